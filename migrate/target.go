package migrate

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"sync"
	"time"

	"github.com/pierrec/lz4/v4"

	"collective/guest"
	"collective/kvm/guestmem"
	"collective/machine"
)

// Target is the machine a migration fills: built bare from the hello,
// its RAM written frame by frame, its state restored at the end, run on
// commit, or closed (discarded) on any failure.
type Target interface {
	Memory() *guestmem.Memory
	RestoreState(*machine.MachineState) error
	// Resume starts the machine's vCPUs.
	Resume() error
	// Close discards the machine (before Resume) or releases it.
	Close() error
}

// ReceiveOptions tune Receive.
type ReceiveOptions struct {
	// Build makes the target machine for the announced memory size and
	// vCPU count. Its memory's regions must match the source's.
	Build func(memSize uint64, cpus int) (Target, error)
	// Cache, when set, holds pages the target announces by hash.
	Cache *Cache
	// Bases finds the source's copy-on-write bases on this host by hash
	// and stores those the source sends (protocol 1.1).
	Bases *Bases
	// OnBases, when set, is told before Build the local path of each
	// disk's base ("" for a raw disk): Build opens the disks over them.
	OnBases func(paths []string)
	// IdleTimeout bounds the silence between frames (default 30 s), and
	// the wait for the commit after ready.
	IdleTimeout time.Duration
	// Progress, when set, is told each finished round.
	Progress func(round int, bytes int64)
	// Accept, when set, takes the source's extra connections for
	// parallel streams (protocol 1.3) from the listener the first came
	// from; without it the target takes one stream only. It should fail
	// after a timeout (collective run --incoming: 10 s): a source that
	// asks for streams and never opens them would hold it otherwise.
	Accept func() (net.Conn, error)
}

// Incoming is a received, resumed machine.
type Incoming struct {
	Target Target
	Stats  ReceiveStats
}

// ReceiveStats are the target's figures.
type ReceiveStats struct {
	Bytes      int64
	Rounds     int
	Pages      int64 // pages written with their content
	ZeroPages  int64 // pages cleared by zero frames
	HashPages  int64 // pages copied from the cache
	DiskBlocks int64 // disk blocks written
	BaseBytes  int64 // bytes of bases received
	RestoreDur time.Duration
	GuestGap   time.Duration // 0 when the guest has no heartbeat
}

// deadliner is the part of net.Conn that Receive uses when it is there.
type deadliner interface {
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// Receive reads a migration stream from conn into a machine made by
// opts.Build, restores its state, and on the source's commit resumes it
// and acknowledges. On any error the partial machine is closed (nothing
// half-received ever runs), an error frame is sent to the source when the
// connection still works, and the error is returned.
//
// The stream is untrusted: every frame's CRC is checked before its
// payload is read, every length and address is bounded, and allocation
// does not depend on the stream beyond the machine Build makes (which
// the caller bounds).
func Receive(ctx context.Context, conn io.ReadWriter, opts ReceiveOptions) (*Incoming, error) {
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = 30 * time.Second
	}
	r := &receiver{conn: conn, opts: opts, fr: newFrameReader(conn), fw: newFrameWriter(conn, 0)}
	r.dl, _ = conn.(deadliner)
	if c, ok := conn.(io.Closer); ok {
		stop := context.AfterFunc(ctx, func() { c.Close() })
		defer stop()
	}
	in, err := r.run(ctx)
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("migrate: incoming migration cancelled: %w", err)
		}
		var re *RemoteError
		if !errors.As(err, &re) {
			if r.dl != nil {
				r.dl.SetWriteDeadline(time.Now().Add(time.Second))
			}
			msg := err.Error()
			if len(msg) > MaxErrorText {
				msg = msg[:MaxErrorText]
			}
			r.fw.send(frameError, []byte(msg))
			r.fw.flush()
		}
		r.stopStreams()
		if r.t != nil && !r.resumed {
			r.t.Close()
		}
		return nil, err
	}
	r.stopStreams()
	return in, nil
}

