package snapshot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"collective/internal/lz4block"
	"collective/internal/testenv"
	"collective/kvm"
	"collective/kvm/boot"
	"collective/kvm/guestmem"
	"collective/machine"

	"golang.org/x/sys/unix"
)

const testMem = 32 << 20

func fakeState(mem uint64) *machine.MachineState {
	return &machine.MachineState{Version: machine.StateVersion, MemSize: mem, CPUs: 1,
		VCPUs: []*kvm.VCPUState{{ID: 0}}, VM: &kvm.VMState{}}
}

func fakeMem(t testing.TB, mem uint64) *guestmem.Memory {
	m, err := guestmem.NewFake(boot.RAMLayout(mem)...)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// scribble writes n pages at random (with some compressible and some
// random content) and returns the dirty bitmap of the writes.
func scribble(m *guestmem.Memory, rng *rand.Rand, n int) {
	r := m.Regions()[0]
	pages := int(r.Size() / pageSize)
	for i := 0; i < n; i++ {
		p := rng.IntN(pages)
		page := r.Host[p*pageSize : (p+1)*pageSize]
		switch rng.IntN(3) {
		case 0:
			for j := range page {
				page[j] = byte(rng.Uint32())
			}
		case 1:
			for j := range page {
				page[j] = byte(p + j/64)
			}
		default:
			clear(page)
		}
		m.MarkDirty(r.GPA+uint64(p)*pageSize, pageSize)
	}
}

func sameMem(t *testing.T, what string, a, b *guestmem.Memory) {
	t.Helper()
	for i, r := range a.Regions() {
		if !bytes.Equal(r.Host, b.Regions()[i].Host) {
			for p := 0; p < len(r.Host); p += pageSize {
				if !bytes.Equal(r.Host[p:p+pageSize], b.Regions()[i].Host[p:p+pageSize]) {
					t.Fatalf("%s: region %d differs first at page %#x", what, i, p)
				}
			}
		}
	}
}

func open(t *testing.T, p string) *Snapshot {
	t.Helper()
	s, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	mem := fakeMem(t, testMem)
	scribble(mem, rng, 2000)
	dir := t.TempDir()
	for _, raw := range []bool{false, true} {
		p := filepath.Join(dir, "full")
		if raw {
			p += ".raw"
		}
		st, err := writeFile(p, writeSpec{mem: mem, state: stateOf(fakeState(testMem)), raw: raw})
		if err != nil {
			t.Fatal(err)
		}
		s := open(t, p)
		if s.ID != st.ID || s.Kind != KindFull || s.RawImage() != raw || s.Pages() != st.Pages {
			t.Fatalf("raw=%v: opened %+v, wrote %+v", raw, s, st)
		}
		img, err := ImageOf([]*Snapshot{s})
		if err != nil {
			t.Fatal(err)
		}
		sameMem(t, "round trip", mem, img)
		// Every stored page's hash is its content's; a raw image has
		// none (and its index is that much smaller).
		n := 0
		s.PageHashes(func(gpa uint64, h []byte) {
			n++
			if raw {
				if h != nil {
					t.Fatalf("raw image: a hash for page %#x", gpa)
				}
				return
			}
			var want [HashSize]byte
			b, _ := mem.Slice(gpa, pageSize)
			pageHash(want[:], b)
			if !bytes.Equal(h, want[:]) {
				t.Fatalf("hash of page %#x", gpa)
			}
		})
		if n != s.Pages() {
			t.Fatalf("raw=%v: %d pages listed, %d stored", raw, n, s.Pages())
		}
		if raw && s.h.indexLen != uint64(len(s.chunks)*entryFixed) {
			t.Fatalf("raw image index of %d bytes for %d entries", s.h.indexLen, len(s.chunks))
		}
	}
}

// chain writes a full snapshot and two incrementals of a changing memory.
func chain(t *testing.T, dir string) (*guestmem.Memory, []string) {
	rng := rand.New(rand.NewPCG(3, 4))
	mem := fakeMem(t, testMem)
	scribble(mem, rng, 1500)
	mem.Regions()[0].TakeDirty()
	paths := []string{filepath.Join(dir, "0.snap"), filepath.Join(dir, "1.snap"), filepath.Join(dir, "2.snap")}
	st, err := writeFile(paths[0], writeSpec{mem: mem, state: stateOf(fakeState(testMem))})
	if err != nil {
		t.Fatal(err)
	}
	parent := st.ID
	for i := 1; i < 3; i++ {
		scribble(mem, rng, 300)
		dirty := [][]uint64{mem.Regions()[0].TakeDirty()}
		st, err := writeFile(paths[i], writeSpec{mem: mem, dirty: dirty, state: stateOf(fakeState(testMem)), parent: parent, parentHint: filepath.Base(paths[i-1])})
		if err != nil {
			t.Fatal(err)
		}
		if st.Pages+st.ZeroPages > 300 || st.Pages+st.ZeroPages < 200 {
			t.Errorf("incremental %d records %d+%d pages for 300 writes", i, st.Pages, st.ZeroPages)
		}
		parent = st.ID
	}
	return mem, paths
}

func TestChainEqualsMerge(t *testing.T) {
	dir := t.TempDir()
	mem, paths := chain(t, dir)
	ch, err := OpenChain(paths[2])
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, s := range ch {
			s.Close()
		}
	}()
	if len(ch) != 3 {
		t.Fatalf("chain of %d", len(ch))
	}
	img, err := ImageOf(ch)
	if err != nil {
		t.Fatal(err)
	}
	sameMem(t, "chain", mem, img)
	for _, raw := range []bool{false, true} {
		out := filepath.Join(dir, "merged")
		if _, err := Merge(out, ch, raw, nil); err != nil {
			t.Fatal(err)
		}
		m := open(t, out)
		img2, err := ImageOf([]*Snapshot{m})
		if err != nil {
			t.Fatal(err)
		}
		sameMem(t, "merge", img, img2)
	}
	// A chain with a missing link is refused.
	if _, err := OpenFiles([]string{paths[0], paths[2]}); !errors.Is(err, ErrParent) {
		t.Fatalf("chain without its middle: %v", err)
	}
	if _, err := OpenFiles([]string{paths[1]}); !errors.Is(err, ErrParent) {
		t.Fatalf("chain starting with an incremental: %v", err)
	}
}

