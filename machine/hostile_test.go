package machine

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"collective/devices/virtioblk"
	"collective/internal/testenv"
)

// TestGuestHostile runs the workload guest's hostile mode (guest/src/hostile.c)
// for a few seeds: for 5 s the guest feeds every device malformed port,
// PCI configuration, register and descriptor input, and every ~100 ms puts
// the virtio-blk device back and checks it still reads and writes sector 0.
// The VMM must stay up (the guest ends by its own debug-exit 0, not a VMM
// error), count the malformed input it refused, keep the disk file's size,
// and a second VM in the same process running blk verify on its own disk at
// the same time must be unaffected (exit 0, its disk verified on the host).
func TestGuestHostile(t *testing.T) {
	elf := guestELF(t)
	seeds := []uint64{1, 2, 3}
	if testing.Short() {
		seeds = seeds[:1]
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { testGuestHostile(t, elf, seed) })
	}
}

func testGuestHostile(t *testing.T, elf string, seed uint64) {
	const diskSize = 4 << 20
	dir := t.TempDir()
	disk := filepath.Join(dir, "hostile.img")
	if err := os.WriteFile(disk, make([]byte, diskSize), 0o644); err != nil {
		t.Fatal(err)
	}
	var console, logs testenv.Buffer
	m, err := New(Config{Kernel: elf, Cmdline: fmt.Sprintf("hostile 5 %d", seed), MemSize: 128 << 20, CPUs: 1,
		Console: &console, Disks: []string{disk}, Log: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()

	// The neighbour: blk verify on its own disk, again and again until the
	// hostile guest is done.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var neighbourRuns int
	var neighbourErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			if err := neighbourVerify(elf, filepath.Join(dir, fmt.Sprintf("neighbour%d.img", i))); err != nil {
				neighbourErr = err
				return
			}
			neighbourRuns++
			select {
			case <-stop:
				return
			default:
			}
		}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	exit := m.Run(ctx)
	close(stop)
	wg.Wait()
	out := strings.ReplaceAll(console.String(), "\r", "")
	if ctx.Err() != nil {
		t.Fatalf("hostile guest did not exit within 60 s; console tail:\n%s", tail(out, 2000))
	}
	if exit.Reason != ExitDebug || exit.Code != 0 {
		t.Fatalf("exit %+v, want the guest's debug-exit 0; console tail:\n%s\nVMM log tail:\n%s", exit, tail(out, 3000), tail(logs.String(), 3000))
	}
	match := regexp.MustCompile(`hostile: done (\d+) operations, device recovered (\d+) times`).FindStringSubmatch(out)
	if match == nil {
		t.Fatalf("no final line; console tail:\n%s", tail(out, 3000))
	}
	ops, _ := strconv.Atoi(match[1])
	recovered, _ := strconv.Atoi(match[2])
	if ops < 500 || recovered < 2 {
		t.Errorf("only %d operations and %d recoveries in 5 s", ops, recovered)
	}
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "hostile: final") {
			t.Log(l)
		}
	}

	// The VMM counted what it refused.
	if len(m.virtio) != 1 {
		t.Fatalf("%d virtio devices", len(m.virtio))
	}
	tr := m.virtio[0].transport
	blk := tr.Device().(*virtioblk.Block)
	tm, bm := &tr.Metrics, &blk.Metrics
	t.Logf("transport: needs-reset %d, bad access %d, bad status %d, notifies %d, features refused %d",
		tm.NeedsReset.Load(), tm.BadAccess.Load(), tm.BadStatus.Load(), tm.Notifies.Load(), tm.FeaturesRefuse.Load())
	t.Logf("virtio-blk: reads %d, writes %d, flushes %d, get-id %d, discards %d, write-zeroes %d, bad requests %d, unsupported %d, malformed %d, I/O errors %d",
		bm.Reads.Load(), bm.Writes.Load(), bm.Flushes.Load(), bm.GetIDs.Load(), bm.Discards.Load(), bm.WriteZeroes.Load(),
		bm.BadRequests.Load(), bm.Unsupported.Load(), bm.Malformed.Load(), bm.IOErrors.Load())
	if tm.NeedsReset.Load() == 0 || tm.BadAccess.Load() == 0 || tm.BadStatus.Load() == 0 {
		t.Errorf("the transport counted no malformed input")
	}
	if bm.BadRequests.Load()+bm.Malformed.Load()+bm.Unsupported.Load() == 0 {
		t.Errorf("virtio-blk counted no bad requests")
	}
	if bm.Reads.Load() < uint64(recovered) {
		t.Errorf("%d reads for %d recoveries", bm.Reads.Load(), recovered)
	}
	if !strings.Contains(logs.String(), "device needs reset") {
		t.Errorf("the VMM log has no \"device needs reset\" warning; log tail:\n%s", tail(logs.String(), 2000))
	}
	if fi, err := os.Stat(disk); err != nil || fi.Size() != diskSize {
		t.Errorf("disk file: %v, size %d, want %d", err, fi.Size(), diskSize)
	}

	if neighbourErr != nil {
		t.Fatalf("neighbour VM: %v", neighbourErr)
	}
	if neighbourRuns == 0 {
		t.Fatal("the neighbour VM never completed a run")
	}
	t.Logf("neighbour VM: %d blk verify runs, every one exit 0 and verified", neighbourRuns)
}

// neighbourVerify boots the workload guest with blk verify on a fresh 2 MiB
// disk at path and checks its exit and, on the host, the disk's contents.
func neighbourVerify(elf, path string) error {
	const size = 2 << 20
	if err := os.WriteFile(path, make([]byte, size), 0o644); err != nil {
		return err
	}
	defer os.Remove(path)
	seed := rand.Uint64() >> 1
	sectors := uint64(size / 512)
	var console testenv.Buffer
	m, err := New(Config{Kernel: elf, Cmdline: fmt.Sprintf("blk verify %d %d", sectors, seed), MemSize: 128 << 20, CPUs: 1,
		Console: &console, Disks: []string{path}})
	if err != nil {
		return err
	}
	defer m.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	exit := m.Run(ctx)
	out := strings.ReplaceAll(console.String(), "\r", "")
	if exit.Reason != ExitDebug || exit.Code != 0 || !strings.Contains(out, fmt.Sprintf("blk: verified %d sectors", sectors)) {
		return fmt.Errorf("exit %+v; console:\n%s", exit, out)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	for s := uint64(0); s < sectors; s++ {
		for w := uint64(0); w < 64; w++ {
			if v, e := binary.LittleEndian.Uint64(got[s*512+w*8:]), blkPattern(seed, s, w); v != e {
				return fmt.Errorf("disk sector %d word %d: %#x, want %#x", s, w, v, e)
			}
		}
	}
	return nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
