package snapshot

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"

	"github.com/pierrec/lz4/v4"

	"collective/internal/lz4block"

	"collective/devices/virtioblk"
	"collective/machine"
)

// Disk kinds in a DiskRecord.
const (
	DiskRaw = "raw"
	DiskCOW = "cow"
)

const (
	diskBlock      = virtioblk.TrackBlockSize
	diskEntrySize  = 48
	diskEncPlain   = 0
	diskEncLZ4     = 1
	diskEncZero    = 2
	diskFlagOrigin = 1 // the block was written since the disk's origin (excluded from Origin)
	// maxDiskSize caps a recorded disk (64 TiB).
	maxDiskSize = 1 << 46
)

// ErrDisk is matched when the disks a snapshot is restored onto are not
// the disks it captured.
var ErrDisk = errors.New("snapshot: wrong disk")

// DiskRecord describes one captured disk in the state section: its
// identity, and where its block table lies.
type DiskRecord struct {
	// Name is the virtio device (virtio-blk0, ...).
	Name string
	// Kind is DiskRaw or DiskCOW.
	Kind string
	// Size is the disk's size in bytes.
	Size int64
	// BlockSize is the unit of the table (virtioblk.TrackBlockSize).
	BlockSize int64
	// Base is a copy-on-write disk's base: the SHA-256 of its bytes (hex).
	Base string `json:",omitempty"`
	// Origin (raw disks, full snapshots) is the digest of the disk's
	// content over every block not flagged as written since the origin
	// (virtioblk.OriginDigestOf): the disk a restore is given must match.
	Origin string `json:",omitempty"`
	// TableOff and TableLen locate the block table; TableSum is its
	// SHA-256 (hex), so that the snapshot's ID commits to every block.
	TableOff, TableLen uint64
	TableSum           string
}

// diskEntry is one block of a disk section.
type diskEntry struct {
	block  int64
	off    uint64 // payload offset in the file
	length uint32
	enc    uint8
	flags  uint8
	crc    uint32
	hash   [virtioblk.HashSize]byte
}

func (e *diskEntry) marshal(w *bytes.Buffer) {
	var b [diskEntrySize]byte
	le := binary.LittleEndian
	le.PutUint64(b[0:], uint64(e.block))
	le.PutUint64(b[8:], e.off)
	le.PutUint32(b[16:], e.length)
	b[20] = e.enc
	b[21] = e.flags
	le.PutUint32(b[24:], e.crc)
	copy(b[32:], e.hash[:])
	w.Write(b[:])
}

// diskSection is a decoded disk record and its table.
type diskSection struct {
	rec     DiskRecord
	entries []diskEntry
}

func (d *diskSection) blocks() int64 { return (d.rec.Size + diskBlock - 1) / diskBlock }

// Disks returns the captured disks' records.
func (s *Snapshot) Disks() []DiskRecord {
	out := make([]DiskRecord, len(s.disks))
	for i, d := range s.disks {
		out[i] = d.rec
	}
	return out
}

// DiskBlocks returns the number of disk blocks the file stores.
func (s *Snapshot) DiskBlocks() int {
	n := 0
	for _, d := range s.disks {
		n += len(d.entries)
	}
	return n
}

