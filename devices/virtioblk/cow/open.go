package cow

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// CreateOptions are the choices made when an overlay is created.
type CreateOptions struct {
	// ClusterSize is a power of two in [4 KiB, 2 MiB]; 0 means 64 KiB.
	ClusterSize int64
	// Size is the virtual size, at least the base's; 0 means the base's
	// size rounded up to 512 bytes.
	Size int64
	// Progress reports hashing the base, when its hash is not cached.
	Progress Progress
}

// Create makes a new, empty overlay at path over the base file. It fails
// if path exists. The file appears at path complete and durable, or not at
// all.
func Create(path, base string, opt CreateOptions) error {
	bf, err := os.Open(base)
	if err != nil {
		return fmt.Errorf("cow: base: %w", err)
	}
	sum, _, err := baseHash(bf, opt.Progress, false)
	bf.Close()
	if err != nil {
		return fmt.Errorf("cow: hashing base: %w", err)
	}
	st, err := os.Stat(base)
	if err != nil {
		return fmt.Errorf("cow: base: %w", err)
	}
	h := header{baseSize: st.Size(), baseHash: sum}
	cs := opt.ClusterSize
	if cs == 0 {
		cs = DefaultClusterSize
	}
	for h.clusterShift = MinClusterShift; int64(1)<<h.clusterShift < cs && h.clusterShift < MaxClusterShift; h.clusterShift++ {
	}
	if int64(1)<<h.clusterShift != cs {
		return fmt.Errorf("cow: cluster size %d is not a power of two in [%d, %d]", cs, 1<<MinClusterShift, 1<<MaxClusterShift)
	}
	h.virtualSize = (h.baseSize + 511) &^ 511
	if opt.Size != 0 {
		if opt.Size < h.virtualSize || opt.Size%512 != 0 {
			return fmt.Errorf("cow: size %d is below the base's %d bytes or not a multiple of 512", opt.Size, h.baseSize)
		}
		h.virtualSize = opt.Size
	}
	if h.virtualSize == 0 {
		return fmt.Errorf("cow: the base is empty: give a size")
	}
	if h.virtualSize > int64(MaxClusters)<<h.clusterShift {
		return fmt.Errorf("cow: size %d needs more than %d clusters of %d bytes", h.virtualSize, MaxClusters, cs)
	}
	if abs, err := filepath.Abs(base); err == nil && len(abs) <= MaxBaseHint {
		h.baseHint = abs
	}
	h.layout()

	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("cow: %w", err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if _, err := tmp.Write(h.encode()); err != nil {
		return fmt.Errorf("cow: %w", err)
	}
	if err := tmp.Truncate(h.dataOff); err != nil {
		return fmt.Errorf("cow: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("cow: %w", err)
	}
	// link(2) fails if path exists: two creators cannot clobber each other.
	if err := os.Link(tmp.Name(), path); err != nil {
		return fmt.Errorf("cow: %w", err)
	}
	return syncDir(dir)
}

// Open opens the overlay at path over base; an empty base means the path
// hint in the header (relative to the overlay's folder if relative). A
// writable overlay is locked against other writers and readers.
func Open(path, base string, readOnly bool) (*Overlay, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("cow: %w", err)
	}
	of := osFile{f}
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("cow: overlay %s is not a regular file", path)
	}
	if err := of.lock(!readOnly); err != nil {
		f.Close()
		return nil, err
	}
	o, err := openStorage(path, of, base, readOnly)
	if err != nil {
		f.Close()
		return nil, err
	}
	return o, nil
}

// OpenOrCreate opens the overlay at path, creating it over base with the
// default options if it does not exist (and readOnly is false).
func OpenOrCreate(path, base string, readOnly bool) (*Overlay, error) {
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) && !readOnly && base != "" {
		if err := Create(path, base, CreateOptions{}); err != nil && !errors.Is(err, fs.ErrExist) {
			return nil, err
		}
	}
	return Open(path, base, readOnly)
}

// IsOverlay reports whether the file at path starts with the overlay magic.
func IsOverlay(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	var b [len(Magic)]byte
	_, err = io.ReadFull(f, b[:])
	return err == nil && string(b[:]) == Magic
}

// openStorage loads the overlay in f and attaches its base.
func openStorage(path string, f storage, base string, readOnly bool) (*Overlay, error) {
	o, err := load(path, f, readOnly)
	if err != nil {
		return nil, err
	}
	if base == "" {
		base = o.hdr.baseHint
		if base == "" {
			return nil, fmt.Errorf("cow: overlay %s names no base: give one", path)
		}
		if !filepath.IsAbs(base) {
			base = filepath.Join(filepath.Dir(path), base)
		}
	}
	if err := o.attachBase(base); err != nil {
		return nil, err
	}
	return o, nil
}

