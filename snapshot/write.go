package snapshot

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"math/bits"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"collective/internal/lz4block"
	"collective/kvm/guestmem"
	"collective/machine"
)

// Stats are the figures of a snapshot write or restore.
type Stats struct {
	// Bytes is the file size (write) or the bytes read (restore).
	Bytes int64
	// MemBytes is the guest RAM covered.
	MemBytes uint64
	// Pages is the number of pages stored (write) or restored.
	Pages int
	// ZeroPages is the number of pages recorded as zero (incremental).
	ZeroPages int
	// Chunks is the number of index entries.
	Chunks int
	// Duration is the wall time of the operation.
	Duration time.Duration
	// ID is the snapshot's ID (write).
	ID ID
	// DiskBlocks is the number of disk blocks stored (write) or written
	// back (restore); DiskBytes their payload bytes in the file.
	DiskBlocks int
	DiskBytes  int64
}

func (s *Stats) String() string {
	disk := ""
	if s.DiskBlocks > 0 {
		disk = fmt.Sprintf(", %d disk blocks", s.DiskBlocks)
	}
	return fmt.Sprintf("%d pages (%.1f MiB) in %.1f MiB, %d zero pages recorded%s, %v",
		s.Pages, float64(s.Pages)*pageSize/(1<<20), float64(s.Bytes)/(1<<20), s.ZeroPages, disk, s.Duration.Round(time.Microsecond))
}

// Progress receives how much of an operation is done, in bytes of guest
// memory out of total. It is called from one goroutine at a time.
type Progress func(done, total uint64)

// writeSpec says what to write.
type writeSpec struct {
	mem   *guestmem.Memory
	dirty [][]uint64 // per region; nil for a full snapshot
	// state returns the machine state. It is called once the memory is
	// written (the state goes last in the file), so that a running
	// machine's can be read meanwhile (Session.Take).
	state      func() (*machine.MachineState, error)
	parent     ID
	parentHint string
	raw        bool
	progress   Progress
	disks      []diskOut
}

// inFlight is how many encoded chunks each worker may have ahead of the
// writer, which writes them in order while the workers encode the next.
const inFlight = 8

type work struct {
	region int
	off    uint64 // of the chunk in the region
	gpa    uint64
	cand   uint64 // pages to consider (dirty, and inside the region)
	zero   uint64 // candidates known to be zero without a look (never touched)
}

type result struct {
	c       chunk
	payload []byte
	err     error
}

// writeRuns writes the runs of pages in mask of the chunk at off in host
// to f at pos (the chunk's first page).
func writeRuns(f *os.File, host []byte, off, mask uint64, pos int64) error {
	for m := mask; m != 0; {
		i0 := bits.TrailingZeros64(m)
		run := bits.TrailingZeros64(^(m >> i0))
		lo := off + uint64(i0)*pageSize
		if _, err := f.WriteAt(host[lo:lo+uint64(run)*pageSize], pos+int64(i0)*pageSize); err != nil {
			return err
		}
		if i0+run >= 64 {
			break
		}
		m &^= (uint64(1)<<run - 1) << i0
	}
	return nil
}

var zeroPage = make([]byte, pageSize)

