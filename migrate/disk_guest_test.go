package migrate_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"collective/api"
	"collective/devices/virtioblk/cow"
	"collective/internal/testenv"
	"collective/migrate"
)

// World 2: a guest running `blk verify` (patterns written over its disk,
// flushed, read back and checked) migrates mid-run between two processes;
// its disk travels with it (raw: every block; overlay: the blocks it
// holds, over a base found by hash on the target or sent once) and blocks
// written during the migration are resent.

const migDiskSize = 256 << 20

// blkPattern is word w of sector s in the guest's blk verify mode.
func blkPattern(seed, s, w uint64) uint64 {
	z := (seed ^ 0x5851f42d4c957f2d) + (s*64+w+1)*0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// sparseDisk makes a sparse disk whose last MiB is random (a tail the
// guest does not touch) and returns that tail.
func sparseDisk(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tail := make([]byte, 1<<20)
	r := rand.New(rand.NewPCG(rand.Uint64(), 1))
	for i := 0; i < len(tail); i += 8 {
		binary.LittleEndian.PutUint64(tail[i:], r.Uint64())
	}
	if _, err := f.WriteAt(tail, migDiskSize-int64(len(tail))); err != nil {
		t.Fatal(err)
	}
	return tail
}

// checkDisk checks the guest's patterns over the first sectors and the
// original bytes after them.
func checkDisk(t *testing.T, path string, seed, sectors uint64, tail []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != migDiskSize {
		t.Fatalf("%s: %d bytes", path, len(got))
	}
	for s := uint64(0); s < sectors; s++ {
		for w := uint64(0); w < 64; w += 7 {
			if v := binary.LittleEndian.Uint64(got[s*512+w*8:]); v != blkPattern(seed, s, w) {
				t.Fatalf("%s: sector %d word %d: %#x, want the pattern", path, s, w, v)
			}
		}
	}
	orig := make([]byte, migDiskSize)
	copy(orig[migDiskSize-len(tail):], tail)
	if !bytes.Equal(got[sectors*512:], orig[sectors*512:]) {
		t.Fatalf("%s: the bytes after sector %d are not the original ones", path, sectors)
	}
}

type diskSetup struct {
	srcDisk, tgtDisk string   // --disk arguments
	tgtArgs          []string // extra target arguments
}

func startDiskPair(t *testing.T, cmdline string, ds diskSetup) (src, tgt *proc, sock, addr string) {
	t.Helper()
	elf := testenv.WorkloadGuest(t)
	sock = filepath.Join(t.TempDir(), "src.sock")
	addr = freeAddr(t)
	tgt = start(t, append([]string{"run", "--incoming", addr, "--disk", ds.tgtDisk}, ds.tgtArgs...)...)
	tgt.waitFor(t, "waiting for a migration", 10*time.Second)
	src = start(t, "run", "--kernel", elf, "--append", cmdline, "--mem", "128M", "--api", sock, "--disk", ds.srcDisk)
	src.waitFor(t, "blk: virtio-blk ", 10*time.Second)
	return src, tgt, sock, addr
}

func TestMigrateDiskWorkloadGuest(t *testing.T) {
	sectors := uint64(migDiskSize/512 - 4096) // the last 2 MiB untouched
	for _, tc := range []string{"raw", "overlay-sent", "overlay-found"} {
		t.Run(tc, func(t *testing.T) {
			dir := t.TempDir()
			seed := rand.Uint64() >> 1
			var ds diskSetup
			var tail []byte
			var base string
			cache := filepath.Join(dir, "cache")
			os.MkdirAll(cache, 0o755)
			switch tc {
			case "raw":
				tail = sparseDisk(t, filepath.Join(dir, "src.img"))
				// The target's disk starts empty: the whole disk travels.
				if err := os.WriteFile(filepath.Join(dir, "tgt.img"), nil, 0o644); err != nil {
					t.Fatal(err)
				}
				os.Truncate(filepath.Join(dir, "tgt.img"), migDiskSize)
				ds = diskSetup{srcDisk: filepath.Join(dir, "src.img") + ",serial=d", tgtDisk: filepath.Join(dir, "tgt.img") + ",serial=d"}
			default:
				base = filepath.Join(dir, "base.img")
				tail = sparseDisk(t, base)
				tgtBase := filepath.Join(dir, "elsewhere", "base.img") // absent: found in the cache or sent
				if tc == "overlay-found" {
					os.MkdirAll(filepath.Dir(tgtBase), 0o755)
					b, _ := os.ReadFile(base)
					os.WriteFile(tgtBase, b, 0o644)
				}
				ds = diskSetup{srcDisk: filepath.Join(dir, "src.cow") + ",base=" + base + ",serial=d",
					tgtDisk: filepath.Join(dir, "tgt.cow") + ",base=" + tgtBase + ",serial=d", tgtArgs: []string{"--cache", cache}}
			}
			// The guest writes and checks its 256 MiB in 1-2 s; the disk
			// transfer (about 70 MB/s today) may lose that race: the guest
			// then ends on the source and the migration fails. Retried.
			var src, tgt *proc
			var rep migrate.Report
			for attempt := 1; ; attempt++ {
				var sock, addr string
				src, tgt, sock, addr = startDiskPair(t, fmt.Sprintf("blk verify %d %d", sectors, seed), ds)
				var err error
				rep, err = api.NewClient(sock).Migrate(api.MigrateRequest{To: addr})
				if err == nil {
					break
				}
				src.wait(t, 30*time.Second)
				if attempt < 4 && strings.Contains(src.out.String(), "blk: verified") {
					t.Logf("attempt %d: the guest finished before the migration did; again", attempt)
					tgt.cmd.Process.Kill()
					<-tgt.done
					os.Remove(filepath.Join(dir, "tgt.cow"))
					os.RemoveAll(filepath.Join(cache, "bases"))
					continue
				}
				t.Fatalf("migrate: %v\nsource:\n%s\ntarget:\n%s", err, src.out.String(), tgt.out.String())
			}
			t.Logf("total %.1f ms, downtime %.2f ms, rounds %d, wire %d B, disk blocks %d, base bytes %d",
				rep.TotalMS, rep.DowntimeMS, rep.Rounds, rep.BytesWire, rep.DiskBlocks, rep.BaseBytes)
			if code := src.wait(t, 10*time.Second); code != 0 {
				t.Errorf("source exit %d", code)
			}
			if strings.Contains(src.out.String(), "blk: verified") {
				t.Errorf("the guest finished on the source: not migrated mid-run")
			}
			if code := tgt.wait(t, 60*time.Second); code != 0 || !strings.Contains(tgt.out.String(), fmt.Sprintf("blk: verified %d sectors", sectors)) {
				t.Fatalf("target exit %d; output:\n%s", code, tgt.out.String())
			}
			switch tc {
			case "raw":
				checkDisk(t, filepath.Join(dir, "tgt.img"), seed, sectors, tail)
			default:
				wantBase := int64(0)
				if tc == "overlay-sent" {
					wantBase = migDiskSize
					b, _ := os.ReadFile(base)
					sum := sha256.Sum256(b)
					cached, err := os.ReadFile(filepath.Join(cache, "bases", hex.EncodeToString(sum[:])))
					if err != nil || !bytes.Equal(cached, b) {
						t.Fatalf("the base in the target's cache: %v", err)
					}
				}
				if rep.BaseBytes != wantBase {
					t.Errorf("%d base bytes sent, want %d", rep.BaseBytes, wantBase)
				}
				flat := filepath.Join(dir, "flat.img")
				if _, err := cow.Commit(filepath.Join(dir, "tgt.cow"), base, flat, nil); err != nil {
					t.Fatal(err)
				}
				checkDisk(t, flat, seed, sectors, tail)
			}
		})
	}
}

// TestMigrateDiskFault: a frame corrupted while disk blocks travel; the
// source keeps running, its guest's verify passes on its own disk, and
// the target keeps nothing running.
func TestMigrateDiskFault(t *testing.T) {
	dir := t.TempDir()
	sectors := uint64(migDiskSize/512 - 4096)
	seed := rand.Uint64() >> 1
	tail := sparseDisk(t, filepath.Join(dir, "src.img"))
	os.WriteFile(filepath.Join(dir, "tgt.img"), nil, 0o644)
	os.Truncate(filepath.Join(dir, "tgt.img"), migDiskSize)
	src, tgt, sock, addr := startDiskPair(t, fmt.Sprintf("blk verify %d %d", sectors, seed),
		diskSetup{srcDisk: filepath.Join(dir, "src.img") + ",serial=d", tgtDisk: filepath.Join(dir, "tgt.img") + ",serial=d"})
	c := api.NewClient(sock)
	to := proxy(t, addr, 2<<20, true)
	if _, err := c.Migrate(api.MigrateRequest{To: to, BandwidthMBps: 30, Compress: "never"}); err == nil {
		t.Fatal("migration succeeded despite the fault")
	} else {
		t.Logf("source: %v", err)
	}
	if st, err := c.State(); err != nil || st.State != api.StateRunning {
		t.Fatalf("source state %+v, %v", st, err)
	}
	if code := tgt.wait(t, 15*time.Second); code == 0 {
		t.Errorf("target exit 0; output:\n%s", tgt.out.String())
	}
	if code := src.wait(t, 60*time.Second); code != 0 || !strings.Contains(src.out.String(), fmt.Sprintf("blk: verified %d sectors", sectors)) {
		t.Fatalf("source exit %d; output:\n%s", code, src.out.String())
	}
	checkDisk(t, filepath.Join(dir, "src.img"), seed, sectors, tail)
}
