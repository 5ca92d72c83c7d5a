package guestmem

import (
	"math/bits"
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestResidentPages(t *testing.T) {
	const size = 64 << 20
	m, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	unix.Madvise(m, unix.MADV_NOHUGEPAGE)
	touched := []int{0, 1, 100, 5000, size/PageSize - 1}
	for _, p := range touched {
		m[p*PageSize+7] = 1
	}
	bm := Resident(m)
	if bm == nil {
		t.Fatal("no map of an anonymous mapping")
	}
	for _, p := range touched {
		if bm[p/64]&(1<<(p%64)) == 0 {
			t.Errorf("touched page %d not resident", p)
		}
	}
	if n := popcount(bm); n > size/PageSize/2 {
		t.Errorf("%d of %d pages resident after touching %d", n, size/PageSize, len(touched))
	}
	// A file mapping never qualifies: its pages hold data unmapped.
	f, err := os.CreateTemp(t.TempDir(), "img")
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(1 << 20)
	fm, err := unix.Mmap(int(f.Fd()), 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(fm)
	if Resident(fm) != nil {
		t.Error("a file mapping qualified")
	}
	// Nor does an anonymous range with a file mapped over part of it.
	if _, err := unix.MmapPtr(int(f.Fd()), 0, unsafe.Pointer(&m[8*PageSize]), 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_FIXED); err != nil {
		t.Fatal(err)
	}
	if Resident(m) != nil {
		t.Error("a range with a file mapped into it qualified")
	}
}

func popcount(bm []uint64) int {
	n := 0
	for _, w := range bm {
		n += bits.OnesCount64(w)
	}
	return n
}
