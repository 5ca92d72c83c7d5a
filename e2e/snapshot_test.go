package e2e

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"collective/nested"
)

// TestSnapshotRestoreLinux snapshots a running appliance through the
// control API (run --api, ctl snapshot) with a shell variable set and a
// file written and synced to its overlay disk, kills the VMM with
// SIGKILL, deletes the overlay, and restores the snapshot with
// collective restore onto a new overlay over the same base: the shell
// goes on where it stopped, $X is still set, and the file reads back
// after the guest drops its page cache (so from the restored disk, not
// from memory). The restored guest powers off with status 0.
//
// Both sides name the disk's serial (serial=data): the default serial is
// the file's base name, and restore refuses a disk whose serial differs
// from the snapshot's, so a new overlay under another name needs it.
func TestSnapshotRestoreLinux(t *testing.T) {
	requireE2fsprogs(t)
	h := nested.Shared(t)
	start := time.Now()
	img, _ := ext4Folder(t, map[string]string{"base.txt": "base for snapshots\n"})
	putFile(t, h, img, "/tmp/e2e/snap/base.img")
	const dir = "/tmp/e2e/snap"
	src := drv{flags: fmt.Sprintf("--api %s/api.sock --disk %s/s.ovl,serial=data,base=%s/base.img", dir, dir, dir), lines: []string{
		"X=42",
		"mount -t ext4 /dev/vda /mnt",
		"echo on-disk-before-snapshot-$((7*6)) > /mnt/f; sync",
	}, then: fmt.Sprintf(`%s ctl --api %s/api.sock snapshot %s/snap.clv; st=$?
echo "@@SNAPSHOT status $st"
kill -9 "$VMM_PID"`, nested.CollectivePath, dir, dir)}
	dst := drv{
		argv: fmt.Sprintf("%s restore -v --disk %s/r.ovl,serial=data,base=%s/base.img %s/snap.clv", nested.CollectivePath, dir, dir, dir),
		lines: []string{
			"echo X=$X",
			"echo 3 > /proc/sys/vm/drop_caches; cat /mnt/f",
			"poweroff",
		}, noBanner: true}
	script := fmt.Sprintf(`cd %s
%s >/tmp/e2e/snap-src.out 2>&1
ls -ls %s
%s snapshot info snap.clv
rm -f s.ovl
%s >/tmp/e2e/snap-dst.out 2>&1
`, dir, src.cmd(), dir, nested.CollectivePath, dst.cmd())
	res := runDrives(t, h, 6*time.Minute, script, "snap-src", "snap-dst")
	s, d := res["snap-src"], res["snap-dst"]
	s.sentAll(t, src)
	if !strings.Contains(s.console, "@@SNAPSHOT status 0") {
		t.Fatalf("ctl snapshot failed; console:\n%s", s.console)
	}
	snapTook := "?"
	if m := regexp.MustCompile(`"duration_ms": ?([0-9.]+)`).FindStringSubmatch(s.console); m != nil {
		snapTook = m[1]
	}
	if s.rep.Status != -1 {
		t.Errorf("source VMM status %d, want -1 (killed after the snapshot)", s.rep.Status)
	}
	d.sentAll(t, dst)
	if !strings.Contains(d.console, "\nX=42\n") {
		t.Errorf("after restore, echo X=$X did not print X=42: the shell's state is lost; console:\n%s", d.console)
	}
	if !strings.Contains(d.console, "\non-disk-before-snapshot-42\n") {
		t.Errorf("after restore, /mnt/f is not on the restored disk; console:\n%s", d.console)
	}
	if d.rep.Status != 0 {
		t.Errorf("restored VMM: status %d after poweroff, want 0", d.rep.Status)
	}
	restoreLine := regexp.MustCompile(`collective restore: [^\n]*ready to run [^\n]*`).FindString(d.console)
	t.Logf("timings: source boot to prompt %.1f s, snapshot %s ms, restore: %s, restored run (3 commands, poweroff) %.1f s; whole test %.1f s",
		s.rep.PromptMS/1000, snapTook, restoreLine, d.rep.EndMS/1000, time.Since(start).Seconds())
	runL1(t, h, time.Minute, "rm -rf "+dir)
}
