package snapshot

import (
	"encoding/binary"
	"path/filepath"
	"testing"
)

// BenchmarkWrite25 writes a full snapshot of a 1 GiB memory with a
// quarter of it holding the workload guest's dirty pattern (as bench
// snapshot's 25% case, without KVM): the encode path alone, lz4 and raw
// image. With -cpuprofile it shows where the time goes (here, lz4: the
// encoder about 70%, writing the file about 10%, each page's xxh3 hash
// about 5%).
func BenchmarkWrite25(b *testing.B) {
	const size = 1 << 30
	mem := fakeMem(b, size)
	r := mem.Regions()[0]
	// guest/src/main.c pattern(): address ^ generation mix ^ tag.
	for off := 16 << 20; off < 16<<20+size/4; off += 8 {
		binary.LittleEndian.PutUint64(r.Host[off:], uint64(off)^(3*0x9e3779b97f4a7c15&(1<<64-1))^0x5a5a000000000000)
	}
	dir := b.TempDir()
	for _, raw := range []bool{false, true} {
		b.Run(map[bool]string{false: "lz4", true: "raw"}[raw], func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if _, err := writeFile(filepath.Join(dir, "s"), writeSpec{mem: mem, state: stateOf(fakeState(size)), raw: raw}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
