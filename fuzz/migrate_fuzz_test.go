package fuzz

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"collective/kvm"
	"collective/kvm/boot"
	"collective/kvm/guestmem"
	"collective/machine"
	"collective/migrate"
)

const migMem = 16 << 20

// migSource is a fake migration source over fake memory.
type migSource struct{ mem *guestmem.Memory }

func (s *migSource) Memory() *guestmem.Memory        { return s.mem }
func (s *migSource) SetDirtyLogging(int, bool) error { return nil }
func (s *migSource) DirtyLog(i int) ([]uint64, error) {
	return make([]uint64, (s.mem.Regions()[i].Size()/4096+63)/64), nil
}
func (s *migSource) Pause()    {}
func (s *migSource) Resume()   {}
func (s *migSource) CPUs() int { return 1 }
func (s *migSource) SaveState() (*machine.MachineState, error) {
	return &machine.MachineState{Version: machine.StateVersion, MemSize: migMem, CPUs: 1,
		VCPUs: []*kvm.VCPUState{{ID: 0}}, VM: &kvm.VMState{}}, nil
}

// migTarget is a fake target; it checks that nothing runs unrestored.
type migTarget struct {
	mem               *guestmem.Memory
	restored, resumed bool
	closed            bool
}

func (t *migTarget) Memory() *guestmem.Memory { return t.mem }
func (t *migTarget) RestoreState(st *machine.MachineState) error {
	if err := st.Validate(); err != nil {
		return err
	}
	t.restored = true
	return nil
}
func (t *migTarget) Resume() error { t.resumed = true; return nil }
func (t *migTarget) Close() error  { t.closed = true; return nil }

// recorder records what is written to a connection.
type recorder struct {
	net.Conn
	mu  sync.Mutex
	buf bytes.Buffer
}

func (r *recorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	r.buf.Write(p)
	r.mu.Unlock()
	return r.Conn.Write(p)
}

// migrationSeeds records the source's side of real migrations between
// fake machines: plain pages, lz4 pages, a zero frame.
func migrationSeeds(f *testing.F) [][]byte {
	var out [][]byte
	for _, compress := range []string{"never", "always"} {
		mem, err := guestmem.NewFake(boot.RAMLayout(migMem)...)
		if err != nil {
			f.Fatal(err)
		}
		for i := 0; i < 20; i++ {
			mem.WriteAt(bytes.Repeat([]byte{byte(i + 1), byte(i * 7)}, 700+i*100), uint64(i)*0x11000+0x100000)
		}
		a, b := net.Pipe()
		rec := &recorder{Conn: a}
		done := make(chan error, 1)
		go func() {
			_, err := migrate.Receive(context.Background(), b, migrate.ReceiveOptions{Build: migBuild(nil)})
			b.Close()
			done <- err
		}()
		src := &migSource{mem: mem}
		// A page zeroed after round 0 gives a zero frame in the last round.
		hook := func(phase string) error {
			if phase == "paused" {
				mem.WriteAt(make([]byte, 4096), 0x100000)
			}
			return nil
		}
		if _, err := migrate.Send(context.Background(), src, rec, nil, migrate.Options{Compress: compress, Hook: hook, ReplyTimeout: 5 * time.Second}); err != nil {
			f.Fatal(err)
		}
		if err := <-done; err != nil {
			f.Fatal(err)
		}
		out = append(out, rec.buf.Bytes())
	}
	return out
}

func migBuild(got **migTarget) func(uint64, int) (migrate.Target, error) {
	return func(size uint64, cpus int) (migrate.Target, error) {
		if size > 64<<20 {
			return nil, errors.New("fuzz: memory size over 64 MiB refused")
		}
		mem, err := guestmem.NewFake(boot.RAMLayout(size)...)
		if err != nil {
			return nil, err
		}
		t := &migTarget{mem: mem}
		if got != nil {
			*got = t
		}
		return t, nil
	}
}

// fixCRCs rewrites every frame's CRC, so that mutations reach the payload
// decoders instead of stopping at the checksum.
func fixCRCs(data []byte) {
	tab := crc32.MakeTable(crc32.Castagnoli)
	for off := 0; off+8 <= len(data); {
		n := int(binary.LittleEndian.Uint32(data[off+4:]))
		if n > migrate.MaxPayload || off+8+n+4 > len(data) {
			return
		}
		binary.LittleEndian.PutUint32(data[off+8+n:], crc32.Checksum(data[off:off+8+n], tab))
		off += 8 + n + 4
	}
}

// streamConn feeds a fixed stream and discards what is written.
type streamConn struct {
	io.Reader
}

func (streamConn) Write(p []byte) (int, error) { return len(p), nil }

