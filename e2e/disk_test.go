package e2e

import (
	"crypto/md5"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"collective/nested"
)

// ext4Folder makes a folder with files name -> contents and an ext4
// image of it (mke2fs -d), and returns the image's path and SHA-256.
func ext4Folder(t *testing.T, files map[string]string) (string, string) {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(src, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	img := filepath.Join(dir, "disk.img")
	mkext4(t, src, img)
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	return img, fmt.Sprintf("%x", sha256.Sum256(b))
}

// recoveredFile replays img's journal (e2fsck -fy, as a mount would:
// poweroff and kill -9 leave it unreplayed), requires a file system
// without errors, and returns path's contents.
func recoveredFile(t *testing.T, img, path string) string {
	t.Helper()
	before, err := debugfsCat(img, path)
	if err == nil {
		t.Logf("%s: before journal replay, %s holds %q", filepath.Base(img), path, before)
	} else {
		t.Logf("%s: before journal replay: %v", filepath.Base(img), err)
	}
	st, out := fsck(t, img)
	t.Logf("e2fsck -fy %s: status %d\n%s", filepath.Base(img), st, out)
	if st > 1 {
		t.Fatalf("e2fsck -fy %s: status %d (errors left):\n%s", img, st, out)
	}
	if st2, out2 := fsck(t, img); st2 != 0 {
		t.Fatalf("e2fsck -fy %s a second time: status %d, want 0 (clean):\n%s", img, st2, out2)
	}
	got, err := debugfsCat(img, path)
	if err != nil {
		t.Fatalf("after journal replay: %v", err)
	}
	return got
}

// TestDiskExt4FromFolder boots the appliance with an ext4 disk made from
// a host folder (mke2fs -d): the guest mounts it, reads the host's file,
// writes a file, syncs and powers off (status 0); the host finds the
// guest's file in the image.
func TestDiskExt4FromFolder(t *testing.T) {
	requireE2fsprogs(t)
	h := nested.Shared(t)
	start := time.Now()
	img, sum := ext4Folder(t, map[string]string{"hello.txt": "hello from the host, folder to ext4\n"})
	putFile(t, h, img, "/tmp/e2e/ext4/disk.img")
	d := drv{flags: "--disk /tmp/e2e/ext4/disk.img", lines: []string{
		"mount -t ext4 /dev/vda /mnt",
		"cat /mnt/hello.txt",
		"echo guest-wrote-$((6*7)) > /mnt/from-guest.txt",
		"sync",
		"poweroff",
	}}
	bootStart := time.Now()
	r := runDrives(t, h, 4*time.Minute, d.cmd()+" >/tmp/e2e/ext4.out 2>&1", "ext4")["ext4"]
	bootTook := time.Since(bootStart)
	r.sentAll(t, d)
	if !strings.Contains(r.console, "cat /mnt/hello.txt\nhello from the host, folder to ext4\n") {
		t.Errorf("the guest did not read the host's file; console:\n%s", r.console)
	}
	if r.rep.Status != 0 {
		t.Errorf("poweroff: VMM status %d, want 0", r.rep.Status)
	}
	after := filepath.Join(t.TempDir(), "after.img")
	getFile(t, h, "/tmp/e2e/ext4/disk.img", after)
	if b, _ := os.ReadFile(after); fmt.Sprintf("%x", sha256.Sum256(b)) == sum {
		t.Errorf("the image is unchanged after the guest wrote a file and synced")
	}
	if got := recoveredFile(t, after, "/from-guest.txt"); got != "guest-wrote-42\n" {
		t.Errorf("/from-guest.txt in the image: %q, want %q", got, "guest-wrote-42\n")
	}
	if got, err := debugfsCat(after, "/hello.txt"); err != nil || got != "hello from the host, folder to ext4\n" {
		t.Errorf("/hello.txt in the image: %q, %v", got, err)
	}
	runL1(t, h, time.Minute, "rm -rf /tmp/e2e/ext4")
	t.Logf("timings: VM run (boot, commands, poweroff) %.1f s; whole test %.1f s", bootTook.Seconds(), time.Since(start).Seconds())
}

// TestDiskTwoVMsOneBase boots two VMs at once from one base image, each
// with its own overlay (base=); each writes its own file. Afterwards each
// overlay (flattened with collective image overlay commit) holds its
// file and not the other's, and the base's hash is unchanged.
func TestDiskTwoVMsOneBase(t *testing.T) {
	requireE2fsprogs(t)
	h := nested.Shared(t)
	start := time.Now()
	img, sum := ext4Folder(t, map[string]string{"base.txt": "shared base\n"})
	putFile(t, h, img, "/tmp/e2e/two/base.img")
	vm := func(name string) drv {
		return drv{flags: fmt.Sprintf("--disk /tmp/e2e/two/%s.ovl,base=/tmp/e2e/two/base.img", name), lines: []string{
			"mount -t ext4 /dev/vda /mnt",
			"cat /mnt/base.txt",
			fmt.Sprintf("echo written-by-%s > /mnt/%s.txt", name, name),
			"sync",
			"poweroff",
		}, timeout: 240 * time.Second}
	}
	a, b := vm("a"), vm("b")
	script := fmt.Sprintf(`cd /tmp/e2e/two
%s >/tmp/e2e/a.out 2>&1 &
pa=$!
%s >/tmp/e2e/b.out 2>&1 &
pb=$!
wait $pa; wait $pb
echo "@@BASE $(sha256sum base.img)"
for v in a b; do
	%s image overlay info --base base.img $v.ovl
	%s image overlay commit --base base.img $v.ovl $v.img
done
`, a.cmd(), b.cmd(), nested.CollectivePath, nested.CollectivePath)
	res := runDrives(t, h, 6*time.Minute, script, "a", "b")
	vmsTook := time.Since(start)
	for _, n := range []string{"a", "b"} {
		r := res[n]
		r.sentAll(t, a)
		if !strings.Contains(r.console, "cat /mnt/base.txt\nshared base\n") {
			t.Errorf("%s did not read the base's file; console:\n%s", n, r.console)
		}
		if r.rep.Status != 0 {
			t.Errorf("%s: VMM status %d, want 0", n, r.rep.Status)
		}
	}
	// Both ran at once: each VMM started before the other's exited (so
	// both had the base open).
	ra, rb := res["a"].rep, res["b"].rep
	if ra.StartUnix > rb.EndUnix || rb.StartUnix > ra.EndUnix {
		t.Errorf("the two VMs did not run at the same time: a ran %.1f-%.1f, b %.1f-%.1f (L1's clock)",
			ra.StartUnix, ra.EndUnix, rb.StartUnix, rb.EndUnix)
	}
	out := runL1(t, h, time.Minute, "sha256sum /tmp/e2e/two/base.img; ls -ls /tmp/e2e/two")
	t.Logf("L1:\n%s", out)
	if !strings.Contains(out, sum) {
		t.Errorf("the base changed: sha256 before %s, after: %s", sum, out)
	}
	dir := t.TempDir()
	for _, n := range []string{"a", "b"} {
		other := map[string]string{"a": "b", "b": "a"}[n]
		flat := filepath.Join(dir, n+".img")
		getFile(t, h, "/tmp/e2e/two/"+n+".img", flat)
		if got := recoveredFile(t, flat, "/"+n+".txt"); got != "written-by-"+n+"\n" {
			t.Errorf("overlay %s: /%s.txt is %q", n, n, got)
		}
		if got, err := debugfsCat(flat, "/"+other+".txt"); err == nil {
			t.Errorf("overlay %s holds the other VM's file /%s.txt (%q)", n, other, got)
		}
		if got, err := debugfsCat(flat, "/base.txt"); err != nil || got != "shared base\n" {
			t.Errorf("overlay %s: /base.txt %q, %v", n, got, err)
		}
	}
	runL1(t, h, time.Minute, "rm -rf /tmp/e2e/two")
	t.Logf("timings: two VMs at once (boot, commands, poweroff, overlay info and commit) %.1f s; whole test %.1f s",
		vmsTook.Seconds(), time.Since(start).Seconds())
}

// TestDiskKill9AfterSync writes a file in the guest on an overlay disk,
// syncs, and kills the VMM with SIGKILL from L1: the overlay opens
// cleanly afterwards and holds the file.
func TestDiskKill9AfterSync(t *testing.T) {
	requireE2fsprogs(t)
	h := nested.Shared(t)
	start := time.Now()
	img, _ := ext4Folder(t, map[string]string{"base.txt": "base for kill -9\n"})
	putFile(t, h, img, "/tmp/e2e/kill/base.img")
	d := drv{flags: "--disk /tmp/e2e/kill/k.ovl,base=/tmp/e2e/kill/base.img", lines: []string{
		"mount -t ext4 /dev/vda /mnt",
		"dd if=/dev/urandom of=/mnt/big bs=64k count=16 2>/dev/null; echo survives-kill-9 > /mnt/k.txt; md5sum /mnt/big",
		"sync",
	}, then: `kill -9 "$VMM_PID"; echo "@@KILLED $VMM_PID"`}
	script := fmt.Sprintf(`cd /tmp/e2e/kill
%s >/tmp/e2e/kill.out 2>&1
%s image overlay info --base base.img k.ovl
%s image overlay commit --base base.img k.ovl k.img
`, d.cmd(), nested.CollectivePath, nested.CollectivePath)
	res := runDrives(t, h, 4*time.Minute, script, "kill")
	vmTook := time.Since(start)
	r := res["kill"]
	r.sentAll(t, d)
	if r.rep.ThenStatus != 0 || !strings.Contains(r.console, "@@KILLED") {
		t.Fatalf("kill -9 did not run (status %d); console:\n%s", r.rep.ThenStatus, r.console)
	}
	if r.rep.Status != -1 {
		t.Errorf("VMM status %d, want -1 (killed by SIGKILL)", r.rep.Status)
	}
	m := regexp.MustCompile(`([0-9a-f]{32})  /mnt/big`).FindStringSubmatch(r.console)
	if m == nil {
		t.Fatalf("no md5sum of /mnt/big on the console:\n%s", r.console)
	}
	flat := filepath.Join(t.TempDir(), "k.img")
	getFile(t, h, "/tmp/e2e/kill/k.img", flat)
	if got := recoveredFile(t, flat, "/k.txt"); got != "survives-kill-9\n" {
		t.Errorf("/k.txt after kill -9: %q, want %q", got, "survives-kill-9\n")
	}
	big, err := debugfsCat(flat, "/big")
	if err != nil {
		t.Fatalf("/big after kill -9: %v", err)
	}
	if got := fmt.Sprintf("%x", md5.Sum([]byte(big))); got != m[1] || len(big) != 1<<20 {
		t.Errorf("/big after kill -9: %d bytes, md5 %s; the guest wrote 1 MiB with md5 %s", len(big), got, m[1])
	}
	runL1(t, h, time.Minute, "rm -rf /tmp/e2e/kill")
	t.Logf("timings: VM run to kill -9 plus overlay info and commit %.1f s; whole test %.1f s", vmTook.Seconds(), time.Since(start).Seconds())
}

// TestDiskINTx boots the appliance with pci=nomsi, so that Linux drives
// virtio-blk through its INTx line (IOAPIC pins 16-23, listed in the MP
// table) instead of MSI-X: the disk's interrupt is an IO-APIC one and the
// guest reads the host's file through it.
func TestDiskINTx(t *testing.T) {
	requireE2fsprogs(t)
	h := nested.Shared(t)
	const text = "read through INTx\n"
	img, _ := ext4Folder(t, map[string]string{"intx.txt": text})
	putFile(t, h, img, "/tmp/e2e/intx/disk.img")
	d := drv{flags: `--disk /tmp/e2e/intx/disk.img,ro --append "$(cat ` + nested.ApplianceDir + `/cmdline) pci=nomsi"`, lines: []string{
		"mount -t ext4 -o ro,noload /dev/vda /mnt",
		"cat /mnt/intx.txt",
		"grep -e virtio -e MSI /proc/interrupts",
		"poweroff",
	}}
	r := runDrives(t, h, 4*time.Minute, d.cmd()+" >/tmp/e2e/intx.out 2>&1", "intx")["intx"]
	r.sentAll(t, d)
	if !strings.Contains(r.console, "cat /mnt/intx.txt\n"+text) {
		t.Errorf("the guest did not read the file; console:\n%s", r.console)
	}
	if !regexp.MustCompile(`IO-APIC +(1[6-9]|2[0-3])-fasteoi +virtio`).MatchString(r.console) {
		t.Errorf("no virtio interrupt on an IO-APIC pin 16-23; console:\n%s", r.console)
	}
	if strings.Contains(r.console, "PCI-MSI") {
		t.Errorf("MSI in use despite pci=nomsi; console:\n%s", r.console)
	}
	if r.rep.Status != 0 {
		t.Errorf("poweroff: VMM status %d, want 0", r.rep.Status)
	}
	runL1(t, h, time.Minute, "rm -rf /tmp/e2e/intx /tmp/e2e/intx.out")
}