// writeFile writes a snapshot to path atomically (a temporary file renamed
// into place).
func writeFile(path string, sp writeSpec) (*Stats, error) {
	start := time.Now()
	regs := sp.mem.Regions()
	var memSize uint64 // guest RAM: its regions (boot.RAMLayout) add up to it
	for _, r := range regs {
		memSize += r.Size()
	}
	lay := newLayout(memSize)
	if len(regs) != len(lay.regions) {
		return nil, fmt.Errorf("snapshot: memory has %d regions, the layout of %d bytes %d", len(regs), memSize, len(lay.regions))
	}
	for i, r := range regs {
		if r.GPA != lay.regions[i].GPA || r.Size() != lay.regions[i].Size {
			return nil, fmt.Errorf("snapshot: memory region %d at %#x+%#x, want %+v", i, r.GPA, r.Size(), lay.regions[i])
		}
	}
	if sp.dirty != nil && sp.raw {
		return nil, fmt.Errorf("snapshot: an incremental snapshot cannot be a raw image")
	}
	var ws []work
	var total uint64
	for ri, r := range regs {
		// A full snapshot reads no page the guest never touched
		// (guestmem.Resident): a mostly idle 1 GiB guest is not scanned.
		var res []uint64
		if sp.dirty == nil {
			res = guestmem.Resident(r.Host)
		}
		for off := uint64(0); off < r.Size(); off += chunkBytes {
			n := min(ChunkPages, (r.Size()-off)/pageSize)
			cand := uint64(1)<<n - 1
			if n == 64 {
				cand = ^uint64(0)
			}
			if sp.dirty != nil {
				w := off / chunkBytes
				if int(w) >= len(sp.dirty[ri]) {
					continue
				}
				cand &= sp.dirty[ri][w]
			}
			var zero uint64
			if res != nil {
				zero = cand &^ res[off/chunkBytes]
			}
			if cand&^zero != 0 || sp.raw {
				ws = append(ws, work{ri, off, r.GPA + off, cand, zero})
				total += uint64(bits.OnesCount64(cand)) * pageSize
			}
		}
	}

	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	h := header{major: formatMajor, minor: formatMinor, patch: formatPatch, kind: KindFull,
		memSize: memSize, parent: sp.parent}
	if sp.dirty != nil {
		h.kind = KindIncremental
	}
	// Layout: header, memory data, index, disk payloads and tables, state.
	h.dataOff = headerSize
	if sp.raw {
		h.flags |= flagRawImage
		h.dataOff = pageSize
		h.dataLen = memSize
	}
	if _, err := f.Seek(int64(h.dataOff), 0); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	bw := bufio.NewWriterSize(f, 64<<10) // payloads of a chunk (up to 256 KiB) mostly bypass it

	var index bytes.Buffer
	stats := &Stats{MemBytes: memSize}
	// Workers encode chunks w, w+nw, w+2nw, ... (hash, zero check,
	// compression) into a ring of buffers and hand them over in order on
	// their channel; this goroutine writes them in file order meanwhile.
	// A buffer is reused inFlight+2 chunks later, when the writer is done
	// with it (it has taken a later chunk of the same worker).
	nw := min(runtime.GOMAXPROCS(0), max(1, len(ws)))
	outs := make([]chan result, nw)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range nw {
		outs[w] = make(chan result, inFlight)
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := new(lz4block.Compressor)
			var bufs [][]byte
			if !sp.raw {
				bufs = make([][]byte, inFlight+2)
				for i := range bufs {
					bufs[i] = make([]byte, chunkBytes+lz4block.CompressBound(chunkBytes)+4*ChunkPages/groupPages)
				}
			}
			for k, i := 0, w; i < len(ws); k, i = k+1, i+nw {
				var buf []byte
				if bufs != nil {
					buf = bufs[k%len(bufs)]
				}
				wk := ws[i]
				host := regs[wk.region].Host
				r := encodeChunk(host, wk, sp.raw, sp.dirty != nil, buf, c)
				if sp.raw {
					// The image's data pages go at their place, from both
					// workers at once; zero pages stay holes.
					r.err = writeRuns(f, host, wk.off, r.c.data, int64(h.dataOff+lay.offsets[wk.region]+wk.off))
				}
				select {
				case outs[w] <- r:
				case <-stop:
					return
				}
			}
		}()
	}
	defer func() { close(stop); wg.Wait() }()
	var dataPos uint64
	var done uint64
	for i, wk := range ws {
		r := <-outs[i%nw]
		done += uint64(bits.OnesCount64(wk.cand)) * pageSize
		if sp.progress != nil && (i%64 == 63 || i == len(ws)-1) {
			sp.progress(done, total)
		}
		if r.c.data|r.c.zero == 0 && !sp.raw {
			continue
		}
		if r.err != nil {
			return nil, fmt.Errorf("snapshot: %w", r.err)
		}
		if sp.raw {
			r.c.off = lay.offsets[wk.region] + wk.off
		} else {
			r.c.off = dataPos
			if _, err := bw.Write(r.payload); err != nil {
				return nil, fmt.Errorf("snapshot: %w", err)
			}
			dataPos += uint64(len(r.payload))
		}
		r.c.marshal(&index)
		stats.Pages += bits.OnesCount64(r.c.data)
		stats.ZeroPages += bits.OnesCount64(r.c.zero)
		stats.Chunks++
	}
	if !sp.raw {
		if err := bw.Flush(); err != nil {
			return nil, fmt.Errorf("snapshot: %w", err)
		}
		h.dataLen = dataPos
	}
	ib := index.Bytes()
	h.indexOff = h.dataOff + h.dataLen
	h.indexLen = uint64(len(ib))
	h.indexCRC = crc(ib)
	if _, err := f.WriteAt(ib, int64(h.indexOff)); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	st, err := sp.state()
	if err != nil {
		return nil, err
	}
	if st.MemSize != memSize {
		return nil, fmt.Errorf("snapshot: the machine state has %d bytes of RAM, the memory %d", st.MemSize, memSize)
	}
	h.cpus = uint32(st.CPUs)
	fs := fileState{Machine: st, Regions: lay.regions, Parent: sp.parentHint, Created: time.Now().UTC()}
	pos := h.indexOff + h.indexLen
	if len(sp.disks) > 0 {
		if _, err := f.Seek(int64(pos), 0); err != nil {
			return nil, fmt.Errorf("snapshot: %w", err)
		}
		bw.Reset(f)
		dw := &diskWriter{w: bw, pos: pos, buf: make([]byte, diskBlock), cmp: make([]byte, lz4block.CompressBound(diskBlock))}
		for _, d := range sp.disks {
			rec, err := dw.writeDisk(d)
			if err != nil {
				return nil, fmt.Errorf("snapshot: %w", err)
			}
			fs.Disks = append(fs.Disks, rec)
		}
		if err := bw.Flush(); err != nil {
			return nil, fmt.Errorf("snapshot: %w", err)
		}
		pos = dw.pos
		stats.DiskBlocks, stats.DiskBytes = dw.n, dw.b
	}
	sb, err := json.Marshal(&fs)
	if err != nil {
		return nil, fmt.Errorf("snapshot: encoding the state: %w", err)
	}
	if len(sb) > MaxStateSize {
		return nil, fmt.Errorf("snapshot: state of %d bytes exceeds the limit of %d", len(sb), MaxStateSize)
	}
	h.stateOff, h.stateLen, h.stateCRC = pos, uint64(len(sb)), crc(sb)
	if _, err := f.WriteAt(sb, int64(h.stateOff)); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	if _, err := f.WriteAt(h.marshal(), 0); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	// A file replaced at path is released in the background: freeing its
	// pages (30-70 ms for 256 MiB on tmpfs here) is no part of taking the
	// snapshot. An open descriptor keeps it alive past the rename.
	old := openRegular(path)
	if err := os.Rename(tmp, path); err != nil {
		if old != nil {
			old.Close()
		}
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	if old != nil {
		go old.Close()
	}
	ok = true
	stats.Bytes = int64(h.stateOff + h.stateLen)
	stats.ID = computeID(sb, ib, sp.parent)
	stats.Duration = time.Since(start)
	return stats, nil
}

