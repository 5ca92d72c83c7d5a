package snapshot

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"
	"time"

	"github.com/zeebo/xxh3"

	"collective/kvm/boot"
	"collective/kvm/guestmem"
	"collective/machine"
)

// FormatVersion is the version of the file format this package writes.
const FormatVersion = "1.3.0"

const (
	formatMajor, formatMinor, formatPatch = 1, 3, 0

	magic      = "CLVSNAP\n"
	headerSize = 128
	pageSize   = guestmem.PageSize
	// ChunkPages is the number of pages per index entry and payload.
	ChunkPages = 64
	chunkBytes = ChunkPages * pageSize
	// HashSize is the size of a page's content hash.
	HashSize = 16
	// minor13 is format 1.3.0's minor version, from which page hashes
	// are XXH3-128 (SHA-256/128 before), raw images store none, and the
	// header holds the vCPU count (Shape; a zero reserved field before).
	minor13 = 3
	// maxCPUs bounds the header's vCPU count (KVM's own limit is lower).
	maxCPUs    = 4096
	entryFixed = 48

	// MaxStateSize caps the state section (a MachineState is tens of KiB).
	MaxStateSize = 16 << 20
	// maxMemSize caps the guest RAM a snapshot may describe (64 TiB).
	maxMemSize = 1 << 46
)

// Snapshot kinds.
const (
	KindFull        = 1
	KindIncremental = 2
)

const flagRawImage = 1

// Payload encodings.
const (
	encPlain = 0
	encLZ4   = 1 // one lz4 block (written up to format 1.1)
	encImage = 2
	// encLZ4Groups (format 1.2): the data pages in groups of groupPages,
	// each a u32 length and an lz4 block. Go's lz4 compresses blocks of
	// at most 64 KiB about a fifth faster than one 256 KiB block.
	encLZ4Groups = 3
)

// groupPages is the number of pages per lz4 block of encLZ4Groups.
const groupPages = 16

// Errors callers branch on.
var (
	// ErrFormat is matched by every error about a malformed, corrupt or
	// truncated file.
	ErrFormat = errors.New("snapshot: bad file")
	// ErrVersion is machine.ErrVersion: an unsupported format version.
	ErrVersion = machine.ErrVersion
	// ErrParent is matched when a chain's parent is missing or wrong.
	ErrParent = errors.New("snapshot: wrong parent")
)

// FormatError reports a malformed file, with the offset where it was seen.
type FormatError struct {
	Off int64
	Msg string
}

func (e *FormatError) Error() string {
	return fmt.Sprintf("snapshot: bad file at byte %#x: %s", e.Off, e.Msg)
}

// Is reports whether target is ErrFormat.
func (e *FormatError) Is(target error) bool { return target == ErrFormat }

func formatErr(off int64, format string, a ...any) error {
	return &FormatError{Off: off, Msg: fmt.Sprintf(format, a...)}
}

// castagnoli returns the CRC-32C table, which hash/crc32 makes at the
// first call (not at package initialisation, which every VMM start runs).
func castagnoli() *crc32.Table { return crc32.MakeTable(crc32.Castagnoli) }

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli()) }

// ID names a snapshot: SHA-256 of its state and index sections and its
// parent's ID.
type ID [32]byte

func (id ID) String() string { return hex.EncodeToString(id[:]) }

// IsZero reports whether id is the zero ID (no parent).
func (id ID) IsZero() bool { return id == ID{} }

type header struct {
	major, minor, patch uint16
	kind                uint16
	flags               uint32
	memSize             uint64
	stateOff, stateLen  uint64
	indexOff, indexLen  uint64
	dataOff, dataLen    uint64
	parent              ID
	stateCRC, indexCRC  uint32
	cpus                uint32 // since 1.3.0; 0 before
}

func (h *header) marshal() []byte {
	b := make([]byte, headerSize)
	le := binary.LittleEndian
	copy(b, magic)
	le.PutUint16(b[8:], h.major)
	le.PutUint16(b[10:], h.minor)
	le.PutUint16(b[12:], h.patch)
	le.PutUint16(b[14:], h.kind)
	le.PutUint32(b[16:], h.flags)
	le.PutUint32(b[20:], pageSize)
	le.PutUint64(b[24:], h.memSize)
	le.PutUint64(b[32:], h.stateOff)
	le.PutUint64(b[40:], h.stateLen)
	le.PutUint64(b[48:], h.indexOff)
	le.PutUint64(b[56:], h.indexLen)
	le.PutUint64(b[64:], h.dataOff)
	le.PutUint64(b[72:], h.dataLen)
	copy(b[80:112], h.parent[:])
	le.PutUint32(b[112:], h.stateCRC)
	le.PutUint32(b[116:], h.indexCRC)
	le.PutUint32(b[120:], h.cpus)
	le.PutUint32(b[124:], crc(b[:124]))
	return b
}