type receiver struct {
	conn    io.ReadWriter
	dl      deadliner
	opts    ReceiveOptions
	fr      *frameReader
	fw      *frameWriter
	t       Target
	mem     *guestmem.Memory
	resumed bool
	stats   ReceiveStats
	info    targetInfo // the stop-phase steps, for the info frame
	// binaryState: the welcome asked for the binary state encoding.
	binaryState bool
	plain       []byte
	dsts        [][]byte // directPages' destinations

	disks     []DiskInfo
	basePaths []string
	tdisks    []machine.Disk

	// Parallel streams (streams.go): the extra ones, the channel closed
	// to stop their loops, and the loops.
	streams  []*inStream
	quit     chan struct{}
	streamWG sync.WaitGroup
	streamMu sync.Mutex // guards streamErr
	// streamErr is the first extra stream's failure (streamFailed).
	streamErr error
}

func (r *receiver) next() (frame, error) {
	if r.dl != nil {
		r.dl.SetReadDeadline(time.Now().Add(r.opts.IdleTimeout))
	}
	// After the deadline is set: a stream failing later cuts the read
	// short (streamFailed).
	if err := r.streamFailure(); err != nil {
		return frame{}, err
	}
	f, err := r.fr.next()
	if err != nil {
		return f, r.readErr(err)
	}
	if f.typ == frameError {
		return f, &RemoteError{string(f.payload[:min(len(f.payload), MaxErrorText)])}
	}
	return f, nil
}

func (r *receiver) readErr(err error) error {
	if serr := r.streamFailure(); serr != nil {
		return serr // the cause of the cut read
	}
	if err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("migrate: the source closed the connection at byte %d: %w", r.fr.off, err)
	}
	var pe *ProtocolError
	if errors.As(err, &pe) {
		return err
	}
	return fmt.Errorf("migrate: reading from the source: %w", err)
}

// directPages reads the next frame when it is a pages frame of plain
// pages that all lie in guest memory: straight into that memory, without
// the copy through the frame buffer (a tenth of a target's CPU for a
// round 0 of dense pages). It reports whether it read one; any other
// frame, or one that fails these checks, is left to next.
func (r *receiver) directPages() (bool, error) {
	if r.dl != nil {
		r.dl.SetReadDeadline(time.Now().Add(r.opts.IdleTimeout))
	}
	if err := r.streamFailure(); err != nil {
		return false, err
	}
	c, ok, err := r.fr.peekPlainPages()
	if err != nil {
		return false, r.readErr(err)
	}
	if !ok {
		return false, nil
	}
	r.dsts = r.dsts[:0]
	pageRuns(c.mask, func(first, n int) bool {
		p, err := r.mem.Slice(c.gpa+uint64(first)*pageSize, uint64(n)*pageSize)
		if err != nil {
			ok = false
			return false
		}
		r.dsts = append(r.dsts, p)
		return true
	})
	if !ok {
		return false, nil // pages() reports the page outside memory
	}
	if err := r.fr.readPlainPages(c, r.dsts); err != nil {
		return false, r.readErr(err)
	}
	r.stats.Pages += int64(bits.OnesCount64(c.mask))
	return true, nil
}

