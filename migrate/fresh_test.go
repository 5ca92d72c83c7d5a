package migrate_test

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"collective/api"
)

// writeAppliancePayload writes n bytes of fixed pseudo-random content
// (incompressible, the same on every call): the stand-in for an
// appliance's kernel and initramfs, loaded into guest RAM as the
// workload guest's initrd.
func writeAppliancePayload(t *testing.T, path string, n int) {
	t.Helper()
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{'c', 'l', 'v', 'a', 'p', 'p'}).Read(b)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestMigrateFreshApplianceByHash: the issue's figure "a freshly booted
// appliance migrates with at most 10% of its memory on the wire when the
// target holds its base snapshot". The appliance is the workload guest
// with a 32 MiB initrd (incompressible content, so that neither lz4 nor
// the zero-page rule can help); its base snapshot is taken from an
// earlier boot of the same ELF, initrd and command line and placed in the
// target's --cache. A fresh boot then migrates with hash-based transfer:
// every page the base holds goes as a 16-byte hash.
func TestMigrateFreshApplianceByHash(t *testing.T) {
	dir := t.TempDir()
	initrd := filepath.Join(dir, "appliance.img")
	writeAppliancePayload(t, initrd, 32<<20)
	cache := filepath.Join(dir, "cache")
	if err := os.MkdirAll(cache, 0o755); err != nil {
		t.Fatal(err)
	}
	// Boot 1: the base snapshot.
	{
		src, _, sock, _ := startPair(t, "spin", "256M", "--initrd", initrd)
		res, err := api.NewClient(sock).Snapshot(api.SnapshotRequest{Path: filepath.Join(cache, "base.snap")})
		if err != nil {
			t.Fatalf("snapshot: %v", err)
		}
		t.Logf("base snapshot: %d pages, %d bytes", res.Pages, res.Bytes)
		src.cmd.Process.Kill()
		src.wait(t, 10*time.Second)
	}
	for _, tc := range []struct {
		name  string
		cache bool
	}{{"with the base in the cache", true}, {"no cache", false}} {
		t.Run(tc.name, func(t *testing.T) {
			var tgtArgs []string
			if tc.cache {
				tgtArgs = []string{"--cache", cache}
			}
			src, tgt, sock, addr := startPairTarget(t, "spin", "256M", tgtArgs, "--initrd", initrd)
			rep, err := api.NewClient(sock).Migrate(api.MigrateRequest{To: addr})
			if err != nil {
				t.Fatalf("migrate: %v\nsource:\n%s\ntarget:\n%s", err, src.out.String(), tgt.out.String())
			}
			ratio := float64(rep.BytesWire) / float64(rep.NonZeroBytes)
			t.Logf("wire %d B, non-zero memory %d B: %.2f%% on the wire (%.3f%% of the %d MiB RAM); pages %+v, hashes announced %d, total %.1f ms, downtime %.2f ms",
				rep.BytesWire, rep.NonZeroBytes, 100*ratio, 100*float64(rep.BytesWire)/float64(rep.MemBytes), rep.MemBytes>>20,
				rep.Pages, rep.HashesAnnounced, rep.TotalMS, rep.DowntimeMS)
			if !rep.OK || rep.GuestGapMS == nil {
				t.Errorf("report: ok %v, guest gap %v", rep.OK, rep.GuestGapMS)
			}
			if rep.NonZeroBytes < 32<<20 {
				t.Errorf("non-zero memory %d B: the initrd is not in RAM", rep.NonZeroBytes)
			}
			if tc.cache && ratio > 0.10 {
				t.Errorf("%.1f%% of the non-zero memory on the wire with the base in the target's cache; want at most 10%%", 100*ratio)
			}
			if !tc.cache && ratio < 0.9 {
				t.Errorf("without a cache only %.1f%% of incompressible memory went on the wire", 100*ratio)
			}
			if code := src.wait(t, 10*time.Second); code != 0 {
				t.Errorf("source exit %d", code)
			}
			if !strings.Contains(tgt.out.String(), "migrated in from") {
				t.Errorf("target output:\n%s", tgt.out.String())
			}
		})
	}
}
