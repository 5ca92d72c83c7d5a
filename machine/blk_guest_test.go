package machine

import (
	"bytes"
	"collective/internal/testenv"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// World 2 for virtio-blk: the workload guest's polling virtio-blk driver
// (guest/src/virtio_blk.c, at CPL3) against our PCI host bridge, virtio-pci
// transport and virtio-blk device, with the host checking the disk file.

// blkPattern is word w of sector s in the guest's blk verify mode
// (pat() in guest/src/virtio_blk.c): splitmix64 of a unique input.
func blkPattern(seed, s, w uint64) uint64 {
	z := (seed ^ 0x5851f42d4c957f2d) + (s*64+w+1)*0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// junkDisk writes a file of size bytes of random data and returns its path
// and contents.
func junkDisk(t *testing.T, size int) (string, []byte) {
	t.Helper()
	data := make([]byte, size)
	r := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	for i := 0; i < size; i += 8 {
		binary.LittleEndian.PutUint64(data[i:], r.Uint64())
	}
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, data
}

// runBlkGuest boots the workload guest with one disk until it exits.
func runBlkGuest(t *testing.T, cmdline, disk string, timeout time.Duration) (Exit, string) {
	t.Helper()
	elf := guestELF(t)
	var console testenv.Buffer
	m, err := New(Config{Kernel: elf, Cmdline: cmdline, MemSize: 128 << 20, CPUs: 1, Console: &console, Disks: []string{disk}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	exit := m.Run(ctx)
	if ctx.Err() != nil {
		t.Fatalf("guest %q did not exit within %v; console:\n%s", cmdline, timeout, console.String())
	}
	return exit, strings.ReplaceAll(console.String(), "\r", "")
}

// TestGuestBlkVerify writes patterns over most of a 16 MiB disk from the
// guest, flushes, reads them back and checks them; then the host checks the
// file: the first SECTORS hold the patterns, the rest is untouched.
// With direct, aligned requests bypass the host page cache (O_DIRECT).
func TestGuestBlkVerify(t *testing.T) {
	// Subtest names end up in TempDir paths: no commas.
	for name, opts := range map[string]string{"pagecache": "", "direct": ",direct"} {
		t.Run(name, func(t *testing.T) { testGuestBlkVerify(t, opts) })
	}
}

func testGuestBlkVerify(t *testing.T, opts string) {
	const size = 16 << 20
	path, junk := junkDisk(t, size)
	sectors := uint64(size/512 - 77) // leave a tail the guest must not touch
	seed := rand.Uint64() >> 1
	cmdline := fmt.Sprintf("blk verify %d %d", sectors, seed)
	exit, out := runBlkGuest(t, cmdline, path+",serial=blk-guest-test"+opts, 60*time.Second)
	t.Logf("console:\n%s", out)
	if exit.Reason != ExitDebug || exit.Code != 0 {
		t.Fatalf("exit %+v, want debug-exit 0", exit)
	}
	for _, want := range []string{
		`blk: serial "blk-guest-test"`,
		"blk: flushed",
		"blk: read past the end: status IOERR (as expected)",
		"blk: unknown request type: status UNSUPP (as expected)",
		fmt.Sprintf("blk: verified %d sectors", sectors),
	} {
		if !strings.Contains(out, want) {
			t.Errorf("console lacks %q", want)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != size {
		t.Fatalf("disk is %d bytes, want %d", len(got), size)
	}
	bad := 0
	for s := uint64(0); s < sectors && bad < 5; s++ {
		for w := uint64(0); w < 64; w++ {
			off := s*512 + w*8
			if v, e := binary.LittleEndian.Uint64(got[off:]), blkPattern(seed, s, w); v != e {
				t.Errorf("sector %d word %d: %#x, want %#x", s, w, v, e)
				bad++
				break
			}
		}
	}
	if tail := sectors * 512; !bytes.Equal(got[tail:], junk[tail:]) {
		t.Errorf("the guest changed sectors at or beyond %d", sectors)
	}
}

// TestGuestBlkReadOnly: on a read-only disk the guest's first write fails
// with VIRTIO_BLK_S_IOERR; the guest reports it, checks that reads still
// work and exits with code 4. The VMM stays up and the file is unchanged.
func TestGuestBlkReadOnly(t *testing.T) {
	const size = 4 << 20
	path, junk := junkDisk(t, size)
	exit, out := runBlkGuest(t, "blk verify", path+",ro", 60*time.Second)
	t.Logf("console:\n%s", out)
	if exit.Reason != ExitDebug || exit.Code != 4 {
		t.Fatalf("exit %+v, want debug-exit 4 (write failed with IOERR)", exit)
	}
	for _, want := range []string{
		", read-only",
		"failed: status 1 (IOERR)", // the first write to complete: any sector
		"blk: device still answers: read of sector 0 status OK",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("console lacks %q", want)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, junk) {
		t.Error("a read-only disk was modified")
	}
}

// TestGuestBlkNoDisk: without a virtio-blk device the guest says so and
// exits with code 5.
func TestGuestBlkNoDisk(t *testing.T) {
	exit, out := bootGuest(t, "blk verify", 1, 30*time.Second)
	if exit.Reason != ExitDebug || exit.Code != 5 || !strings.Contains(out, "no virtio-blk device") {
		t.Fatalf("exit %+v; console:\n%s", exit, out)
	}
}
