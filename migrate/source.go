package migrate

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"collective/internal/lz4block"
	"collective/kvm"
	"collective/kvm/guestmem"
	"collective/machine"
)

// Errors callers branch on.
var (
	// ErrVersion: the peers speak different protocol versions.
	ErrVersion = errors.New("migrate: unsupported protocol version")
	// ErrCanceled: the migration was cancelled before the commit.
	ErrCanceled = errors.New("migrate: cancelled")
	// ErrInDoubt: the commit was sent and no resumed acknowledgement
	// came. The target may be running: the source stays paused.
	ErrInDoubt = errors.New("migrate: outcome in doubt: the commit was sent but the target's acknowledgement never came; " +
		"the source stays paused (resume it only once the target is known not to run)")
)

// Source is what a migration needs of the machine it moves: guest RAM,
// the dirty logs, pause and resume, and its state. machine.Machine
// provides it through MachineSource.
type Source interface {
	Memory() *guestmem.Memory
	// SetDirtyLogging and DirtyLog are KVM's log of vCPU writes for the
	// memory slot backing Memory().Regions()[slot].
	SetDirtyLogging(slot int, on bool) error
	DirtyLog(slot int) ([]uint64, error)
	Pause()
	Resume()
	SaveState() (*machine.MachineState, error)
	CPUs() int
}

// Throttler is implemented by a Source whose vCPUs can be slowed down:
// auto-converge (Options.AutoConverge) needs it.
type Throttler interface {
	// SetThrottle makes the vCPUs sleep pct percent of the time (0: run
	// freely).
	SetThrottle(pct int)
}

type machineSource struct{ m *machine.Machine }

// MachineSource adapts a machine to Source.
func MachineSource(m *machine.Machine) Source { return machineSource{m} }

func (s machineSource) Memory() *guestmem.Memory { return s.m.Memory() }
func (s machineSource) SetDirtyLogging(i int, on bool) error {
	return s.m.VM().SetDirtyLogging(i, on)
}
func (s machineSource) DirtyLog(i int) ([]uint64, error)          { return s.m.VM().DirtyLog(i) }
func (s machineSource) Pause()                                    { s.m.Pause() }
func (s machineSource) Resume()                                   { s.m.Resume() }
func (s machineSource) Disks() []machine.Disk                     { return s.m.Disks() }
func (s machineSource) SaveState() (*machine.MachineState, error) { return s.m.SaveState() }
func (s machineSource) CPUs() int                                 { return s.m.Config().CPUs }
func (s machineSource) SetThrottle(pct int)                       { s.m.VM().SetThrottle(pct) }

// Options tune a migration.
type Options struct {
	// Downtime is the longest stop-and-copy phase the source aims for
	// (default 50 ms).
	Downtime time.Duration
	// MaxRounds stops pre-copy after this many rounds even if it has not
	// converged (default 30).
	MaxRounds int
	// Bandwidth caps the wire rate in bytes per second (0: none).
	Bandwidth float64
	// Compress is "auto" (lz4 when the measured link and compression rates
	// say it pays; the default), "always" or "never".
	Compress string
	// DialTimeout bounds the connection attempt (default 5 s).
	DialTimeout time.Duration
	// ReplyTimeout bounds each wait for the target (welcome, ready,
	// resumed; default 10 s). While waiting for ready the source is paused.
	ReplyTimeout time.Duration
	// AutoConverge throttles the vCPUs when the guest dirties memory
	// faster than the rounds carry it (QEMU's auto-converge, with its
	// defaults): once two rounds in a row saw the guest dirty more than
	// half the bytes they sent, the vCPUs are made to sleep
	// ThrottleInitial percent of the time, and ThrottleStep more after
	// every two such rounds again, up to kvm.MaxThrottle. The throttle is
	// lifted when the migration ends, whatever its outcome. The source
	// must implement Throttler.
	AutoConverge bool
	// Streams is how many TCP connections carry the pages (default 1, at
	// most MaxStreams): each round's chunks are dealt to them in turn,
	// and the target applies them in parallel. A target that does not
	// take parallel streams gets one.
	Streams int
	// Progress, when set, is called after each round and phase change.
	Progress func(Progress)

	// CorruptFrame, when > 0, flips a bit in the payload of that frame
	// (counted from 1): fault injection for tests.
	CorruptFrame int
	// Hook, when set, is called at each phase ("round0", "round", "paused",
	// "committed"); an error it returns aborts the migration as a fault
	// would: fault injection for tests.
	Hook func(phase string) error
}

func (o *Options) defaults() {
	if o.Downtime <= 0 {
		o.Downtime = 50 * time.Millisecond
	}
	if o.MaxRounds <= 0 {
		o.MaxRounds = 30
	}
	if o.Compress == "" {
		o.Compress = "auto"
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 5 * time.Second
	}
	if o.ReplyTimeout <= 0 {
		o.ReplyTimeout = 10 * time.Second
	}
}

// Auto-converge's throttle steps, in percent (QEMU's cpu-throttle-initial
// and cpu-throttle-increment defaults), and its trigger: a round in which
// the guest dirtied more than this share of the bytes sent.
const (
	ThrottleInitial   = 20
	ThrottleStep      = 10
	throttleTriggerPc = 50
)

// throttleUp raises the throttle after a round that sent sent bytes while
// the guest dirtied dirtied bytes, as auto-converge asks.
func (s *sender) throttleUp(sent, dirtied int64) {
	if !s.opts.AutoConverge || s.throttler == nil {
		return
	}
	if dirtied*100 <= sent*throttleTriggerPc {
		s.highRounds = 0
		return
	}
	s.highRounds++
	if s.highRounds < 2 {
		return
	}
	s.highRounds = 0
	pct := ThrottleInitial
	if s.throttle > 0 {
		pct = min(s.throttle+ThrottleStep, kvm.MaxThrottle)
	}
	if pct != s.throttle {
		s.throttle = pct
		s.throttler.SetThrottle(pct)
	}
	s.rep.ThrottlePct = s.throttle
}

