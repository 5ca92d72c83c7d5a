package cow

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// The tests describe disk contents per 512-byte sector by a value id:
// 0 is zeros, -1 the base's bytes, and a positive id the pattern written by
// operation id.
const sector = 512

// pattern fills b (one sector) with the content of value id at sector s.
func pattern(b []byte, id, s int64, base []byte) {
	switch {
	case id == 0:
		clear(b)
	case id == -1:
		off := s * sector
		n := 0
		if off < int64(len(base)) {
			n = copy(b, base[off:])
		}
		clear(b[n:])
	default:
		copy(b, "SECTOR!!")
		binary.LittleEndian.PutUint64(b[8:], uint64(id))
		binary.LittleEndian.PutUint64(b[16:], uint64(s))
		for i := 24; i < len(b); i++ {
			b[i] = byte(id*31 + s*7 + int64(i))
		}
	}
}

// makeBase writes a base of size bytes whose sectors are tagged, and
// returns its bytes.
func makeBase(t testing.TB, path string, size int64) []byte {
	t.Helper()
	b := make([]byte, size)
	for s := int64(0); s*sector < size; s++ {
		var sec [sector]byte
		copy(sec[:], "BASE....")
		binary.LittleEndian.PutUint64(sec[8:], uint64(s))
		for i := 16; i < sector; i++ {
			sec[i] = byte(s*13 + int64(i)*3 + 1)
		}
		copy(b[s*sector:], sec[:])
	}
	if err := os.WriteFile(path, b, 0o444); err != nil {
		t.Fatal(err)
	}
	return b
}

