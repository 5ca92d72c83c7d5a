package cow

import (
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"sync/atomic"
)

// Overlay is a copy-on-write disk: an overlay file over a read-only base.
// It implements virtioblk.Backend and is safe for concurrent use (see the
// package doc for the locking).
type Overlay struct {
	path     string
	f        storage     // the overlay file; immutable
	base     io.ReaderAt // the base, opened O_RDONLY; immutable
	baseFile *os.File    // closed by Close, if we opened it
	hdr      header      // immutable
	shift    uint        // log2 of the cluster size; immutable
	cs       int64       // cluster size; immutable
	ro       bool        // immutable
	torn     int         // torn slots passed over at open; immutable

	written atomic.Bool // a write or punch completed since the last Sync began

	bufs sync.Pool // *[]byte of one cluster

	// syncMu serialises Sync and Close; taken before mu.
	syncMu sync.Mutex
	// +checklocks:syncMu
	seq uint64 // the seq the next Sync writes
	// +checklocks:syncMu
	closed bool

	mu sync.RWMutex
	// table maps virtual clusters to valBase, valZero or a physical cluster.
	// +checklocks:mu
	table []uint32
	// cur has bit v set when slot 1 holds cluster v's durable entry.
	// +checklocks:mu
	cur []uint64
	// dirty maps each cluster changed since the last Sync snapshot to its
	// value at that snapshot (the value a durable slot may hold).
	// +checklocks:mu
	dirty map[uint32]uint32
	// flight maps each cluster in the snapshot of a Sync in progress to
	// its value before that snapshot (nil when no Sync is writing).
	// +checklocks:mu
	flight map[uint32]uint32
	// gen counts Sync snapshots.
	// +checklocks:mu
	gen uint64
	// pending holds released physical clusters that a durable slot may
	// still name; each is freed when a Sync with snapshot >= gen completes.
	// +checklocks:mu
	pending []pendingFree
	// free holds physical clusters that no durable slot names.
	// +checklocks:mu
	free []uint32
	// next is one past the highest physical cluster ever allocated.
	// +checklocks:mu
	next uint32
	// allocated and zeroed count the table's mapped and zero clusters.
	// +checklocks:mu
	allocated, zeroed int64
	// err is sticky: after a failed Sync every operation fails.
	// +checklocks:mu
	err error
}

type pendingFree struct {
	phys uint32
	gen  uint64
}

// Stats are an overlay's figures.
type Stats struct {
	VirtualSize   int64
	ClusterSize   int64
	Clusters      int64 // virtual clusters
	Allocated     int64 // clusters held in the overlay
	Zero          int64 // clusters marked zero
	PhysClusters  int64 // data clusters in the file, free ones included
	TornRepaired  int   // torn table slots passed over at open
	BaseSize      int64
	BaseHash      [32]byte
	BaseHint      string
	DirtyEntries  int // table entries not yet durable
	FreeClusters  int // reusable data clusters
	PendingFrees  int // released clusters awaiting a Sync
	DataOffset    int64
	FormatVersion string
}

// Size implements virtioblk.Backend.Size: the virtual size.
func (o *Overlay) Size() int64 { return o.hdr.virtualSize }

// BaseHash returns the content hash of the base the overlay was made over.
func (o *Overlay) BaseHash() [32]byte { return o.hdr.baseHash }

// Stats returns the overlay's figures.
func (o *Overlay) Stats() Stats {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return Stats{
		VirtualSize: o.hdr.virtualSize, ClusterSize: o.cs, Clusters: o.hdr.clusters,
		Allocated: o.allocated, Zero: o.zeroed, PhysClusters: int64(o.next) - o.hdr.dataOff>>o.shift,
		TornRepaired: o.torn, BaseSize: o.hdr.baseSize, BaseHash: o.hdr.baseHash, BaseHint: o.hdr.baseHint,
		DirtyEntries: len(o.dirty), FreeClusters: len(o.free), PendingFrees: len(o.pending),
		DataOffset: o.hdr.dataOff, FormatVersion: fmt.Sprintf("%d.%d", VersionMajor, VersionMinor),
	}
}

func (o *Overlay) getBuf() *[]byte {
	if b, ok := o.bufs.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, o.cs)
	return &b
}

// check validates a byte range against the virtual size.
func (o *Overlay) check(off, n int64) error {
	if off < 0 || n < 0 || off > o.hdr.virtualSize || n > o.hdr.virtualSize-off {
		return fmt.Errorf("cow: range [%d, +%d) outside the disk (%d bytes)", off, n, o.hdr.virtualSize)
	}
	return nil
}

