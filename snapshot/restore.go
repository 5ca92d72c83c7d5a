package snapshot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pierrec/lz4/v4"

	"collective/kvm/guestmem"
	"collective/machine"
)

// maxChain bounds how many parents OpenChain follows.
const maxChain = 1024

// Open opens a snapshot file and verifies its header, state and index.
func Open(path string) (*Snapshot, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	s, err := Decode(f, st.Size())
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s.Path, s.closer = path, f
	return s, nil
}

// Shape reads the header of the snapshot file at path alone and returns
// the guest RAM size and vCPU count of the machine it holds; ok is false
// for a file before format 1.3.0, whose header has no vCPU count. The
// rest of the file is not checked: Open does that.
func Shape(path string) (memSize uint64, cpus int, ok bool, err error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, false, fmt.Errorf("snapshot: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, 0, false, fmt.Errorf("snapshot: %w", err)
	}
	b := make([]byte, headerSize)
	if _, err := f.ReadAt(b, 0); err != nil {
		return 0, 0, false, fmt.Errorf("snapshot: %s: reading the header: %w", path, err)
	}
	h, err := parseHeader(b, st.Size())
	if err != nil {
		return 0, 0, false, fmt.Errorf("%s: %w", path, err)
	}
	return h.memSize, int(h.cpus), h.cpus != 0, nil
}

// Prepared is a bare machine being built (machine.NewBare) while a
// snapshot chain is opened: a restore then waits only for the longer of
// the two. Restore takes it through RestoreOptions.Prepared.
type Prepared struct {
	cfg  machine.Config
	done chan struct{}
	m    *machine.Machine
	err  error
}

// Prepare starts building, in the background, the bare machine that the
// snapshot at path restores into: its shape from Shape, the rest of the
// configuration from cfg. It returns nil when the shape is unknown (an
// older file, an unreadable one: Open then reports why). A Prepared that
// no Restore takes must be closed.
func Prepare(path string, cfg machine.Config) *Prepared {
	memSize, cpus, ok, err := Shape(path)
	if err != nil || !ok {
		return nil
	}
	cfg.MemSize, cfg.CPUs = memSize, cpus
	p := &Prepared{cfg: cfg, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		p.m, p.err = machine.NewBare(cfg)
	}()
	return p
}

// take returns the machine once built, if it has the shape cfg asks for;
// otherwise it is closed and take returns nil.
func (p *Prepared) take(cfg machine.Config) *machine.Machine {
	<-p.done
	if p.err != nil || p.m == nil {
		return nil
	}
	m := p.m
	p.m = nil
	if cfg.MemSize != p.cfg.MemSize || cfg.CPUs != p.cfg.CPUs {
		m.Close()
		return nil
	}
	return m
}

// Close releases the machine if no Restore has taken it.
func (p *Prepared) Close() {
	if p == nil {
		return
	}
	<-p.done
	if p.m != nil {
		p.m.Close()
		p.m = nil
	}
}

// OpenChain opens path and, for an incremental snapshot, its parents by
// their hints, back to a full snapshot. The chain is returned oldest
// first and checked (CheckChain).
func OpenChain(path string) ([]*Snapshot, error) {
	var chain []*Snapshot
	closeAll := func() {
		for _, s := range chain {
			s.Close()
		}
	}
	for p := path; ; {
		s, err := Open(p)
		if err != nil {
			closeAll()
			return nil, err
		}
		chain = append([]*Snapshot{s}, chain...)
		if s.Kind == KindFull {
			break
		}
		if len(chain) >= maxChain {
			closeAll()
			return nil, fmt.Errorf("snapshot: %s: a chain of more than %d snapshots", path, maxChain)
		}
		if s.ParentHint == "" {
			closeAll()
			return nil, fmt.Errorf("snapshot: %s: incremental snapshot without a parent path; name the chain explicitly: %w", p, ErrParent)
		}
		next := s.ParentHint
		if !filepath.IsAbs(next) {
			next = filepath.Join(filepath.Dir(p), next)
		}
		p = next
	}
	if err := CheckChain(chain); err != nil {
		closeAll()
		return nil, err
	}
	return chain, nil
}