// Migrate moves the running machine src to the target listening at addr
// (collective run --incoming ADDR). On success the target runs the
// machine, src is left paused and the caller must stop it without
// resuming. On any error before the commit, src runs on (resumed if the
// migration had paused it) and the target discards what it received. An
// error matching ErrInDoubt leaves src paused: see the package doc. The
// report is filled in either case.
func Migrate(ctx context.Context, src Source, addr string, opts Options) (*Report, error) {
	opts.defaults()
	rep := &Report{To: addr, MemBytes: src.Memory().Size()}
	if opts.Progress != nil {
		opts.Progress(Progress{Phase: "connecting"})
	}
	d := net.Dialer{Timeout: opts.DialTimeout}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		err = fmt.Errorf("migrate: target %s unreachable: %w", addr, err)
		rep.Error = err.Error()
		return rep, err
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
		tc.SetWriteBuffer(4 << 20)
	}
	return Send(ctx, src, conn, rep, opts)
}

// Send migrates src over an established connection; Migrate dials it.
// conn is closed on return.
func Send(ctx context.Context, src Source, conn net.Conn, rep *Report, opts Options) (*Report, error) {
	opts.defaults()
	if rep == nil {
		rep = &Report{To: conn.RemoteAddr().String(), MemBytes: src.Memory().Size()}
	}
	s := &sender{src: src, mem: src.Memory(), conn: conn, opts: opts, rep: rep, start: time.Now(),
		replies: make(chan frame, 8), peerErr: make(chan error, 1)}
	s.regs = s.mem.Regions()
	s.acked = -1
	if opts.AutoConverge {
		t, ok := src.(Throttler)
		if !ok {
			err := errors.New("migrate: auto-converge: this source cannot throttle its vCPUs")
			conn.Close()
			rep.Error = err.Error()
			return rep, err
		}
		s.throttler = t
	}
	s.decideEvery = decideEarly
	s.bufs = make(chan []byte, 4*runtime.GOMAXPROCS(0)+8)
	s.taken = make([][]uint64, len(s.regs))
	for i, r := range s.regs {
		s.taken[i] = make([]uint64, (r.Size()/pageSize+63)/64)
	}
	// Cancellation (or any return) closes the connection, which unblocks
	// every read and write.
	stop := context.AfterFunc(ctx, func() {
		conn.Close()
		s.cutStreams()
	})
	err := s.run(ctx)
	stop()
	conn.Close()
	s.closeStreams()
	if s.throttle > 0 {
		// Lifted before a failed migration's resume: the guest runs on
		// at full speed.
		s.throttler.SetThrottle(0)
	}
	if err != nil {
		if ctx.Err() != nil && !errors.Is(err, ErrInDoubt) {
			err = fmt.Errorf("%w: %w", ErrCanceled, err)
		}
		if s.paused && !s.committed {
			s.src.Resume()
			s.paused = false
		}
		s.giveBack()
		s.giveBackDisks()
		rep.OK = false
		rep.Error = err.Error()
		rep.InDoubt = errors.Is(err, ErrInDoubt)
		if s.opts.Progress != nil {
			s.opts.Progress(Progress{Phase: "failed", Round: rep.Rounds, SentBytes: s.wireBytes()})
		}
	}
	rep.BytesWire = s.wireBytes()
	rep.TotalMS = ms(time.Since(s.start))
	if s.ackAt != (time.Time{}) {
		rep.TotalMS = ms(s.ackAt.Sub(s.start))
	}
	rep.RateMBps = s.rate / 1e6
	return rep, err
}

type sender struct {
	src  Source
	mem  *guestmem.Memory
	regs []*guestmem.Region
	conn net.Conn
	fw   *frameWriter
	fr   *frameReader
	opts Options
	rep  *Report

	start  time.Time
	ackAt  time.Time
	paused bool
	// committed: the commit frame was (being) written; the source must not
	// resume any more.
	committed bool

	// taken is the union of the dirty bits taken from both logs, given
	// back to guestmem's log if the migration fails, so that an
	// incremental snapshot after it misses nothing.
	taken [][]uint64

	hashes map[[hashSize]byte]struct{}
	// binaryState: the target asked for the state in the binary encoding.
	binaryState bool
	// enc[0] encodes small rounds in the sender's goroutine; enc[i]
	// serves worker i. They and the frame buffers in bufs live for the
	// whole migration: buffers allocated afresh each round (or handed
	// back to the heap by the GC) cost a page fault per 4 KiB each
	// time, a tenth of a round 0's CPU.
	enc  []*encoder
	bufs chan []byte
	// stateSaved: when the stop phase's state read ended.
	stateSaved time.Time
	// acked is the last round the target acknowledged (-1: none).
	acked int
	// granted is how many streams the target takes (0 or 1: one).
	granted int

	// disks are the source's disks (protocol 1.1); need the disks whose
	// base the target asked for.
	disks []*srcDisk
	need  []uint32

	replies chan frame
	peerErr chan error

	// Parallel streams beyond the first connection (streams.go), their
	// writers, and the bytes they wrote.
	streams     []*outStream
	streamWG    sync.WaitGroup
	streamBytes atomic.Int64
	// streamMu guards conns (every extra stream's connection, for a
	// cancel to close) and cut (a cancel came).
	streamMu sync.Mutex
	conns    []net.Conn
	cut      bool

	// Auto-converge: the source's throttle, the one set (percent), and
	// the rounds in a row that dirtied faster than they sent.
	throttler  Throttler
	throttle   int
	highRounds int

	// Transfer rate of page bytes (per second), measured per round.
	rate float64
	// Compression decision and its measurements; encoders is how many
	// goroutines encode (and compress) the current round's chunks.
	useLZ4                  atomic.Bool
	lzDecided               bool // decideCompression has measured the link
	decideEvery             int  // chunks between decisions until then
	lzIn, lzOut, lzNanos    atomic.Int64
	encoders                int
	busyNanos, busyBytes    int64
	mu                      sync.Mutex // guards the report's counters from workers
	full, compressed, zeros int64
	hashHits                int64
}

func (s *sender) wireBytes() int64 {
	if s.fw == nil {
		return 0
	}
	return s.fw.bytes + s.streamBytes.Load()
}

func (s *sender) progress(phase string, round int, dirtyRate float64, dirtyBytes int64) {
	if s.opts.Progress == nil {
		return
	}
	s.opts.Progress(Progress{Phase: phase, Round: round, SentBytes: s.wireBytes(), DirtyRate: dirtyRate,
		DirtyBytes: dirtyBytes, Rate: s.rate, ExpectedDowntimeMS: ms(s.expectedDowntime(dirtyBytes)), Throttle: s.throttle})
}

// stopOverhead is the fixed part of a stop phase, beyond the pages: the
// pause, state save, restore on the target, the commit round trip
// (measured on this machine at 0.6-0.9 ms with the binary state and state
// ioctls on the migration's own thread; assumed, not measured per
// migration).
const stopOverhead = 750 * time.Microsecond

