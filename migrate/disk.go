package migrate

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"path/filepath"

	"github.com/pierrec/lz4/v4"

	"collective/devices/virtioblk"
	"collective/devices/virtioblk/cow"
	"collective/internal/lz4block"
	"collective/machine"
)

// Disk frames (protocol 1.1).
const (
	frameDisks     = 16 // S->T: the source's disks, right after hello
	frameBase      = 17 // S->T: a chunk of a base image the target asked for
	frameBaseEnd   = 18 // S->T: the base is complete
	frameDiskBlock = 19 // S->T: one disk block
)

const (
	diskBlock    = virtioblk.TrackBlockSize
	diskKindRaw  = 0
	diskKindCOW  = 1
	diskEncPlain = 0
	diskEncLZ4   = 1
	diskEncZero  = 2
	// MaxDisks bounds the disks of a disks frame.
	MaxDisks = 64
	// maxDiskSize bounds an announced disk (64 TiB).
	maxDiskSize = 1 << 46
	baseChunk   = 256 << 10
	diskInfoLen = 1 + 8 + 32 + 8
)

// DiskInfo is one disk of the source, as the target learns it.
type DiskInfo struct {
	// COW is set for a copy-on-write overlay over a base named by Base.
	COW bool
	// Size is the disk's size in bytes.
	Size int64
	// Base is the SHA-256 of the base's bytes (COW); BaseSize its size.
	Base     [32]byte
	BaseSize int64
}

// DiskSource is the optional part of a Source that has disks.
type DiskSource interface {
	Disks() []machine.Disk
}

// DiskTarget is the optional part of a Target that has disks.
type DiskTarget interface {
	Disks() []machine.Disk
}

// Bases finds base images by hash on the target and stores those the
// source sends: Known maps hashes to local files (the --disk base=
// arguments that exist), Dir holds received bases named by their hex
// SHA-256 (--cache DIR).
type Bases struct {
	Known map[[32]byte]string
	Dir   string
}

// Find returns the path of the base with hash h, or "".
func (b *Bases) Find(h [32]byte) string {
	if b == nil {
		return ""
	}
	if p, ok := b.Known[h]; ok {
		return p
	}
	if b.Dir != "" {
		p := filepath.Join(b.Dir, hex.EncodeToString(h[:]))
		if sum, _, err := cow.BaseHash(p, nil); err == nil && sum == h {
			return p
		}
	}
	return ""
}

func marshalDisks(ds []DiskInfo) []byte {
	b := binary.LittleEndian.AppendUint32(nil, uint32(len(ds)))
	for _, d := range ds {
		k := byte(diskKindRaw)
		if d.COW {
			k = diskKindCOW
		}
		b = append(b, k)
		b = binary.LittleEndian.AppendUint64(b, uint64(d.Size))
		b = append(b, d.Base[:]...)
		b = binary.LittleEndian.AppendUint64(b, uint64(d.BaseSize))
	}
	return b
}

func parseDisks(f frame) ([]DiskInfo, error) {
	p := f.payload
	if f.typ != frameDisks {
		return nil, &ProtocolError{f.off, "expected a disks frame, got " + frameName(f.typ)}
	}
	if len(p) < 4 {
		return nil, &ProtocolError{f.off, "short disks frame"}
	}
	n := binary.LittleEndian.Uint32(p)
	if n > MaxDisks || uint64(len(p)) != 4+uint64(n)*diskInfoLen {
		return nil, &ProtocolError{f.off, fmt.Sprintf("disks frame: %d disks in %d bytes", n, len(p))}
	}
	var out []DiskInfo
	for i := uint32(0); i < n; i++ {
		q := p[4+i*diskInfoLen:]
		d := DiskInfo{COW: q[0] == diskKindCOW, Size: int64(binary.LittleEndian.Uint64(q[1:])), BaseSize: int64(binary.LittleEndian.Uint64(q[41:]))}
		copy(d.Base[:], q[9:41])
		if q[0] > diskKindCOW || d.Size <= 0 || d.Size > maxDiskSize || d.BaseSize < 0 || d.BaseSize > d.Size || (!d.COW && (d.BaseSize != 0 || d.Base != [32]byte{})) {
			return nil, &ProtocolError{f.off, fmt.Sprintf("disks frame: disk %d: kind %d, size %d, base size %d", i, q[0], d.Size, d.BaseSize)}
		}
		out = append(out, d)
	}
	return out, nil
}

