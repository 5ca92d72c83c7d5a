package snapshot

import (
	"errors"
	"fmt"
	"sync"

	"collective/machine"
)

// ErrNoParent is returned for an incremental snapshot of a machine that
// has no full snapshot (or restored snapshot) to be relative to.
var ErrNoParent = errors.New("snapshot: no parent for an incremental snapshot: take a full snapshot first")

// Session takes the snapshots of one running machine and keeps what an
// incremental snapshot needs: the dirty-page tracking (KVM's dirty log of
// every memory slot, and guestmem's log of the VMM's own writes), both
// reset at each snapshot, and the last snapshot's ID and path.
//
// Lock order: Session.mu, then the machine's locks.
type Session struct {
	mu sync.Mutex
	m  *machine.Machine
	// +checklocks:mu
	tracking bool
	// +checklocks:mu
	last *lastSnap
	// +checklocks:mu
	pending [][]uint64 // dirty pages taken by a failed incremental
}

// takeDiskDirty takes every disk's dirty-block bitmap.
func takeDiskDirty(disks []machine.Disk) [][]uint64 {
	out := make([][]uint64, len(disks))
	for i, d := range disks {
		if d.Tracker != nil {
			out[i] = d.Tracker.TakeDirty()
		}
	}
	return out
}

// giveBackDisks returns dirty blocks taken by a failed snapshot.
func giveBackDisks(disks []machine.Disk, bm [][]uint64) {
	for i, d := range disks {
		if d.Tracker != nil && i < len(bm) {
			d.Tracker.GiveBack(bm[i])
		}
	}
}

// syncDisks flushes every disk backend.
func syncDisks(disks []machine.Disk) error {
	for _, d := range disks {
		if err := d.Block.Backend().Sync(); err != nil {
			return fmt.Errorf("snapshot: flushing disk %s: %w", d.Name, err)
		}
	}
	return nil
}

type lastSnap struct {
	id   ID
	path string
}

// NewSession returns a session for m with no parent yet.
func NewSession(m *machine.Machine) *Session { return &Session{m: m} }

// SetParent makes s the parent of the next incremental snapshot: for a
// machine just restored from s, before it runs. It starts dirty tracking.
func (ss *Session) SetParent(s *Snapshot) error {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if err := ss.resetTracking(); err != nil {
		return err
	}
	ss.last = &lastSnap{id: s.ID, path: s.Path}
	return nil
}

// resetTracking turns dirty logging on (the first time) and empties both
// dirty logs.
//
// +checklocks:ss.mu
func (ss *Session) resetTracking() error {
	vm := ss.m.VM()
	if !ss.tracking {
		for i := 0; i < vm.NumSlots(); i++ {
			if err := vm.SetDirtyLogging(i, true); err != nil {
				return err
			}
		}
		ss.tracking = true
	}
	_, err := ss.takeDirty()
	ss.pending = nil
	takeDiskDirty(ss.m.Disks())
	return err
}

// takeDirty returns and clears the merged dirty logs, one bitmap per
// region.
//
// +checklocks:ss.mu
func (ss *Session) takeDirty() ([][]uint64, error) {
	vm := ss.m.VM()
	regs := ss.m.Memory().Regions()
	out := make([][]uint64, len(regs))
	for i, r := range regs {
		kvmLog, err := vm.DirtyLog(i)
		if err != nil {
			return nil, err
		}
		vmm := r.TakeDirty()
		for w := range vmm {
			vmm[w] |= kvmLog[w]
			if ss.pending != nil {
				vmm[w] |= ss.pending[i][w]
			}
		}
		out[i] = vmm
	}
	return out, nil
}

// TakeOptions tune Take.
type TakeOptions struct {
	// Incremental stores only the pages dirtied since the last snapshot.
	Incremental bool
	// Raw stores a full snapshot's memory as a raw image (lazy restore).
	Raw bool
	// Progress, when set, is told how far the write is.
	Progress Progress
}

// Take writes a snapshot of the machine to path.
//
// Preconditions: the machine's VM is paused.
func (ss *Session) Take(path string, opts TakeOptions) (*Stats, error) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if err := ss.m.VM().CheckPaused(); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	if opts.Incremental && opts.Raw {
		return nil, errors.New("snapshot: an incremental snapshot cannot be a raw image")
	}
	if opts.Incremental && (ss.last == nil || !ss.tracking) {
		return nil, ErrNoParent
	}
	// No device may take a chain while memory, disks and state are read.
	defer ss.m.HoldDevices()()
	// The state is read (each vCPU's on its own thread) while the memory
	// is written: it goes last in the file. Take returns only after the
	// reading is done, so that no caller resumes the machine under it.
	ch := make(chan struct{})
	var st *machine.MachineState
	var stErr error
	go func() {
		defer close(ch)
		st, stErr = ss.m.SaveState()
	}()
	defer func() { <-ch }()
	state := func() (*machine.MachineState, error) { <-ch; return st, stErr }
	// The machine is paused and its virtio devices quiesced: no disk
	// request is in flight, so the disks hold still with the memory.
	disks := ss.m.Disks()
	if err := syncDisks(disks); err != nil {
		return nil, err
	}
	spec := writeSpec{mem: ss.m.Memory(), state: state, raw: opts.Raw, progress: opts.Progress}
	if opts.Incremental {
		// Logs are taken before memory is read: a write after this point
		// is in the copy, or in the next log, or both.
		dirty, err := ss.takeDirty()
		if err != nil {
			return nil, err
		}
		diskDirty := takeDiskDirty(disks)
		if spec.disks, err = liveDisks(disks, diskDirty, false); err != nil {
			giveBackDisks(disks, diskDirty)
			ss.pending = dirty
			return nil, err
		}
		spec.dirty, spec.parent, spec.parentHint = dirty, ss.last.id, parentHint(path, ss.last.path)
		stats, err := writeFile(path, spec)
		if err != nil {
			ss.pending = dirty // resent in the next incremental
			giveBackDisks(disks, diskDirty)
			return nil, err
		}
		ss.pending = nil
		ss.last = &lastSnap{id: stats.ID, path: path}
		return stats, nil
	}
	if err := ss.resetTracking(); err != nil {
		return nil, err
	}
	var err error
	if spec.disks, err = liveDisks(disks, nil, true); err != nil {
		ss.last = nil
		return nil, err
	}
	stats, err := writeFile(path, spec)
	if err != nil {
		ss.last = nil // the logs were reset: only a new full snapshot is a valid parent
		return nil, err
	}
	ss.last = &lastSnap{id: stats.ID, path: path}
	return stats, nil
}