// attachBase opens the base read-only and checks its size and hash.
func (o *Overlay) attachBase(path string) error {
	bf, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("cow: base of %s: %w", o.path, err)
	}
	st, err := bf.Stat()
	if err != nil {
		bf.Close()
		return fmt.Errorf("cow: base of %s: %w", o.path, err)
	}
	if st.Size() != o.hdr.baseSize {
		bf.Close()
		return fmt.Errorf("%w: base %s is %d bytes, overlay %s was made over %d bytes", ErrBaseMismatch, path, st.Size(), o.path, o.hdr.baseSize)
	}
	sum, _, err := baseHash(bf, nil, false)
	if err != nil {
		bf.Close()
		return fmt.Errorf("cow: hashing base %s: %w", path, err)
	}
	if sum != o.hdr.baseHash {
		bf.Close()
		return fmt.Errorf("%w: base %s has SHA-256 %s, overlay %s was made over %s", ErrBaseMismatch, path, hex.EncodeToString(sum[:]), o.path, hex.EncodeToString(o.hdr.baseHash[:]))
	}
	o.base, o.baseFile = bf, bf
	return nil
}

// tableChunk is how many pairs load reads at once.
const tableChunk = 2048

// load validates and decodes the header and the table. Memory allocated is
// bounded by the cluster count (see the package doc's Security section).
func load(path string, f storage, readOnly bool) (*Overlay, error) {
	size, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("cow: %w", err)
	}
	hb := make([]byte, HeaderSize)
	n, err := f.ReadAt(hb, 0)
	if err != nil && err != io.EOF {
		return nil, fmt.Errorf("cow: reading header of %s: %w", path, err)
	}
	if n < len(Magic) || !bytes.Equal(hb[:len(Magic)], []byte(Magic)) {
		return nil, &FormatError{Path: path, Msg: fmt.Sprintf("bad magic %q: not a collective overlay", hb[:min(n, len(Magic))])}
	}
	h, err := decodeHeader(path, hb[:n], size)
	if err != nil {
		return nil, err
	}
	o := &Overlay{path: path, f: f, hdr: *h, shift: h.clusterShift, cs: h.clusterSize(), ro: readOnly,
		dirty: make(map[uint32]uint32)}
	nc := h.clusters
	o.table = make([]uint32, nc)
	o.cur = make([]uint64, (nc+63)/64)

	dataStart := h.dataOff >> h.clusterShift
	maxPhys := min(h.maxPhys(), size>>h.clusterShift) // whole clusters inside the file
	used := make([]uint64, (h.maxPhys()-dataStart+63)/64)
	next := dataStart
	var maxSeq uint64
	buf := make([]byte, tableChunk*pairSize)
	for first := int64(0); first < nc; first += tableChunk {
		k := min(tableChunk, nc-first)
		chunk := buf[:k*pairSize]
		if _, err := readFull(f, chunk, h.tableOff+first*pairSize); err != nil {
			return nil, fmt.Errorf("cow: reading table of %s: %w", path, err)
		}
		for i := range k {
			vc := first + i
			off := h.tableOff + vc*pairSize
			s, which, torn, msg := pickSlot(chunk[i*pairSize:(i+1)*pairSize], uint64(vc))
			if msg != "" {
				return nil, &FormatError{Path: path, Off: off, Msg: msg}
			}
			if torn {
				o.torn++
			}
			if which == 1 {
				o.cur[vc/64] |= 1 << (vc % 64)
			}
			maxSeq = max(maxSeq, s.seq)
			o.table[vc] = s.val
			switch {
			case s.val == valZero:
				o.zeroed++
			case s.val == valBase:
			default:
				p := int64(s.val)
				if p < dataStart || p >= h.maxPhys() {
					return nil, &FormatError{Path: path, Off: off, Msg: fmt.Sprintf("cluster %d maps physical cluster %d, outside the data area [%d, %d)", vc, p, dataStart, h.maxPhys())}
				}
				if p >= maxPhys {
					return nil, &FormatError{Path: path, Off: off, Msg: fmt.Sprintf("cluster %d maps physical cluster %d, past the end of the file (%d bytes)", vc, p, size)}
				}
				bit := p - dataStart
				if used[bit/64]&(1<<(bit%64)) != 0 {
					other := int64(0)
					for j := range vc {
						if int64(o.table[j]) == p {
							other = j
							break
						}
					}
					return nil, &FormatError{Path: path, Off: off, Msg: fmt.Sprintf("clusters %d and %d both map physical cluster %d (overlap)", other, vc, p)}
				}
				used[bit/64] |= 1 << (bit % 64)
				o.allocated++
				next = max(next, p+1)
			}
		}
	}
	for p := next - 1; p >= dataStart; p-- { // descending: allocation pops the lowest
		bit := p - dataStart
		if used[bit/64]&(1<<(bit%64)) == 0 {
			o.free = append(o.free, uint32(p))
		}
	}
	o.next = uint32(next)
	o.seq = maxSeq + 1
	return o, nil
}