func parseHeader(b []byte, size int64) (*header, error) {
	if len(b) < headerSize {
		return nil, formatErr(0, "truncated: %d bytes, the header alone is %d", len(b), headerSize)
	}
	if string(b[:8]) != magic {
		return nil, formatErr(0, "not a Collective snapshot (magic %q)", b[:8])
	}
	le := binary.LittleEndian
	h := &header{
		major: le.Uint16(b[8:]), minor: le.Uint16(b[10:]), patch: le.Uint16(b[12:]),
		kind: le.Uint16(b[14:]), flags: le.Uint32(b[16:]), memSize: le.Uint64(b[24:]),
		stateOff: le.Uint64(b[32:]), stateLen: le.Uint64(b[40:]),
		indexOff: le.Uint64(b[48:]), indexLen: le.Uint64(b[56:]),
		dataOff: le.Uint64(b[64:]), dataLen: le.Uint64(b[72:]),
		stateCRC: le.Uint32(b[112:]), indexCRC: le.Uint32(b[116:]), cpus: le.Uint32(b[120:]),
	}
	copy(h.parent[:], b[80:112])
	// The version is checked before the checksum, so that a file of
	// another format version is refused for that reason.
	if err := machine.CheckVersion("snapshot", fmt.Sprintf("%d.%d.%d", h.major, h.minor, h.patch), FormatVersion); err != nil {
		return nil, err
	}
	if got, want := crc(b[:124]), le.Uint32(b[124:]); got != want {
		return nil, formatErr(124, "header checksum %#08x, computed %#08x: the file is corrupt", want, got)
	}
	switch {
	case le.Uint32(b[20:]) != pageSize:
		return nil, formatErr(20, "page size %d, want %d", le.Uint32(b[20:]), pageSize)
	case h.kind != KindFull && h.kind != KindIncremental:
		return nil, formatErr(14, "unknown kind %d", h.kind)
	case h.flags&^flagRawImage != 0:
		return nil, formatErr(16, "unknown flags %#x", h.flags)
	case h.flags&flagRawImage != 0 && h.kind != KindFull:
		return nil, formatErr(16, "a raw memory image in an incremental snapshot")
	case h.kind == KindFull && !h.parent.IsZero():
		return nil, formatErr(80, "a full snapshot with a parent")
	case h.kind == KindIncremental && h.parent.IsZero():
		return nil, formatErr(80, "an incremental snapshot without a parent")
	case h.memSize == 0 || h.memSize%pageSize != 0 || h.memSize > maxMemSize:
		return nil, formatErr(24, "guest RAM size %d", h.memSize)
	case h.stateLen > MaxStateSize:
		return nil, formatErr(40, "state section of %d bytes, limit %d", h.stateLen, MaxStateSize)
	case h.minor < minor13 && h.cpus != 0:
		return nil, formatErr(120, "reserved field not zero")
	case h.minor >= minor13 && (h.cpus == 0 || h.cpus > maxCPUs):
		return nil, formatErr(120, "%d vCPUs", h.cpus)
	}
	for _, s := range []struct {
		name     string
		off, len uint64
	}{{"state", h.stateOff, h.stateLen}, {"index", h.indexOff, h.indexLen}, {"data", h.dataOff, h.dataLen}} {
		end, ok := guestmem.AddLength(s.off, s.len)
		if !ok || s.off < headerSize || end > uint64(size) {
			return nil, formatErr(32, "truncated or bad layout: %s section [%#x, +%#x) beyond the file's %d bytes", s.name, s.off, s.len, size)
		}
	}
	if h.flags&flagRawImage != 0 && (h.dataOff%pageSize != 0 || h.dataLen != h.memSize) {
		return nil, formatErr(64, "raw image of %d bytes at %#x: want %d bytes, page aligned", h.dataLen, h.dataOff, h.memSize)
	}
	return h, nil
}

// fileState is the state section.
type fileState struct {
	// Machine is the machine's state.
	Machine *machine.MachineState
	// Regions is the guest RAM layout the memory sections address.
	Regions []guestmem.Range
	// Parent is where the parent was when this file was written, relative
	// to this file's directory when possible: a hint; the ID decides.
	Parent string `json:",omitempty"`
	// Created is when the snapshot was taken.
	Created time.Time
	// Disks are the captured disks (since format 1.1.0), in --disk order.
	Disks []DiskRecord `json:",omitempty"`
}

