package e2e

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"collective/nested"
)

// TestMigrateLinux live-migrates a running appliance with a disk between
// two collective processes in L1 over loopback. The source runs with
// --api and an overlay over an ext4 base; the target waits with run
// --incoming and a new overlay whose base it does not have (so the
// source sends it once, into the target's --cache). Before the
// migration the guest sets a shell variable, writes a file to its tmpfs,
// writes and syncs a file to its disk, and starts a background loop that
// appends a numbered, synced line to a disk file every 0.2 s, so blocks
// are written during the migration. collective migrate moves it; the
// source exits 0; on the target the serial shell goes on: $X is 42, the
// tmpfs file is there, and after the page cache is dropped the disk file
// and the loop's log (no line lost) read back from the target's disk.
// The target writes a file, syncs and powers off (status 0); its overlay
// flattened over the received base holds both VMs' files, and the
// received base has the source's base's hash.
func TestMigrateLinux(t *testing.T) {
	requireE2fsprogs(t)
	h := nested.Shared(t)
	start := time.Now()
	img, sum := ext4Folder(t, map[string]string{"base.txt": "base for migration\n"})
	const (
		dir  = "/tmp/e2e/mig"
		addr = "127.0.0.1:4710"
	)
	putFile(t, h, img, dir+"/base.img")
	dst := drv{
		argv: fmt.Sprintf("%s run -v --incoming %s --mem 256M --cache %s/cache --disk %s/t.ovl,serial=data,base=%s/absent/base.img",
			nested.CollectivePath, addr, dir, dir, dir),
		lines: []string{
			"echo X=$X",
			"cat /tmp/f",
			"sleep 1; kill $(cat /tmp/w.pid); sync; echo 3 > /proc/sys/vm/drop_caches",
			"cat /mnt/f; awk 'NR != $1 + 1 { bad++ } END { print \"LOG\", NR, \"lines\", bad + 0, \"out of order\" }' /mnt/log",
			"echo written-on-the-target > /mnt/g; sync",
			"poweroff",
		}, noBanner: true, timeout: 240 * time.Second}
	src := drv{flags: fmt.Sprintf("--api %s/api.sock --disk %s/s.ovl,serial=data,base=%s/base.img", dir, dir, dir), lines: []string{
		"X=42",
		"echo written-on-the-source > /tmp/f",
		"mount -t ext4 /dev/vda /mnt",
		"echo on-disk-before-migration > /mnt/f; sync",
		"(i=0; while :; do echo $i >> /mnt/log; sync; i=$((i+1)); sleep 0.2; done) & echo $! > /tmp/w.pid; sleep 2",
	}, then: fmt.Sprintf(`for i in $(seq 100); do netstat -ltn | grep -q ':%s ' && break; sleep 0.1; done
%s migrate --api %s/api.sock --to %s --report %s/report.json; echo "@@MIGRATE status $?"`,
		strings.Split(addr, ":")[1], nested.CollectivePath, dir, addr, dir), timeout: 240 * time.Second}
	script := fmt.Sprintf(`cd %s
mkdir -p cache
%s >/tmp/e2e/mig-dst.out 2>&1 &
pd=$!
%s >/tmp/e2e/mig-src.out 2>&1
wait $pd
ls -lsR %s
sha256sum cache/bases/* base.img
%s image overlay commit --base cache/bases/%s t.ovl t.img
`, dir, dst.cmd(), src.cmd(), dir, nested.CollectivePath, sum)
	res := runDrives(t, h, 8*time.Minute, script, "mig-src", "mig-dst")
	s, d := res["mig-src"], res["mig-dst"]
	s.sentAll(t, src)
	if !strings.Contains(s.console, "@@MIGRATE status 0") {
		t.Fatalf("collective migrate failed; source console:\n%s\ntarget console:\n%s", s.console, d.console)
	}
	if s.rep.Status != 0 || !strings.Contains(s.console, "migrated away") {
		t.Errorf("source VMM: status %d, want 0 with \"the machine migrated away\"", s.rep.Status)
	}
	d.sentAll(t, dst)
	for _, want := range []string{"\nX=42\n", "\nwritten-on-the-source\n", "\non-disk-before-migration\n"} {
		if !strings.Contains(d.console, want) {
			t.Errorf("the target's console lacks %q:\n%s", strings.TrimSpace(want), d.console)
		}
	}
	if m := regexp.MustCompile(`LOG (\d+) lines (\d+) out of order`).FindStringSubmatch(d.console); m == nil || m[2] != "0" {
		t.Errorf("the disk log written across the migration is broken or missing; target console:\n%s", d.console)
	} else {
		t.Logf("the guest's disk log: %s lines, none lost or out of order", m[1])
	}
	if d.rep.Status != 0 {
		t.Errorf("target VMM: status %d after poweroff, want 0", d.rep.Status)
	}
	num := func(key string) string {
		if m := regexp.MustCompile(`"` + key + `": ?([0-9.e+-]+)`).FindStringSubmatch(s.console); m != nil {
			return m[1]
		}
		return "?"
	}
	if out := runL1(t, h, time.Minute, "sha256sum "+dir+"/cache/bases/*"); !strings.Contains(out, sum) {
		t.Errorf("the base the target received: %s; want sha256 %s", out, sum)
	}
	flat := filepath.Join(t.TempDir(), "t.img")
	getFile(t, h, dir+"/t.img", flat)
	if got := recoveredFile(t, flat, "/g"); got != "written-on-the-target\n" {
		t.Errorf("/g in the target's disk: %q", got)
	}
	if got, err := debugfsCat(flat, "/f"); err != nil || got != "on-disk-before-migration\n" {
		t.Errorf("/f in the target's disk: %q, %v", got, err)
	}
	t.Logf("timings: source boot to prompt %.1f s; migration total %s ms, downtime %s ms, %s rounds, %s bytes on the wire; target: %s; whole test %.1f s",
		s.rep.PromptMS/1000, num("total_ms"), num("downtime_ms"), num("rounds"), num("bytes_wire"),
		regexp.MustCompile(`collective run: migrated in[^\n]*`).FindString(d.console), time.Since(start).Seconds())
	runL1(t, h, time.Minute, "rm -rf "+dir)
}