// encodeChunk finds the chunk's non-zero candidate pages and, unless raw
// (a raw image has no page hashes: its chunk CRCs cover every byte),
// hashes them and compresses them into buf: straight from guest memory when
// they are contiguous, else gathered first. The payload may be guest
// memory itself (plain pages), which holds still while the machine is
// paused.
func encodeChunk(host []byte, wk work, raw, incremental bool, buf []byte, c *lz4block.Compressor) result {
	var r result
	r.c.gpa = wk.gpa
	crcAcc := uint32(0)
	var hashes []byte
	if !raw {
		hashes = make([]byte, 0, bits.OnesCount64(wk.cand)*HashSize)
	}
	for m := wk.cand; m != 0; m &= m - 1 {
		i := bits.TrailingZeros64(m)
		lo := wk.off + uint64(i)*pageSize
		if wk.zero&(1<<i) != 0 {
			if raw {
				crcAcc = crcZeroPage(crcAcc)
			}
			continue
		}
		page := host[lo : lo+pageSize]
		if bytes.Equal(page, zeroPage) {
			if incremental {
				r.c.zero |= 1 << i
			}
			if raw {
				crcAcc = crcZeroPage(crcAcc)
			}
			continue
		}
		r.c.data |= 1 << i
		if raw {
			crcAcc = crc32.Update(crcAcc, castagnoli(), page)
			continue
		}
		var hsum [HashSize]byte
		pageHash(hsum[:], page)
		hashes = append(hashes, hsum[:]...)
	}
	r.c.hashes = hashes
	if raw {
		r.c.enc = encImage
		r.c.crc = crcAcc
		inside := wk.cand // pages inside the region: the full span for a full snapshot
		r.c.length = uint32(bits.Len64(inside)) * pageSize
		return r
	}
	if r.c.data == 0 {
		return r
	}
	var plain []byte
	lo := bits.TrailingZeros64(r.c.data)
	n := bits.OnesCount64(r.c.data)
	if r.c.data>>lo == uint64(1)<<n-1 || n == 64 {
		start := wk.off + uint64(lo)*pageSize
		plain = host[start : start+uint64(n)*pageSize]
	} else {
		plain = buf[:0]
		for m := r.c.data; m != 0; m &= m - 1 {
			off := wk.off + uint64(bits.TrailingZeros64(m))*pageSize
			plain = append(plain, host[off:off+pageSize]...)
		}
	}
	// lz4 output is kept only when it saves at least an eighth: below
	// that, decoding on every restore costs more than the bytes it saves
	// (lz4 itself skips quickly over data it cannot compress, about 8 GB/s
	// here, so there is no sample to take first).
	// dst holds only what may be kept, so that the encoder stops as soon
	// as a chunk is known not to pay.
	dst := buf[chunkBytes : chunkBytes+len(plain)-len(plain)/8]
	k, ok := compressGroups(c, plain, dst)
	if ok && k <= len(plain)-len(plain)/8 {
		r.c.enc, r.payload = encLZ4Groups, dst[:k]
	} else {
		r.c.enc, r.payload = encPlain, plain
	}
	r.c.length = uint32(len(r.payload))
	r.c.crc = crc(r.payload)
	return r
}