// stopPages: once the downtime limit is met, one more round runs while
// the pages left would take longer than this in the stop phase (and the
// rounds still halve them). A round costs the total about what it takes
// off the downtime, and downtime is what the guest feels: at 10 MB/s a
// 1 GiB guest left 0.6 MB (0.4-1.4 ms of pages) for its stop phase with
// the earlier bound (2*stopOverhead in all); one more round of 0.5 ms
// leaves a few pages.
const stopPages = 250 * time.Microsecond

// maxExtraRounds bounds the rounds run after the rest first fits the
// downtime limit.
const maxExtraRounds = 3

func (s *sender) expectedDowntime(dirtyBytes int64) time.Duration {
	r := s.rate
	if r <= 0 {
		r = 1e9
	}
	return time.Duration(float64(dirtyBytes)/r*float64(time.Second)) + stopOverhead
}

func (s *sender) hook(phase string) error {
	if s.opts.Hook != nil {
		return s.opts.Hook(phase)
	}
	return nil
}

// checkPeer returns the target's error if it sent one or closed the
// connection.
func (s *sender) checkPeer() error {
	select {
	case err := <-s.peerErr:
		s.peerErr <- err
		return err
	default:
		return nil
	}
}

func (s *sender) run(ctx context.Context) error {
	s.fw = newFrameWriter(s.conn, s.opts.Bandwidth)
	s.fw.corrupt = s.opts.CorruptFrame
	s.fr = newFrameReader(s.conn)
	switch s.opts.Compress {
	case "always":
		s.useLZ4.Store(true)
	case "auto", "never":
	default:
		return fmt.Errorf("migrate: compress %q: want auto, always or never", s.opts.Compress)
	}

	// Handshake.
	h := hello{major: ProtoMajor, minor: ProtoMinor, memSize: s.mem.Size(), cpus: uint32(s.src.CPUs())}
	if fp, ok := stateFingerprint(); ok {
		h.flags, h.stateFP = helloStateFP, fp
	}
	if s.opts.Streams < 0 || s.opts.Streams > MaxStreams {
		return fmt.Errorf("migrate: %d streams: want 1 to %d", s.opts.Streams, MaxStreams)
	}
	if s.opts.Streams > 1 {
		h.flags |= helloStreams
		h.streams, h.token = uint32(s.opts.Streams), newToken()
	}
	for _, r := range s.regs {
		h.regions = append(h.regions, region{r.GPA, r.Size()})
	}
	if err := s.fw.send(frameHello, h.marshal()); err != nil {
		return s.wireErr("sending hello", err)
	}
	s.initDisks()
	infos := make([]DiskInfo, len(s.disks))
	for i, d := range s.disks {
		infos[i] = d.info
	}
	if err := s.fw.send(frameDisks, marshalDisks(infos)); err != nil {
		return s.wireErr("sending the disks", err)
	}
	if err := s.fw.flush(); err != nil {
		return s.wireErr("sending hello", err)
	}
	// Dirty tracking goes on while the target answers (a millisecond or
	// so of KVM memory-slot updates, off the migration's critical path);
	// round 0 waits for it.
	logging := make(chan error, 1)
	go func() { logging <- s.startLogging() }()
	loggingOn := func() error {
		if logging == nil {
			return nil
		}
		err := <-logging
		logging = nil
		return err
	}
	defer loggingOn() // on every path: giveBack reads what it took
	if err := s.readWelcome(); err != nil {
		return err
	}
	if s.granted > 1 {
		if err := s.openStreams(s.granted, h.token); err != nil {
			return err
		}
	}
	s.rep.Streams = 1 + len(s.streams)
	if s.opts.Compress == "auto" && s.hashes != nil {
		// The target holds pages by hash: this is a fresh appliance
		// shipped to a host that has its base, where the bytes on the
		// wire are the point. Auto starts compressed there, so that
		// the pages the cache lacks go compressed until the link is
		// known (they went from 6% of the guest's memory on the wire
		// to 23% when auto started plain), and decides at the usual
		// pace. Elsewhere it starts plain and decides within the first
		// MiBs: every chunk compressed before the decision costs the
		// CPU the round runs on, a fifth of a round 0 on a loopback.
		s.useLZ4.Store(true)
		s.decideEvery = decideLate
	}
	go s.readLoop()
	if err := s.sendBases(s.need); err != nil {
		return err
	}

	if err := loggingOn(); err != nil {
		return err
	}
	s.takeDiskDirty()

	var cand [][]uint64  // nil: every page
	var dcand [][]uint64 // disk blocks; nil: round 0
	var dirtyPages int64
	prevDirty := int64(math.MaxInt64) // bytes left after the previous round
	extra := 0                        // rounds run within the limit
	for round := 0; ; round++ {
		phase := "round"
		if round == 0 {
			phase = "round0"
		}
		if err := s.hook(phase); err != nil {
			return err
		}
		st, err := s.sendRound(round, cand, dcand, false)
		if err != nil {
			return err
		}
		s.rep.Rounds = round + 1
		// Rounds are pipelined: the next one starts while the target
		// still applies this one (its acknowledgements are collected as
		// they come); only the pause waits for the target to catch up.
		if err := s.pollAcks(); err != nil {
			return err
		}
		st.MS = ms(time.Since(s.start)) - st.StartMS
		if cand, err = s.takeDirty(); err != nil {
			return err
		}
		dcand = s.takeDiskDirty()
		dirtyPages = countBits(cand)
		st.DirtyAfter = dirtyPages
		st.Throttle = s.throttle
		s.rep.RoundStats = append(s.rep.RoundStats, st)
		dirtyBytes := dirtyPages*pageSize + diskBytes(dcand)
		dirtyRate := float64(dirtyBytes) / (st.MS / 1e3)
		s.throttleUp(st.Bytes, dirtyBytes)
		s.progress("round", round, dirtyRate, dirtyBytes)
		stop := round+1 >= s.opts.MaxRounds
		// Within the limit, one more round pays while it at least halves
		// the rest and the pages would lengthen the stop (stopPages):
		// the downtime falls by about what the round adds to the total.
		if exp := s.expectedDowntime(dirtyBytes); !stop && exp <= s.opts.Downtime {
			if exp <= stopOverhead+stopPages || dirtyBytes*2 > prevDirty || extra >= maxExtraRounds {
				stop = true
			} else {
				extra++
			}
		}
		prevDirty = dirtyBytes
		if !stop {
			continue
		}
		if s.acked < round {
			// The target's backlog must not land in the downtime: wait
			// until it has applied every round, take what the guest
			// dirtied meanwhile, and run one more round if that is
			// worth it.
			if err := s.awaitAcks(round); err != nil {
				return err
			}
			more, err := s.takeDirty()
			if err != nil {
				return err
			}
			orInto(cand, more)
			for i, m := range s.takeDiskDirty() {
				orBits(dcand[i], m)
			}
			dirtyPages = countBits(cand)
			dirtyBytes = dirtyPages*pageSize + diskBytes(dcand)
			if round+1 < s.opts.MaxRounds && extra < maxExtraRounds && s.expectedDowntime(dirtyBytes) > stopOverhead+stopPages {
				extra++
				prevDirty = dirtyBytes
				continue
			}
		}
		break
	}

	// Stop and copy.
	pausedAt := time.Now()
	stop := &StopTimes{}
	s.rep.Stop = stop
	since := func() float64 { return ms(time.Since(pausedAt)) }
	s.src.Pause()
	s.paused = true
	stop.Paused = since()
	s.rep.StoppedUnixNS = time.Now().UnixNano()
	// The state is read and encoded while the last pages go: it waits on
	// the vCPU threads (each reads its own registers), the pages on the
	// socket.
	type encodedState struct {
		b   []byte
		err error
	}
	stateCh := make(chan encodedState, 1)
	go func() {
		var e encodedState
		e.b, e.err = s.encodeMachineState()
		stateCh <- e
	}()
	// On a failure the source resumes: not while its state is being read.
	stateTaken := false
	defer func() {
		if !stateTaken {
			<-stateCh
		}
	}()
	s.progress("paused", s.rep.Rounds, 0, dirtyPages*pageSize)
	if err := s.hook("paused"); err != nil {
		return err
	}
	more, err := s.takeDirty()
	if err != nil {
		return err
	}
	orInto(cand, more)
	stop.DirtyLog = since()
	// The machine is paused and its virtio devices quiesced: no disk
	// write is in flight, the blocks marked now are the last.
	for i, m := range s.takeDiskDirty() {
		orBits(dcand[i], m)
	}
	st, err := s.sendRound(s.rep.Rounds, cand, dcand, true)
	if err != nil {
		return err
	}
	st.Paused = true
	s.rep.RoundStats = append(s.rep.RoundStats, st)
	s.rep.Rounds++
	stop.Pages = since()
	es := <-stateCh
	stateTaken = true
	if es.err != nil {
		return es.err
	}
	stop.SaveState, stop.Encode = ms(s.stateSaved.Sub(pausedAt)), since()
	if err := s.fw.send(frameState, es.b); err != nil {
		return s.wireErr("sending the state", err)
	}
	if err := s.fw.send(frameEnd, nil); err != nil {
		return s.wireErr("sending the end", err)
	}
	if err := s.fw.flush(); err != nil {
		return s.wireErr("sending the end", err)
	}
	endAt := time.Now()
	s.rep.PausedWorkMS = ms(endAt.Sub(pausedAt))
	stop.Sent = s.rep.PausedWorkMS
	if _, err := s.await(frameReady, "ready"); err != nil {
		return err
	}
	stop.Ready = since()
	s.rep.TargetRestoreMS = ms(time.Since(endAt))
	if err := s.checkPeer(); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	// Point of no return: once the commit may have left, the source
	// never resumes by itself.
	s.committed = true
	s.progress("committing", s.rep.Rounds, 0, 0)
	commitAt := time.Now()
	if err := s.hook("committed"); err != nil {
		return fmt.Errorf("%w: %w", ErrInDoubt, err)
	}
	if err := s.fw.send(frameCommit, nil); err != nil {
		return fmt.Errorf("%w: %w", ErrInDoubt, s.wireErr("sending the commit", err))
	}
	if err := s.fw.flush(); err != nil {
		return fmt.Errorf("%w: %w", ErrInDoubt, s.wireErr("sending the commit", err))
	}
	stop.Committed = since()
	f, err := s.await(frameResumed, "resumed")
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInDoubt, err)
	}
	// When the acknowledgement was read off the socket, not when this
	// goroutine got to it: on a loaded host that wakeup alone can take
	// milliseconds, which are not the guest's.
	s.ackAt = f.at
	stop.Resumed = ms(s.ackAt.Sub(pausedAt))
	s.rep.OK = true
	s.rep.DowntimeMS = ms(s.ackAt.Sub(pausedAt))
	rtt := s.ackAt.Sub(commitAt)
	var targetNanos int64
	if len(f.payload) >= 8 {
		targetNanos = int64(binary.LittleEndian.Uint64(f.payload))
	}
	if len(f.payload) >= 16 {
		s.rep.TargetResumedUnixNS = int64(binary.LittleEndian.Uint64(f.payload[8:]))
	}
	oneWay := (rtt - time.Duration(targetNanos)) / 2
	if oneWay < 0 {
		oneWay = 0
	}
	s.rep.DowntimeEstMS = ms(s.ackAt.Sub(pausedAt) - oneWay)
	s.sample()
	// The target's figures (guest-observed gap) follow; they are optional.
	if f, err := s.awaitTimeout(frameInfo, "info", 3*time.Second); err == nil {
		var info targetInfo
		if json.Unmarshal(f.payload, &info) == nil {
			if info.GuestGapNS > 0 {
				g := float64(info.GuestGapNS) / 1e6
				s.rep.GuestGapMS = &g
			}
			s.rep.GuestMode = info.GuestMode
			stop.TargetDecode, stop.TargetSync = ms(time.Duration(info.DecodeNS)), ms(time.Duration(info.SyncNS))
			stop.TargetRestore, stop.TargetResume = ms(time.Duration(info.RestoreNS)), ms(time.Duration(info.ResumeNS))
			stop.TargetFirstBeat = ms(time.Duration(info.FirstBeatNS))
		}
	}
	s.progress("done", s.rep.Rounds, 0, 0)
	return nil
}