// chunk is one parsed index entry.
type chunk struct {
	gpa       uint64
	data      uint64 // mask of stored pages
	zero      uint64 // mask of zero pages (incremental)
	off       uint64 // payload offset in the data section
	length    uint32
	enc       uint32
	crc       uint32
	hashes    []byte // HashSize × popcount(data)
	imageOff  uint64 // for encImage: offset of the chunk's first page in the image
	regionIdx int
	regionOff uint64 // offset of gpa in its region
}

func (c *chunk) marshal(w *bytes.Buffer) {
	var b [entryFixed]byte
	le := binary.LittleEndian
	le.PutUint64(b[0:], c.gpa)
	le.PutUint64(b[8:], c.data)
	le.PutUint64(b[16:], c.zero)
	le.PutUint64(b[24:], c.off)
	le.PutUint32(b[32:], c.length)
	le.PutUint32(b[36:], c.enc)
	le.PutUint32(b[40:], c.crc)
	w.Write(b[:])
	w.Write(c.hashes)
}

// layout maps guest-physical chunks to regions and image offsets.
type layout struct {
	regions []guestmem.Range
	offsets []uint64 // image offset of each region
}

func newLayout(memSize uint64) layout {
	l := layout{regions: boot.RAMLayout(memSize)}
	var off uint64
	for _, r := range l.regions {
		l.offsets = append(l.offsets, off)
		off += r.Size
	}
	return l
}

// locate returns the region holding the chunk at gpa and the mask of the
// chunk's pages inside that region.
func (l layout) locate(gpa uint64) (int, uint64, bool) {
	for i, r := range l.regions {
		if gpa >= r.GPA && gpa < r.End() {
			pages := (r.End() - gpa) / pageSize
			if pages >= ChunkPages {
				return i, ^uint64(0), true
			}
			return i, 1<<pages - 1, true
		}
	}
	return 0, 0, false
}

// Snapshot is an opened snapshot whose header, state and index were
// verified and decoded. Its memory is read on demand (Apply, Restore).
type Snapshot struct {
	// Path is the file's path ("" when decoded from memory).
	Path string
	// ID names the snapshot; Parent names its parent (zero for a full one).
	ID, Parent ID
	// Kind is KindFull or KindIncremental.
	Kind int
	// Version is the file's format version.
	Version string
	// State is the machine's state.
	State *machine.MachineState
	// ParentHint is where the parent was when this file was written.
	ParentHint string
	// Created is when the snapshot was taken.
	Created time.Time
	// Size is the file's size in bytes.
	Size int64

	h      *header
	r      io.ReaderAt
	closer io.Closer
	lay    layout
	chunks []chunk
	pages  int // stored pages
	zeros  int // pages recorded as zero
	disks  []*diskSection
}

// Pages returns the number of pages whose contents the file stores.
func (s *Snapshot) Pages() int { return s.pages }

// ZeroPages returns the number of pages an incremental snapshot records
// as zeroed.
func (s *Snapshot) ZeroPages() int { return s.zeros }

// RawImage reports whether the memory is a raw image (lazy restore).
func (s *Snapshot) RawImage() bool { return s.h.flags&flagRawImage != 0 }

// MemSize returns the guest RAM size.
func (s *Snapshot) MemSize() uint64 { return s.h.memSize }

// Close closes the file.
func (s *Snapshot) Close() error {
	if s.closer != nil {
		return s.closer.Close()
	}
	return nil
}

// readSection reads and checks one section; its length was bounded by the
// file size (and a cap) in parseHeader.
func readSection(r io.ReaderAt, off, n uint64, want uint32, name string) ([]byte, error) {
	b := make([]byte, n)
	if n == 0 {
		if want != crc(nil) {
			return nil, formatErr(int64(off), "%s section checksum %#08x over no bytes: the file is corrupt", name, want)
		}
		return b, nil
	}
	if _, err := r.ReadAt(b, int64(off)); err != nil {
		return nil, fmt.Errorf("snapshot: reading the %s section: %w", name, err)
	}
	if got := crc(b); got != want {
		return nil, formatErr(int64(off), "%s section checksum %#08x, computed %#08x: the file is corrupt", name, want, got)
	}
	return b, nil
}

