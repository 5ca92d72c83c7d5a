package cow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// Format constants (see the package doc).
const (
	Magic        = "COLLCOW\x00"
	VersionMajor = 1
	VersionMinor = 0

	HeaderSize = 4096
	// MaxClusters caps the table: 16 Mi clusters (1 TiB at 64 KiB), 512 MiB
	// of table on disk and 64 MiB in memory.
	MaxClusters = 1 << 24
	// MaxBaseHint caps the base path hint in the header.
	MaxBaseHint = 1024

	DefaultClusterSize = 64 << 10
	MinClusterShift    = 12
	MaxClusterShift    = 21

	slotSize  = 16
	pairSize  = 2 * slotSize
	crcOffset = HeaderSize - 4

	valBase = 0          // not allocated: the base (or zeros past its end)
	valZero = 0xffffffff // reads as zeros
)

// castagnoli returns the CRC-32C table. hash/crc32 builds it once, on the
// first call: not at package initialisation, which every VMM process runs.
func castagnoli() *crc32.Table { return crc32.MakeTable(crc32.Castagnoli) }

// ErrCorrupt is matched by every *FormatError.
var ErrCorrupt = errors.New("cow: corrupt overlay")

// ErrBaseMismatch means the base given is not the one the overlay was made
// over (another size or content hash).
var ErrBaseMismatch = errors.New("cow: base does not match the overlay")

// ErrInUse means another process holds the overlay open for writing.
var ErrInUse = errors.New("cow: overlay in use by another process")

// FormatError is a problem found in an overlay file, at byte Off.
type FormatError struct {
	Path string
	Off  int64
	Msg  string
}

func (e *FormatError) Error() string {
	return fmt.Sprintf("cow: overlay %s: %s (at byte %#x)", e.Path, e.Msg, e.Off)
}

// Is reports ErrCorrupt.
func (e *FormatError) Is(target error) bool { return target == ErrCorrupt }

// header is the decoded header.
type header struct {
	clusterShift uint
	virtualSize  int64
	clusters     int64
	tableOff     int64
	dataOff      int64
	baseSize     int64
	baseHash     [32]byte
	baseHint     string
}

func (h *header) clusterSize() int64 { return 1 << h.clusterShift }

// layout fills clusters, tableOff and dataOff from clusterShift and
// virtualSize.
func (h *header) layout() {
	cs := h.clusterSize()
	h.clusters = (h.virtualSize + cs - 1) / cs
	h.tableOff = HeaderSize
	h.dataOff = (h.tableOff + h.clusters*pairSize + cs - 1) &^ (cs - 1)
}

// maxPhys is one past the largest physical cluster an entry may name: the
// data area holds at most 3n clusters (n mapped, 2n awaiting reuse).
func (h *header) maxPhys() int64 { return h.dataOff>>h.clusterShift + 3*h.clusters }

func (h *header) encode() []byte {
	b := make([]byte, HeaderSize)
	copy(b, Magic)
	le := binary.LittleEndian
	le.PutUint16(b[8:], VersionMajor)
	le.PutUint16(b[10:], VersionMinor)
	le.PutUint32(b[12:], uint32(h.clusterShift))
	le.PutUint64(b[16:], uint64(h.virtualSize))
	le.PutUint64(b[24:], uint64(h.clusters))
	le.PutUint64(b[32:], uint64(h.tableOff))
	le.PutUint64(b[40:], uint64(h.dataOff))
	le.PutUint64(b[48:], uint64(h.baseSize))
	copy(b[56:88], h.baseHash[:])
	le.PutUint16(b[88:], uint16(len(h.baseHint)))
	copy(b[90:], h.baseHint)
	le.PutUint32(b[crcOffset:], crc32.Checksum(b[:crcOffset], castagnoli()))
	return b
}