// ReadAt implements io.ReaderAt. Runs of clusters that are contiguous in
// the overlay or in the base are read with one call.
func (o *Overlay) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("cow: negative offset %d", off)
	}
	var eof error
	if off >= o.hdr.virtualSize {
		return 0, io.EOF
	}
	if rest := o.hdr.virtualSize - off; int64(len(p)) > rest {
		p, eof = p[:rest], io.EOF
	}
	o.mu.RLock()
	defer o.mu.RUnlock()
	if o.err != nil {
		return 0, o.err
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		vc := pos >> o.shift
		val := o.table[vc]
		// Extend the run while the next cluster continues it.
		end := (vc + 1) << o.shift
		for end < pos+int64(len(p)-done) {
			nv := o.table[end>>o.shift]
			if !(nv == val && (val == valBase || val == valZero)) && !(isPhys(val) && nv == val+uint32((end>>o.shift)-vc)) {
				break
			}
			end += o.cs
		}
		n := int(min(end-pos, int64(len(p)-done)))
		chunk := p[done : done+n]
		var err error
		switch {
		case val == valZero:
			clear(chunk)
		case val == valBase:
			err = o.readBase(chunk, pos)
		default:
			_, err = readFull(o.f, chunk, int64(val)<<o.shift+pos&(o.cs-1))
		}
		if err != nil {
			return done, fmt.Errorf("cow: read at %d: %w", pos, err)
		}
		done += n
	}
	return done, eof
}

func isPhys(v uint32) bool { return v != valBase && v != valZero }

// readBase reads the base's bytes at off, zeros past its end.
func (o *Overlay) readBase(p []byte, off int64) error {
	n := 0
	if off < o.hdr.baseSize {
		n = int(min(int64(len(p)), o.hdr.baseSize-off))
		if _, err := readFull(o.base, p[:n], off); err != nil {
			return fmt.Errorf("base: %w", err)
		}
	}
	clear(p[n:])
	return nil
}

func readFull(r io.ReaderAt, p []byte, off int64) (int, error) {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return n, nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// WriteAt implements io.WriterAt.
func (o *Overlay) WriteAt(p []byte, off int64) (int, error) {
	if o.ro {
		return 0, errors.New("cow: read-only overlay")
	}
	if err := o.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		n, err := o.writeRun(p[done:], pos)
		if err != nil {
			return done, err
		}
		if n == 0 {
			n = int(min(o.cs-pos&(o.cs-1), int64(len(p)-done)))
			if err := o.writeCluster(p[done:done+n], pos); err != nil {
				return done, err
			}
		}
		done += n
	}
	o.written.Store(true)
	return done, nil
}

// writeRun writes the longest prefix of p that lies in allocated clusters
// contiguous in the overlay, in place and with one call; 0 if the first
// cluster is not allocated.
func (o *Overlay) writeRun(p []byte, off int64) (int, error) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	if o.err != nil {
		return 0, o.err
	}
	vc := off >> o.shift
	val := o.table[vc]
	if !isPhys(val) {
		return 0, nil
	}
	end := (vc + 1) << o.shift
	for end < off+int64(len(p)) && o.table[end>>o.shift] == val+uint32(end>>o.shift-vc) {
		end += o.cs
	}
	n := int(min(end-off, int64(len(p))))
	if _, err := o.f.WriteAt(p[:n], int64(val)<<o.shift+off&(o.cs-1)); err != nil {
		return 0, fmt.Errorf("cow: write at %d: %w", off, err)
	}
	return n, nil
}

// writeCluster writes p, which lies within one cluster, at off, allocating
// the cluster if it is still unallocated.
func (o *Overlay) writeCluster(p []byte, off int64) error {
	vc := off >> o.shift
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.err != nil {
		return o.err
	}
	val := o.table[vc]
	if isPhys(val) { // allocated meanwhile
		if _, err := o.f.WriteAt(p, int64(val)<<o.shift+off&(o.cs-1)); err != nil {
			return fmt.Errorf("cow: write at %d: %w", off, err)
		}
		return nil
	}
	// Copy on write: the whole cluster, old contents around the new.
	bp := o.getBuf()
	defer o.bufs.Put(bp)
	buf := *bp
	start := vc << o.shift
	inner := off - start
	if int64(len(p)) < o.cs {
		if val == valZero {
			clear(buf)
		} else if err := o.readBase(buf, start); err != nil {
			return fmt.Errorf("cow: read at %d: %w", start, err)
		}
	}
	copy(buf[inner:], p)
	return o.allocLocked(vc, buf)
}