// Decode reads and verifies a snapshot's header, state and index from r,
// which holds size bytes. It reads no memory payload. On error the result
// is nil.
func Decode(r io.ReaderAt, size int64) (*Snapshot, error) {
	hb := make([]byte, headerSize)
	if size < headerSize {
		return nil, formatErr(0, "truncated: %d bytes, the header alone is %d", max(size, 0), headerSize)
	}
	if _, err := r.ReadAt(hb, 0); err != nil {
		return nil, fmt.Errorf("snapshot: reading the header: %w", err)
	}
	h, err := parseHeader(hb, size)
	if err != nil {
		return nil, err
	}
	sb, err := readSection(r, h.stateOff, h.stateLen, h.stateCRC, "state")
	if err != nil {
		return nil, err
	}
	ib, err := readSection(r, h.indexOff, h.indexLen, h.indexCRC, "index")
	if err != nil {
		return nil, err
	}
	var fs fileState
	dec := json.NewDecoder(bytes.NewReader(sb))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&fs); err != nil {
		return nil, formatErr(int64(h.stateOff), "state section: %v", err)
	}
	if dec.More() {
		return nil, formatErr(int64(h.stateOff), "state section: trailing data")
	}
	if fs.Machine == nil {
		return nil, formatErr(int64(h.stateOff), "state section: no machine state")
	}
	if err := fs.Machine.Validate(); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	if fs.Machine.MemSize != h.memSize {
		return nil, formatErr(int64(h.stateOff), "machine state has %d bytes of RAM, the header %d", fs.Machine.MemSize, h.memSize)
	}
	if h.cpus != 0 && uint32(fs.Machine.CPUs) != h.cpus {
		return nil, formatErr(int64(h.stateOff), "machine state has %d vCPUs, the header %d", fs.Machine.CPUs, h.cpus)
	}
	s := &Snapshot{
		ID: computeID(sb, ib, h.parent), Parent: h.parent, Kind: int(h.kind),
		Version: fmt.Sprintf("%d.%d.%d", h.major, h.minor, h.patch),
		State:   fs.Machine, ParentHint: fs.Parent, Created: fs.Created, Size: size,
		h: h, r: r, lay: newLayout(h.memSize),
	}
	if len(fs.Regions) != len(s.lay.regions) {
		return nil, formatErr(int64(h.stateOff), "state section: %d RAM regions, the layout of %d bytes has %d", len(fs.Regions), h.memSize, len(s.lay.regions))
	}
	for i, r := range fs.Regions {
		if r != s.lay.regions[i] {
			return nil, formatErr(int64(h.stateOff), "state section: RAM region %d is %+v, want %+v", i, r, s.lay.regions[i])
		}
	}
	if err := s.parseIndex(ib); err != nil {
		return nil, err
	}
	if err := s.parseDisks(fs.Disks); err != nil {
		return nil, err
	}
	return s, nil
}

func computeID(state, index []byte, parent ID) ID {
	d := sha256.New()
	d.Write(state)
	d.Write(index)
	d.Write(parent[:])
	var id ID
	d.Sum(id[:0])
	return id
}