// encodeMachineState reads the paused machine's state and encodes it for
// the state frame (binary when the target asked for it, else JSON),
// noting when the read ended in s.stateSaved.
func (s *sender) encodeMachineState() ([]byte, error) {
	ms0, err := s.src.SaveState()
	s.stateSaved = time.Now()
	if err != nil {
		return nil, err
	}
	var enc []byte
	if s.binaryState {
		enc = encodeStateBinary([]byte{encBinary}, ms0)
	} else {
		sb, err := json.Marshal(ms0)
		if err != nil {
			return nil, fmt.Errorf("migrate: encoding the machine state: %w", err)
		}
		if len(sb) > MaxStateSize {
			return nil, fmt.Errorf("migrate: machine state of %d bytes exceeds the limit of %d", len(sb), MaxStateSize)
		}
		enc = encodeState(sb)
	}
	if len(enc) > MaxStateSize {
		return nil, fmt.Errorf("migrate: machine state of %d bytes exceeds the limit of %d", len(enc), MaxStateSize)
	}
	return enc, nil
}

// startLogging turns dirty tracking on and empties both logs: from then
// on every write is in the logs, and round 0 copies everything else.
func (s *sender) startLogging() error {
	for i := range s.regs {
		if err := s.src.SetDirtyLogging(i, true); err != nil {
			return err
		}
	}
	_, err := s.takeDirty()
	return err
}