// decodeHeader validates and decodes a header; fileSize is the overlay's
// length. Every field is checked before it is used.
func decodeHeader(path string, b []byte, fileSize int64) (*header, error) {
	bad := func(off int64, format string, a ...any) error {
		return &FormatError{Path: path, Off: off, Msg: fmt.Sprintf(format, a...)}
	}
	if len(b) < HeaderSize {
		return nil, bad(0, "truncated header: %d bytes, want %d", len(b), HeaderSize)
	}
	if string(b[:8]) != Magic {
		return nil, bad(0, "bad magic %q: not a collective overlay", b[:8])
	}
	le := binary.LittleEndian
	if stored, sum := le.Uint32(b[crcOffset:]), crc32.Checksum(b[:crcOffset], castagnoli()); stored != sum {
		return nil, bad(crcOffset, "header checksum mismatch: stored %#08x, computed %#08x", stored, sum)
	}
	if major, minor := le.Uint16(b[8:]), le.Uint16(b[10:]); major != VersionMajor || minor > VersionMinor {
		return nil, bad(8, "unsupported format version %d.%d (this build reads %d.0 to %d.%d)", major, minor, VersionMajor, VersionMajor, VersionMinor)
	}
	h := &header{}
	shift := le.Uint32(b[12:])
	if shift < MinClusterShift || shift > MaxClusterShift {
		return nil, bad(12, "cluster size 2^%d out of range [2^%d, 2^%d]", shift, MinClusterShift, MaxClusterShift)
	}
	h.clusterShift = uint(shift)
	vs := le.Uint64(b[16:])
	if vs == 0 || vs%512 != 0 || vs > uint64(MaxClusters)<<h.clusterShift {
		return nil, bad(16, "virtual size %d is zero, not a multiple of 512 or above %d clusters", vs, MaxClusters)
	}
	h.virtualSize = int64(vs)
	h.layout()
	if n := le.Uint64(b[24:]); n != uint64(h.clusters) {
		return nil, bad(24, "cluster count %d does not match the virtual size (%d)", n, h.clusters)
	}
	if off := le.Uint64(b[32:]); off != uint64(h.tableOff) {
		return nil, bad(32, "table offset %#x, want %#x", off, h.tableOff)
	}
	if off := le.Uint64(b[40:]); off != uint64(h.dataOff) {
		return nil, bad(40, "data offset %#x, want %#x", off, h.dataOff)
	}
	if bs := le.Uint64(b[48:]); bs > vs {
		return nil, bad(48, "base size %d above the virtual size %d", bs, vs)
	} else {
		h.baseSize = int64(bs)
	}
	copy(h.baseHash[:], b[56:88])
	hl := int(le.Uint16(b[88:]))
	if hl > MaxBaseHint {
		return nil, bad(88, "base path hint of %d bytes (max %d)", hl, MaxBaseHint)
	}
	h.baseHint = string(b[90 : 90+hl])
	if fileSize < h.dataOff {
		return nil, bad(fileSize, "truncated: %d bytes, the table ends at %#x", fileSize, h.dataOff)
	}
	return h, nil
}

// slot is one decoded table slot.
type slot struct {
	seq uint64
	val uint32
}

type slotState int

const (
	slotEmpty slotState = iota
	slotValid
	slotBad
)

func encodeSlot(b []byte, vc uint64, s slot) {
	le := binary.LittleEndian
	le.PutUint64(b[0:], s.seq)
	le.PutUint32(b[8:], s.val)
	le.PutUint32(b[12:], slotCRC(b, vc))
}

func slotCRC(b []byte, vc uint64) uint32 {
	var tmp [20]byte
	copy(tmp[:12], b[:12])
	binary.LittleEndian.PutUint64(tmp[12:], vc)
	return crc32.Checksum(tmp[:], castagnoli())
}

func decodeSlot(b []byte, vc uint64) (slot, slotState) {
	if allZero(b[:slotSize]) {
		return slot{}, slotEmpty
	}
	le := binary.LittleEndian
	s := slot{seq: le.Uint64(b[0:]), val: le.Uint32(b[8:])}
	if s.seq == 0 || le.Uint32(b[12:]) != slotCRC(b, vc) {
		return slot{}, slotBad
	}
	return s, slotValid
}

// pickSlot chooses the entry of a pair. It returns the entry, which slot
// holds it (0 or 1; for an empty pair 1, so that the first write goes to
// slot 0), whether a torn slot was passed over, and an error message if
// the pair is corrupt.
func pickSlot(pair []byte, vc uint64) (s slot, which int, torn bool, msg string) {
	a, sa := decodeSlot(pair[:slotSize], vc)
	b, sb := decodeSlot(pair[slotSize:], vc)
	switch {
	case sa == slotValid && sb == slotValid:
		if a.seq == b.seq {
			return slot{}, 0, false, fmt.Sprintf("both slots of cluster %d carry seq %d", vc, a.seq)
		}
		if a.seq > b.seq {
			return a, 0, false, ""
		}
		return b, 1, false, ""
	case sa == slotValid:
		return a, 0, sb == slotBad, ""
	case sb == slotValid:
		return b, 1, sa == slotBad, ""
	case sa == slotBad && sb == slotBad:
		return slot{}, 0, false, fmt.Sprintf("both slots of cluster %d fail their checksum", vc)
	case sa == slotBad:
		// A first write into slot 0 was torn: the entry before it was
		// "not allocated". The next write goes to slot 0 again.
		return slot{}, 1, true, ""
	case sb == slotBad:
		return slot{}, 0, true, ""
	}
	return slot{}, 1, false, ""
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