// compressGroups writes plain's pages into dst as encLZ4Groups: groups of
// groupPages pages, each a u32 length and an lz4 block. It reports false
// when dst is too small; dst needs lz4block.CompressBound(len(plain))
// bytes plus 4 per group.
func compressGroups(c *lz4block.Compressor, plain, dst []byte) (int, bool) {
	k := 0
	for len(plain) > 0 {
		g := plain[:min(len(plain), groupPages*pageSize)]
		plain = plain[len(g):]
		if len(dst)-k < 4 {
			return 0, false
		}
		n := c.Compress(dst[k+4:], g)
		if n == 0 {
			return 0, false
		}
		binary.LittleEndian.PutUint32(dst[k:], uint32(n))
		k += 4 + n
	}
	return k, true
}

// zeroPageCRC()[k][b] is the CRC-32C register's change from byte b in
// position k after a page of zeros: the register's update over a zero
// page is linear, so crcZeroPage costs four lookups, not a page. Built at
// first use, not at package initialisation (every VMM start runs those).
var zeroPageCRC = sync.OnceValue(func() *[4][256]uint32 {
	t := new([4][256]uint32)
	var basis [32]uint32
	for i := range basis {
		basis[i] = ^crc32.Update(^(uint32(1) << i), castagnoli(), zeroPage)
	}
	for k := range t {
		for b := range 256 {
			var v uint32
			for j := range 8 {
				if b&(1<<j) != 0 {
					v ^= basis[8*k+j]
				}
			}
			t[k][b] = v
		}
	}
	return t
})

// crcZeroPage returns crc32.Update(c, castagnoli(), zeroPage).
func crcZeroPage(c uint32) uint32 {
	x := ^c
	t := zeroPageCRC()
	return ^(t[0][byte(x)] ^ t[1][byte(x>>8)] ^ t[2][byte(x>>16)] ^ t[3][byte(x>>24)])
}

// openRegular opens path when it is a regular file, else returns nil
// (never blocking on a FIFO, never following a symbolic link).
func openRegular(path string) *os.File {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil
	}
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil
	}
	return f
}

// parentHint returns parent's path relative to child's directory when
// that is possible, else its absolute path.
func parentHint(child, parent string) string {
	if parent == "" {
		return ""
	}
	abs, err := filepath.Abs(parent)
	if err != nil {
		return parent
	}
	cabs, err := filepath.Abs(filepath.Dir(child))
	if err == nil {
		if rel, err := filepath.Rel(cabs, abs); err == nil {
			return rel
		}
	}
	return abs
}

// WriteFull writes a full snapshot of mem (laid out as boot.RAMLayout of
// st.MemSize) with state st: for tools and tests that hold memory
// themselves; a running machine's snapshots go through a Session.
func WriteFull(path string, mem *guestmem.Memory, st *machine.MachineState, raw bool) (*Stats, error) {
	return writeFile(path, writeSpec{mem: mem, state: stateOf(st), raw: raw})
}

// WriteIncremental writes an incremental snapshot of the pages of mem
// marked in dirty (one bitmap per region), as a child of parent.
func WriteIncremental(path string, mem *guestmem.Memory, dirty [][]uint64, st *machine.MachineState, parent *Snapshot) (*Stats, error) {
	if len(dirty) != len(mem.Regions()) {
		return nil, fmt.Errorf("snapshot: %d dirty bitmaps for %d regions", len(dirty), len(mem.Regions()))
	}
	return writeFile(path, writeSpec{mem: mem, dirty: dirty, state: stateOf(st), parent: parent.ID, parentHint: parentHint(path, parent.Path)})
}

// stateOf returns a writeSpec.state for a state at hand.
func stateOf(st *machine.MachineState) func() (*machine.MachineState, error) {
	return func() (*machine.MachineState, error) { return st, nil }
}
