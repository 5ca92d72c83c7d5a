package nested

import (
	"bytes"
	"context"
	"errors"
	"os"
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
		{"after", "echo still here", "still here\n", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			out, status, err := h.Run(ctx, tc.script)
			if err != nil {
				t.Fatalf("Run: %v", err)
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