func (s *Snapshot) parseIndex(ib []byte) error {
	h := s.h
	base := int64(h.indexOff)
	le := binary.LittleEndian
	var prevGPA uint64
	var dataEnd uint64
	raw := h.flags&flagRawImage != 0
	// At most one chunk per fixed entry: allocated once (a 1 GiB image
	// has 4096), not grown; bounded by the index section's size.
	s.chunks = make([]chunk, 0, len(ib)/entryFixed)
	for p := 0; p < len(ib); {
		off := base + int64(p)
		if len(ib)-p < entryFixed {
			return formatErr(off, "index entry truncated")
		}
		e := ib[p : p+entryFixed]
		c := chunk{
			gpa: le.Uint64(e[0:]), data: le.Uint64(e[8:]), zero: le.Uint64(e[16:]),
			off: le.Uint64(e[24:]), length: le.Uint32(e[32:]), enc: le.Uint32(e[36:]), crc: le.Uint32(e[40:]),
		}
		if le.Uint32(e[44:]) != 0 {
			return formatErr(off+44, "index entry: reserved field not zero")
		}
		n := bits.OnesCount64(c.data)
		hl := n * HashSize
		if !s.hasPageHashes() {
			hl = 0
		}
		if len(ib)-p-entryFixed < hl {
			return formatErr(off, "index entry hashes truncated")
		}
		if s.hasPageHashes() {
			c.hashes = ib[p+entryFixed : p+entryFixed+hl]
		}
		p += entryFixed + hl
		if c.gpa%chunkBytes != 0 || (len(s.chunks) > 0 && c.gpa <= prevGPA) {
			return formatErr(off, "chunk GPA %#x unaligned or out of order", c.gpa)
		}
		prevGPA = c.gpa
		ri, inside, ok := s.lay.locate(c.gpa)
		if !ok || (c.data|c.zero)&^inside != 0 {
			return formatErr(off, "chunk at GPA %#x: pages outside guest RAM", c.gpa)
		}
		c.regionIdx, c.regionOff = ri, c.gpa-s.lay.regions[ri].GPA
		c.imageOff = s.lay.offsets[ri] + c.regionOff
		switch {
		case c.data&c.zero != 0:
			return formatErr(off, "chunk at GPA %#x: pages both stored and zero", c.gpa)
		case c.data|c.zero == 0 && !raw:
			return formatErr(off, "chunk at GPA %#x: empty", c.gpa)
		case h.kind == KindFull && c.zero != 0:
			return formatErr(off, "chunk at GPA %#x: zero pages in a full snapshot", c.gpa)
		}
		plain := uint64(n) * pageSize
		if raw {
			if c.enc != encImage || c.off != c.imageOff || uint64(c.length) != uint64(bits.Len64(inside))*pageSize {
				return formatErr(off, "chunk at GPA %#x: image payload %d bytes at %#x, encoding %d", c.gpa, c.length, c.off, c.enc)
			}
		} else {
			switch {
			case c.enc == encPlain && uint64(c.length) == plain:
			case c.enc == encLZ4 && c.length > 0 && uint64(c.length) < plain:
			case c.enc == encLZ4Groups && uint64(c.length) >= 4*uint64(groups(n)) && uint64(c.length) < plain:
			default:
				return formatErr(off, "chunk at GPA %#x: payload of %d bytes, encoding %d, for %d pages", c.gpa, c.length, c.enc, n)
			}
			if c.off < dataEnd {
				return formatErr(off, "chunk at GPA %#x: payload overlaps the previous one", c.gpa)
			}
		}
		end, ok := guestmem.AddLength(c.off, uint64(c.length))
		if !ok || end > h.dataLen {
			return formatErr(off, "chunk at GPA %#x: payload beyond the data section", c.gpa)
		}
		dataEnd = end
		s.pages += n
		s.zeros += bits.OnesCount64(c.zero)
		s.chunks = append(s.chunks, c)
	}
	return nil
}

// PageHashes calls f for every stored page with its GPA and content hash
// (nil in a raw image, which has none since 1.3.0).
func (s *Snapshot) PageHashes(f func(gpa uint64, hash []byte)) {
	for _, c := range s.chunks {
		k := 0
		for m := c.data; m != 0; m &= m - 1 {
			i := bits.TrailingZeros64(m)
			var h []byte
			if c.hashes != nil {
				h = c.hashes[k*HashSize : (k+1)*HashSize]
			}
			f(c.gpa+uint64(i)*pageSize, h)
			k++
		}
	}
}

// hasPageHashes reports whether s's index holds a content hash per
// stored page: every file but a raw image from 1.3.0 on, whose chunk
// checksums cover every byte of the image and whose restore should read
// as little as it can (a 1 GiB image's hashes were a megabyte).
func (s *Snapshot) hasPageHashes() bool {
	return s.h.flags&flagRawImage == 0 || s.h.minor < minor13
}

// pageHash is the content hash of a page in the files this package
// writes: XXH3-128 (seed 0, high half first). It guards against
// corruption; it is not collision resistant against a guest crafting its
// own pages, which is why the migration cache hashes pages again with
// SHA-256 (migrate.LoadCache). SHA-256 cost a third of the time of
// taking a snapshot; XXH3 is about eight times as fast here.
func pageHash(dst, page []byte) {
	sum := xxh3.Hash128(page).Bytes()
	copy(dst, sum[:])
}

// pageHashSHA is the content hash of a page in files before 1.3.0:
// SHA-256 truncated to 128 bits.
func pageHashSHA(dst, page []byte) {
	sum := sha256.Sum256(page)
	copy(dst, sum[:HashSize])
}

// hashPage computes a page's content hash as s's format defines it.
func (s *Snapshot) hashPage(dst, page []byte) {
	if s.h.minor < minor13 {
		pageHashSHA(dst, page)
		return
	}
	pageHash(dst, page)
}

// groups returns the number of lz4 blocks of encLZ4Groups for n pages.
func groups(n int) int { return (n + groupPages - 1) / groupPages }