// --- source side ---

// diskState is the source's per-disk migration state.
type srcDisk struct {
	d     machine.Disk
	info  DiskInfo
	base  string   // base path (COW)
	taken []uint64 // dirty bits taken, given back on failure
}

func (s *sender) initDisks() {
	ds, ok := s.src.(DiskSource)
	if !ok {
		return
	}
	for _, d := range ds.Disks() {
		if d.Tracker == nil {
			continue
		}
		sd := &srcDisk{d: d, info: DiskInfo{Size: d.Tracker.Size()}, taken: make([]uint64, (d.Tracker.Blocks()+63)/64)}
		if o := d.Tracker.Overlay(); o != nil {
			sd.info.COW, sd.info.Base, sd.base = true, o.BaseHash(), d.Spec.Base
			if st, err := os.Stat(sd.base); err == nil {
				sd.info.BaseSize = min(st.Size(), sd.info.Size)
			}
		}
		s.disks = append(s.disks, sd)
	}
}

// takeDiskDirty takes every disk's dirty blocks.
func (s *sender) takeDiskDirty() [][]uint64 {
	out := make([][]uint64, len(s.disks))
	for i, d := range s.disks {
		out[i] = d.d.Tracker.TakeDirty()
		orBits(d.taken, out[i])
	}
	return out
}

func orBits(dst, src []uint64) {
	for i := range min(len(dst), len(src)) {
		dst[i] |= src[i]
	}
}

func (s *sender) giveBackDisks() {
	for _, d := range s.disks {
		d.d.Tracker.GiveBack(d.taken)
	}
}

func diskBytes(bm [][]uint64) int64 {
	var n int64
	for _, b := range bm {
		for _, w := range b {
			n += int64(bits.OnesCount64(w))
		}
	}
	return n * diskBlock
}

// sendBases sends each base the target asked for, in chunks, then its
// end frame; the target checks the SHA-256.
func (s *sender) sendBases(need []uint32) error {
	buf := make([]byte, baseChunk)
	for _, i := range need {
		if int(i) >= len(s.disks) || !s.disks[i].info.COW {
			return fmt.Errorf("migrate: the target asks for the base of disk %d, which has none", i)
		}
		d := s.disks[i]
		f, err := os.Open(d.base)
		if err != nil {
			return fmt.Errorf("migrate: sending the base of disk %d: %w", i, err)
		}
		var off int64
		for off < d.info.BaseSize {
			n, err := f.ReadAt(buf[:min(int64(baseChunk), d.info.BaseSize-off)], off)
			if n == 0 && err != nil {
				f.Close()
				return fmt.Errorf("migrate: reading base %s: %w", d.base, err)
			}
			p := binary.LittleEndian.AppendUint32(make([]byte, 0, 16+n), i)
			p = binary.LittleEndian.AppendUint32(p, 0)
			p = binary.LittleEndian.AppendUint64(p, uint64(off))
			p = append(p, buf[:n]...)
			if err := s.fw.send(frameBase, p); err != nil {
				f.Close()
				return s.wireErr("sending a base", err)
			}
			off += int64(n)
			s.rep.BaseBytes += int64(n)
			if err := s.checkPeer(); err != nil {
				f.Close()
				return err
			}
		}
		f.Close()
		if err := s.fw.send(frameBaseEnd, binary.LittleEndian.AppendUint32(nil, i)); err != nil {
			return s.wireErr("sending a base", err)
		}
	}
	return s.fw.flush()
}