func (r *receiver) run(ctx context.Context) (*Incoming, error) {
	f, err := r.next()
	if err != nil {
		return nil, err
	}
	h, err := parseHello(f)
	if err != nil {
		return nil, err
	}
	if r.opts.Build == nil {
		return nil, errors.New("migrate: no machine builder")
	}
	// Protocol 1.1: the disks, and which bases this host lacks.
	var need []uint32
	if h.minor >= 1 {
		if need, err = r.receiveDisks(); err != nil {
			return nil, err
		}
	}
	// Welcome, then the hashes of the pages we hold.
	w := make([]byte, 16)
	binary.LittleEndian.PutUint16(w[0:], ProtoMajor)
	binary.LittleEndian.PutUint16(w[2:], ProtoMinor)
	var wflags uint32
	if fp, ok := stateFingerprint(); ok && h.flags&helloStateFP != 0 && h.stateFP == fp {
		wflags |= welcomeBinaryState
		r.binaryState = true
	}
	if h.flags&helloStreams != 0 && r.opts.Accept != nil {
		wflags |= welcomeStreams | h.streams<<16
	}
	binary.LittleEndian.PutUint32(w[4:], wflags)
	if h.minor >= 1 && len(need) > 0 {
		w = binary.LittleEndian.AppendUint32(w, uint32(len(need)))
		for _, i := range need {
			w = binary.LittleEndian.AppendUint32(w, i)
		}
	}
	var hashes [][hashSize]byte
	if r.opts.Cache != nil {
		hashes = r.opts.Cache.hashList()
	}
	binary.LittleEndian.PutUint64(w[8:], uint64(len(hashes)))
	if err := r.fw.send(frameWelcome, w); err != nil {
		return nil, fmt.Errorf("migrate: sending welcome: %w", err)
	}
	for len(hashes) > 0 {
		n := min(len(hashes), maxHashesPerFrame)
		b := make([]byte, 0, n*hashSize)
		for _, x := range hashes[:n] {
			b = append(b, x[:]...)
		}
		if err := r.fw.send(frameHashes, b); err != nil {
			return nil, fmt.Errorf("migrate: sending hashes: %w", err)
		}
		hashes = hashes[n:]
	}
	if err := r.fw.flush(); err != nil {
		return nil, fmt.Errorf("migrate: sending welcome: %w", err)
	}
	if wflags&welcomeStreams != 0 {
		if err := r.acceptStreams(h.streams, h.token); err != nil {
			return nil, err
		}
	}
	r.plain = make([]byte, chunkBytes)
	if err := r.receiveBases(need); err != nil {
		return nil, err
	}
	if r.opts.OnBases != nil && r.basePaths != nil {
		r.opts.OnBases(r.basePaths)
	}
	t, err := r.opts.Build(h.memSize, int(h.cpus))
	if err != nil {
		return nil, fmt.Errorf("migrate: building a %d MiB, %d vCPU machine: %w", h.memSize>>20, h.cpus, err)
	}
	r.t, r.mem = t, t.Memory()
	regs := r.mem.Regions()
	if len(regs) != len(h.regions) {
		return nil, fmt.Errorf("migrate: the source has %d memory regions, this machine %d", len(h.regions), len(regs))
	}
	for i, g := range regs {
		if g.GPA != h.regions[i].gpa || g.Size() != h.regions[i].size {
			return nil, fmt.Errorf("migrate: memory region %d: source %#x+%#x, target %#x+%#x", i, h.regions[i].gpa, h.regions[i].size, g.GPA, g.Size())
		}
	}
	if h.minor >= 1 {
		if err := r.checkTargetDisks(); err != nil {
			return nil, err
		}
	}

	r.startStreams()
	var st *machine.MachineState
	round := 0
	for {
		f, err := r.nextOther()
		if err != nil {
			return nil, err
		}
		switch f.typ {
		case frameDiskBlock:
			err = r.diskBlock(f)
		case frameRound:
			if err := checkRound(f, round, ""); err != nil {
				return nil, err
			}
			// Every stream's part of the round is applied first.
			if err := r.roundBarrier(round); err != nil {
				return nil, err
			}
			// Acknowledged once applied: the source pauses only when the
			// target has caught up, so no backlog hides in the downtime.
			if err := r.fw.send(frameRoundAck, f.payload[:4]); err == nil {
				err = r.fw.flush()
			}
			r.releaseStreams()
			round++
			r.stats.Rounds = round
			if r.opts.Progress != nil {
				r.opts.Progress(round, r.fr.off)
			}
		case frameState:
			if st != nil {
				return nil, &ProtocolError{f.off, "a second state frame"}
			}
			t0 := time.Now()
			if len(f.payload) >= 1 && f.payload[0] == encBinary {
				if !r.binaryState {
					return nil, &ProtocolError{f.off, "state frame: binary encoding not asked for"}
				}
				if st, err = decodeStateBinary(f.payload[1:]); err != nil {
					return nil, &ProtocolError{f.off, fmt.Sprintf("state: %v", err)}
				}
			} else {
				sb, err := decodeState(f, r.plain)
				if err != nil {
					return nil, err
				}
				st = new(machine.MachineState)
				dec := json.NewDecoder(bytes.NewReader(sb))
				dec.DisallowUnknownFields()
				if err := dec.Decode(st); err != nil {
					return nil, &ProtocolError{f.off, fmt.Sprintf("state: %v", err)}
				}
				if dec.More() {
					return nil, &ProtocolError{f.off, "state: data after the object"}
				}
			}
			if err := st.Validate(); err != nil {
				return nil, fmt.Errorf("migrate: the source's machine state: %w", err)
			}
			if st.MemSize != h.memSize || st.CPUs != int(h.cpus) {
				return nil, &ProtocolError{f.off, fmt.Sprintf("state for %d bytes, %d vCPUs; hello said %d, %d", st.MemSize, st.CPUs, h.memSize, h.cpus)}
			}
			r.info.DecodeNS = int64(time.Since(t0))
		case frameEnd:
			if st == nil {
				return nil, &ProtocolError{f.off, "end before the state"}
			}
			if err := r.endStreams(); err != nil {
				return nil, err
			}
			return r.finish(ctx, st)
		default:
			return nil, &ProtocolError{f.off, "unexpected " + frameName(f.typ) + " frame"}
		}
		if err != nil {
			return nil, err
		}
	}
}