// pollAcks takes the round acknowledgements that have arrived, without
// waiting.
func (s *sender) pollAcks() error {
	for {
		select {
		case f, ok := <-s.replies:
			if !ok {
				return fmt.Errorf("waiting for the target's round acknowledgement: %w", s.checkPeer())
			}
			if err := s.takeAck(f); err != nil {
				return err
			}
		default:
			return nil
		}
	}
}

// awaitAcks waits until the target has acknowledged round.
func (s *sender) awaitAcks(round int) error {
	for s.acked < round {
		f, err := s.await(frameRoundAck, "round acknowledgement")
		if err != nil {
			return err
		}
		if err := s.takeAck(f); err != nil {
			return err
		}
	}
	return nil
}

// takeAck checks that f acknowledges the next round.
func (s *sender) takeAck(f frame) error {
	if f.typ != frameRoundAck {
		return &ProtocolError{f.off, "expected a round acknowledgement, got " + frameName(f.typ)}
	}
	if len(f.payload) != 4 || int64(binary.LittleEndian.Uint32(f.payload)) != int64(s.acked)+1 {
		return &ProtocolError{f.off, fmt.Sprintf("round acknowledgement out of sequence (want round %d)", s.acked+1)}
	}
	s.acked++
	return nil
}

// targetInfo is the JSON of an info frame.
type targetInfo struct {
	GuestGapNS int64  `json:"guest_gap_ns,omitempty"`
	GuestMode  string `json:"guest_mode,omitempty"`
	// The target's stop-phase steps (StopTimes).
	DecodeNS  int64 `json:"decode_ns,omitempty"`
	SyncNS    int64 `json:"sync_ns,omitempty"`
	RestoreNS int64 `json:"restore_ns,omitempty"`
	ResumeNS  int64 `json:"resume_ns,omitempty"`
	// FirstBeatNS: commit received to the guest's first heartbeat seen.
	FirstBeatNS int64 `json:"first_beat_ns,omitempty"`
}

func (s *sender) wireErr(what string, err error) error {
	if perr := s.checkPeer(); perr != nil {
		return perr
	}
	return fmt.Errorf("migrate: %s: connection to the target lost: %w", what, err)
}

func (s *sender) readWelcome() error {
	s.conn.SetReadDeadline(time.Now().Add(s.opts.ReplyTimeout))
	defer s.conn.SetReadDeadline(time.Time{})
	f, err := s.fr.next()
	if err != nil {
		return fmt.Errorf("migrate: waiting for the target's welcome: %w", err)
	}
	switch f.typ {
	case frameError:
		return &RemoteError{string(f.payload)}
	case frameWelcome:
	default:
		return &ProtocolError{f.off, "expected welcome, got " + frameName(f.typ)}
	}
	if len(f.payload) < 16 {
		return &ProtocolError{f.off, "short welcome"}
	}
	if maj, min := binary.LittleEndian.Uint16(f.payload), binary.LittleEndian.Uint16(f.payload[2:]); maj != ProtoMajor {
		return fmt.Errorf("migrate: the target speaks protocol %d.%d, this source %d.%d: %w", maj, min, ProtoMajor, ProtoMinor, ErrVersion)
	}
	n := binary.LittleEndian.Uint64(f.payload[8:])
	if n > s.mem.Size()/pageSize*4+1<<20 {
		return &ProtocolError{f.off, fmt.Sprintf("welcome announces %d hashes", n)}
	}
	s.rep.HashesAnnounced = int(n)
	flags := binary.LittleEndian.Uint32(f.payload[4:])
	if flags&^(welcomeBinaryState|welcomeStreams|0xff<<16) != 0 {
		return &ProtocolError{f.off, fmt.Sprintf("welcome flags %#x", flags)}
	}
	if flags&welcomeBinaryState != 0 {
		if _, ok := stateFingerprint(); !ok {
			return &ProtocolError{f.off, fmt.Sprintf("welcome flags %#x: a binary state this source cannot check", flags)}
		}
		s.binaryState = true
	}
	if flags&welcomeStreams != 0 {
		// At least 2, at most what the hello asked for.
		g := int(flags >> 16 & 0xff)
		if g < 2 || g > s.opts.Streams {
			return &ProtocolError{f.off, fmt.Sprintf("welcome grants %d streams, %d asked for", g, s.opts.Streams)}
		}
		s.granted = g
	} else if flags>>16 != 0 {
		return &ProtocolError{f.off, fmt.Sprintf("welcome flags %#x", flags)}
	}
	if rest := f.payload[16:]; len(rest) > 0 {
		// Protocol 1.1: u32 count, u32 disk index each: the bases to send.
		if len(rest) < 4 || uint64(len(rest)) != 4+4*uint64(binary.LittleEndian.Uint32(rest)) || binary.LittleEndian.Uint32(rest) > MaxDisks {
			return &ProtocolError{f.off, "welcome: bad list of bases to send"}
		}
		for q := rest[4:]; len(q) > 0; q = q[4:] {
			s.need = append(s.need, binary.LittleEndian.Uint32(q))
		}
	}
	if n > 0 {
		s.hashes = make(map[[hashSize]byte]struct{}, n)
	}
	for uint64(len(s.hashes)) < n {
		f, err := s.fr.next()
		if err != nil {
			return fmt.Errorf("migrate: reading the target's hashes: %w", err)
		}
		if f.typ != frameHashes || len(f.payload)%hashSize != 0 || len(f.payload) == 0 {
			return &ProtocolError{f.off, "expected a hashes frame, got " + frameName(f.typ)}
		}
		before := len(s.hashes)
		for p := f.payload; len(p) > 0; p = p[hashSize:] {
			s.hashes[[hashSize]byte(p)] = struct{}{}
		}
		if len(s.hashes) == before {
			return &ProtocolError{f.off, "hashes frame adds nothing"}
		}
	}
	return nil
}