// sendDiskBlocks sends the blocks in cand (nil: round 0: for a raw disk
// every block, for an overlay every block it holds or was written).
func (s *sender) sendDiskBlocks(cand [][]uint64) error {
	buf := make([]byte, diskBlock)
	cmp := make([]byte, lz4block.CompressBound(diskBlock))
	var c lz4block.Compressor
	for i, d := range s.disks {
		tr := d.d.Tracker
		var bm []uint64
		switch {
		case cand != nil:
			bm = cand[i]
		case d.info.COW:
			bm = tr.Changed()
		}
		for b := int64(0); b < tr.Blocks(); b++ {
			if bm != nil && bm[b/64]&(1<<(b%64)) == 0 {
				continue
			}
			data := buf[:tr.BlockLen(b)]
			if _, err := tr.ReadAt(data, b*diskBlock); err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("migrate: reading disk %s block %d: %w", d.d.Name, b, err)
			}
			p := binary.LittleEndian.AppendUint32(make([]byte, 0, 24+len(data)), uint32(i))
			p = binary.LittleEndian.AppendUint32(p, 0)
			p = binary.LittleEndian.AppendUint64(p, uint64(b))
			switch {
			case virtioblk.IsZero(data):
				p = append(p, diskEncZero)
			default:
				if n := c.Compress(cmp, data); s.useLZ4.Load() && n > 0 && n < len(data)*7/8 {
					p = append(p, diskEncLZ4)
					p = append(p, cmp[:n]...)
				} else {
					p = append(p, diskEncPlain)
					p = append(p, data...)
				}
			}
			if err := s.fw.send(frameDiskBlock, p); err != nil {
				return s.wireErr("sending disk blocks", err)
			}
			s.rep.DiskBlocks++
			if s.rep.DiskBlocks%64 == 0 {
				if err := s.checkPeer(); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// --- target side ---

// receiveDisks reads the disks frame, finds the bases it can, and returns
// the indices of the disks whose base must be sent.
func (r *receiver) receiveDisks() ([]uint32, error) {
	f, err := r.next()
	if err != nil {
		return nil, err
	}
	ds, err := parseDisks(f)
	if err != nil {
		return nil, err
	}
	r.disks = ds
	r.basePaths = make([]string, len(ds))
	var need []uint32
	for i, d := range ds {
		if !d.COW {
			continue
		}
		if p := r.opts.Bases.Find(d.Base); p != "" {
			r.basePaths[i] = p
			continue
		}
		if r.opts.Bases == nil || r.opts.Bases.Dir == "" {
			return nil, fmt.Errorf("migrate: disk %d's base (SHA-256 %x) is not on this host and there is no cache directory to receive it (--cache DIR)", i, d.Base)
		}
		need = append(need, uint32(i))
	}
	return need, nil
}

// receiveBases stores each base the source sends in the cache directory
// under its hash, checking size and SHA-256 before it is named.
func (r *receiver) receiveBases(need []uint32) error {
	for _, i := range need {
		d := r.disks[i]
		if err := os.MkdirAll(r.opts.Bases.Dir, 0o755); err != nil {
			return fmt.Errorf("migrate: cache: %w", err)
		}
		final := filepath.Join(r.opts.Bases.Dir, hex.EncodeToString(d.Base[:]))
		tmp, err := os.CreateTemp(r.opts.Bases.Dir, ".base-*")
		if err != nil {
			return fmt.Errorf("migrate: cache: %w", err)
		}
		ok := false
		defer func() {
			if !ok {
				tmp.Close()
				os.Remove(tmp.Name())
			}
		}()
		h := sha256.New()
		var off int64
		for {
			f, err := r.next()
			if err != nil {
				return err
			}
			if f.typ == frameBaseEnd {
				if len(f.payload) != 4 || binary.LittleEndian.Uint32(f.payload) != i || off != d.BaseSize {
					return &ProtocolError{f.off, fmt.Sprintf("base end for disk %d after %d of %d bytes", i, off, d.BaseSize)}
				}
				break
			}
			if f.typ != frameBase || len(f.payload) < 16 || binary.LittleEndian.Uint32(f.payload) != i ||
				int64(binary.LittleEndian.Uint64(f.payload[8:])) != off || off+int64(len(f.payload)-16) > d.BaseSize {
				return &ProtocolError{f.off, fmt.Sprintf("expected base data of disk %d at byte %d, got %s", i, off, frameName(f.typ))}
			}
			data := f.payload[16:]
			if _, err := tmp.Write(data); err != nil {
				return fmt.Errorf("migrate: cache: %w", err)
			}
			h.Write(data)
			off += int64(len(data))
			r.stats.BaseBytes += int64(len(data))
		}
		if sum := h.Sum(nil); [32]byte(sum) != d.Base {
			return fmt.Errorf("migrate: the base of disk %d received has SHA-256 %x, announced %x: discarded", i, sum, d.Base)
		}
		if err := tmp.Sync(); err != nil {
			return fmt.Errorf("migrate: cache: %w", err)
		}
		tmp.Close()
		if err := os.Rename(tmp.Name(), final); err != nil {
			return fmt.Errorf("migrate: cache: %w", err)
		}
		ok = true
		r.basePaths[i] = final
	}
	return nil
}

// checkTargetDisks checks the built machine's disks against the source's.
func (r *receiver) checkTargetDisks() error {
	var have []machine.Disk
	if dt, ok := r.t.(DiskTarget); ok {
		have = dt.Disks()
	}
	if len(have) != len(r.disks) {
		return fmt.Errorf("migrate: the source has %d disks, this target %d (give the same --disk arguments)", len(r.disks), len(have))
	}
	for i, d := range r.disks {
		tr := have[i].Tracker
		if tr == nil {
			return fmt.Errorf("migrate: disk %d is not tracked", i)
		}
		if tr.Size() != d.Size {
			return fmt.Errorf("migrate: disk %d (%s): %d bytes here, %d on the source", i, have[i].Spec.Path, tr.Size(), d.Size)
		}
		o := tr.Overlay()
		if (o != nil) != d.COW {
			return fmt.Errorf("migrate: disk %d (%s): copy-on-write %v here, %v on the source", i, have[i].Spec.Path, o != nil, d.COW)
		}
		if o != nil {
			if o.BaseHash() != d.Base {
				return fmt.Errorf("migrate: disk %d (%s): another base than the source's", i, have[i].Spec.Path)
			}
			held := virtioblk.ChangedBitmap(tr)
			for _, w := range held {
				if w != 0 {
					return fmt.Errorf("migrate: disk %d: the overlay %s already holds data: give a new overlay path (it is created over the base)", i, have[i].Spec.Path)
				}
			}
		}
	}
	r.tdisks = have
	return nil
}

// diskBlock writes one received block.
func (r *receiver) diskBlock(f frame) error {
	p := f.payload
	if len(p) < 17 || binary.LittleEndian.Uint32(p[4:]) != 0 {
		return &ProtocolError{f.off, "short disk block frame"}
	}
	i := binary.LittleEndian.Uint32(p)
	b := int64(binary.LittleEndian.Uint64(p[8:]))
	if int(i) >= len(r.tdisks) {
		return &ProtocolError{f.off, fmt.Sprintf("disk block for disk %d of %d", i, len(r.tdisks))}
	}
	tr := r.tdisks[i].Tracker
	if b < 0 || b >= tr.Blocks() {
		return &ProtocolError{f.off, fmt.Sprintf("disk %d block %d beyond its %d blocks", i, b, tr.Blocks())}
	}
	n := tr.BlockLen(b)
	data := p[17:]
	var err error
	switch p[16] {
	case diskEncZero:
		if len(data) != 0 {
			return &ProtocolError{f.off, "zero disk block with data"}
		}
		err = tr.Zero(b*diskBlock, n)
	case diskEncPlain, diskEncLZ4:
		if p[16] == diskEncLZ4 {
			k, e := lz4.UncompressBlock(data, r.plain[:n])
			if e != nil || int64(k) != n {
				return &ProtocolError{f.off, fmt.Sprintf("disk block: lz4 decodes to %d bytes (%v), want %d", k, e, n)}
			}
			data = r.plain[:n]
		} else if int64(len(data)) != n {
			return &ProtocolError{f.off, fmt.Sprintf("disk block of %d bytes, want %d", len(data), n)}
		}
		_, err = tr.WriteAt(data, b*diskBlock)
	default:
		return &ProtocolError{f.off, fmt.Sprintf("disk block encoding %d", p[16])}
	}
	if err != nil {
		return fmt.Errorf("migrate: writing disk %d block %d: %w", i, b, err)
	}
	r.stats.DiskBlocks++
	return nil
}

// syncDisks makes the received disks durable before ready.
func (r *receiver) syncDisks() error {
	for _, d := range r.tdisks {
		if err := d.Tracker.Sync(); err != nil {
			return fmt.Errorf("migrate: syncing disk %s: %w", d.Name, err)
		}
		d.Tracker.TakeDirty()
	}
	return nil
}
