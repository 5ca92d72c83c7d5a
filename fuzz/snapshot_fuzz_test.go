package fuzz

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"os"
	"path/filepath"
	"testing"

	"collective/kvm"
	"collective/kvm/boot"
	"collective/kvm/guestmem"
	"collective/machine"
	"collective/snapshot"
)

const snapMem = 16 << 20

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// snapshotSeeds writes a full and an incremental snapshot of a small
// memory and returns their bytes.
func snapshotSeeds(f *testing.F) [][]byte {
	dir := f.TempDir()
	mem, err := guestmem.NewFake(boot.RAMLayout(snapMem)...)
	if err != nil {
		f.Fatal(err)
	}
	st := &machine.MachineState{Version: machine.StateVersion, MemSize: snapMem, CPUs: 1,
		VCPUs: []*kvm.VCPUState{{ID: 0}}, VM: &kvm.VMState{}}
	for i := 0; i < 12; i++ {
		mem.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 100+i*300), uint64(i)*0x9000+0x100000)
	}
	mem.Regions()[0].TakeDirty()
	full := filepath.Join(dir, "full")
	if _, err := snapshot.WriteFull(full, mem, st, false); err != nil {
		f.Fatal(err)
	}
	parent, err := snapshot.Open(full)
	if err != nil {
		f.Fatal(err)
	}
	defer parent.Close()
	mem.WriteAt([]byte("changed"), 0x200000)
	mem.Zero(0x100000, 4096)
	inc := filepath.Join(dir, "inc")
	if _, err := snapshot.WriteIncremental(inc, mem, [][]uint64{mem.Regions()[0].TakeDirty()}, st, parent); err != nil {
		f.Fatal(err)
	}
	var out [][]byte
	for _, p := range []string{full, inc, filepath.Join("..", "snapshot", "testdata", "golden-1.0.0.snap")} {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		out = append(out, b)
	}
	return out
}

// fixChecksums recomputes the header's, the sections' and (with chunks)
// every payload's CRC, so that mutations reach the decoders behind them.
func fixChecksums(b []byte, chunks bool) {
	if len(b) < 128 {
		return
	}
	le := binary.LittleEndian
	section := func(off, n int) []byte {
		o, l := le.Uint64(b[off:]), le.Uint64(b[off+8:])
		if o > uint64(len(b)) || l > uint64(len(b))-o {
			return nil
		}
		return b[o : o+l]
	}
	if s := section(32, 16); s != nil {
		le.PutUint32(b[112:], crc32.Checksum(s, castagnoli))
	}
	if chunks {
		idx, data := section(48, 16), section(64, 16)
		for p := 0; idx != nil && data != nil && len(idx)-p >= 48; {
			e := idx[p:]
			off, n := le.Uint64(e[24:]), uint64(le.Uint32(e[32:]))
			if off <= uint64(len(data)) && n <= uint64(len(data))-off {
				le.PutUint32(e[40:], crc32.Checksum(data[off:off+n], castagnoli))
			}
			mask := le.Uint64(e[8:])
			k := 0
			for ; mask != 0; mask &= mask - 1 {
				k++
			}
			p += 48 + 16*k
		}
	}
	if s := section(48, 16); s != nil {
		le.PutUint32(b[116:], crc32.Checksum(s, castagnoli))
	}
	le.PutUint32(b[124:], crc32.Checksum(b[:124], castagnoli))
}

// FuzzSnapshotDecode decodes arbitrary bytes as a snapshot file and, when
// they decode, restores their memory into a fake guest RAM. The first byte
// chooses whether checksums are fixed up first (so that mutations reach
// the JSON, index and lz4 decoders). Invariants: an error means a nil
// result; no panic; allocations bounded by the input and the guest RAM
// size (capped here at 64 MiB).
func FuzzSnapshotDecode(f *testing.F) {
	for _, s := range snapshotSeeds(f) {
		for mode := byte(0); mode < 3; mode++ {
			f.Add(append([]byte{mode}, s...))
		}
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < 1 {
			return
		}
		data := bytes.Clone(in[1:])
		if in[0]&3 != 0 {
			fixChecksums(data, in[0]&2 != 0)
		}
		s, err := snapshot.Decode(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			if s != nil {
				t.Fatalf("Decode returned a snapshot and error %v", err)
			}
			return
		}
		if s.State == nil || s.MemSize() == 0 {
			t.Fatal("decoded snapshot without state or memory size")
		}
		if s.MemSize() > 64<<20 || s.Kind != snapshot.KindFull {
			return
		}
		mem, err := snapshot.ImageOf([]*snapshot.Snapshot{s})
		if err != nil {
			if mem != nil {
				t.Fatalf("ImageOf returned memory and error %v", err)
			}
			return
		}
		if mem.Size() != s.MemSize() {
			t.Fatalf("image of %d bytes for %d", mem.Size(), s.MemSize())
		}
	})
}