// readLoop reads the target's frames after the handshake: an error frame
// or a closed connection is reported on peerErr at once, so that rounds
// stop early.
func (s *sender) readLoop() {
	for {
		f, err := s.fr.next()
		if err != nil {
			if err == io.EOF {
				err = errors.New("migrate: the target closed the connection")
			} else {
				err = fmt.Errorf("migrate: connection to the target lost: %w", err)
			}
			s.peerErr <- err
			close(s.replies)
			return
		}
		if f.typ == frameError {
			s.peerErr <- &RemoteError{string(f.payload[:min(len(f.payload), MaxErrorText)])}
			close(s.replies)
			return
		}
		f.payload = append([]byte(nil), f.payload...)
		f.at = time.Now()
		s.replies <- f
	}
}

func (s *sender) await(typ byte, what string) (frame, error) {
	return s.awaitTimeout(typ, what, s.opts.ReplyTimeout)
}

func (s *sender) awaitTimeout(typ byte, what string, d time.Duration) (frame, error) {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case f, ok := <-s.replies:
			if !ok {
				return frame{}, fmt.Errorf("waiting for the target's %s: %w", what, s.checkPeer())
			}
			if f.typ == frameRoundAck && typ != frameRoundAck {
				continue // the stop-and-copy round's, not waited for
			}
			if f.typ != typ {
				return frame{}, &ProtocolError{f.off, fmt.Sprintf("expected %s, got %s", what, frameName(f.typ))}
			}
			return f, nil
		case <-t.C:
			return frame{}, fmt.Errorf("migrate: no %s from the target within %v", what, d)
		}
	}
}

// takeDirty returns and clears both dirty logs (KVM's and the VMM's),
// merged, one bitmap per region.
func (s *sender) takeDirty() ([][]uint64, error) {
	out := make([][]uint64, len(s.regs))
	for i, r := range s.regs {
		k, err := s.src.DirtyLog(i)
		if err != nil {
			return nil, err
		}
		v := r.TakeDirty()
		for w := range v {
			if w < len(k) {
				v[w] |= k[w]
			}
			s.taken[i][w] |= v[w]
		}
		out[i] = v
	}
	return out, nil
}

// giveBack marks every page taken from the logs dirty again in the VMM's
// log, after a failed migration.
func (s *sender) giveBack() {
	for i, r := range s.regs {
		for w, m := range s.taken[i] {
			for ; m != 0; m &= m - 1 {
				s.mem.MarkDirty(r.GPA+uint64(w*64+bits.TrailingZeros64(m))*pageSize, pageSize)
			}
		}
	}
}

func countBits(bm [][]uint64) int64 {
	var n int64
	for _, r := range bm {
		for _, w := range r {
			n += int64(bits.OnesCount64(w))
		}
	}
	return n
}

func orInto(dst, src [][]uint64) {
	for i := range dst {
		for w := range dst[i] {
			dst[i][w] |= src[i][w]
		}
	}
}

// chunkWork is one chunk of a round.
type chunkWork struct {
	region int
	off    uint64 // in the region
	cand   uint64 // pages to consider
}

// encoded is the frames of one chunk, ready to write.
type encoded struct {
	buf                           []byte
	full, compressed, zero, hashd int64
	considered                    int64
}

// encoder is one encoding goroutine's scratch state.
type encoder struct {
	scratch []byte
	lz      lz4block.Compressor
}

// encoderN returns encoder i, made at first use.
func (s *sender) encoderN(i int) *encoder {
	for len(s.enc) <= i {
		s.enc = append(s.enc, &encoder{scratch: make([]byte, chunkBytes)})
	}
	return s.enc[i]
}

// frameBufSize holds a chunk's frames: its pages (plain or compressed)
// with the hash and zero frames beside them.
const frameBufSize = 2*MaxPayload + 64

// getBuf returns an empty frame buffer, reusing one the writer is done
// with.
func (s *sender) getBuf() []byte {
	select {
	case b := <-s.bufs:
		return b
	default:
		return make([]byte, 0, frameBufSize)
	}
}

// putBuf keeps b for reuse (at most cap(s.bufs) are kept).
func (s *sender) putBuf(b []byte) {
	if cap(b) != frameBufSize {
		return
	}
	select {
	case s.bufs <- b[:0]:
	default:
	}
}

