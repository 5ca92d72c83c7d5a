package migrate

import (
	"fmt"
	"time"
)

// Progress is a snapshot of a migration under way, for a terminal line
// or the API.
type Progress struct {
	Phase string `json:"phase"` // connecting, round, paused, committing, done, failed
	Round int    `json:"round"`
	// SentBytes is the bytes on the wire so far.
	SentBytes int64 `json:"sent_bytes"`
	// DirtyRate is the rate at which the guest dirtied pages during the
	// last round, in bytes per second.
	DirtyRate float64 `json:"dirty_rate"`
	// DirtyBytes is the bytes of pages left to send after the last round.
	DirtyBytes int64 `json:"dirty_bytes"`
	// Rate is the measured transfer rate of page bytes, per second.
	Rate float64 `json:"rate"`
	// ExpectedDowntimeMS is the downtime a stop now would cost.
	ExpectedDowntimeMS float64 `json:"expected_downtime_ms"`
	// Throttle is auto-converge's vCPU throttle, in percent (0: none).
	Throttle int `json:"throttle,omitempty"`
}

// String formats p as one terminal line.
func (p Progress) String() string {
	throttle := ""
	if p.Throttle > 0 {
		throttle = fmt.Sprintf(", vCPUs throttled %d%%", p.Throttle)
	}
	return fmt.Sprintf("%s: round %d, %.1f MB sent, dirty %.1f MB/s, %.1f MB left, rate %.0f MB/s, expected downtime %.1f ms%s",
		p.Phase, p.Round, float64(p.SentBytes)/1e6, p.DirtyRate/1e6, float64(p.DirtyBytes)/1e6, p.Rate/1e6, p.ExpectedDowntimeMS, throttle)
}

// PageCounts counts pages by how they travelled.
type PageCounts struct {
	// Full pages were sent with their content (Compressed of them in lz4
	// frames).
	Full       int64 `json:"full"`
	Compressed int64 `json:"compressed"`
	// Zero pages were never sent: skipped in round 0 (the target's RAM
	// starts zeroed), a bit in a zero frame later.
	Zero int64 `json:"zero"`
	// HashHit pages were sent as a hash the target already held.
	HashHit int64 `json:"hash_hit"`
}

// RoundStat describes one pre-copy round (the last one is the stop-and-copy
// round, with the vCPUs paused).
type RoundStat struct {
	Round int `json:"round"`
	// StartMS is the round's start, from the migration's start.
	StartMS float64 `json:"start_ms"`
	MS      float64 `json:"ms"`
	// Pages is the pages the round considered (dirty, or all in round 0);
	// Sent of them went with their content.
	Pages int64 `json:"pages"`
	Sent  int64 `json:"sent"`
	// Bytes is the wire bytes of the round.
	Bytes int64 `json:"bytes"`
	// DirtyAfter is the pages the guest dirtied while the round ran.
	DirtyAfter int64 `json:"dirty_after"`
	// Throttle is the auto-converge throttle the round ran under, in
	// percent.
	Throttle int  `json:"throttle,omitempty"`
	Paused   bool `json:"paused,omitempty"`
}

// Sample is a point of the bytes-over-time curve.
type Sample struct {
	MS    float64 `json:"ms"`
	Bytes int64   `json:"bytes"`
}