// TestCorruptAndTruncated flips a byte in each section, and cuts the file
// at many lengths: every one is refused with a clear error.
func TestCorruptAndTruncated(t *testing.T) {
	dir := t.TempDir()
	mem := fakeMem(t, testMem)
	scribble(mem, rand.New(rand.NewPCG(5, 6)), 500)
	for _, raw := range []bool{false, true} {
		p := filepath.Join(dir, "s")
		if _, err := writeFile(p, writeSpec{mem: mem, state: stateOf(fakeState(testMem)), raw: raw}); err != nil {
			t.Fatal(err)
		}
		good, _ := os.ReadFile(p)
		s := open(t, p)
		h := s.h
		lastChunk := s.chunks[len(s.chunks)-1]
		for _, tc := range []struct {
			name string
			off  uint64
			want string
		}{
			{"header", 30, "header checksum"},
			{"state", h.stateOff + 10, "state section checksum"},
			{"index", h.indexOff + 3, "index section checksum"},
			{"data", h.dataOff + lastChunk.off + 5, "checksum"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				bad := bytes.Clone(good)
				bad[tc.off] ^= 0x40
				q := filepath.Join(dir, "bad")
				os.WriteFile(q, bad, 0o644)
				s, err := Open(q)
				if err == nil {
					defer s.Close()
					_, err = ImageOf([]*Snapshot{s})
				}
				if err == nil || !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("flipped byte %#x (raw=%v): %v, want an ErrFormat about %q", tc.off, raw, err, tc.want)
				}
			})
		}
		for _, n := range []int{0, 7, 100, headerSize, int(h.stateOff) + 5, int(h.dataOff) + 1, len(good) / 2, len(good) - 1} {
			q := filepath.Join(dir, "short")
			os.WriteFile(q, good[:n], 0o644)
			s, err := Open(q)
			if err == nil {
				s.Close()
				t.Fatalf("a file cut to %d of %d bytes opened", n, len(good))
			}
			if !errors.Is(err, ErrFormat) {
				t.Errorf("cut to %d: %v is not ErrFormat", n, err)
			}
		}
	}
}

func TestVersionRefused(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "s")
	if _, err := writeFile(p, writeSpec{mem: fakeMem(t, testMem), state: stateOf(fakeState(testMem))}); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(p)
	for _, v := range [][3]uint16{{2, 0, 0}, {1, formatMinor + 1, 0}, {0, 9, 0}} {
		bad := bytes.Clone(good)
		binary.LittleEndian.PutUint16(bad[8:], v[0])
		binary.LittleEndian.PutUint16(bad[10:], v[1])
		binary.LittleEndian.PutUint32(bad[124:], crc(bad[:124]))
		_, err := Decode(bytes.NewReader(bad), int64(len(bad)))
		if !errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), FormatVersion) {
			t.Errorf("version %v: %v, want ErrVersion naming %s", v, err, FormatVersion)
		}
	}
	// A newer patch version is read.
	ok := bytes.Clone(good)
	binary.LittleEndian.PutUint16(ok[12:], 9)
	binary.LittleEndian.PutUint32(ok[124:], crc(ok[:124]))
	if _, err := Decode(bytes.NewReader(ok), int64(len(ok))); err != nil {
		t.Errorf("patch version %d.%d.9: %v", formatMajor, formatMinor, err)
	}
}

