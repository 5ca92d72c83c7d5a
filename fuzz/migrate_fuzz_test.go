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
	})
}