// parseDisks reads and checks every disk table named in the state.
func (s *Snapshot) parseDisks(recs []DiskRecord) error {
	le := binary.LittleEndian
	for i, rec := range recs {
		where := int64(s.h.stateOff)
		switch {
		case rec.Kind != DiskRaw && rec.Kind != DiskCOW:
			return formatErr(where, "disk %d: unknown kind %q", i, rec.Kind)
		case rec.Size <= 0 || rec.Size > maxDiskSize:
			return formatErr(where, "disk %d: size %d", i, rec.Size)
		case rec.BlockSize != diskBlock:
			return formatErr(where, "disk %d: block size %d, want %d", i, rec.BlockSize, diskBlock)
		case rec.TableLen%diskEntrySize != 0:
			return formatErr(where, "disk %d: table of %d bytes", i, rec.TableLen)
		case rec.Kind == DiskCOW && len(rec.Base) != 64:
			return formatErr(where, "disk %d: copy-on-write disk without a base hash", i)
		}
		end := rec.TableOff + rec.TableLen
		if end < rec.TableOff || rec.TableOff < headerSize || end > uint64(s.Size) {
			return formatErr(where, "disk %d: table [%#x, +%#x) beyond the file's %d bytes", i, rec.TableOff, rec.TableLen, s.Size)
		}
		tb := make([]byte, rec.TableLen)
		if len(tb) > 0 {
			if _, err := s.r.ReadAt(tb, int64(rec.TableOff)); err != nil {
				return fmt.Errorf("snapshot: reading disk %d's table: %w", i, err)
			}
		}
		sum := sha256.Sum256(tb)
		if hex.EncodeToString(sum[:]) != rec.TableSum {
			return formatErr(int64(rec.TableOff), "disk %d (%s): block table checksum mismatch: the file is corrupt", i, rec.Name)
		}
		d := &diskSection{rec: rec}
		nb := d.blocks()
		prev := int64(-1)
		for p := 0; p < len(tb); p += diskEntrySize {
			b := tb[p : p+diskEntrySize]
			e := diskEntry{block: int64(le.Uint64(b[0:])), off: le.Uint64(b[8:]), length: le.Uint32(b[16:]),
				enc: b[20], flags: b[21], crc: le.Uint32(b[24:])}
			copy(e.hash[:], b[32:])
			off := int64(rec.TableOff) + int64(p)
			if e.block <= prev || e.block >= nb {
				return formatErr(off, "disk %d: block %d out of order or beyond the disk's %d", i, e.block, nb)
			}
			prev = e.block
			if b[22] != 0 || b[23] != 0 || le.Uint32(b[28:]) != 0 || e.flags&^diskFlagOrigin != 0 {
				return formatErr(off, "disk %d: reserved bits set", i)
			}
			blen := uint64(min(diskBlock, rec.Size-e.block*diskBlock))
			switch {
			case e.enc == diskEncZero && e.length == 0:
			case e.enc == diskEncPlain && uint64(e.length) == blen:
			case e.enc == diskEncLZ4 && e.length > 0 && uint64(e.length) < blen:
			default:
				return formatErr(off, "disk %d: block %d: payload of %d bytes, encoding %d", i, e.block, e.length, e.enc)
			}
			pend := e.off + uint64(e.length)
			if pend < e.off || (e.length > 0 && e.off < headerSize) || pend > uint64(s.Size) {
				return formatErr(off, "disk %d: block %d: payload beyond the file", i, e.block)
			}
			d.entries = append(d.entries, e)
		}
		s.disks = append(s.disks, d)
	}
	return nil
}

// readBlock reads, checks and decodes one block into dst (its length).
func (s *Snapshot) readBlock(d *diskSection, e *diskEntry, dst, scratch []byte) error {
	switch e.enc {
	case diskEncZero:
		clear(dst)
	case diskEncPlain, diskEncLZ4:
		p := scratch[:e.length]
		if _, err := s.r.ReadAt(p, int64(e.off)); err != nil {
			return fmt.Errorf("snapshot: %s: reading disk %s block %d: %w", name(s), d.rec.Name, e.block, err)
		}
		if got := crc(p); got != e.crc {
			return formatErr(int64(e.off), "%s: disk %s block %d: checksum %#08x, computed %#08x: the file is corrupt", name(s), d.rec.Name, e.block, e.crc, got)
		}
		if e.enc == diskEncPlain {
			copy(dst, p)
		} else if k, err := lz4.UncompressBlock(p, dst); err != nil || k != len(dst) {
			return formatErr(int64(e.off), "%s: disk %s block %d: lz4 payload decodes to %d bytes, want %d (%v)", name(s), d.rec.Name, e.block, k, len(dst), err)
		}
	default:
		return formatErr(int64(e.off), "disk block encoding %d", e.enc)
	}
	if virtioblk.BlockHash(dst) != e.hash {
		return formatErr(int64(e.off), "%s: disk %s block %d does not match its hash: the file is corrupt", name(s), d.rec.Name, e.block)
	}
	return nil
}

// diskOut is one disk to write into a snapshot file: its record (without
// the table fields) and its blocks, in ascending order.
type diskOut struct {
	rec    DiskRecord
	blocks []int64
	flags  func(b int64) uint8
	// read fills dst (the block's length) with block b's content.
	read func(b int64, dst []byte) error
}