// TestGolden decodes the checked-in snapshot of format 1.0.0: a guard
// against format changes that would strand existing files.
func TestGolden(t *testing.T) {
	p := filepath.Join("testdata", "golden-1.0.0.snap")
	if os.Getenv("SNAPSHOT_UPDATE_GOLDEN") != "" {
		mem := fakeMem(t, 16<<20)
		scribble(mem, rand.New(rand.NewPCG(7, 8)), 40)
		os.MkdirAll("testdata", 0o755)
		if _, err := writeFile(p, writeSpec{mem: mem, state: stateOf(fakeState(16 << 20))}); err != nil {
			t.Fatal(err)
		}
	}
	s := open(t, p)
	if s.Version != "1.0.0" || s.Pages() == 0 {
		t.Fatalf("golden: version %s, %d pages", s.Version, s.Pages())
	}
	img, err := ImageOf([]*Snapshot{s})
	if err != nil {
		t.Fatal(err)
	}
	// Its page hashes are SHA-256/128 (before 1.3.0), and a restore that
	// checks them uses that hash, not this version's.
	n := 0
	s.PageHashes(func(gpa uint64, h []byte) {
		var want, got [HashSize]byte
		b, _ := img.Slice(gpa, pageSize)
		pageHashSHA(want[:], b)
		s.hashPage(got[:], b)
		if !bytes.Equal(h, want[:]) || got != want {
			t.Fatalf("golden page %#x: stored hash %x, SHA-256/128 %x, hashPage %x", gpa, h, want, got)
		}
		n++
	})
	if n != s.Pages() {
		t.Fatalf("%d page hashes for %d pages", n, s.Pages())
	}
	if _, err := ImageOf([]*Snapshot{s}); err != nil {
		t.Fatal(err)
	}
	mem := fakeMem(t, 16<<20)
	if _, err := s.apply(mem.Regions(), true, nil); err != nil {
		t.Fatalf("golden restored with its hashes checked: %v", err)
	}
}

func TestCRCZeroPage(t *testing.T) {
	for _, c := range []uint32{0, 1, 0xffffffff, 0x12345678, crc([]byte("x"))} {
		if got, want := crcZeroPage(c), crc32.Update(c, castagnoli(), zeroPage); got != want {
			t.Errorf("crcZeroPage(%#x) = %#x, want %#x", c, got, want)
		}
	}
}