// allocLocked gives cluster vc a physical cluster holding data.
//
// Preconditions: mu held for writing; vc is not mapped.
func (o *Overlay) allocLocked(vc int64, data []byte) error {
	var phys uint32
	if k := len(o.free); k > 0 {
		phys = o.free[k-1]
		o.free = o.free[:k-1]
	} else {
		if int64(o.next) >= o.hdr.maxPhys() {
			// Cannot happen: see maxPhys.
			return fmt.Errorf("cow: overlay data area full (%d clusters)", o.next)
		}
		phys = o.next
		o.next++
	}
	if _, err := o.f.WriteAt(data, int64(phys)<<o.shift); err != nil {
		o.free = append(o.free, phys)
		return fmt.Errorf("cow: write at %d: %w", vc<<o.shift, err)
	}
	o.setLocked(uint32(vc), phys)
	return nil
}

// setLocked changes cluster vc's entry, releasing its physical cluster if
// it had one.
//
// Preconditions: mu held for writing.
func (o *Overlay) setLocked(vc, val uint32) {
	old := o.table[vc]
	if old == val {
		return
	}
	if _, ok := o.dirty[vc]; !ok {
		o.dirty[vc] = old
	}
	switch {
	case isPhys(old):
		o.allocated--
	case old == valZero:
		o.zeroed--
	}
	switch {
	case isPhys(val):
		o.allocated++
	case val == valZero:
		o.zeroed++
	}
	o.table[vc] = val
	if isPhys(old) {
		o.releaseLocked(vc, old)
	}
}

// releaseLocked frees physical cluster phys, which cluster vc no longer
// maps: at once if no durable slot can name it, else after the next Sync.
//
// Preconditions: mu held for writing.
func (o *Overlay) releaseLocked(vc, phys uint32) {
	// A durable slot may hold vc's value at the last snapshot (dirty[vc],
	// set by setLocked) or, while a Sync writes, its value before it.
	onDisk := o.dirty[vc] == phys
	if old, ok := o.flight[vc]; ok && old == phys {
		onDisk = true
	}
	if onDisk {
		o.pending = append(o.pending, pendingFree{phys: phys, gen: o.gen + 1})
	} else {
		o.free = append(o.free, phys)
	}
}

// Punch implements virtioblk.Backend.Punch: [off, off+n) reads as zeros.
// Whole clusters are marked zero and their space released; parts of
// clusters are zeroed in place.
func (o *Overlay) Punch(off, n int64) error { return o.zero(off, n) }

// Zero implements virtioblk.Backend.Zero. An overlay keeps no space for a
// zero cluster, so it is Punch.
func (o *Overlay) Zero(off, n int64) error { return o.zero(off, n) }