// diskWriter appends disk payloads and tables to a file at pos.
type diskWriter struct {
	w   *bufio.Writer
	pos uint64
	buf []byte
	cmp []byte
	c   lz4block.Compressor
	n   int   // blocks written
	b   int64 // payload bytes
}

func (dw *diskWriter) write(p []byte) error {
	_, err := dw.w.Write(p)
	dw.pos += uint64(len(p))
	return err
}

// writeDisk writes d's payloads then its table, and returns its record.
func (dw *diskWriter) writeDisk(d diskOut) (DiskRecord, error) {
	rec := d.rec
	rec.BlockSize = diskBlock
	var table bytes.Buffer
	for _, b := range d.blocks {
		blen := min(diskBlock, rec.Size-b*diskBlock)
		data := dw.buf[:blen]
		if err := d.read(b, data); err != nil {
			return rec, err
		}
		e := diskEntry{block: b, hash: virtioblk.BlockHash(data)}
		if d.flags != nil {
			e.flags = d.flags(b)
		}
		if virtioblk.IsZero(data) {
			e.enc = diskEncZero
		} else {
			payload := data
			e.enc = diskEncPlain
			if n := dw.c.Compress(dw.cmp, data); n > 0 && n < len(data)*7/8 {
				payload, e.enc = dw.cmp[:n], diskEncLZ4
			}
			e.off, e.length, e.crc = dw.pos, uint32(len(payload)), crc(payload)
			if err := dw.write(payload); err != nil {
				return rec, err
			}
			dw.b += int64(len(payload))
		}
		e.marshal(&table)
		dw.n++
	}
	tb := table.Bytes()
	rec.TableOff, rec.TableLen = dw.pos, uint64(len(tb))
	sum := sha256.Sum256(tb)
	rec.TableSum = hex.EncodeToString(sum[:])
	return rec, dw.write(tb)
}

func bitmapBlocks(bm []uint64, n int64) []int64 {
	var out []int64
	for b := int64(0); b < n; b++ {
		if bm[b/64]&(1<<(b%64)) != 0 {
			out = append(out, b)
		}
	}
	return out
}

func orBitmap(dst, src []uint64) {
	for i := range min(len(dst), len(src)) {
		dst[i] |= src[i]
	}
}

// liveDisks describes a paused machine's disks for a snapshot: a full
// snapshot carries every block that differs from the disk's origin
// (Tracker.Changed), an incremental one the blocks in dirty[i].
func liveDisks(disks []machine.Disk, dirty [][]uint64, full bool) ([]diskOut, error) {
	var out []diskOut
	for i, d := range disks {
		tr := d.Tracker
		if tr == nil {
			return nil, fmt.Errorf("snapshot: disk %s is not tracked", d.Name)
		}
		rec := DiskRecord{Name: d.Name, Kind: DiskRaw, Size: tr.Size()}
		if o := tr.Overlay(); o != nil {
			h := o.BaseHash()
			rec.Kind, rec.Base = DiskCOW, hex.EncodeToString(h[:])
		}
		var bm []uint64
		var written []uint64
		if full {
			bm, written = tr.Changed(), tr.Written()
			if rec.Kind == DiskRaw {
				dg, err := tr.OriginDigest(written)
				if err != nil {
					return nil, fmt.Errorf("snapshot: disk %s: %w", d.Name, err)
				}
				rec.Origin = hex.EncodeToString(dg[:])
			}
		} else {
			bm = dirty[i]
		}
		do := diskOut{rec: rec, blocks: bitmapBlocks(bm, tr.Blocks()),
			read: func(b int64, dst []byte) error {
				if _, err := tr.ReadAt(dst, b*diskBlock); err != nil {
					return fmt.Errorf("snapshot: reading disk %s block %d: %w", d.Name, b, err)
				}
				return nil
			}}
		if written != nil && rec.Kind == DiskRaw {
			do.flags = func(b int64) uint8 {
				if written[b/64]&(1<<(b%64)) != 0 {
					return diskFlagOrigin
				}
				return 0
			}
		}
		out = append(out, do)
	}
	return out, nil
}

