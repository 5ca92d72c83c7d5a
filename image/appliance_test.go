package image

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"collective/internal/qemumon"
	"collective/internal/testenv"
)

func baseInputs() *inputs {
	mods := []string{"kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko"}
	return &inputs{
		Format:        FormatVersion,
		KernelVersion: "6.1.0-57-amd64",
		BzImage:       strings.Repeat("a", 64),
		Vmlinux:       strings.Repeat("b", 64),
		Busybox:       strings.Repeat("c", 64),
		Applets:       []string{"bin/sh", "sbin/init"},
		Modules:       []fileInput{{mods[0], strings.Repeat("d", 64)}, {mods[1], strings.Repeat("e", 64)}},
		Files:         rootFiles("6.1.0-57-amd64", mods),
		Cmdline:       DefaultCmdline,
	}
}

func TestApplianceID(t *testing.T) {
	base := baseInputs().id()
	if again := baseInputs().id(); again != base {
		t.Fatalf("the same inputs give two IDs: %s, %s", base, again)
	}
	if len(base) != 64 {
		t.Errorf("ID %q is not 64 hex digits", base)
	}
	for _, tc := range []struct {
		name   string
		mutate func(in *inputs)
	}{
		{"format", func(in *inputs) { in.Format++ }},
		{"kernel version", func(in *inputs) { in.KernelVersion = "6.1.0-58-amd64" }},
		{"bzImage", func(in *inputs) { in.BzImage = strings.Repeat("f", 64) }},
		{"vmlinux", func(in *inputs) { in.Vmlinux = strings.Repeat("f", 64) }},
		{"busybox", func(in *inputs) { in.Busybox = strings.Repeat("f", 64) }},
		{"applets", func(in *inputs) { in.Applets = append(in.Applets, "bin/ls") }},
		{"module hash", func(in *inputs) { in.Modules[1].SHA256 = strings.Repeat("f", 64) }},
		{"module list", func(in *inputs) { in.Modules = in.Modules[:1] }},
		{"module order", func(in *inputs) { in.Modules[0], in.Modules[1] = in.Modules[1], in.Modules[0] }},
		{"init", func(in *inputs) { in.Files[0].Text += "# changed\n" }},
		{"inittab", func(in *inputs) { in.Files[1].Text = strings.Replace(in.Files[1].Text, "tty1", "tty2", 1) }},
		{"file mode", func(in *inputs) { in.Files[1].Mode = 0o600 }},
		{"cmdline", func(in *inputs) { in.Cmdline += " debug" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := baseInputs()
			tc.mutate(in)
			if in.id() == base {
				t.Errorf("changing the %s keeps the ID", tc.name)
			}
		})
	}
}

func TestRootFiles(t *testing.T) {
	mods := []string{"kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_pci.ko"}
	files := map[string]string{}
	for _, f := range rootFiles("6.1.0-57-amd64", mods) {
		files[f.Name] = f.Text
	}
	init, tab := files["init"], files["etc/inittab"]
	for _, want := range []string{
		"#!/bin/sh\n",
		`echo "Collective appliance: Linux $(uname -r), $(nproc) CPUs, up $(cut -d' ' -f1 /proc/uptime) s"`,
		"mount -t proc", "mount -t sysfs", "mount -t devtmpfs",
		"insmod /lib/modules/6.1.0-57-amd64/$m",
		"ifconfig lo", "udhcpc -i eth0",
		"exec /sbin/init",
	} {
		if !strings.Contains(init, want) {
			t.Errorf("/init lacks %q:\n%s", want, init)
		}
	}
	// Modules in the given order.
	last := -1
	for _, m := range mods {
		i := strings.Index(init, "\t"+m+" \\\n")
		if i <= last {
			t.Errorf("/init loads %s out of order:\n%s", m, init)
		}
		last = i
	}
	for _, want := range []string{
		"ttyS0::respawn:/bin/cttyhack /bin/sh -l\n",
		"tty1::respawn:/sbin/getty 38400 tty1\n",
		`::shutdown:printf '\000' | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null` + "\n",
	} {
		if !strings.Contains(tab, want) {
			t.Errorf("inittab lacks %q:\n%s", want, tab)
		}
	}
	if strings.Index(tab, "::shutdown:/bin/sync") > strings.Index(tab, "/dev/port") {
		t.Error("inittab ends the VM before sync")
	}
	// The banner as a shell would print it.
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	out, err := exec.Command(sh, "-c", `echo "`+Banner+`"`).Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(out), BannerPrefix) || !regexp.MustCompile(` CPUs, up [0-9]+\.[0-9]+ s\n$`).MatchString(string(out)) {
		t.Errorf("banner %q", out)
	}
}