// checkReceived checks Receive's invariants: an error leaves no machine
// running and the built one closed; a success ran only a restored
// machine.
func checkReceived(t *testing.T, in *migrate.Incoming, err error, tgt *migTarget) {
	t.Helper()
	if err != nil {
		if in != nil {
			t.Fatal("error with a result")
		}
		if tgt != nil && (tgt.resumed || !tgt.closed) {
			t.Fatalf("failed migration: target resumed %v closed %v", tgt.resumed, tgt.closed)
		}
		return
	}
	if tgt == nil || !tgt.restored || !tgt.resumed {
		t.Fatalf("success without a restored, resumed machine")
	}
}

// FuzzMigrationStream feeds arbitrary bytes to a migration target as the
// incoming stream (byte 0 selects whether frame CRCs are fixed up first).
// Invariants: no panic; an error leaves no machine running and the built
// one closed; a success ran only a restored machine.
func FuzzMigrationStream(f *testing.F) {
	for _, s := range migrationSeeds(f) {
		f.Add(append([]byte{0}, s...))
		f.Add(append([]byte{1}, s...))
	}
	f.Add([]byte{1})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		stream := append([]byte(nil), data[1:]...)
		if data[0]&1 == 1 {
			fixCRCs(stream)
		}
		var tgt *migTarget
		in, err := migrate.Receive(context.Background(), streamConn{bytes.NewReader(stream)}, migrate.ReceiveOptions{Build: migBuild(&tgt)})
		checkReceived(t, in, err, tgt)
	})
}

// readRecorder records what is read from a connection.
type readRecorder struct {
	net.Conn
	mu  sync.Mutex
	buf bytes.Buffer
}

func (r *readRecorder) Read(p []byte) (int, error) {
	n, err := r.Conn.Read(p)
	r.mu.Lock()
	r.buf.Write(p[:n])
	r.mu.Unlock()
	return n, err
}

func (r *readRecorder) bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.buf.Bytes())
}

// fuzzToken replaces the random stream token of recorded streams, so that
// a saved input matches the first stream recorded in another run.
var fuzzToken = [16]byte{'c', 'o', 'l', 'l', 'e', 'c', 't', 'i', 'v', 'e', ' ', 'f', 'u', 'z', 'z', '!'}

// setToken replaces every occurrence of old in b by fuzzToken (the hello's
// and the stream frame's copies) and fixes the frames' CRCs.
func setToken(b []byte, old []byte) []byte {
	b = bytes.ReplaceAll(b, old, fuzzToken[:])
	fixCRCs(b)
	return b
}

// streamSeeds records real two-stream migrations between fake machines
// over loopback TCP (plain pages, lz4 pages), as the target read them:
// each one's first connection and its extra one, with the token made
// fuzzToken.
func streamSeeds(f testing.TB) (firsts, extras [][]byte) {
	for _, compress := range []string{"never", "always"} {
		mem, err := guestmem.NewFake(boot.RAMLayout(migMem)...)
		if err != nil {
			f.Fatal(err)
		}
		for i := 0; i < 40; i++ {
			mem.WriteAt(bytes.Repeat([]byte{byte(i + 1), byte(i * 7)}, 700+i*100), uint64(i)*0x41000+0x100000)
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			f.Fatal(err)
		}
		var main, extra *readRecorder
		done := make(chan error, 1)
		go func() {
			c, err := l.Accept()
			if err != nil {
				done <- err
				return
			}
			main = &readRecorder{Conn: c}
			_, err = migrate.Receive(context.Background(), main, migrate.ReceiveOptions{Build: migBuild(nil), Accept: func() (net.Conn, error) {
				c, err := l.Accept()
				if err != nil {
					return nil, err
				}
				extra = &readRecorder{Conn: c}
				return extra, nil
			}})
			c.Close()
			done <- err
		}()
		rep, err := migrate.Migrate(context.Background(), &migSource{mem: mem}, l.Addr().String(), migrate.Options{Compress: compress, Streams: 2, ReplyTimeout: 5 * time.Second})
		if err != nil {
			f.Fatal(err)
		}
		if err := <-done; err != nil {
			f.Fatal(err)
		}
		l.Close()
		if rep.Streams != 2 || extra == nil {
			f.Fatalf("the seed migration ran on %d streams", rep.Streams)
		}
		x := extra.bytes()
		// The stream frame: header, then the token.
		if len(x) < 8+16 {
			f.Fatalf("extra stream of %d bytes", len(x))
		}
		token := bytes.Clone(x[8 : 8+16])
		firsts = append(firsts, setToken(main.bytes(), token))
		extras = append(extras, setToken(x, token))
	}
	return firsts, extras
}

