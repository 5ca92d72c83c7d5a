package snapshot

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"collective/devices/virtioblk/cow"
	"collective/internal/testenv"
	"collective/machine"
)

// World 2: the workload guest's `blk verify` (writes patterns over the
// disk, flushes, reads them back) is snapshotted while it runs; a restore
// onto a fresh copy of the disk the machine started with (raw) or a new
// overlay over the same base (cow) must finish the verify.

const diskTestSize = 32 << 20

// blkPattern is word w of sector s in the guest's blk verify mode.
func blkPattern(seed, s, w uint64) uint64 {
	z := (seed ^ 0x5851f42d4c957f2d) + (s*64+w+1)*0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

func junkFile(t *testing.T, path string, size int) []byte {
	t.Helper()
	data := make([]byte, size)
	r := rand.New(rand.NewPCG(rand.Uint64(), 7))
	for i := 0; i < size; i += 8 {
		binary.LittleEndian.PutUint64(data[i:], r.Uint64())
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return data
}

// checkPatterns checks the disk at path holds the guest's patterns over
// the first sectors and tail beyond.
func checkPatterns(t *testing.T, path string, seed, sectors uint64, tail []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for s := uint64(0); s < sectors; s++ {
		for w := uint64(0); w < 64; w++ {
			if v := binary.LittleEndian.Uint64(got[s*512+w*8:]); v != blkPattern(seed, s, w) {
				t.Fatalf("%s: sector %d word %d: %#x, want the pattern", path, s, w, v)
			}
		}
	}
	if tail != nil && !bytes.Equal(got[sectors*512:], tail) {
		t.Fatalf("%s: the tail beyond sector %d changed", path, sectors)
	}
}

type blkRun struct {
	m       *machine.Machine
	console *testenv.Buffer
	done    chan machine.Exit
}

func startBlkGuest(t *testing.T, cmdline, disk string) *blkRun {
	t.Helper()
	elf := testenv.WorkloadGuest(t)
	r := &blkRun{console: &testenv.Buffer{}, done: make(chan machine.Exit, 1)}
	var err error
	r.m, err = machine.New(machine.Config{Kernel: elf, Cmdline: cmdline, MemSize: 128 << 20, CPUs: 1, Console: r.console, Disks: []string{disk}})
	if err != nil {
		t.Fatal(err)
	}
	go func() { r.done <- r.m.Run(context.Background()) }()
	t.Cleanup(func() { r.m.Stop(); <-r.done; r.m.Close() })
	return r
}

// waitWritten waits until the guest has written at least n bytes.
func (r *blkRun) waitWritten(t *testing.T, n uint64) {
	t.Helper()
	b := r.m.Disks()[0].Block
	deadline := time.Now().Add(30 * time.Second)
	for b.Metrics.BytesWritten.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("the guest wrote %d bytes; console:\n%s", b.Metrics.BytesWritten.Load(), r.console.String())
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// runToVerified runs a restored machine and checks the guest's verify.
func runToVerified(t *testing.T, m *machine.Machine, console *testenv.Buffer, sectors uint64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	exit := m.Run(ctx)
	out := console.String()
	if exit.Reason != machine.ExitDebug || exit.Code != 0 || !strings.Contains(out, fmt.Sprintf("blk: verified %d sectors", sectors)) {
		t.Fatalf("restored guest: exit %+v; console:\n%s", exit, out)
	}
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestSnapshotDiskRaw: a raw disk. A full snapshot early in the write
// phase and an incremental one later; restoring the chain, its merge and
// the full snapshot alone onto fresh copies of the original disk all
// finish the verify; a different disk, a disk of another size, a
// corrupted disk block and a corrupted block table are refused.
func TestSnapshotDiskRaw(t *testing.T) {
	dir := t.TempDir()
	orig := filepath.Join(dir, "orig.img")
	junk := junkFile(t, orig, diskTestSize)
	live := filepath.Join(dir, "live.img")
	copyFile(t, orig, live)
	sectors := uint64(diskTestSize/512 - 77)
	seed := rand.Uint64() >> 1
	r := startBlkGuest(t, fmt.Sprintf("blk verify %d %d", sectors, seed), live+",serial=snapdisk")
	ss := NewSession(r.m)
	full, inc := filepath.Join(dir, "full"), filepath.Join(dir, "inc")
	r.waitWritten(t, 1<<20)
	r.m.Pause()
	st, err := ss.Take(full, TakeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("full: %v", st)
	if st.DiskBlocks == 0 {
		t.Fatal("the full snapshot stores no disk block")
	}
	r.m.Resume()
	r.waitWritten(t, 8<<20)
	r.m.Pause()
	st2, err := ss.Take(inc, TakeOptions{Incremental: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("incremental: %v", st2)
	written := r.m.Disks()[0].Block.Metrics.BytesWritten.Load()
	r.m.Stop()
	if written >= sectors*512 {
		t.Logf("note: the guest finished its writes (%d bytes) before the incremental snapshot", written)
	}
	chain, err := OpenChain(inc)
	if err != nil {
		t.Fatal(err)
	}
	merged := filepath.Join(dir, "merged")
	if _, err := Merge(merged, chain, false, nil); err != nil {
		t.Fatal(err)
	}
	restore := func(t *testing.T, paths []string, disk string) (*machine.Machine, *testenv.Buffer, error) {
		c, err := OpenFiles(paths)
		if err != nil {
			return nil, nil, err
		}
		console := &testenv.Buffer{}
		m, _, err := Restore(c, machine.Config{Console: console, Disks: []string{disk + ",serial=snapdisk"}}, RestoreOptions{})
		return m, console, err
	}
	for name, paths := range map[string][]string{"chain": {full, inc}, "merge": {merged}, "full": {full}} {
		t.Run(name, func(t *testing.T) {
			d := filepath.Join(t.TempDir(), "disk.img")
			copyFile(t, orig, d)
			m, console, err := restore(t, paths, d)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			runToVerified(t, m, console, sectors)
			checkPatterns(t, d, seed, sectors, junk[sectors*512:])
		})
	}
	t.Run("other-disk", func(t *testing.T) {
		d := filepath.Join(t.TempDir(), "disk.img")
		other := junkFile(t, d, diskTestSize)
		_, _, err := restore(t, []string{full, inc}, d)
		if !errors.Is(err, ErrDisk) || !strings.Contains(err.Error(), "not the disk that was snapshotted") {
			t.Fatalf("restore onto another disk: %v", err)
		}
		if got, _ := os.ReadFile(d); !bytes.Equal(got, other) {
			t.Fatal("a refused restore wrote to the disk")
		}
	})
	t.Run("other-size", func(t *testing.T) {
		d := filepath.Join(t.TempDir(), "disk.img")
		junkFile(t, d, diskTestSize/2)
		if _, _, err := restore(t, []string{full}, d); err == nil {
			t.Fatal("restore onto a smaller disk succeeded")
		}
	})
	t.Run("corrupt", func(t *testing.T) {
		s := open(t, full)
		d0 := s.disks[0]
		var e *diskEntry
		for k := range d0.entries {
			if d0.entries[k].length > 0 {
				e = &d0.entries[k]
				break
			}
		}
		if e == nil {
			t.Fatal("no stored block")
		}
		good, _ := os.ReadFile(full)
		for what, off := range map[string]uint64{"payload": e.off + uint64(e.length)/2, "table": d0.rec.TableOff + 3} {
			bad := bytes.Clone(good)
			bad[off] ^= 0x40
			p := filepath.Join(t.TempDir(), "bad")
			os.WriteFile(p, bad, 0o644)
			d := filepath.Join(t.TempDir(), "disk.img")
			copyFile(t, orig, d)
			_, _, err := restore(t, []string{p}, d)
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("%s corrupted: %v, want ErrFormat", what, err)
			}
			if got, _ := os.ReadFile(d); !bytes.Equal(got, junk) {
				t.Fatalf("%s corrupted: the disk was written", what)
			}
			t.Logf("%s corrupted: %v", what, err)
		}
	})
}

// TestSnapshotDiskOverlay: a copy-on-write overlay over a base. The
// snapshot carries every block the overlay holds, so a restore onto a NEW
// overlay over the same base finishes the verify; an overlay over another
// base, or one already holding other data, is refused.
func TestSnapshotDiskOverlay(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.img")
	junk := junkFile(t, base, diskTestSize)
	ov := filepath.Join(dir, "live.cow")
	// Data in the overlay before the machine starts travels too.
	o, err := cow.OpenOrCreate(ov, base, false)
	if err != nil {
		t.Fatal(err)
	}
	pre := bytes.Repeat([]byte{0xab}, 4096)
	tailOff := int64(diskTestSize - 8192)
	if _, err := o.WriteAt(pre, tailOff); err != nil {
		t.Fatal(err)
	}
	o.Sync()
	o.Close()
	copy(junk[tailOff:], pre)

	sectors := uint64(diskTestSize/512 - 77)
	seed := rand.Uint64() >> 1
	r := startBlkGuest(t, fmt.Sprintf("blk verify %d %d", sectors, seed), ov+",base="+base+",serial=snapdisk")
	ss := NewSession(r.m)
	snap := filepath.Join(dir, "snap")
	r.waitWritten(t, 4<<20)
	r.m.Pause()
	st, err := ss.Take(snap, TakeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("full: %v", st)
	r.m.Stop()
	restore := func(disk string) (*machine.Machine, *testenv.Buffer, error) {
		c, err := OpenFiles([]string{snap})
		if err != nil {
			return nil, nil, err
		}
		console := &testenv.Buffer{}
		m, _, err := Restore(c, machine.Config{Console: console, Disks: []string{disk + ",serial=snapdisk"}}, RestoreOptions{})
		return m, console, err
	}
	t.Run("new-overlay", func(t *testing.T) {
		nov := filepath.Join(t.TempDir(), "new.cow")
		m, console, err := restore(nov + ",base=" + base)
		if err != nil {
			t.Fatal(err)
		}
		runToVerified(t, m, console, sectors)
		m.Close()
		flat := filepath.Join(t.TempDir(), "flat.img")
		if _, err := cow.Commit(nov, base, flat, nil); err != nil {
			t.Fatal(err)
		}
		checkPatterns(t, flat, seed, sectors, junk[sectors*512:])
	})
	t.Run("other-base", func(t *testing.T) {
		tdir := t.TempDir()
		b2 := filepath.Join(tdir, "base2.img")
		junkFile(t, b2, diskTestSize)
		_, _, err := restore(filepath.Join(tdir, "new.cow") + ",base=" + b2)
		if !errors.Is(err, ErrDisk) || !strings.Contains(err.Error(), "base") {
			t.Fatalf("restore over another base: %v", err)
		}
	})
	t.Run("raw", func(t *testing.T) {
		d := filepath.Join(t.TempDir(), "disk.img")
		copyFile(t, base, d)
		if _, _, err := restore(d); !errors.Is(err, ErrDisk) {
			t.Fatalf("restore onto a raw disk: %v", err)
		}
	})
	t.Run("dirty-overlay", func(t *testing.T) {
		nov := filepath.Join(t.TempDir(), "dirty.cow")
		o, err := cow.OpenOrCreate(nov, base, false)
		if err != nil {
			t.Fatal(err)
		}
		s := open(t, snap)
		held := map[int64]bool{}
		for _, e := range s.disks[0].entries {
			held[e.block] = true
		}
		free := int64(-1)
		for b := int64(0); b < diskTestSize/65536; b++ {
			if !held[b] {
				free = b
				break
			}
		}
		if free < 0 {
			t.Skip("the snapshot holds every block")
		}
		o.WriteAt(pre, free*65536) // a block the snapshot does not hold
		o.Sync()
		o.Close()
		if _, _, err := restore(nov + ",base=" + base); !errors.Is(err, ErrDisk) || !strings.Contains(err.Error(), "already holds") {
			t.Fatalf("restore onto an overlay with other data: %v", err)
		}
	})
}