// requireAppliance builds the default appliance in the default cache.
func requireAppliance(t *testing.T) (*Appliance, string) {
	t.Helper()
	_, dir := requireAptKernel(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	a, err := BuildDefault(WithProgress(ctx, t.Logf), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("BuildDefault: %s in %s", a.ID, time.Since(start))
	return a, dir
}

// listInitrd returns the names and contents of the initrd's members.
func listInitrd(t *testing.T, path string) map[string]string {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	members := map[string]string{}
	for off := 0; off+110 <= len(b); {
		var size, namesize int
		fmt.Sscanf(string(b[off+54:off+62]), "%x", &size)
		fmt.Sscanf(string(b[off+94:off+102]), "%x", &namesize)
		name := string(b[off+110 : off+110+namesize-1])
		data := (off + 110 + namesize + 3) &^ 3
		if name == "TRAILER!!!" {
			break
		}
		members[name] = string(b[data : data+size])
		off = (data + size + 3) &^ 3
	}
	return members
}

func TestBuildDefault(t *testing.T) {
	a, dir := requireAppliance(t)
	if !hasPVHNote(t, a.Kernel) {
		t.Errorf("%s has no PVH note", a.Kernel)
	}
	fi, err := os.Stat(a.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("initrd %s: %d bytes; cmdline %q", a.Initrd, fi.Size(), a.Cmdline)
	members := listInitrd(t, a.Initrd)
	for _, want := range []string{"init", "bin/busybox", "bin/sh", "sbin/init", "etc/inittab", "dev/console",
		"lib/modules/" + a.KernelVersion + "/kernel/drivers/net/virtio_net.ko",
		"lib/modules/" + a.KernelVersion + "/modules.dep"} {
		if _, ok := members[want]; !ok {
			t.Errorf("initrd lacks %s", want)
		}
	}
	// Built once: the second call finds it.
	b, err := BuildDefault(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	if *b != *a {
		t.Errorf("second BuildDefault = %+v, want %+v", *b, *a)
	}
	list, err := List(dir)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, l := range list {
		found = found || l == *a
	}
	if !found {
		t.Errorf("List = %+v, lacks %s", list, a.ID)
	}
}

// TestQEMUBoot boots the appliance's bzImage under QEMU TCG, types
// commands into its serial shell and checks that poweroff ends QEMU
// through the debug-exit port.
func TestQEMUBoot(t *testing.T) {
	if testing.Short() {
		t.Skip("skipped under -short: boots Linux under QEMU TCG")
	}
	qemu := testenv.RequireCommand(t, "qemu-system-x86_64")
	a, _ := requireAppliance(t)
	k, _ := requireAptKernel(t)
	// The nested test host saves the kernel's text symbols there (when it
	// has run on this cache); without them a post-mortem has bare addresses.
	syms, _ := qemumon.LoadSymbols(filepath.Join(filepath.Dir(k.BzImage), "kallsyms-text"))
	for _, tc := range []struct{ name, machine, kernel string }{
		{"microvm bzImage", "microvm,acpi=off,pit=on,isa-serial=on,rtc=on", a.BzImage},
		{"microvm vmlinux PVH", "microvm,acpi=off,pit=on,isa-serial=on,rtc=on", a.Kernel},
	} {
		t.Run(tc.name, func(t *testing.T) { qemuBoot(t, qemu, tc.machine, tc.kernel, a, syms) })
	}
}

// qemuBannerTimeout bounds the wait for the banner: about 6 s on a quiet
// machine, 10-12 s with both cores busy.
const qemuBannerTimeout = 90 * time.Second

func qemuBoot(t *testing.T, qemu, machine, kernel string, a *Appliance, syms qemumon.Symbols) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	mon := filepath.Join(t.TempDir(), "mon.sock")
	// One TCG thread for both vCPUs: QEMU 7.2's multi-threaded TCG can
	// livelock on a guest kernel patching its text across CPUs (see
	// nested/doc.go); this test is about the appliance, not QEMU's speed.
	// nokaslr keeps the kernel at the addresses of the saved symbols.
	cmd := exec.CommandContext(ctx, qemu, "-accel", "tcg,thread=single", "-M", machine, "-cpu", "max", "-smp", "2",
		"-m", "512", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
		"-monitor", "unix:"+mon+",server=on,wait=off",
		"-kernel", kernel, "-initrd", a.Initrd, "-append", a.Cmdline+" nokaslr",
		"-device", "isa-debug-exit,iobase=0xf4,iosize=4")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var (
		mu      sync.Mutex
		console bytes.Buffer
		banner  = make(chan time.Duration, 1)
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			l := sc.Text()
			mu.Lock()
			console.WriteString(l + "\n")
			mu.Unlock()
			if strings.HasPrefix(strings.TrimSpace(l), BannerPrefix) {
				select {
				case banner <- time.Since(start):
				default:
				}
			}
		}
	}()
	select {
	case d := <-banner:
		t.Logf("banner after %s", d.Round(time.Millisecond))
	case <-time.After(qemuBannerTimeout):
		t.Errorf("no banner after %s; QEMU's vCPUs:\n%s", qemuBannerTimeout, qemumon.VCPUs(mon, syms))
		cancel()
	case <-done:
	}
	// Give the shell a moment to start, then type.
	time.Sleep(2 * time.Second)
	io.WriteString(stdin, "echo marker-$((6*7)); uname -r; nproc\n")
	time.Sleep(time.Second)
	io.WriteString(stdin, "poweroff\n")
	<-done
	err = cmd.Wait()
	t.Logf("QEMU ran %s", time.Since(start).Round(time.Millisecond))
	mu.Lock()
	out := console.String()
	mu.Unlock()
	code := -1
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err == nil {
		code = 0
	}
	if code != 1 {
		t.Errorf("QEMU exit status %d (%v), want 1 = the guest wrote 0 to port 0xf4\nstderr: %s", code, err, stderr.String())
	}
	wantBanner := BannerPrefix + a.KernelVersion + ", 2 CPUs"
	for _, want := range []string{wantBanner, "marker-42", "\n" + a.KernelVersion + "\n", "\n2\n"} {
		if !strings.Contains(strings.ReplaceAll(out, "\r", ""), want) {
			t.Errorf("console lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("console:\n%s", out)
	}
}