func (o *Overlay) zero(off, n int64) error {
	if o.ro {
		return errors.New("cow: read-only overlay")
	}
	if err := o.check(off, n); err != nil {
		return err
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.err != nil {
		return o.err
	}
	for n > 0 {
		vc := off >> o.shift
		inner := off & (o.cs - 1)
		k := min(o.cs-inner, n)
		if err := o.zeroClusterLocked(vc, inner, k); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	o.written.Store(true)
	return nil
}

// zeroClusterLocked zeroes [inner, inner+k) of cluster vc.
//
// Preconditions: mu held for writing.
func (o *Overlay) zeroClusterLocked(vc, inner, k int64) error {
	val := o.table[vc]
	start := vc << o.shift
	// The cluster's part inside the virtual disk: a whole last cluster
	// may end past the virtual size.
	whole := inner == 0 && (k == o.cs || start+k == o.hdr.virtualSize)
	switch {
	case val == valZero:
		return nil
	case whole:
		if isPhys(val) {
			if err := o.f.Punch(int64(val)<<o.shift, o.cs); err != nil {
				return fmt.Errorf("cow: punch at %d: %w", start, err)
			}
		}
		o.setLocked(uint32(vc), valZero)
		return nil
	case isPhys(val):
		if err := o.f.Punch(int64(val)<<o.shift+inner, k); err != nil {
			return fmt.Errorf("cow: punch at %d: %w", start+inner, err)
		}
		return nil
	}
	// Part of a base cluster: copy on write with the range zeroed.
	bp := o.getBuf()
	defer o.bufs.Put(bp)
	buf := *bp
	if err := o.readBase(buf, start); err != nil {
		return fmt.Errorf("cow: read at %d: %w", start, err)
	}
	if allZero(buf[:inner]) && allZero(buf[inner+k:]) {
		o.setLocked(uint32(vc), valZero)
		return nil
	}
	clear(buf[inner : inner+k])
	return o.allocLocked(vc, buf)
}

// Sync implements virtioblk.Backend.Sync: every write and punch completed
// before it is durable, table entries included, when it returns nil.
//
// Order: take the dirty entries; fdatasync (the data they point to is
// durable); write each into the pair slot that does not hold its durable
// entry; fdatasync; then publish. See the package doc.
func (o *Overlay) Sync() error {
	if o.ro {
		return nil
	}
	o.syncMu.Lock()
	defer o.syncMu.Unlock()
	if o.closed {
		return errors.New("cow: overlay closed")
	}
	return o.syncLocked()
}

type snapEntry struct {
	vc, val uint32
	slot    int
}

// syncLocked is Sync.
//
// Preconditions: syncMu held.
func (o *Overlay) syncLocked() error {
	o.mu.Lock()
	if o.err != nil {
		o.mu.Unlock()
		return o.err
	}
	wrote := o.written.Swap(false)
	if len(o.dirty) == 0 && !wrote {
		o.mu.Unlock()
		return nil
	}
	o.gen++
	gen := o.gen
	snap := make([]snapEntry, 0, len(o.dirty))
	for vc := range o.dirty {
		slot := 0
		if o.cur[vc/64]&(1<<(vc%64)) == 0 {
			slot = 1
		}
		snap = append(snap, snapEntry{vc: vc, val: o.table[vc], slot: slot})
	}
	o.flight, o.dirty = o.dirty, make(map[uint32]uint32)
	o.mu.Unlock()

	err := o.writeEntries(snap)

	o.mu.Lock()
	defer o.mu.Unlock()
	o.flight = nil
	if err != nil {
		// After a failed fdatasync the page cache may have dropped the
		// data: nothing written since can be trusted to become durable.
		o.err = fmt.Errorf("cow: overlay %s: sync failed, disk offline: %w", o.path, err)
		return o.err
	}
	for _, e := range snap {
		o.cur[e.vc/64] ^= 1 << (e.vc % 64)
	}
	keep := o.pending[:0]
	for _, p := range o.pending {
		if p.gen <= gen {
			o.free = append(o.free, p.phys)
		} else {
			keep = append(keep, p)
		}
	}
	o.pending = keep
	return nil
}

// writeEntries makes the data durable, then the entries.
//
// Preconditions: syncMu held, mu not held.
func (o *Overlay) writeEntries(snap []snapEntry) error {
	if err := o.f.Datasync(); err != nil {
		return err
	}
	if len(snap) == 0 {
		return nil
	}
	slices.SortFunc(snap, func(a, b snapEntry) int { return int(a.vc) - int(b.vc) })
	seq := o.seq
	o.seq++
	var b [slotSize]byte
	for _, e := range snap {
		encodeSlot(b[:], uint64(e.vc), slot{seq: seq, val: e.val})
		off := o.hdr.tableOff + int64(e.vc)*pairSize + int64(e.slot)*slotSize
		if _, err := o.f.WriteAt(b[:], off); err != nil {
			return err
		}
	}
	return o.f.Datasync()
}

// Close implements virtioblk.Backend.Close. A writable overlay is synced
// first.
func (o *Overlay) Close() error {
	o.syncMu.Lock()
	defer o.syncMu.Unlock()
	if o.closed {
		return nil
	}
	var err error
	if !o.ro {
		err = o.syncLocked()
	}
	o.closed = true
	if cerr := o.f.Close(); err == nil {
		err = cerr
	}
	if o.baseFile != nil {
		o.baseFile.Close()
	}
	return err
}

// Changed calls f, in ascending order, with each run of bytes [off, off+n)
// that does not read from the base: clusters the overlay holds or records
// as zeros. A snapshot or a migration that carries these runs, over the
// same base, carries the whole disk.
func (o *Overlay) Changed(f func(off, n int64)) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	size := o.hdr.virtualSize
	for vc := 0; vc < len(o.table); {
		if o.table[vc] == valBase {
			vc++
			continue
		}
		end := vc + 1
		for end < len(o.table) && o.table[end] != valBase {
			end++
		}
		off := int64(vc) << o.shift
		n := min(int64(end)<<o.shift, size) - off
		if n > 0 {
			f(off, n)
		}
		vc = end
	}
}