// Report is the outcome of a migration, printed as JSON by collective
// migrate.
type Report struct {
	To    string `json:"to"`
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	// InDoubt is set when the commit was sent but the target's resumed
	// acknowledgement never came: the source stays paused (see the
	// package doc, "Faults").
	InDoubt bool `json:"in_doubt,omitempty"`

	MemBytes uint64 `json:"mem_bytes"`
	// NonZeroBytes is the guest's non-zero memory found in round 0.
	NonZeroBytes int64 `json:"nonzero_bytes"`
	// TotalMS runs from the start of the migration to the target's
	// resumed acknowledgement.
	TotalMS float64 `json:"total_ms"`
	// DowntimeMS is the time from the source's vCPUs pausing to the
	// target's resumed acknowledgement arriving, on the source's clock: an
	// upper bound of the true downtime by the ack's one-way delay.
	DowntimeMS float64 `json:"downtime_ms"`
	// DowntimeEstMS subtracts the ack's one-way delay, estimated as half
	// of (commit-to-ack round trip minus the target's commit-to-resume
	// time, which the target measures on its own clock and reports).
	DowntimeEstMS float64 `json:"downtime_est_ms"`
	// StoppedUnixNS is the source's wall clock once its vCPUs were
	// parked, TargetResumedUnixNS the target's once its vCPUs started
	// (protocol 1.3; 0 from an older target). Between two processes of
	// one host, or hosts with synchronized clocks, their difference is
	// the downtime exactly, as QEMU's STOP and RESUME event timestamps
	// give it; across hosts, DowntimeEstMS needs no common clock.
	StoppedUnixNS       int64 `json:"stopped_unix_ns,omitempty"`
	TargetResumedUnixNS int64 `json:"target_resumed_unix_ns,omitempty"`
	// PausedWorkMS is the source's part of the stop phase: pause to the
	// end frame flushed.
	PausedWorkMS float64 `json:"paused_work_ms"`
	// TargetRestoreMS is the target's time from the end frame to ready.
	TargetRestoreMS float64 `json:"target_restore_ms"`
	// Stop breaks the downtime into its steps.
	Stop *StopTimes `json:"stop,omitempty"`
	// GuestGapMS is the gap the guest itself observed, from its heartbeat
	// (TSC-stamped): the last update before the pause to the first after
	// the resume, measured on the target; nil when the guest has no
	// heartbeat. In dirty mode the heartbeat moves once per verified pass,
	// so the gap includes up to a pass's time.
	GuestGapMS *float64 `json:"guest_gap_ms,omitempty"`
	GuestMode  string   `json:"guest_mode,omitempty"`

	// DiskBlocks counts the disk blocks sent (64 KiB each); BaseBytes the
	// bytes of base images sent because the target lacked them.
	DiskBlocks int64 `json:"disk_blocks"`
	BaseBytes  int64 `json:"base_bytes,omitempty"`

	BytesWire   int64       `json:"bytes_wire"`
	Pages       PageCounts  `json:"pages"`
	Rounds      int         `json:"rounds"`
	RoundStats  []RoundStat `json:"round_stats"`
	Compression string      `json:"compression"`
	// RateMBps is the measured page transfer rate.
	RateMBps float64 `json:"rate_mbps"`
	// Streams is how many TCP connections carried the pages.
	Streams int `json:"streams,omitempty"`
	// ThrottlePct is the highest vCPU throttle auto-converge set, in
	// percent (0: none).
	ThrottlePct int `json:"throttle_pct,omitempty"`
	// HashesAnnounced is how many page hashes the target offered.
	HashesAnnounced int      `json:"hashes_announced"`
	Timeline        []Sample `json:"timeline"`
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

// StopTimes are the steps of the stop-and-copy phase, in milliseconds:
// on the source each from the moment it began to pause the vCPUs (its
// clock), on the target the durations it measured and reported in its
// info frame.
type StopTimes struct {
	Paused    float64 `json:"paused"`     // vCPUs out of KVM_RUN, devices quiesced
	DirtyLog  float64 `json:"dirty_log"`  // both dirty logs taken
	Pages     float64 `json:"pages"`      // last pages and disk blocks written
	SaveState float64 `json:"save_state"` // vCPU, irqchip and device state read
	Encode    float64 `json:"encode"`     // state encoded
	Sent      float64 `json:"sent"`       // state and end flushed to the socket
	Ready     float64 `json:"ready"`      // ready received
	Committed float64 `json:"committed"`  // commit flushed
	Resumed   float64 `json:"resumed"`    // resumed received

	// The target's durations: end frame to state decoded and validated,
	// disks synced, state restored; commit received to vCPUs started.
	TargetDecode  float64 `json:"target_decode"`
	TargetSync    float64 `json:"target_sync"`
	TargetRestore float64 `json:"target_restore"`
	TargetResume  float64 `json:"target_resume"`
	// TargetFirstBeat runs from the commit received to the guest's first
	// heartbeat after it (the workload guest's; 0 without a heartbeat).
	TargetFirstBeat float64 `json:"target_first_beat,omitempty"`
}
