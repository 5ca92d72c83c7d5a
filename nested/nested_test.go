package nested

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	code := m.Run()
	CloseShared()
	os.Exit(code)
}

// TestL1KVM checks that L1 booted with a working /dev/kvm (SVM, nested
// paging) and prints how long L1 took to boot.
func TestL1KVM(t *testing.T) {
	h := Shared(t)
	t.Logf("L1 boot: %s wall (QEMU start to /init ready), L1 uptime %s",
		h.BootTime.Round(time.Millisecond), h.KernelUptime)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, status, err := h.Run(ctx, "ls -l /dev/kvm && grep -c svm /proc/cpuinfo && dmesg | grep -i -e svm -e kvm")
	if err != nil || status != 0 {
		t.Fatalf("status %d, err %v, output:\n%s", status, err, out)
	}
	for _, want := range []string{"/dev/kvm", "Nested Paging enabled"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	t.Logf("L1:\n%s", out)
}

// TestRunSequence runs several scripts in one boot, including failing
// ones, and checks each output and status.
func TestRunSequence(t *testing.T) {
	h := Shared(t)
	for _, tc := range []struct {
		name, script, out string
		status            int
	}{
		{"echo", "echo hello; echo world >&2", "hello\nworld\n", 0},
		{"status", "echo partial; exit 7", "partial\n", 7},
		{"no-newline", "printf 'a\\nb'", "a\nb", 0},
		{"binary-ish", "printf 'x@@y\\001\\r\\n'", "x@@y\x01\r\n", 0},
		{"false", "false", "", 1},
		{"files", "test -x /bin/collective && ls /appliance | sort | tr '\\n' ' '", "bzImage cmdline initrd.img vmlinux ", 0},
		// collective run is the collective process itself (no exec).
		{"vmm", "/bin/collective run --kernel /appliance/vmlinux --mem 256M --serial none & p=$!; sleep 1; " +
			"readlink /proc/$p/exe; kill $p; wait $p", "/bin/collective\n", 0},
		// Its other commands are collective-tools's.
		{"tools", "/bin/collective bench -h 2>&1 | head -1",
			"usage: collective bench [flags] boot|exits|memory|snapshot|blk|migrate|all\n", 0},
		{"after", "echo still here", "still here\n", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			out, status, err := h.Run(ctx, tc.script)
			if err != nil {
				t.Fatalf("Run: %v; output %q", err, out)
			}
			if out != tc.out || status != tc.status {
				t.Errorf("got status %d output %q, want %d %q", status, out, tc.status, tc.out)
			}
		})
	}
}

// TestRunTimeout checks that L1 kills a script at its deadline and the
// host stays usable.
func TestRunTimeout(t *testing.T) {
	h := Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Second)
	defer cancel()
	out, _, err := h.Run(ctx, "echo started; sleep 1000 & sleep 1000")
	if !errors.Is(err, ErrTimeout) || !strings.Contains(out, "started") {
		t.Fatalf("got err %v output %q, want ErrTimeout and \"started\"", err, out)
	}
	ctx, cancel = context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, status, err := h.Run(ctx, "ps | grep '[s]leep 1000' | wc -l")
	if err != nil || status != 0 || strings.TrimSpace(out) != "0" {
		t.Errorf("after a timeout: status %d err %v output %q, want the sleeps gone", status, err, out)
	}
}

// TestRunConsole runs a script on L1's console with piped input.
func TestRunConsole(t *testing.T) {
	h := Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out bytes.Buffer
	status, err := h.RunConsole(ctx, "read a; read b; echo \"got $a-$b\"; [ -t 0 ] && echo tty; exit 3",
		strings.NewReader("one\ntwo\n"), &out, true)
	if err != nil || status != 3 {
		t.Fatalf("status %d err %v output %q", status, err, out.String())
	}
	if got := out.String(); !strings.Contains(got, "got one-two") || !strings.Contains(got, "tty") {
		t.Errorf("output %q, want \"got one-two\" and \"tty\"", got)
	}
}

// l2Script boots the appliance in L1 with the VMM command %s (console on
// stdin and stdout), types "uname -r" and "poweroff" at the first shell
// prompt, and prints L1-uptime timings at the end: @@start, @@banner
// (the appliance's banner seen, polled every 0.2 s), @@end, and
// @@vmm-status.
const l2Script = `
rm -f /tmp/l2.out /tmp/l2.times; touch /tmp/l2.out
echo "@@start $(cut -d' ' -f1 /proc/uptime)" >/tmp/l2.times
(
	while ! grep -q 'Collective appliance' /tmp/l2.out; do sleep 0.2; done
	echo "@@banner $(cut -d' ' -f1 /proc/uptime)" >>/tmp/l2.times
	while ! grep -q '# ' /tmp/l2.out; do sleep 0.2; done
	printf 'uname -r\npoweroff\n'
) | { %s 2>&1; echo "@@vmm-status $?" >>/tmp/l2.times; } | tee /tmp/l2.out
echo "@@end $(cut -d' ' -f1 /proc/uptime)" >>/tmp/l2.times
echo; cat /tmp/l2.times
`