// nextOther applies the page frames (pages, zero, hashref) as they come
// and returns the first frame of another type.
func (r *receiver) nextOther() (frame, error) {
	for {
		if done, err := r.directPages(); err != nil {
			return frame{}, err
		} else if done {
			continue
		}
		f, err := r.next()
		if err != nil {
			return f, err
		}
		switch f.typ {
		case framePages:
			err = r.pages(f)
		case frameZero:
			err = r.zero(f)
		case frameHashRef:
			err = r.hashRef(f)
		default:
			return f, nil
		}
		if err != nil {
			return f, err
		}
	}
}

// checkRound checks that the round frame f ends round (where says on
// which stream, when not the first).
func checkRound(f frame, round int, where string) error {
	if len(f.payload) != 16 || binary.LittleEndian.Uint32(f.payload) != uint32(round) {
		return &ProtocolError{f.off, fmt.Sprintf("round frame out of sequence%s (want round %d)", where, round)}
	}
	return nil
}

// finish restores the state, reports ready, and resumes on commit.
func (r *receiver) finish(ctx context.Context, st *machine.MachineState) (*Incoming, error) {
	t0 := time.Now()
	// The heartbeat as it was when the source paused.
	hb0, hbOK := readHeartbeat(r.mem)
	if k, ok := r.t.(TSCKHzer); ok && hbOK && hb0.tscKHz == 0 {
		hb0.tscKHz = k.TSCKHz()
	}
	hbOK = hbOK && hb0.tscKHz != 0
	if err := r.syncDisks(); err != nil {
		return nil, err
	}
	t1 := time.Now()
	r.info.SyncNS = int64(t1.Sub(t0))
	if err := r.t.RestoreState(st); err != nil {
		return nil, fmt.Errorf("migrate: restoring the machine state: %w", err)
	}
	r.stats.RestoreDur = time.Since(t0)
	r.info.RestoreNS = int64(time.Since(t1))
	if err := r.fw.send(frameReady, nil); err != nil {
		return nil, fmt.Errorf("migrate: sending ready: %w", err)
	}
	if err := r.fw.flush(); err != nil {
		return nil, fmt.Errorf("migrate: sending ready: %w", err)
	}
	f, err := r.next()
	if err != nil {
		return nil, fmt.Errorf("migrate: waiting for the commit (the machine is discarded, the source keeps it): %w", err)
	}
	if f.typ != frameCommit {
		return nil, &ProtocolError{f.off, "expected commit, got " + frameName(f.typ)}
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	c0 := time.Now()
	if err := r.t.Resume(); err != nil {
		return nil, fmt.Errorf("migrate: resuming: %w", err)
	}
	r.resumed = true
	// The acknowledgement: commit-to-resume nanoseconds, and (1.3) the
	// wall clock at the resume, which gives the source the exact downtime
	// when both share a clock.
	var b [16]byte
	now := time.Now()
	r.info.ResumeNS = int64(now.Sub(c0))
	binary.LittleEndian.PutUint64(b[:], uint64(r.info.ResumeNS))
	binary.LittleEndian.PutUint64(b[8:], uint64(now.UnixNano()))
	// From here the machine runs here: a lost acknowledgement leaves the
	// source in doubt (paused), never running too.
	if r.dl != nil {
		r.dl.SetWriteDeadline(time.Now().Add(5 * time.Second))
	}
	r.fw.send(frameResumed, b[:])
	r.fw.flush()
	r.stats.Bytes += r.fr.off // the extra streams' were added by endStreams
	info := r.info
	if hbOK {
		if gap, ok := heartbeatGap(r.mem, hb0, 2*time.Second); ok {
			info.FirstBeatNS = int64(time.Since(c0))
			r.stats.GuestGap = gap
			info.GuestGapNS = int64(gap)
		}
		info.GuestMode = map[uint64]string{1: "dirty", 2: "spin"}[hb0.mode]
	}
	ib, _ := json.Marshal(info)
	r.fw.send(frameInfo, ib)
	r.fw.flush()
	return &Incoming{Target: r.t, Stats: r.stats}, nil
}

// pageSlice returns the host bytes of the guest page at gpa, for writing.
func (r *receiver) pageSlice(f frame, gpa uint64) ([]byte, error) {
	p, err := r.mem.Slice(gpa, pageSize)
	if err != nil {
		return nil, &ProtocolError{f.off, fmt.Sprintf("%s frame: page %#x outside guest memory", frameName(f.typ), gpa)}
	}
	return p, nil
}

func (r *receiver) pages(f frame) error {
	c, rest, err := parseChunkHeader(f)
	if err != nil {
		return err
	}
	if len(rest) < 1 {
		return &ProtocolError{f.off, "pages frame without an encoding"}
	}
	n := bits.OnesCount64(c.mask) * pageSize
	data := rest[1:]
	switch rest[0] {
	case encPlain:
		if len(data) != n {
			return &ProtocolError{f.off, fmt.Sprintf("pages frame: %d bytes for %d pages", len(data), n/pageSize)}
		}
	case encLZ4:
		m, err := lz4.UncompressBlock(data, r.plain[:n])
		if err != nil || m != n {
			return &ProtocolError{f.off, fmt.Sprintf("pages frame: lz4 block decodes to %d bytes (%v), want %d", m, err, n)}
		}
		data = r.plain[:n]
	default:
		return &ProtocolError{f.off, fmt.Sprintf("pages frame: encoding %d", rest[0])}
	}
	for m, k := c.mask, 0; m != 0; m &= m - 1 {
		gpa := c.gpa + uint64(bits.TrailingZeros64(m))*pageSize
		p, err := r.pageSlice(f, gpa)
		if err != nil {
			return err
		}
		copy(p, data[k*pageSize:(k+1)*pageSize])
		k++
	}
	r.stats.Pages += int64(bits.OnesCount64(c.mask))
	return nil
}

func (r *receiver) zero(f frame) error {
	c, rest, err := parseChunkHeader(f)
	if err != nil {
		return err
	}
	if len(rest) != 0 {
		return &ProtocolError{f.off, "zero frame with trailing bytes"}
	}
	for m := c.mask; m != 0; m &= m - 1 {
		p, err := r.pageSlice(f, c.gpa+uint64(bits.TrailingZeros64(m))*pageSize)
		if err != nil {
			return err
		}
		clear(p)
	}
	r.stats.ZeroPages += int64(bits.OnesCount64(c.mask))
	return nil
}

func (r *receiver) hashRef(f frame) error {
	c, rest, err := parseChunkHeader(f)
	if err != nil {
		return err
	}
	if len(rest) != bits.OnesCount64(c.mask)*hashSize {
		return &ProtocolError{f.off, fmt.Sprintf("hashref frame: %d bytes of hashes for %d pages", len(rest), bits.OnesCount64(c.mask))}
	}
	for m := c.mask; m != 0; m &= m - 1 {
		gpa := c.gpa + uint64(bits.TrailingZeros64(m))*pageSize
		p, err := r.pageSlice(f, gpa)
		if err != nil {
			return err
		}
		h := [hashSize]byte(rest[:hashSize])
		rest = rest[hashSize:]
		if r.opts.Cache == nil || !r.opts.Cache.copyPage(p, h) {
			return &ProtocolError{f.off, fmt.Sprintf("hashref frame: page %#x by hash %x, which this target never announced", gpa, h)}
		}
	}
	r.stats.HashPages += int64(bits.OnesCount64(c.mask))
	return nil
}

// pageHash is the content hash of a page on the wire and in the cache:
// SHA-256 truncated to 128 bits. It must resist collisions a hostile
// guest crafts, so it is not the snapshot files' own page hash (XXH3, for
// integrity), and LoadCache hashes every cached page again.
func pageHash(dst, page []byte) {
	sum := sha256.Sum256(page)
	copy(dst, sum[:hashSize])
}

// heartbeat is the workload guest's record (guest/README.md).
type heartbeat struct {
	counter, tsc, tscKHz, mode uint64
}

func readHeartbeat(mem *guestmem.Memory) (heartbeat, bool) {
	var b [0x30]byte
	if _, err := mem.ReadAt(b[:], guest.HeartbeatAddr); err != nil {
		return heartbeat{}, false
	}
	if binary.LittleEndian.Uint64(b[:]) != guest.HeartbeatMagic {
		return heartbeat{}, false
	}
	hb := heartbeat{counter: binary.LittleEndian.Uint64(b[8:]), tsc: binary.LittleEndian.Uint64(b[0x10:]),
		tscKHz: binary.LittleEndian.Uint64(b[0x20:]), mode: binary.LittleEndian.Uint64(b[0x28:])}
	return hb, true
}

// TSCKHzer is implemented by targets that know the guest's TSC frequency,
// for guests whose heartbeat does not carry it (spin mode).
type TSCKHzer interface{ TSCKHz() uint64 }

// heartbeatGap waits (up to limit) for the guest's next heartbeat after
// the resume and returns the TSC distance from the last one before the
// pause. On kvm-pvm the guest reads the host's TSC, and both processes
// run on one host, so the gap is wall time.
func heartbeatGap(mem *guestmem.Memory, hb0 heartbeat, limit time.Duration) (time.Duration, bool) {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		hb, ok := readHeartbeat(mem)
		if ok && hb.counter != hb0.counter && hb.tsc > hb0.tsc {
			// The counter is written last: reread the TSC of this update.
			return time.Duration(float64(hb.tsc-hb0.tsc) / float64(hb0.tscKHz) * 1e6), true
		}
		time.Sleep(20 * time.Microsecond)
	}
	return 0, false
}

// decodeState undoes encodeState into buf (MaxStateSize bytes at most).
func decodeState(f frame, buf []byte) ([]byte, error) {
	p := f.payload
	switch {
	case len(p) >= 1 && p[0] == encPlain:
		return p[1:], nil
	case len(p) >= 5 && p[0] == encLZ4:
		n := binary.LittleEndian.Uint32(p[1:])
		if n > MaxStateSize || int(n) > len(buf) {
			return nil, &ProtocolError{f.off, fmt.Sprintf("state of %d bytes exceeds the limit of %d", n, MaxStateSize)}
		}
		m, err := lz4.UncompressBlock(p[5:], buf[:n])
		if err != nil || m != int(n) {
			return nil, &ProtocolError{f.off, fmt.Sprintf("state: lz4 block decodes to %d bytes (%v), want %d", m, err, n)}
		}
		return buf[:n], nil
	}
	return nil, &ProtocolError{f.off, "state frame: bad encoding"}
}