func fileHash(t testing.TB, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// op is one step of a workload.
type op struct {
	kind  byte // 'w' write, 'p' punch, 'z' zero, 's' sync
	id    int64
	first int64 // sector
	count int64 // sectors
}

// genOps makes a deterministic workload over a disk of nsec sectors with
// clusters of cs bytes: writes within a cluster, across clusters and of
// whole clusters, discards and write-zeroes of parts and wholes, syncs.
func genOps(seed uint64, idBase int64, n int, nsec, cs int64) []op {
	rng := rand.New(rand.NewPCG(seed, 0x636f77))
	spc := cs / sector
	ops := make([]op, 0, n)
	for i := range n {
		o := op{id: idBase + int64(i) + 1}
		switch r := rng.IntN(100); {
		case r < 12:
			o.kind = 's'
		case r < 20:
			o.kind = 'p'
		case r < 26:
			o.kind = 'z'
		default:
			o.kind = 'w'
		}
		switch r := rng.IntN(3); {
		case o.kind == 's':
		case r == 0: // inside one cluster
			c := rng.Int64N((nsec + spc - 1) / spc)
			o.first = c*spc + rng.Int64N(spc)
			o.count = 1 + rng.Int64N(spc-(o.first%spc))
		case r == 1: // whole clusters
			c := rng.Int64N((nsec + spc - 1) / spc)
			o.first = c * spc
			o.count = spc * (1 + rng.Int64N(2))
		default: // anywhere, up to three clusters
			o.first = rng.Int64N(nsec)
			o.count = 1 + rng.Int64N(3*spc)
		}
		if o.kind != 's' {
			o.count = min(o.count, nsec-o.first)
		}
		ops = append(ops, o)
	}
	return ops
}

// model tracks what each sector may read as.
type model struct {
	base  []byte
	acked []int64   // as of the last acknowledged Sync
	later [][]int64 // written since
	cur   []int64   // as the running overlay must read now
}

func newModel(nsec int64, base []byte) *model {
	m := &model{base: base, acked: make([]int64, nsec), later: make([][]int64, nsec), cur: make([]int64, nsec)}
	for i := range m.acked {
		m.acked[i], m.cur[i] = -1, -1
	}
	return m
}

// apply records a completed write, punch or zero.
func (m *model) apply(o op) {
	id := o.id
	if o.kind != 'w' {
		id = 0
	}
	for s := o.first; s < o.first+o.count; s++ {
		m.cur[s] = id
		m.later[s] = append(m.later[s], id)
	}
}

// ack records a completed Sync.
func (m *model) ack() {
	copy(m.acked, m.cur)
	for i := range m.later {
		m.later[i] = m.later[i][:0]
	}
}

// do runs o on the overlay and returns its error.
func do(ov *Overlay, o op, buf []byte) error {
	off, n := o.first*sector, o.count*sector
	switch o.kind {
	case 's':
		return ov.Sync()
	case 'p':
		return ov.Punch(off, n)
	case 'z':
		return ov.Zero(off, n)
	}
	b := buf[:n]
	for i := range o.count {
		pattern(b[i*sector:(i+1)*sector], o.id, o.first+i, nil)
	}
	_, err := ov.WriteAt(b, off)
	return err
}

// verify reads the whole disk and checks every sector against the model:
// its acknowledged value or one written later. With settle, it then makes
// what it read the acknowledged state.
func (m *model) verify(t testing.TB, ov *Overlay, settle bool) {
	t.Helper()
	nsec := int64(len(m.acked))
	disk := make([]byte, nsec*sector)
	if _, err := ov.ReadAt(disk, 0); err != nil {
		t.Fatalf("reading back: %v", err)
	}
	var want [sector]byte
	bad := 0
	for s := range nsec {
		got := disk[s*sector : (s+1)*sector]
		// Name what the sector holds (zeros past the base's end are
		// both "base" and "zeros"), then check it is allowed.
		ids := []int64{0, -1}
		if bytes.HasPrefix(got, []byte("SECTOR!!")) {
			ids = []int64{int64(binary.LittleEndian.Uint64(got[8:]))}
		}
		found := int64(-2)
		for _, id := range ids {
			pattern(want[:], id, s, m.base)
			if bytes.Equal(got, want[:]) && (id == m.acked[s] || slices.Contains(m.later[s], id)) {
				found = id
				break
			}
		}
		if found == -2 {
			if bad++; bad <= 5 {
				t.Errorf("sector %d (cluster %d): reads %s, want id %d (acked) or one of %v", s, s*sector/ov.cs, describe(got, m.base, s), m.acked[s], m.later[s])
			}
			continue
		}
		if settle {
			m.acked[s], m.cur[s] = found, found
		}
	}
	if bad > 0 {
		t.Fatalf("%d of %d sectors wrong", bad, nsec)
	}
	if settle {
		for i := range m.later {
			m.later[i] = m.later[i][:0]
		}
	}
}

// checkCur checks that the running overlay reads what was last written.
func (m *model) checkCur(t testing.TB, ov *Overlay, first, count int64) {
	t.Helper()
	b := make([]byte, count*sector)
	if _, err := ov.ReadAt(b, first*sector); err != nil {
		t.Fatalf("read: %v", err)
	}
	var want [sector]byte
	for i := range count {
		s := first + i
		pattern(want[:], m.cur[s], s, m.base)
		if got := b[i*sector : (i+1)*sector]; !bytes.Equal(got, want[:]) {
			t.Fatalf("sector %d reads %s, want id %d", s, describe(got, m.base, s), m.cur[s])
		}
	}
}

func describe(b, base []byte, s int64) string {
	var sec [sector]byte
	switch {
	case allZero(b):
		return "zeros"
	case bytes.HasPrefix(b, []byte("SECTOR!!")):
		return fmt.Sprintf("id %d for sector %d", binary.LittleEndian.Uint64(b[8:]), binary.LittleEndian.Uint64(b[16:]))
	default:
		pattern(sec[:], -1, s, base)
		if bytes.Equal(b, sec[:]) {
			return "base"
		}
	}
	return fmt.Sprintf("garbage %x...", b[:16])
}

// testDisk is a base and an overlay path in a temporary folder.
type testDisk struct {
	dir, basePath, ovPath string
	base                  []byte
	baseHash              [32]byte
}

func newTestDisk(t testing.TB, baseSize, virtSize, cs int64) *testDisk {
	t.Helper()
	d := &testDisk{dir: t.TempDir()}
	d.basePath = filepath.Join(d.dir, "base.img")
	d.ovPath = filepath.Join(d.dir, "vm.cow")
	d.base = makeBase(t, d.basePath, baseSize)
	d.baseHash = fileHash(t, d.basePath)
	if err := Create(d.ovPath, d.basePath, CreateOptions{ClusterSize: cs, Size: virtSize}); err != nil {
		t.Fatal(err)
	}
	return d
}