// l2Times reads the @@ lines of l2Script's output.
func l2Times(t *testing.T, out string) (toBanner, total float64, vmmStatus string) {
	t.Helper()
	v := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(strings.TrimSpace(line)); len(f) == 2 && strings.HasPrefix(f[0], "@@") {
			v[f[0]] = f[1]
		}
	}
	num := func(k string) float64 {
		var x float64
		fmt.Sscan(v[k], &x)
		return x
	}
	if v["@@banner"] != "" {
		toBanner = num("@@banner") - num("@@start")
	}
	return toBanner, num("@@end") - num("@@start"), v["@@vmm-status"]
}

// TestCollectiveBootsLinux runs our VMM in L1 on the default appliance
// (PVH vmlinux, 256 MiB) and checks that Linux boots to a shell, runs a
// command and powers off with status 0. The time to the banner is printed.
func TestCollectiveBootsLinux(t *testing.T) {
	h := Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	out, status, err := h.Run(ctx, fmt.Sprintf(l2Script, ApplianceRun+" --mem 256M -v"))
	toBanner, total, vmm := l2Times(t, out)
	t.Logf("collective in L1: banner after %.2f s, whole run %.2f s (L1 time), VMM status %s; output:\n%s",
		toBanner, total, vmm, out)
	if err != nil || status != 0 {
		t.Fatalf("script: status %d, err %v", status, err)
	}
	if vmm != "0" || !strings.Contains(out, "6.1.0") || toBanner == 0 {
		t.Errorf("want the banner, uname -r's 6.1.0 and VMM status 0")
	}
}

// TestQEMUInL1 boots the same appliance with QEMU (-M microvm) as the L2
// VMM, the peer the benchmark compares us with, and prints its times.
func TestQEMUInL1(t *testing.T) {
	h := Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	qemu := QEMUPath + ` -enable-kvm -M microvm -cpu host -m 256 -nodefaults -no-user-config -display none` +
		` -serial stdio -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=4` +
		` -kernel /appliance/vmlinux -initrd /appliance/initrd.img -append "$(cat /appliance/cmdline)"`
	out, status, err := h.Run(ctx, fmt.Sprintf(l2Script, qemu))
	toBanner, total, vmm := l2Times(t, out)
	t.Logf("QEMU microvm in L1: banner after %.2f s, whole run %.2f s (L1 time), VMM status %s; output:\n%s",
		toBanner, total, vmm, out)
	if err != nil || status != 0 {
		t.Fatalf("script: status %d, err %v", status, err)
	}
	// isa-debug-exit turns the appliance's 0 into QEMU's status 1.
	if vmm != "1" || !strings.Contains(out, "6.1.0") {
		t.Errorf("want uname -r's 6.1.0 and QEMU status 1 (debug-exit 0)")
	}
}

// TestDiagnose reads L1's vCPUs through QEMU's monitor, as a Host does
// when L1 stops answering: every vCPU's instruction pointer, named from
// System.map (L1 boots without KASLR).
func TestDiagnose(t *testing.T) {
	h := Shared(t)
	d := h.diagnose()
	first, _, _ := strings.Cut(d, "\n")
	if n := len(regexp.MustCompile(`[0-9a-f]{16}`).FindAllString(first, -1)); n < 2 || !strings.Contains(first, "+0x") {
		t.Errorf("want two vCPUs' kernel addresses with symbols in the first sample, got:\n%s", d)
	}
	if !strings.Contains(d, "RIP=") {
		t.Errorf("no register dump:\n%s", d)
	}
	t.Logf("%s", first)
}

// TestBootTimeoutPostMortem: an L1 that does not become ready in time is
// killed with the same post-mortem as one that stops answering later
// (here: a boot timeout far too short for L1 to finish booting).
func TestBootTimeoutPostMortem(t *testing.T) {
	if testing.Short() {
		t.Skip("skipped under -short: boots the nested test host")
	}
	Require(t)
	_, err := Start(context.Background(), Options{BootTimeout: 4 * time.Second, Logf: t.Logf})
	if err == nil {
		t.Fatal("L1 became ready within 4 s; the test needs a slower boot")
	}
	if !strings.Contains(err.Error(), "did not become ready") || !strings.Contains(err.Error(), "L1's vCPUs (QEMU monitor)") ||
		!regexp.MustCompile(`sample 0: [0-9a-f]{16}`).MatchString(err.Error()) {
		t.Errorf("no post-mortem in the error:\n%v", err)
	}
	t.Logf("%s", regexp.MustCompile(`sample 0: .*`).FindString(err.Error()))
}

// TestL1ExitPostMortem: an L1 that ends itself (here poweroff -f; a reset
// under -no-reboot looks the same) is reported as QEMU having exited,
// with its status, instead of a monitor that no longer answers.
func TestL1ExitPostMortem(t *testing.T) {
	if testing.Short() {
		t.Skip("skipped under -short: boots the nested test host")
	}
	Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	h, err := Start(ctx, Options{Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	_, _, err = h.Run(ctx, "poweroff -f")
	if err == nil || !strings.Contains(err.Error(), "QEMU has exited (<nil>; status 0") {
		t.Fatalf("Run(poweroff -f): %v", err)
	}
	if _, _, err := h.Run(ctx, "true"); !errors.Is(err, ErrClosed) {
		t.Errorf("Run after L1 ended: %v, want ErrClosed", err)
	}
}