// latestBlocks maps each block of disk i to the last snapshot of chain
// that stores it.
type blockRef struct {
	s     *Snapshot
	d     *diskSection
	e     *diskEntry
	flags uint8
}

func chainBlocks(chain []*Snapshot, i int) map[int64]blockRef {
	m := map[int64]blockRef{}
	for _, s := range chain {
		d := s.disks[i]
		for k := range d.entries {
			e := &d.entries[k]
			prev := m[e.block]
			m[e.block] = blockRef{s: s, d: d, e: e, flags: prev.flags | e.flags}
		}
	}
	return m
}

// checkChainDisks checks that every snapshot of chain records the same
// disks.
func checkChainDisks(chain []*Snapshot) error {
	last := chain[len(chain)-1]
	for _, s := range chain {
		if len(s.disks) != len(last.disks) {
			return fmt.Errorf("snapshot: %s records %d disks, %s %d: %w", name(s), len(s.disks), name(last), len(last.disks), ErrParent)
		}
		for i, d := range s.disks {
			l := last.disks[i].rec
			if d.rec.Name != l.Name || d.rec.Kind != l.Kind || d.rec.Size != l.Size || d.rec.Base != l.Base {
				return fmt.Errorf("snapshot: %s and %s record different disks %d (%s %s %d bytes, %s %s %d bytes): %w",
					name(s), name(last), i, d.rec.Name, d.rec.Kind, d.rec.Size, l.Name, l.Kind, l.Size, ErrParent)
			}
		}
	}
	if len(chain[0].disks) > 0 {
		for i, d := range chain[0].disks {
			if d.rec.Kind == DiskRaw && d.rec.Origin == "" {
				return fmt.Errorf("snapshot: %s: raw disk %d without an origin digest", name(chain[0]), i)
			}
		}
	}
	return nil
}

// mergeDisks describes a chain's disks for a merged full snapshot: each
// block's last stored content, flags OR-ed along the chain.
func mergeDisks(chain []*Snapshot) []diskOut {
	var out []diskOut
	for i, d0 := range chain[0].disks {
		refs := chainBlocks(chain, i)
		rec := d0.rec
		do := diskOut{rec: DiskRecord{Name: rec.Name, Kind: rec.Kind, Size: rec.Size, Base: rec.Base, Origin: rec.Origin}}
		for b := int64(0); b < d0.blocks(); b++ {
			if _, ok := refs[b]; ok {
				do.blocks = append(do.blocks, b)
			}
		}
		scratch := make([]byte, lz4.CompressBlockBound(diskBlock))
		do.flags = func(b int64) uint8 { return refs[b].flags }
		do.read = func(b int64, dst []byte) error {
			r := refs[b]
			return r.s.readBlock(r.d, r.e, dst, scratch)
		}
		out = append(out, do)
	}
	return out
}