// TestFullSkipsUntouched: a full snapshot of guest RAM in a private
// anonymous mapping stores the pages that hold data and reads none that
// the guest never touched (they stay unmapped), raw image or not; the
// restored memory equals the original either way.
func TestFullSkipsUntouched(t *testing.T) {
	host, err := unix.Mmap(-1, 0, testMem, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(host)
	unix.Madvise(host, unix.MADV_NOHUGEPAGE) // one touch maps one page
	mem, err := guestmem.New(guestmem.Region{GPA: 0, Host: host})
	if err != nil {
		t.Fatal(err)
	}
	data := []int{0, 3, 64, 65, 1000, testMem/pageSize - 1}
	for _, p := range data {
		host[p*pageSize+17] = byte(p) | 1
	}
	host[5*pageSize] = 0 // touched, and zero: read, not stored
	touched := map[int]bool{5: true}
	for _, p := range data {
		touched[p] = true
	}
	dir := t.TempDir()
	var paths []string
	for _, raw := range []bool{false, true} {
		p := filepath.Join(dir, fmt.Sprintf("full-raw=%v", raw))
		st, err := writeFile(p, writeSpec{mem: mem, state: stateOf(fakeState(testMem)), raw: raw})
		if err != nil {
			t.Fatal(err)
		}
		if st.Pages != len(data) {
			t.Errorf("raw=%v: %d pages stored, want %d", raw, st.Pages, len(data))
		}
		paths = append(paths, p)
	}
	// Before anything reads the memory to compare it.
	res := guestmem.Resident(host)
	if res == nil {
		t.Fatal("no resident map of an anonymous mapping")
	}
	for pg := 0; pg < testMem/pageSize; pg++ {
		if res[pg/64]&(1<<(pg%64)) != 0 && !touched[pg] {
			t.Fatalf("the snapshots read page %d, which the guest never touched", pg)
		}
	}
	for _, p := range paths {
		img, err := ImageOf([]*Snapshot{open(t, p)})
		if err != nil {
			t.Fatal(err)
		}
		sameMem(t, p, mem, img)
	}
}

// TestLZ4Groups: a chunk's pages in groups of lz4 blocks (format 1.2)
// decode back exactly, and every malformed group list is refused.
func TestLZ4Groups(t *testing.T) {
	const pages = 40 // groups of 16, 16 and 8
	plain := make([]byte, pages*pageSize)
	for i := range plain {
		plain[i] = byte(i / 64)
	}
	var c lz4block.Compressor
	dst := make([]byte, lz4block.CompressBound(len(plain))+4*groups(pages))
	n, ok := compressGroups(&c, plain, dst)
	if !ok {
		t.Fatal("compressible pages did not compress")
	}
	p := dst[:n]
	out := make([]byte, len(plain))
	if k, err := uncompressGroups(p, out); err != nil || k != len(plain) || !bytes.Equal(out, plain) {
		t.Fatalf("round trip: %d bytes, %v", k, err)
	}
	first := binary.LittleEndian.Uint32(p)
	bad := map[string][]byte{
		"truncated":        p[:len(p)-1],
		"no last group":    p[:4+first],
		"trailing byte":    append(bytes.Clone(p), 0),
		"length too large": func() []byte { q := bytes.Clone(p); binary.LittleEndian.PutUint32(q, uint32(len(q))); return q }(),
		"empty":            nil,
	}
	for what, q := range bad {
		if _, err := uncompressGroups(q, make([]byte, len(plain))); err == nil {
			t.Errorf("%s: accepted", what)
		}
	}
	// The first group alone is the payload of 16 pages, not of 17.
	if _, err := uncompressGroups(p[:4+first], make([]byte, 17*pageSize)); err == nil {
		t.Error("one group for 17 pages: accepted")
	}
	if _, err := uncompressGroups(p[:4+first], make([]byte, 16*pageSize)); err != nil {
		t.Errorf("one group for 16 pages: %v", err)
	}
	// A group that decodes to fewer pages than its place needs.
	short := make([]byte, 4, 4+lz4block.CompressBound(pageSize))
	k := c.Compress(short[4:cap(short)], plain[:pageSize])
	binary.LittleEndian.PutUint32(short, uint32(k))
	if _, err := uncompressGroups(short[:4+k], make([]byte, 2*pageSize)); err == nil {
		t.Error("a group of 1 page for 2 pages: accepted")
	}
}

// TestShape: a file's header gives its machine's shape from 1.3.0 on (and
// a header whose vCPU count disagrees with the state is refused); a
// Prepared machine of another shape is closed and replaced by Restore.
func TestShape(t *testing.T) {
	testenv.RequireKVM(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "s")
	m0, err := machine.NewBare(machine.Config{MemSize: testMem, CPUs: 2})
	if err != nil {
		t.Fatal(err)
	}
	m0.Pause()
	st, err := m0.SaveState()
	m0.Close()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := writeFile(p, writeSpec{mem: fakeMem(t, testMem), state: stateOf(st)}); err != nil {
		t.Fatal(err)
	}
	mem, cpus, ok, err := Shape(p)
	if err != nil || !ok || mem != testMem || cpus != st.CPUs {
		t.Fatalf("Shape: %d bytes, %d vCPUs, %v, %v; want %d, %d", mem, cpus, ok, err, uint64(testMem), st.CPUs)
	}
	if _, _, ok, err := Shape(filepath.Join("testdata", "golden-1.0.0.snap")); ok || err != nil {
		t.Errorf("Shape of a 1.0.0 file: ok %v, %v", ok, err)
	}
	if Prepare(filepath.Join("testdata", "golden-1.0.0.snap"), machine.Config{}) != nil {
		t.Error("Prepare of a 1.0.0 file: not nil")
	}
	// A header that disagrees with its state.
	good, _ := os.ReadFile(p)
	bad := bytes.Clone(good)
	binary.LittleEndian.PutUint32(bad[120:], uint32(st.CPUs+1))
	binary.LittleEndian.PutUint32(bad[124:], crc(bad[:124]))
	if _, err := Decode(bytes.NewReader(bad), int64(len(bad))); !errors.Is(err, ErrFormat) {
		t.Errorf("header with %d vCPUs, state %d: %v", st.CPUs+1, st.CPUs, err)
	}
	// A machine prepared for another file's shape (1 vCPU).
	other := filepath.Join(dir, "other")
	if _, err := writeFile(other, writeSpec{mem: fakeMem(t, testMem), state: stateOf(fakeState(testMem))}); err != nil {
		t.Fatal(err)
	}
	prep := Prepare(other, machine.Config{})
	s := open(t, p)
	m, _, err := Restore([]*Snapshot{s}, machine.Config{}, RestoreOptions{Prepared: prep})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if prep.m != nil || m.Config().CPUs != st.CPUs {
		t.Errorf("the prepared machine of 1 vCPU was kept (%v), the restored one has %d", prep.m != nil, m.Config().CPUs)
	}
}