// fuzzConn is a net.Conn that reads a fixed stream and discards what is
// written.
type fuzzConn struct{ io.Reader }

func (fuzzConn) Write(p []byte) (int, error)      { return len(p), nil }
func (fuzzConn) Close() error                     { return nil }
func (fuzzConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (fuzzConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (fuzzConn) SetDeadline(time.Time) error      { return nil }
func (fuzzConn) SetReadDeadline(time.Time) error  { return nil }
func (fuzzConn) SetWriteDeadline(time.Time) error { return nil }

// FuzzMigrationExtraStream feeds arbitrary bytes to a migration target as
// the extra stream of a recorded two-stream migration (protocol 1.3),
// whose first stream is replayed as it was (byte 0: bit 0 fixes the frame
// CRCs up first, bit 1 picks the recorded migration). Invariants: no panic and no hang (a stream
// that ends, stalls at a round or runs past the end fails the target);
// an error leaves no machine running and the built one closed; a success
// ran only a restored machine.
func FuzzMigrationExtraStream(f *testing.F) {
	firsts, extras := streamSeeds(f)
	for i, x := range extras {
		f.Add(append([]byte{byte(i << 1)}, x...))
		f.Add(append([]byte{byte(i<<1 | 1)}, x...))
	}
	f.Add([]byte{1})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		first := firsts[int(data[0]>>1)%len(firsts)]
		extra := append([]byte(nil), data[1:]...)
		if data[0]&1 == 1 {
			fixCRCs(extra)
		}
		var tgt *migTarget
		accepted := false
		accept := func() (net.Conn, error) {
			if accepted {
				return nil, errors.New("fuzz: one extra stream only")
			}
			accepted = true
			return fuzzConn{bytes.NewReader(extra)}, nil
		}
		in, err := migrate.Receive(context.Background(), streamConn{bytes.NewReader(first)}, migrate.ReceiveOptions{Build: migBuild(&tgt), Accept: accept})
		checkReceived(t, in, err, tgt)
	})
}

// TestExtraStreamSeedReplays checks that FuzzMigrationExtraStream's seeds
// are whole migrations: replayed, each restores and resumes the target,
// so that the fuzzer starts from inputs that reach every step.
func TestExtraStreamSeedReplays(t *testing.T) {
	firsts, extras := streamSeeds(t)
	for i, x := range extras {
		first := firsts[i]
		var tgt *migTarget
		accepted := false
		_, err := migrate.Receive(context.Background(), streamConn{bytes.NewReader(first)}, migrate.ReceiveOptions{Build: migBuild(&tgt), Accept: func() (net.Conn, error) {
			if accepted {
				return nil, errors.New("one extra stream only")
			}
			accepted = true
			return fuzzConn{bytes.NewReader(x)}, nil
		}})
		if err != nil || tgt == nil || !tgt.resumed {
			t.Errorf("seed %d: %v", i, err)
		}
	}
}

// TestExtraStreamRoundAfterEnd: an extra stream that ends one more round
// than the first stream does (a hostile source) fails the target instead
// of leaving it waiting at that round forever.
func TestExtraStreamRoundAfterEnd(t *testing.T) {
	firsts, extras := streamSeeds(t)
	x := extras[0]
	// Count its round frames; its last frame is the end frame (12 bytes).
	rounds := 0
	for off := 0; off+8 <= len(x); {
		n := int(binary.LittleEndian.Uint32(x[off+4:]))
		if x[off] == 7 {
			rounds++
		}
		off += 8 + n + 4
	}
	if len(x) < 12 || x[len(x)-12] != 9 {
		t.Fatalf("the extra stream does not end with an end frame")
	}
	round := make([]byte, 8+16+4)
	round[0], round[4] = 7, 16
	binary.LittleEndian.PutUint32(round[8:], uint32(rounds))
	bad := append(append(bytes.Clone(x[:len(x)-12]), round...), x[len(x)-12:]...)
	fixCRCs(bad)
	done := make(chan error, 1)
	var tgt *migTarget
	go func() {
		_, err := migrate.Receive(context.Background(), streamConn{bytes.NewReader(firsts[0])}, migrate.ReceiveOptions{Build: migBuild(&tgt), Accept: func() (net.Conn, error) {
			return fuzzConn{bytes.NewReader(bad)}, nil
		}})
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || tgt.resumed || !tgt.closed {
			t.Fatalf("Receive = %v, target resumed %v closed %v", err, tgt.resumed, tgt.closed)
		}
		t.Log(err)
	case <-time.After(10 * time.Second):
		t.Fatal("the target hangs on a round after the end")
	}
}