// restoreDisks checks that disks are the disks chain captured and writes
// the chain's blocks into them. Nothing is written unless every identity
// check and every block's checksum and hash passed.
func restoreDisks(chain []*Snapshot, disks []machine.Disk) (int, error) {
	last := chain[len(chain)-1]
	if len(last.disks) == 0 && len(disks) > 0 {
		for _, v := range last.State.Virtio {
			if v.Block != nil {
				return 0, fmt.Errorf("snapshot: %s (format %s) does not hold its disks' contents: restoring it could pair memory with another disk state: %w", name(last), last.Version, ErrDisk)
			}
		}
	}
	if len(last.disks) != len(disks) {
		return 0, fmt.Errorf("snapshot: %s captured %d disks, the machine has %d (give the same --disk arguments): %w", name(last), len(last.disks), len(disks), ErrDisk)
	}
	if err := checkChainDisks(chain); err != nil {
		return 0, err
	}
	// The devices' own checks (capacity, mode, serial) before any write.
	k := 0
	for _, v := range last.State.Virtio {
		if v.Block == nil {
			continue
		}
		if k < len(disks) {
			if err := disks[k].Block.Restore(*v.Block); err != nil {
				return 0, fmt.Errorf("snapshot: disk %d (%s): %w: %w", k, disks[k].Spec.Path, err, ErrDisk)
			}
		}
		k++
	}
	refs := make([]map[int64]blockRef, len(disks))
	for i, d := range disks {
		rec := chain[0].disks[i].rec
		tr := d.Tracker
		what := fmt.Sprintf("disk %d (%s, %s)", i, d.Name, d.Spec.Path)
		if tr == nil {
			return 0, fmt.Errorf("snapshot: %s is not tracked", what)
		}
		if rec.Name != d.Name {
			return 0, fmt.Errorf("snapshot: %s: the snapshot's disk %d is %s: %w", what, i, rec.Name, ErrDisk)
		}
		if tr.Size() != rec.Size {
			return 0, fmt.Errorf("snapshot: %s has %d bytes, the snapshotted disk had %d: %w", what, tr.Size(), rec.Size, ErrDisk)
		}
		refs[i] = chainBlocks(chain, i)
		o := tr.Overlay()
		switch {
		case rec.Kind == DiskCOW && o == nil:
			return 0, fmt.Errorf("snapshot: %s is a raw disk, the snapshotted disk was a copy-on-write overlay over base %.16s…: give base=: %w", what, rec.Base, ErrDisk)
		case rec.Kind == DiskRaw && o != nil:
			return 0, fmt.Errorf("snapshot: %s is a copy-on-write overlay, the snapshotted disk was raw: %w", what, ErrDisk)
		case o != nil:
			h := o.BaseHash()
			if got := hex.EncodeToString(h[:]); got != rec.Base {
				return 0, fmt.Errorf("snapshot: %s: its base has SHA-256 %.16s…, the snapshotted disk's base %.16s…: %w", what, got, rec.Base, ErrDisk)
			}
			// Every block the overlay holds must be overwritten by the
			// snapshot, or it would not read as the base.
			held := virtioblk.ChangedBitmap(tr)
			for b := int64(0); b < tr.Blocks(); b++ {
				if held[b/64]&(1<<(b%64)) != 0 {
					if _, ok := refs[i][b]; !ok {
						return 0, fmt.Errorf("snapshot: %s: the overlay already holds data (block %d) that the snapshot does not: give a new overlay path (it is created over the base): %w", what, b, ErrDisk)
					}
				}
			}
		default:
			excl := make([]uint64, (tr.Blocks()+63)/64)
			for _, e := range chain[0].disks[i].entries {
				if e.flags&diskFlagOrigin != 0 {
					excl[e.block/64] |= 1 << (e.block % 64)
				}
			}
			dg, err := tr.OriginDigest(excl)
			if err != nil {
				return 0, fmt.Errorf("snapshot: %s: %w", what, err)
			}
			if got := hex.EncodeToString(dg[:]); got != rec.Origin {
				return 0, fmt.Errorf("snapshot: %s is not the disk that was snapshotted (content digest %.16s…, want %.16s…): give a copy of the disk the machine was started with: %w", what, got, rec.Origin, ErrDisk)
			}
		}
	}
	// Verify every stored block of the chain before writing any.
	data := make([]byte, diskBlock)
	scratch := make([]byte, lz4.CompressBlockBound(diskBlock))
	for _, s := range chain {
		for _, d := range s.disks {
			for k := range d.entries {
				e := &d.entries[k]
				if err := s.readBlock(d, e, data[:min(diskBlock, d.rec.Size-e.block*diskBlock)], scratch); err != nil {
					return 0, err
				}
			}
		}
	}
	n := 0
	for i, d := range disks {
		tr := d.Tracker
		for b := int64(0); b < tr.Blocks(); b++ {
			r, ok := refs[i][b]
			if !ok {
				continue
			}
			dst := data[:tr.BlockLen(b)]
			if err := r.s.readBlock(r.d, r.e, dst, scratch); err != nil {
				return n, err
			}
			var err error
			if r.e.enc == diskEncZero {
				err = tr.Zero(b*diskBlock, int64(len(dst)))
			} else {
				_, err = tr.WriteAt(dst, b*diskBlock)
			}
			if err != nil {
				return n, fmt.Errorf("snapshot: writing disk %s block %d: %w", d.Name, b, err)
			}
			n++
		}
		if err := tr.Sync(); err != nil {
			return n, fmt.Errorf("snapshot: syncing disk %s: %w", d.Name, err)
		}
		tr.TakeDirty()
	}
	return n, nil
}

var _ io.ReaderAt = (*virtioblk.Tracker)(nil)