// sendRound sends the candidate pages (nil: all) with parallel encoders
// and one writer.
func (s *sender) sendRound(round int, cand, dcand [][]uint64, final bool) (RoundStat, error) {
	start := time.Now()
	st := RoundStat{Round: round, StartMS: ms(start.Sub(s.start))}
	bytes0 := s.wireBytes()
	var work []chunkWork
	var untouched int64 // round 0: pages never touched, zero without a look
	for ri, r := range s.regs {
		nch := (r.Size() + chunkBytes - 1) / chunkBytes
		var res []uint64
		if cand == nil {
			res = guestmem.Resident(r.Host)
		}
		for c := uint64(0); c < nch; c++ {
			off := c * chunkBytes
			n := min(chunkPages, (r.Size()-off)/pageSize)
			m := ^uint64(0) >> (64 - n)
			if cand != nil {
				m &= cand[ri][c]
			}
			if res != nil {
				untouched += int64(bits.OnesCount64(m &^ res[c]))
				m &= res[c]
			}
			if m != 0 {
				work = append(work, chunkWork{ri, off, m})
			}
		}
	}
	// While the guest runs, leave it a CPU: encoders that starve the
	// vCPUs slow the guest and the round alike. Paused, use them all.
	nw := runtime.GOMAXPROCS(0)
	if !final && nw > 1 {
		nw--
	}
	s.encoders = nw
	if !final {
		s.decideCompression(round)
	}
	var out chan encoded
	quit := make(chan struct{})
	if len(work) <= smallRound {
		// A few chunks (the stop phase's, often): encoded here, without
		// waking workers.
		nw = 0
		out = make(chan encoded, len(work))
		for i, w := range work {
			out <- s.encodeChunk(w, round == 0, s.encoderN(0), i)
		}
	} else {
		out = make(chan encoded, 4*nw)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < nw; w++ {
		wg.Add(1)
		enc := s.encoderN(w)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(work) {
					return
				}
				e := s.encodeChunk(work[i], round == 0, enc, i)
				select {
				case out <- e:
				case <-quit:
					return
				}
			}
		}()
	}
	go func() { wg.Wait(); close(out) }()
	var werr error
	n := 0
	for e := range out {
		dealt := false
		if werr == nil {
			if k := n % (1 + len(s.streams)); k > 0 && len(e.buf) > 0 {
				// An extra stream's writer writes it and hands the
				// buffer back.
				s.streams[k-1].ch <- streamItem{e: e}
				dealt = true
			} else if len(e.buf) > 0 {
				t0 := time.Now()
				werr = s.fw.write(e.buf)
				s.busyNanos += int64(time.Since(t0))
				s.busyBytes += int64(len(e.buf))
			}
			st.Pages += e.considered
			st.Sent += e.full + e.hashd
			s.full += e.full
			s.compressed += e.compressed
			s.zeros += e.zero
			s.hashHits += e.hashd
			if round == 0 {
				s.rep.NonZeroBytes += (e.full + e.hashd) * pageSize
			}
			n++
			if n%64 == 0 && werr == nil {
				werr = s.checkPeer()
			}
			// Decide early, and then now and then: a round 0 of a large
			// guest is thousands of chunks, and until the first decision
			// every chunk is compressed.
			if !final && (n%decideLate == 0 || (!s.lzDecided && n%s.decideEvery == 0)) {
				s.decideCompression(round)
				if n%1024 == 0 {
					s.sample()
				}
			}
			if werr != nil {
				close(quit)
			}
		}
		if !dealt {
			s.putBuf(e.buf)
		}
	}
	if werr != nil {
		return st, s.wireErr(fmt.Sprintf("round %d", round), werr)
	}
	st.Pages += untouched
	s.zeros += untouched
	if len(s.disks) > 0 {
		if err := s.sendDiskBlocks(dcand); err != nil {
			return st, err
		}
	}
	var rb [16]byte
	binary.LittleEndian.PutUint32(rb[:], uint32(round))
	binary.LittleEndian.PutUint64(rb[8:], uint64(st.Pages))
	if len(s.streams) > 0 {
		// Every stream ends the round (and, after the stop phase's
		// round, the migration: they carry nothing else).
		if err := s.endStreams(frameRound, rb); err != nil {
			return st, err
		}
		if final {
			if err := s.endStreams(frameEnd, rb); err != nil {
				return st, err
			}
		}
	}
	if err := s.fw.send(frameRound, rb[:]); err != nil {
		return st, s.wireErr(fmt.Sprintf("round %d", round), err)
	}
	// The stop phase's round goes out with the state, in one flush.
	if !final {
		if err := s.fw.flush(); err != nil {
			return st, s.wireErr(fmt.Sprintf("round %d", round), err)
		}
	}
	if err := s.checkPeer(); err != nil {
		return st, err
	}
	d := time.Since(start)
	st.MS = ms(d)
	st.Bytes = s.wireBytes() - bytes0
	// The rate of page bytes handled: what the stop phase's estimate
	// divides by. Round 0 also scans zero memory, so it counts the
	// non-zero pages only (an underestimate, which errs towards more
	// rounds and less downtime); tiny rounds are too noisy to measure.
	if sent := st.Sent * pageSize; sent >= 1<<20 || (round > 0 && st.Pages >= 256) {
		r := float64(sent) / d.Seconds()
		if round > 0 {
			r = float64(st.Pages*pageSize) / d.Seconds()
		}
		if s.rate == 0 {
			s.rate = r
		} else {
			s.rate = 0.5*s.rate + 0.5*r
		}
	}
	if s.opts.Bandwidth > 0 && (s.rate == 0 || s.rate > s.opts.Bandwidth) {
		s.rate = s.opts.Bandwidth
	}
	s.sample()
	s.rep.Pages = PageCounts{Full: s.full, Compressed: s.compressed, Zero: s.zeros, HashHit: s.hashHits}
	return st, nil
}

func (s *sender) sample() {
	s.rep.Timeline = append(s.rep.Timeline, Sample{MS: ms(time.Since(s.start)), Bytes: s.wireBytes()})
}

// smallRound: a round of at most this many chunks is encoded without
// workers.
const smallRound = 4

// decideEarly and decideLate are the chunks written between compression
// decisions before the first one and after it.
const (
	decideEarly = 4
	decideLate  = 64
)

// sampleEvery: one data chunk in this many is compressed for measurement
// while lz4 is off (one 256 KiB chunk in 64 MiB of pages), and
// measureFirst the bytes compressed before the first decision. Measuring
// is not free where compression does not pay: source and target share the
// CPU the guest leaves, and with 1 MiB first and one chunk in 16 MiB the
// 256 MiB guest at 100 MB/s compressed 2.2 MB only to measure, about a
// tenth of the source's CPU in the migration (profiled).
const (
	sampleEvery  = 256
	measureFirst = 256 << 10
)

// decideCompression turns lz4 on when it pays: when the link (measured
// while writing, or the bandwidth cap) is slower than what compression
// can feed it, given the measured ratio and compression speed.
func (s *sender) decideCompression(round int) {
	if s.opts.Compress != "auto" {
		return
	}
	in, out, nanos := s.lzIn.Load(), s.lzOut.Load(), s.lzNanos.Load()
	if in < measureFirst || nanos == 0 {
		return // not measured yet
	}
	ratio := float64(out) / float64(in)
	// Each encoder compresses at the measured speed; while the guest
	// runs there is one fewer than the CPUs (sendRound).
	cspeed := float64(in) / (float64(nanos) / 1e9) * float64(max(1, s.encoders))
	link := s.opts.Bandwidth
	if link == 0 && s.busyNanos > 0 && s.busyBytes >= 4<<20 {
		// Measured on the first connection's writes; with parallel
		// streams it carries a share of the link, as each of the others.
		link = float64(s.busyBytes) / (float64(s.busyNanos) / 1e9) * float64(1+len(s.streams))
	}
	if link == 0 {
		return
	}
	s.lzDecided = true
	s.useLZ4.Store(lz4Pays(ratio, cspeed, link))
	s.rep.Compression = fmt.Sprintf("lz4=%v (ratio %.2f, compress %.0f MB/s with %d encoders, link %.0f MB/s)", s.useLZ4.Load(), ratio, cspeed/1e6, max(1, s.encoders), link/1e6)
}