// OpenFiles opens the given files as a chain, oldest first.
func OpenFiles(paths []string) ([]*Snapshot, error) {
	var chain []*Snapshot
	for _, p := range paths {
		s, err := Open(p)
		if err != nil {
			for _, c := range chain {
				c.Close()
			}
			return nil, err
		}
		chain = append(chain, s)
	}
	if err := CheckChain(chain); err != nil {
		for _, c := range chain {
			c.Close()
		}
		return nil, err
	}
	return chain, nil
}

// CheckChain checks that chain starts with a full snapshot and that each
// later one is incremental with the one before as its parent, all of the
// same machine shape.
func CheckChain(chain []*Snapshot) error {
	if len(chain) == 0 {
		return errors.New("snapshot: empty chain")
	}
	if chain[0].Kind != KindFull {
		return fmt.Errorf("snapshot: %s is incremental (parent %.16s…): the chain must start with a full snapshot: %w", name(chain[0]), chain[0].Parent, ErrParent)
	}
	for i := 1; i < len(chain); i++ {
		c, p := chain[i], chain[i-1]
		if c.Kind != KindIncremental {
			return fmt.Errorf("snapshot: %s is a full snapshot in the middle of a chain: %w", name(c), ErrParent)
		}
		if c.Parent != p.ID {
			return fmt.Errorf("snapshot: %s names parent %.16s…, but %s is %.16s…: %w", name(c), c.Parent, name(p), p.ID, ErrParent)
		}
		if c.MemSize() != p.MemSize() || c.State.CPUs != p.State.CPUs {
			return fmt.Errorf("snapshot: %s and its parent %s describe different machines: %w", name(c), name(p), ErrParent)
		}
	}
	return checkChainDisks(chain)
}

func name(s *Snapshot) string {
	if s.Path != "" {
		return s.Path
	}
	return "snapshot " + s.ID.String()[:16]
}

