// Package migrate moves a running machine to another process or host by
// pre-copy live migration over TCP: collective migrate (the source, through
// the control API) and collective run --incoming ADDR (the target).
//
// # Algorithm
//
// The source turns on KVM's dirty log for every memory slot and empties
// both logs (KVM's, of vCPU writes, and guestmem's, of the VMM's own
// writes: design fact 1). Round 0 sends every non-zero page; each later
// round sends the pages the logs recorded during the previous one (the
// logs are taken before the pages are read, so a write that races the copy
// is in the next round). After each round the source estimates the stop
// phase as dirty bytes / measured rate + a fixed overhead (0.75 ms); once
// that fits the downtime limit it runs up to three more rounds while each
// at least halves the rest and the pages would take more than 0.25 ms of
// the stop phase (each such round costs the total about what it saves the
// downtime); then, or after MaxRounds, it pauses the vCPUs, sends the
// pages dirtied since, the machine state (machine.MachineState) and an end
// frame, and runs the commit handshake below. While paused, the state is
// read and encoded by one goroutine as the last pages go, and a last
// round of a few chunks is encoded without waking workers and flushed
// with the state. Chunks of 64 pages are encoded by one worker per CPU
// (one fewer while the guest runs: zero test, hash lookup, lz4; a plain
// page is copied once, from guest RAM into its frame) and written by one
// writer, large frames past its buffer; a bandwidth cap paces the
// writer.
//
// Zero pages are never sent: in round 0 they are skipped (the target's RAM
// starts zeroed), and memory the guest never touched is not even read
// (/proc/self/pagemap: neither present nor swapped, in a region whose
// every mapping is private and anonymous, so never over a lazily mapped
// snapshot image); later a page that became zero is one bit of a zero
// frame. lz4 is used when it pays: it starts on, then one data chunk in 16
// is compressed to measure the ratio and speed while it is off (those
// chunks go compressed when that saves), and lz4 is on only
// while 1/(1/compress rate + ratio/link rate) beats the link rate by 20%
// (the compress rate is one encoder's times the encoders, one fewer than
// the CPUs while the guest runs; the link rate is the bandwidth cap or the
// writer's measured rate; both share the CPUs, so the model is serial).
// A chunk that does not shrink to 7/8 goes plain. With a hash cache on the target (Cache, --cache DIR:
// the pages of local snapshot files), the target announces the hashes it
// holds and the source sends a 16-byte hash instead of any page whose
// content hash is among them (the Collective's OSDI'02 technique).
//
// Auto-converge (Options.AutoConverge, collective migrate --auto-converge;
// off by default, as in QEMU) slows a guest that dirties memory faster
// than the rounds carry it, with QEMU's rule and defaults: after two
// rounds in a row in which the guest dirtied more than half the bytes the
// round put on the wire, every vCPU sleeps 20% of the time
// (kvm.VM.SetThrottle: a 10 ms slice of running, then a sleep), then 10%
// more after every two such rounds again, up to 99%. A pause ends a
// throttle sleep at once, so the stop phase is not held up; the throttle
// is lifted when the migration ends, and a failed migration's source
// runs on at full speed. Each round's throttle is in the report
// (RoundStat.Throttle, Report.ThrottlePct). A guest that paces itself by
// the clock (the workload guest's dirty mode with a rate) catches up
// after each sleep, so only its peak rate is slowed.
//
// # Wire format (protocol version ProtoMajor.ProtoMinor)
//
// All integers little-endian. The stream is a sequence of frames:
//
//	0   u8   type
//	1   [3]u8 reserved, 0
//	4   u32  payload length n (<= MaxPayload, 256 KiB + 64)
//	8   [n]  payload
//	8+n u32  CRC-32C (Castagnoli) of bytes [0, 8+n)
//
// The CRC is verified before a byte of the payload is interpreted.
//
//	S->T hello    (1)  "CLVMIGR\n", u16 major, u16 minor, u32 page size (4096),
//	                   u64 memory bytes, u32 vCPUs, u32 flags (0, or 1.2: 1, 1.3: 2),
//	                   u32 region count, {u64 GPA, u64 size} per region,
//	                   1.2 with flag 1: [16]u8 state fingerprint
//	T->S welcome  (2)  u16 major, u16 minor, u32 flags (0, or 1.2: 1),
//	                   u64 hashes announced
//	T->S hashes   (3)  [16]u8 page hashes (SHA-256/128; snapshot files use XXH3),
//	                   until the announced count is reached
//	S->T pages    (4)  u64 chunk GPA (256 KiB aligned), u64 page mask,
//	                   u8 encoding (0 plain, 1 lz4 block), the mask's pages
//	S->T zero     (5)  u64 chunk GPA, u64 mask: these pages are now zero
//	S->T hashref  (6)  u64 chunk GPA, u64 mask, [16]u8 hash per page in the mask
//	S->T round    (7)  u32 round number (0, 1, ... in sequence), u32 0,
//	                   u64 pages considered
//	S->T state    (8)  u8 encoding (0 plain, 1 lz4: u32 plain length, block),
//	                   JSON machine.MachineState (<= MaxStateSize); or
//	                   encoding 2 (1.2): the binary encoding
//	S->T end      (9)  empty: everything is sent
//	T->S ready    (10) empty: restored, waiting for the commit
//	S->T commit   (11) empty: run now; the source never resumes after this
//	T->S resumed  (12) u64 nanoseconds from commit received to vCPUs started;
//	                   1.3: then u64 the target's wall clock (Unix ns) at that start
//	T->S info     (13) JSON {guest_gap_ns, guest_mode}: the guest's heartbeat
//	either error  (14) UTF-8 message (<= MaxErrorText); the sender closes
//	T->S round-ack (15) u32 round number: the round is applied; rounds are
//	                   pipelined (the next starts without waiting), but
//	                   the source pauses only once every round is
//	                   acknowledged, so that the target's backlog never
//	                   lands in the downtime
//
// Protocol 1.1 adds the disks (a 1.1 target still reads 1.0 streams, which
// have none; a 1.0 target refuses a 1.1 source by version):
//
//	S->T disks    (16) right after hello: u32 n (<= MaxDisks), then per disk
//	                   u8 kind (0 raw, 1 copy-on-write), u64 size,
//	                   [32]u8 base SHA-256, u64 base size (zero for raw)
//	T->S welcome       gains, after its 16 bytes, u32 n and n × u32 disk
//	                   index: the bases this host lacks (absent when none)
//	S->T base     (17) u32 disk, u32 0, u64 offset, data (<= 256 KiB, in
//	                   order from 0)
//	S->T base-end (18) u32 disk: the target checks the size and SHA-256,
//	                   then stores it in its cache as DIR/bases/HEX-SHA256
//	S->T disk-block (19) u32 disk, u32 0, u64 block (64 KiB units),
//	                   u8 encoding (0 plain, 1 lz4 block, 2 zeros: no data),
//	                   data
//
// Protocol 1.2 makes the state cheap to encode and decode inside the
// downtime (JSON cost about 0.7 ms, mostly decoding its byte arrays): the
// source sets hello flag 1 and appends the fingerprint of its
// machine.MachineState type (SHA-256/128 of the type tree: field names,
// kinds, array lengths; statecodec.go); a target with the same
// fingerprint sets welcome flag 1, and the state frame then uses encoding
// 2, a field-order binary walk of the type (varints, raw byte arrays,
// presence bytes), decoded strictly (lengths bounded by the bytes left,
// integers checked against their fields, nothing left over) and validated
// like JSON. Different fingerprints (another build of the state types)
// keep JSON; a target never accepts encoding 2 unless it asked for it.
//
// Protocol 1.3 adds parallel streams (Options.Streams, --streams N;
// streams.go). The source sets hello flag 2 and appends, after the
// fingerprint if any, u32 streams (2 to MaxStreams) and a random 16-byte
// token; a target that can accept more connections (ReceiveOptions.Accept)
// sets welcome flag 2 with the count it takes in the flags' bits 16-23.
// The source then opens the other connections, each starting with
//
//	S->T stream   (20) [16]u8 token, u32 index (1 to streams-1)
//
// and deals each round's chunk frames (pages, zero, hashref) to all the
// connections in turn; every connection ends each round with its own
// round frame, and the extra ones end with an end frame after the stop
// phase's round. The first connection alone carries everything else
// (disks, bases, disk blocks, state, the handshake). The target applies
// the streams in parallel but acknowledges a round only once every stream
// has reached its round frame, and lets none start the next round before:
// a page goes at most once per round, so pages of two rounds never race.
// A stream's failure (a cut, a CRC mismatch, a wrong token or index) fails
// the whole migration at once, with that stream's error, and the target
// stops every stream's loop before it discards the machine.
//
// # Disks
//
// Every disk's backend records written blocks (virtioblk.Tracker, 64 KiB
// granularity, marked when a write, discard or write-zeroes completes).
// The target is started with the same --disk arguments: a raw disk of the
// same size (any content: round 0 sends every block, zero blocks as one
// frame each), or a new overlay path with base=BASE, where BASE is found
// by hash: the given path when it exists with that SHA-256, else
// DIR/bases/HEX of --cache DIR; failing both, the target asks for it in
// its welcome and the source sends it once, chunked, before round 0 (it
// lands in the cache: the next migration finds it). The target builds the
// machine only then, over the bases found, and checks each disk's kind,
// size, base hash, and that an overlay holds nothing yet. Round 0 sends a
// raw disk's every block and an overlay's every block that does not read
// from the base (Overlay.Changed) or was written; each later round the
// blocks the tracker marked meanwhile; the stop phase pauses the machine
// with its virtio devices quiesced (no request in flight) and sends the
// rest. The dirty-byte estimate that decides the stop includes disk
// blocks. The target writes blocks through its own tracker and syncs its
// disks before it restores the state. The source only reads its disks: a
// failed migration leaves them untouched, and the dirty blocks it took
// are given back, so that a later incremental snapshot misses none. A
// failed target may leave its disk files partly written: they are
// scratch until the commit.
//
// # Faults
//
// Until the commit, the source owns the machine: any failure (target
// unreachable, connection cut, a frame failing its CRC on either side, a
// target error frame, a missing reply within ReplyTimeout, a cancel) ends
// the migration with the source running, resumed if it had paused, and
// the dirty pages it took from the logs given back to guestmem's log, so
// that a later incremental snapshot misses nothing. The target never runs
// anything before the commit: on any failure it closes (discards) the
// machine it was filling, sends an error frame if it can, and exits
// non-zero.
//
// The commit is two-phase: the source sends end, the target restores the
// state and answers ready, the source sends commit (its point of no
// return), the target starts the vCPUs and answers resumed, and only then
// does the source report success and stop. If the connection fails after
// the commit was written and before resumed arrives, the source cannot
// know whether the target runs: it stays paused (ErrInDoubt, exit status
// 3 of collective migrate, API state "paused") and says so. That choice
// never gives two running copies and loses nothing (the paused source
// still holds the whole machine); the operator resumes the source only
// after checking that the target is not running. A target that sent ready
// and sees no commit within its IdleTimeout discards its machine and
// exits, so a lost commit leaves only the paused source.
//
// # Timing
//
// Downtime is measured on the source's clock alone: from the pause to the
// resumed frame's arrival (an upper bound), and less the ack's one-way
// delay, estimated as half the commit-to-resumed round trip minus the
// target's own commit-to-resume time. Since 1.3 the target also reports
// its wall clock at the resume: with the source's at the pause
// (Report.StoppedUnixNS, TargetResumedUnixNS) that gives the downtime
// exactly where both share a clock (one host, or synchronized hosts),
// which is how bench migrate times ours, as QEMU's STOP and RESUME event
// timestamps time QEMU's. The target also reads the workload
// guest's heartbeat (guest.HeartbeatAddr: counter and TSC) as the source
// left it and waits for the next update after resuming: the TSC
// difference is the gap the guest observed (kvm-pvm guests read the
// host's TSC, so on one host this is wall time).
//
// The report's "stop" object breaks the downtime into its steps (pause,
// dirty logs, last pages, state save, encode, sent, ready, commit,
// resumed, on the source's clock from the pause; the target's decode,
// disk sync, restore and resume durations from its info frame).
//
// # Security
//
// The stream is untrusted on both ends. Frame lengths are capped before
// any read, the reader allocates one MaxPayload buffer, a hello's memory
// size and regions are bounded and must match the machine the target
// builds, every page address is checked against guest RAM, lz4 blocks
// must decode to exactly their pages, hash references must name hashes
// the target announced, the state is decoded strictly and validated, and
// frames out of order are refused. Nothing here panics on input.
package migrate