// lz4Pays reports whether compressing at cspeed (bytes of pages per
// second, all encoders together) to ratio moves pages faster than sending
// them plain over a link of link bytes per second. Compression and
// sending share the CPUs (on a loaded host the link rate measured is
// often the CPU's): they are modelled as serial, so lz4 wins only when
// the link is clearly the bottleneck.
func lz4Pays(ratio, cspeed, link float64) bool {
	withLZ4 := 1 / (1/cspeed + ratio/link)
	return withLZ4 > link*1.2
}

func isZero(p []byte) bool {
	// Most non-zero pages differ in their first word.
	if binary.LittleEndian.Uint64(p) != 0 {
		return false
	}
	for i := 0; i < len(p); i += 512 {
		q := p[i : i+512]
		for j := 0; j < 512; j += 64 {
			if binary.LittleEndian.Uint64(q[j:])|binary.LittleEndian.Uint64(q[j+8:])|
				binary.LittleEndian.Uint64(q[j+16:])|binary.LittleEndian.Uint64(q[j+24:])|
				binary.LittleEndian.Uint64(q[j+32:])|binary.LittleEndian.Uint64(q[j+40:])|
				binary.LittleEndian.Uint64(q[j+48:])|binary.LittleEndian.Uint64(q[j+56:]) != 0 {
				return false
			}
		}
	}
	return true
}

// encodeChunk builds a chunk's frames: zero (after round 0), hashref,
// pages.
//
// Pages are copied out of guest RAM before they are hashed or compressed:
// the guest may write them meanwhile (the dirty log then has them again
// for the next round), and lz4 must not see bytes change under it.
func (s *sender) encodeChunk(w chunkWork, round0 bool, enc *encoder, seq int) encoded {
	r := s.regs[w.region]
	gpa := r.GPA + w.off
	var e encoded
	e.considered = int64(bits.OnesCount64(w.cand))
	buf := s.getBuf()
	var zeroMask, dataMask, hashMask uint64
	var hashes []byte
	useLZ4 := s.useLZ4.Load()
	// The first measureFirst bytes of data chunks are all measured, so
	// that the first decision comes early; then one chunk in sampleEvery.
	measure := !useLZ4 && s.opts.Compress == "auto" && (seq%sampleEvery == 0 || s.lzIn.Load() < measureFirst)
	// Plain pages are copied once, from guest RAM straight into their
	// frame, which goes first in buf; otherwise into scratch for lz4.
	direct := !useLZ4 && !measure
	plain := enc.scratch[:0]
	if direct {
		buf = append(appendChunkHeader(beginFrame(buf, framePages), gpa, 0), encPlain)
		plain = buf
	}
	for m := w.cand; m != 0; m &= m - 1 {
		i := bits.TrailingZeros64(m)
		lo := w.off + uint64(i)*pageSize
		page := r.Host[lo : lo+pageSize]
		if isZero(page) {
			zeroMask |= 1 << i
			continue
		}
		k := len(plain)
		plain = append(plain, page...)
		if s.hashes != nil {
			var h [hashSize]byte
			pageHash(h[:], plain[k:])
			if _, ok := s.hashes[h]; ok {
				hashMask |= 1 << i
				hashes = append(hashes, h[:]...)
				plain = plain[:k]
				continue
			}
		}
		dataMask |= 1 << i
	}
	if direct {
		buf = buf[:0]
		if dataMask != 0 {
			binary.LittleEndian.PutUint64(plain[headerSize+8:], dataMask)
			buf = finishFrame(plain)
			e.full = int64(bits.OnesCount64(dataMask))
			dataMask = 0 // sent
		}
	}
	e.zero = int64(bits.OnesCount64(zeroMask))
	if zeroMask != 0 && !round0 {
		k := len(buf)
		f := finishFrame(appendChunkHeader(beginFrame(buf[k:], frameZero), gpa, zeroMask))
		buf = buf[:k+len(f)]
	}
	if hashMask != 0 {
		k := len(buf)
		f := beginFrame(buf[k:], frameHashRef)
		f = appendChunkHeader(f, gpa, hashMask)
		f = finishFrame(append(f, hashes...))
		buf = buf[:k+len(f)]
		e.hashd = int64(bits.OnesCount64(hashMask))
	}
	if dataMask != 0 {
		e.full = int64(bits.OnesCount64(dataMask))
		k := len(buf)
		f := beginFrame(buf[k:k], framePages)
		f = appendChunkHeader(f, gpa, dataMask)
		how := byte(encPlain)
		if useLZ4 || measure {
			f = append(f, encLZ4)
			dst := f[len(f) : len(f)+lz4block.CompressBound(len(plain))]
			t0 := time.Now()
			n := enc.lz.Compress(dst, plain)
			s.lzNanos.Add(int64(time.Since(t0)))
			s.lzIn.Add(int64(len(plain)))
			if n > 0 {
				s.lzOut.Add(int64(n))
			} else {
				s.lzOut.Add(int64(len(plain)))
			}
			// A chunk compressed only to measure goes compressed too
			// when that saves: the work is done (and the first MiB of
			// a small, idle guest's pages then shrinks on the wire).
			if n > 0 && n < len(plain)*7/8 {
				how = encLZ4
				f = f[:len(f)+n]
				e.compressed = e.full
			} else {
				f = f[:len(f)-1]
			}
		}
		if how == encPlain {
			f = append(f, encPlain)
			f = append(f, plain...)
		}
		f = finishFrame(f)
		buf = buf[:k+len(f)]
	}
	e.buf = buf
	return e
}

// encodeState prefixes the JSON state with its encoding: lz4 (u8 1, u32
// plain length, block) when that is smaller, else plain (u8 0). The
// state's JSON (register arrays as numbers) compresses about tenfold.
func encodeState(sb []byte) []byte {
	dst := make([]byte, 5+lz4block.CompressBound(len(sb)))
	var c lz4block.Compressor
	if n := c.Compress(dst[5:], sb); n > 0 && n < len(sb) {
		dst[0] = encLZ4
		binary.LittleEndian.PutUint32(dst[1:], uint32(len(sb)))
		return dst[:5+n]
	}
	return append([]byte{encPlain}, sb...)
}