// apply writes the snapshot's pages into regions (laid out as the
// snapshot's): stored pages are copied in, zero-recorded pages cleared.
// Every payload's checksum is verified before it is decoded; with
// verifyHashes every page's content hash too. Chunks are decoded in
// parallel.
func (s *Snapshot) apply(regs []*guestmem.Region, verifyHashes bool, progress Progress) (int64, error) {
	if err := s.checkRegions(regs); err != nil {
		return 0, err
	}
	nw := runtime.GOMAXPROCS(0)
	var next, read, done atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var failed atomic.Bool
	fail := func(err error) {
		errOnce.Do(func() { firstErr = err; failed.Store(true) })
	}
	var progMu sync.Mutex
	total := uint64(len(s.chunks))
	var wg sync.WaitGroup
	for w := 0; w < nw; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			payload := make([]byte, lz4.CompressBlockBound(chunkBytes))
			plain := make([]byte, chunkBytes)
			for !failed.Load() {
				i := int(next.Add(1) - 1)
				if i >= len(s.chunks) {
					return
				}
				n, err := s.applyChunk(&s.chunks[i], regs, payload, plain, verifyHashes)
				if err != nil {
					fail(err)
					return
				}
				read.Add(n)
				if d := done.Add(1); progress != nil && (d%256 == 0 || d == int64(total)) {
					progMu.Lock()
					progress(uint64(d)*chunkBytes, total*chunkBytes)
					progMu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return read.Load(), firstErr
}

func (s *Snapshot) checkRegions(regs []*guestmem.Region) error {
	if len(regs) != len(s.lay.regions) {
		return fmt.Errorf("snapshot: %s: guest RAM has %d regions, the snapshot %d", name(s), len(regs), len(s.lay.regions))
	}
	for i, r := range regs {
		if r.GPA != s.lay.regions[i].GPA || r.Size() != s.lay.regions[i].Size {
			return fmt.Errorf("snapshot: %s: guest RAM region %d at %#x+%#x, the snapshot's at %#x+%#x", name(s), i, r.GPA, r.Size(), s.lay.regions[i].GPA, s.lay.regions[i].Size)
		}
	}
	return nil
}

func (s *Snapshot) applyChunk(c *chunk, regs []*guestmem.Region, payload, plain []byte, verifyHashes bool) (int64, error) {
	host := regs[c.regionIdx].Host
	n := bits.OnesCount64(c.data)
	dataOff := int64(s.h.dataOff + c.off)
	var src []byte // the data pages, in mask order
	var nread int64
	switch c.enc {
	case encImage:
		// Read the chunk's whole span and check it before any use.
		span := plain[:c.length]
		if _, err := s.r.ReadAt(span, dataOff); err != nil {
			return 0, fmt.Errorf("snapshot: %s: reading the memory image at GPA %#x: %w", name(s), c.gpa, err)
		}
		nread = int64(c.length)
		if got := crc(span); got != c.crc {
			return 0, formatErr(dataOff, "%s: memory image checksum %#08x at GPA %#x, computed %#08x: the file is corrupt", name(s), c.crc, c.gpa, got)
		}
		k := 0
		for m := c.data; m != 0; m &= m - 1 {
			i := bits.TrailingZeros64(m)
			page := span[i*pageSize : (i+1)*pageSize]
			if verifyHashes {
				if err := s.checkHash(c, k, page); err != nil {
					return 0, err
				}
			}
			lo := c.regionOff + uint64(i)*pageSize
			copy(host[lo:lo+pageSize], page)
			k++
		}
		inside := uint64(1)<<(c.length/pageSize) - 1 // all ones for 64 pages
		for m := ^c.data & inside; m != 0; m &= m - 1 {
			i := bits.TrailingZeros64(m)
			if !bytes.Equal(span[i*pageSize:(i+1)*pageSize], zeroPage) {
				return 0, formatErr(dataOff, "%s: a page recorded as zero at GPA %#x is not", name(s), c.gpa+uint64(i)*pageSize)
			}
		}
		return nread, nil
	case encPlain, encLZ4, encLZ4Groups:
		p := payload[:c.length]
		if _, err := s.r.ReadAt(p, dataOff); err != nil {
			return 0, fmt.Errorf("snapshot: %s: reading the payload of GPA %#x: %w", name(s), c.gpa, err)
		}
		nread = int64(c.length)
		if got := crc(p); got != c.crc {
			return 0, formatErr(dataOff, "%s: payload checksum %#08x at GPA %#x, computed %#08x: the file is corrupt", name(s), c.crc, c.gpa, got)
		}
		// Contiguous pages are decoded straight into guest memory (a
		// failure leaves them half written, but then the whole restore
		// fails and nothing runs on that memory).
		lo := bits.TrailingZeros64(c.data)
		contiguous := c.data>>lo == uint64(1)<<n-1 || n == 64
		var dst []byte
		if contiguous {
			start := c.regionOff + uint64(lo)*pageSize
			dst = host[start : start+uint64(n)*pageSize]
		}
		switch {
		case c.enc == encPlain && contiguous:
			copy(dst, p)
			src = dst
		case c.enc == encPlain:
			src = p
		default:
			if !contiguous {
				dst = plain[:n*pageSize]
			}
			var k int
			var err error
			if c.enc == encLZ4 {
				k, err = lz4.UncompressBlock(p, dst)
			} else {
				k, err = uncompressGroups(p, dst)
			}
			if err != nil || k != n*pageSize {
				return 0, formatErr(dataOff, "%s: lz4 payload at GPA %#x decodes to %d bytes, want %d (%v)", name(s), c.gpa, k, n*pageSize, err)
			}
			src = dst
		}
		if contiguous {
			if verifyHashes {
				for k := 0; k < n; k++ {
					if err := s.checkHash(c, k, src[k*pageSize:(k+1)*pageSize]); err != nil {
						return 0, err
					}
				}
			}
			for m := c.zero; m != 0; m &= m - 1 {
				lo := c.regionOff + uint64(bits.TrailingZeros64(m))*pageSize
				clear(host[lo : lo+pageSize])
			}
			return nread, nil
		}
	default:
		return 0, formatErr(dataOff, "unknown encoding %d", c.enc)
	}
	k := 0
	for m := c.data; m != 0; m &= m - 1 {
		i := bits.TrailingZeros64(m)
		page := src[k*pageSize : (k+1)*pageSize]
		if verifyHashes {
			if err := s.checkHash(c, k, page); err != nil {
				return 0, err
			}
		}
		lo := c.regionOff + uint64(i)*pageSize
		copy(host[lo:lo+pageSize], page)
		k++
	}
	for m := c.zero; m != 0; m &= m - 1 {
		lo := c.regionOff + uint64(bits.TrailingZeros64(m))*pageSize
		clear(host[lo : lo+pageSize])
	}
	return nread, nil
}

// uncompressGroups decodes an encLZ4Groups payload into dst, whose length
// is the pages' size: every group but the last must decode to exactly
// groupPages pages, and the payload must end with the last group.
func uncompressGroups(p, dst []byte) (int, error) {
	k := 0
	for len(dst)-k > 0 {
		if len(p) < 4 {
			return k, errors.New("truncated group length")
		}
		n := binary.LittleEndian.Uint32(p)
		p = p[4:]
		if uint64(n) > uint64(len(p)) {
			return k, fmt.Errorf("group of %d bytes in %d", n, len(p))
		}
		want := min(len(dst)-k, groupPages*pageSize)
		got, err := lz4.UncompressBlock(p[:n], dst[k:k+want])
		if err != nil {
			return k, err
		}
		if got != want {
			return k + got, fmt.Errorf("group decodes to %d bytes, want %d", got, want)
		}
		p = p[n:]
		k += want
	}
	if len(p) != 0 {
		return k, fmt.Errorf("%d bytes after the last group", len(p))
	}
	return k, nil
}

func (s *Snapshot) checkHash(c *chunk, k int, page []byte) error {
	if c.hashes == nil {
		return nil // a raw image: its chunk checksums cover the page
	}
	var h [HashSize]byte
	s.hashPage(h[:], page)
	if !bytes.Equal(h[:], c.hashes[k*HashSize:(k+1)*HashSize]) {
		return formatErr(int64(s.h.dataOff+c.off), "%s: page %d of the chunk at GPA %#x does not match its hash", name(s), k, c.gpa)
	}
	return nil
}

// VerifyImage checks every checksum of a raw memory image without
// applying it (the file's pages land in the page cache).
func (s *Snapshot) VerifyImage() error {
	if !s.RawImage() {
		return nil
	}
	nw := runtime.GOMAXPROCS(0)
	var next atomic.Int64
	errs := make([]error, nw)
	var wg sync.WaitGroup
	for w := 0; w < nw; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunkBytes)
			for {
				i := int(next.Add(1) - 1)
				if i >= len(s.chunks) || errs[w] != nil {
					return
				}
				c := &s.chunks[i]
				base := int64(s.h.dataOff + c.off)
				span := buf[:c.length]
				if _, err := s.r.ReadAt(span, base); err != nil {
					errs[w] = fmt.Errorf("snapshot: %s: reading the memory image at GPA %#x: %w", name(s), c.gpa, err)
					return
				}
				if crc(span) != c.crc {
					errs[w] = formatErr(base, "%s: memory image checksum mismatch at GPA %#x: the file is corrupt", name(s), c.gpa)
					return
				}
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// RestoreOptions tune a restore.
type RestoreOptions struct {
	// Lazy maps a raw memory image privately over guest RAM instead of
	// reading it: pages are read when the guest touches them.
	Lazy bool
	// Trust skips the raw image's checksums on the lazy path, so that
	// nothing is read before the guest runs. Only for files this host
	// wrote and kept.
	Trust bool
	// VerifyHashes checks every page against its content hash.
	VerifyHashes bool
	// Prepared, when set, is the bare machine Prepare started building
	// with the same configuration: Restore uses it when its shape is the
	// chain's (and closes it otherwise, or on an error).
	Prepared *Prepared
	// Progress, when set, is told how far the memory restore is.
	Progress Progress
}

// Restore builds a machine from a chain (oldest first; one full snapshot
// then its incrementals) with the last snapshot's state and the merged
// memory. The machine is ready to Run. On error no machine is left.
func Restore(chain []*Snapshot, cfg machine.Config, opts RestoreOptions) (*machine.Machine, *Stats, error) {
	start := time.Now()
	defer opts.Prepared.Close() // a no-op once taken
	if err := CheckChain(chain); err != nil {
		return nil, nil, err
	}
	last := chain[len(chain)-1]
	base := chain[0]
	if base.RawImage() && opts.Lazy && !opts.Trust {
		if err := base.VerifyImage(); err != nil {
			return nil, nil, err
		}
	}
	// The machine is built bare; memory and disks are filled before the
	// devices' state is restored, because restoring an active virtio
	// device starts it on the rings in guest memory.
	st := last.State
	if err := st.Validate(); err != nil {
		return nil, nil, err
	}
	if (cfg.MemSize != 0 && cfg.MemSize != st.MemSize) || (cfg.CPUs != 0 && cfg.CPUs != st.CPUs) {
		return nil, nil, fmt.Errorf("snapshot: %s holds a machine of %d bytes and %d vCPUs, not %d and %d: %w",
			name(last), st.MemSize, st.CPUs, cfg.MemSize, cfg.CPUs, machine.ErrConfig)
	}
	cfg.MemSize, cfg.CPUs = st.MemSize, st.CPUs
	var m *machine.Machine
	if opts.Prepared != nil {
		m = opts.Prepared.take(cfg)
	}
	if m == nil {
		var err error
		if m, err = machine.NewBare(cfg); err != nil {
			return nil, nil, err
		}
	}
	stats := &Stats{MemBytes: last.MemSize(), ID: last.ID}
	for i, s := range chain {
		stats.Pages += s.pages
		stats.ZeroPages += s.zeros
		stats.Chunks += len(s.chunks)
		if i == 0 && s.RawImage() && opts.Lazy {
			if err := s.mapImage(m); err != nil {
				m.Close()
				return nil, nil, err
			}
			continue
		}
		n, err := s.apply(m.Memory().Regions(), opts.VerifyHashes, opts.Progress)
		stats.Bytes += n
		if err != nil {
			m.Close()
			return nil, nil, err
		}
	}
	// The disks: identities checked and every block verified before any
	// is written back; a mismatch leaves no machine.
	nb, err := restoreDisks(chain, m.Disks())
	stats.DiskBlocks = nb
	if err != nil {
		m.Close()
		return nil, nil, err
	}
	if err := m.RestoreState(st); err != nil {
		m.Close()
		return nil, nil, err
	}
	stats.Duration = time.Since(start)
	return m, stats, nil
}

// mapImage maps the raw image's regions over the machine's guest RAM.
func (s *Snapshot) mapImage(m *machine.Machine) error {
	f, ok := s.closer.(*os.File)
	if !ok {
		return fmt.Errorf("snapshot: %s: a lazy restore needs a file", name(s))
	}
	if err := s.checkRegions(m.Memory().Regions()); err != nil {
		return err
	}
	for i := range s.lay.regions {
		if err := m.VM().MapFile(i, f, int64(s.h.dataOff+s.lay.offsets[i])); err != nil {
			return err
		}
	}
	return nil
}

// Merge flattens a chain into one full snapshot at out: restoring it
// equals restoring the chain. raw writes a raw memory image.
func Merge(out string, chain []*Snapshot, raw bool, progress Progress) (*Stats, error) {
	if err := CheckChain(chain); err != nil {
		return nil, err
	}
	last := chain[len(chain)-1]
	mem, err := ImageOf(chain)
	if err != nil {
		return nil, err
	}
	if err := checkChainDisks(chain); err != nil {
		return nil, err
	}
	return writeFile(out, writeSpec{mem: mem, state: stateOf(last.State), raw: raw, progress: progress, disks: mergeDisks(chain)})
}

// ImageOf returns the guest memory a chain describes, in host memory.
func ImageOf(chain []*Snapshot) (*guestmem.Memory, error) {
	if err := CheckChain(chain); err != nil {
		return nil, err
	}
	mem, err := guestmem.NewFake(chain[0].lay.regions...)
	if err != nil {
		return nil, err
	}
	for _, s := range chain {
		if _, err := s.apply(mem.Regions(), false, nil); err != nil {
			return nil, err
		}
	}
	return mem, nil
}
