package guestmem

import (
	"bufio"
	"encoding/binary"
	"os"
	"strconv"
	"strings"
	"unsafe"
)

// A migration's first round and a full snapshot need not read guest RAM
// the guest never touched: in a private anonymous mapping a page that is
// neither present nor swapped reads as zero. /proc/self/pagemap tells
// both bits for 8 bytes a page, so a mostly empty 1 GiB guest is skipped
// for a 2 MiB read instead of a 1 GiB zero scan. Only private anonymous
// memory qualifies: a page of a file mapping (a lazily restored snapshot
// image) or of shared memory may hold data without being mapped here, so
// any other mapping in the range turns the shortcut off.

// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const (
	pmPresent = 1 << 63
	pmSwapped = 1 << 62
)

// Resident returns a bitmap of the pages of host (a region's backing) that
// may hold data, present or swapped, bit i%64 of word i/64 for page i; or
// nil when that cannot be known (then every page may). The caller keeps
// the memory still while it uses the answer (a paused machine).
func Resident(host []byte) []uint64 {
	if len(host) == 0 || len(host)%PageSize != 0 {
		return nil
	}
	start := uintptr(unsafe.Pointer(&host[0]))
	end := start + uintptr(len(host))
	if !privateAnonymous(start, end) {
		return nil
	}
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return nil
	}
	defer f.Close()
	n := len(host) / PageSize
	out := make([]uint64, (n+63)/64)
	buf := make([]byte, 8*4096)
	for i := 0; i < n; {
		k := min(n-i, len(buf)/8)
		off := int64(start/PageSize+uintptr(i)) * 8
		if _, err := f.ReadAt(buf[:8*k], off); err != nil {
			return nil
		}
		for j := 0; j < k; j++ {
			if binary.LittleEndian.Uint64(buf[8*j:])&(pmPresent|pmSwapped) != 0 {
				out[(i+j)/64] |= 1 << ((i + j) % 64)
			}
		}
		i += k
	}
	return out
}

// privateAnonymous reports whether every mapping overlapping [start, end)
// is private and anonymous (no inode), and the range is fully mapped.
func privateAnonymous(start, end uintptr) bool {
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return false
	}
	defer f.Close()
	covered := start
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// start-end perms offset dev inode [path]
		fs := strings.Fields(sc.Text())
		if len(fs) < 5 {
			return false
		}
		lo, hi, ok := strings.Cut(fs[0], "-")
		if !ok {
			return false
		}
		a, err1 := strconv.ParseUint(lo, 16, 64)
		b, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil {
			return false
		}
		if uintptr(b) <= start || uintptr(a) >= end {
			continue
		}
		if len(fs[1]) < 4 || fs[1][3] != 'p' || fs[4] != "0" {
			return false
		}
		if len(fs) > 5 && !strings.HasPrefix(fs[5], "[anon") {
			return false
		}
		if uintptr(a) > covered {
			return false // a hole
		}
		covered = max(covered, uintptr(b))
	}
	return sc.Err() == nil && covered >= end
}
