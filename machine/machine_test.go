package machine

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"collective/internal/testenv"
	"collective/kvm/boot"
)

func guestELF(t *testing.T) string {
	t.Helper()
	p := testenv.WorkloadGuest(t)
	return p
}

// boot builds and runs the workload guest with cmdline until it exits.
func bootGuest(t *testing.T, cmdline string, cpus int, timeout time.Duration) (Exit, string) {
	t.Helper()
	elf := guestELF(t)
	var console testenv.Buffer
	m, err := New(Config{Kernel: elf, Cmdline: cmdline, MemSize: 128 << 20, CPUs: cpus, Console: &console})
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
	return exit, console.String()
}

func TestGuestHello(t *testing.T) {
	exit, out := bootGuest(t, "hello", 1, 20*time.Second)
	if exit.Reason != ExitDebug || exit.Code != 0 {
		t.Fatalf("exit %+v, want debug-exit 0; console:\n%s", exit, out)
	}
	if !strings.Contains(out, "collective-guest: hello") {
		t.Fatalf("console lacks the hello line:\n%s", out)
	}
}

func TestGuestExitCode(t *testing.T) {
	// An unknown mode makes the guest exit with code 2.
	exit, out := bootGuest(t, "no-such-mode", 1, 20*time.Second)
	if exit.Reason != ExitDebug || exit.Code != 2 {
		t.Fatalf("exit %+v, want debug-exit 2; console:\n%s", exit, out)
	}
}

func TestGuestSMP(t *testing.T) {
	exit, out := bootGuest(t, "smp 2", 2, 30*time.Second)
	if exit.Reason != ExitDebug || exit.Code != 0 || !strings.Contains(out, "smp: 2 cpus up") {
		t.Fatalf("exit %+v; console:\n%s", exit, out)
	}
}

func TestGuestExits(t *testing.T) {
	for _, kind := range []string{"port", "mmio"} {
		t.Run(kind, func(t *testing.T) {
			exit, out := bootGuest(t, "exits 10000 "+kind, 1, 30*time.Second)
			if exit.Reason != ExitDebug || exit.Code != 0 || !strings.Contains(out, "exits: 10000") {
				t.Fatalf("exit %+v; console:\n%s", exit, out)
			}
		})
	}
}

func TestPauseResumeAndDirtyLog(t *testing.T) {
	elf := guestELF(t)
	var console testenv.Buffer
	m, err := New(Config{Kernel: elf, Cmdline: "dirty 8M 0 3", MemSize: 128 << 20, CPUs: 1, Console: &console})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for i := 0; i < m.VM().NumSlots(); i++ {
		if err := m.VM().SetDirtyLogging(i, true); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	done := make(chan Exit, 1)
	go func() { done <- m.Run(ctx) }()

	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(console.String(), "verified") {
		if time.Now().After(deadline) {
			t.Fatalf("no verified pass; console:\n%s", console.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	m.VM().Pause()
	v := m.VM().VCPUs()[0]
	r1, err := v.Regs()
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	r2, _ := v.Regs()
	if r1.RIP != r2.RIP || r1.RAX != r2.RAX {
		t.Errorf("vCPU moved while paused: rip %#x -> %#x", r1.RIP, r2.RIP)
	}
	bm, err := m.VM().DirtyLog(0)
	if err != nil {
		t.Fatal(err)
	}
	dirty := 0
	for _, w := range bm {
		for ; w != 0; w &= w - 1 {
			dirty++
		}
	}
	if dirty < 100 {
		t.Errorf("KVM dirty log shows %d pages after the guest dirtied 8 MiB", dirty)
	}
	// Nothing runs while paused: a second log read is empty.
	bm, _ = m.VM().DirtyLog(0)
	for _, w := range bm {
		if w != 0 {
			t.Fatalf("pages dirtied while paused")
		}
	}
	m.VM().Resume()
	exit := <-done
	if exit.Reason != ExitDebug || exit.Code != 0 {
		t.Fatalf("exit %+v after resume; console:\n%s", exit, console.String())
	}
}

func TestBadKernels(t *testing.T) {
	testenv.RequireKVM(t)
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name   string
		cfg    Config
		target error
	}{
		{"missing file", Config{Kernel: filepath.Join(dir, "nope"), MemSize: 64 << 20, CPUs: 1}, ErrConfig},
		{"text file", Config{Kernel: write("txt", []byte("hello, world\n")), MemSize: 64 << 20, CPUs: 1}, boot.ErrUnknownKernel},
		{"empty file", Config{Kernel: write("empty", nil), MemSize: 64 << 20, CPUs: 1}, boot.ErrUnknownKernel},
		{"zero cpus", Config{Kernel: write("z", nil), MemSize: 64 << 20, CPUs: 0}, ErrConfig},
		{"too little memory", Config{Kernel: write("z2", nil), MemSize: 1 << 20, CPUs: 1}, ErrConfig},
		{"too many cpus", Config{Kernel: write("z3", nil), MemSize: 64 << 20, CPUs: 100000}, ErrConfig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := New(tc.cfg)
			if err == nil {
				m.Close()
				t.Fatal("New succeeded")
			}
			if !errors.Is(err, tc.target) || !errors.Is(err, ErrConfig) {
				t.Fatalf("error %q does not match %v and ErrConfig", err, tc.target)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
		})
	}
}

// TestGuestRTCDate: the guest reads the CMOS clock and gets the host's
// time (UTC), as Linux's date must be right.
func TestGuestRTCDate(t *testing.T) {
	before := time.Now().UTC().Truncate(time.Second)
	exit, out := bootGuest(t, "rtc", 1, 20*time.Second)
	after := time.Now().UTC()
	i := strings.Index(out, "rtc: ")
	if exit.Reason != ExitDebug || exit.Code != 0 || i < 0 {
		t.Fatalf("exit %+v; console:\n%s", exit, out)
	}
	line := strings.TrimSpace(strings.SplitN(out[i+5:], "\n", 2)[0])
	got, err := time.Parse("2006-01-02 15:04:05", line)
	if err != nil {
		t.Fatalf("guest printed %q: %v", line, err)
	}
	if got.Before(before) || got.After(after) {
		t.Fatalf("guest date %v, host between %v and %v", got, before, after)
	}
}

func TestDisks(t *testing.T) {
	elf := guestELF(t)
	dir := t.TempDir()
	disk := filepath.Join(dir, "d.img")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	var console testenv.Buffer
	m, err := New(Config{Kernel: elf, Cmdline: "hello", MemSize: 64 << 20, CPUs: 1, Console: &console,
		Disks: []string{disk, disk + ",ro,serial=second"}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	// Probe PCI config space the way a guest does: 0xcf8/0xcfc.
	vendor := func(slot int) uint32 {
		addr := []byte{0, 0, 0, 0}
		v := uint32(1<<31 | slot<<11)
		addr[0], addr[1], addr[2], addr[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
		m.PortOut(0xcf8, addr)
		p := make([]byte, 4)
		m.PortIn(0xcfc, p)
		return uint32(p[0]) | uint32(p[1])<<8 | uint32(p[2])<<16 | uint32(p[3])<<24
	}
	if v := vendor(0) & 0xffff; v != 0x8086 {
		t.Errorf("host bridge vendor %#x", v)
	}
	for slot := 1; slot <= 2; slot++ {
		if v := vendor(slot); v != 0x10421af4 {
			t.Errorf("slot %d: vendor/device %#x, want virtio-blk 1af4:1042", slot, v)
		}
	}
	if v := vendor(3); v != 0x00111b36 {
		t.Errorf("slot 3: vendor/device %#x, want pvpanic 1b36:0011", v)
	}
	if v := vendor(4); v != 0xffffffff {
		t.Errorf("empty slot 4 reads %#x", v)
	}
	exit := m.Run(context.Background())
	if exit.Reason != ExitDebug || exit.Code != 0 {
		t.Fatalf("exit %+v", exit)
	}

	_, err = New(Config{Kernel: elf, MemSize: 64 << 20, CPUs: 1, Disks: []string{filepath.Join(dir, "missing.img")}})
	if !errors.Is(err, ErrConfig) {
		t.Fatalf("missing disk: %v, want ErrConfig", err)
	}
}

// TestVirtioStateRoundTrip: a machine's virtio-blk state goes into its
// MachineState and restores into a machine built with the same disks; a
// machine built without them refuses it.
func TestVirtioStateRoundTrip(t *testing.T) {
	elf := guestELF(t)
	disk := filepath.Join(t.TempDir(), "d.img")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := Config{Kernel: elf, Cmdline: "hello", MemSize: 64 << 20, CPUs: 1, Disks: []string{disk}}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	m.Pause()
	st, err := m.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Virtio) != 1 || st.Virtio[0].Block == nil {
		t.Fatalf("virtio state %+v", st.Virtio)
	}
	r, err := Restore(Config{Disks: []string{disk}}, st)
	if err != nil {
		t.Fatal(err)
	}
	st2, err := func() (*MachineState, error) { r.Pause(); return r.SaveState() }()
	r.Close()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(st.Virtio, st2.Virtio); diff != "" {
		t.Errorf("virtio state after restore (-saved +restored):\n%s", diff)
	}
	if _, err := Restore(Config{}, st); !errors.Is(err, ErrConfig) {
		t.Fatalf("restore without the disk: %v, want ErrConfig", err)
	}
}

// TestPVPanic: a write of PANICKED to the pvpanic register, as Linux's
// pvpanic-pci driver does from its panic notifier, ends the machine with
// ExitPanic even though the guest goes on (to reset, with panic=-1).
func TestPVPanic(t *testing.T) {
	elf := guestELF(t)
	m, err := New(Config{Kernel: elf, Cmdline: "spin", MemSize: 64 << 20, CPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	bar := m.pvpanic.PCI().BAR(0)
	p := []byte{0}
	m.MMIORead(bar, p)
	if p[0] != 3 {
		t.Fatalf("pvpanic at %#x reads %#x, want the supported events 3", bar, p[0])
	}
	go func() {
		time.Sleep(100 * time.Millisecond)
		m.MMIOWrite(bar, []byte{1})
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if exit := m.Run(ctx); exit.Reason != ExitPanic {
		t.Fatalf("exit %+v, want panic", exit)
	}
}

// TestMSIThroughIRQFD: an MSI a device signals goes through a GSI route and
// an irqfd into the LAPIC of its destination; routes are reused per message
// and recycled beyond maxMSIRoutes.
func TestMSIThroughIRQFD(t *testing.T) {
	elf := guestELF(t)
	m, err := New(Config{Kernel: elf, Cmdline: "spin", MemSize: 64 << 20, CPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	const vector = 0x31
	irr := func() bool {
		l, err := m.VM().VCPUs()[0].LAPIC()
		if err != nil {
			t.Fatal(err)
		}
		off := 0x200 + (vector/32)*0x10
		return l.Regs[off+(vector%32)/8]&(1<<(vector%8)) != 0
	}
	if irr() {
		t.Fatal("vector pending before any MSI")
	}
	if err := m.msi.SignalMSI(0xfee00000, vector); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for !irr() {
		if time.Now().After(deadline) {
			t.Fatal("the MSI never reached the LAPIC")
		}
		time.Sleep(time.Millisecond)
	}
	m.msi.SignalMSI(0xfee00000, vector)
	if n := len(m.msi.routes); n != 1 {
		t.Fatalf("%d routes after two signals of one message", n)
	}
	for i := 0; i < maxMSIRoutes+10; i++ {
		if err := m.msi.SignalMSI(0xfee00000, uint32(0x40+i%0xb0)|uint32(i/0xb0)<<16); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(m.msi.routes); n != maxMSIRoutes {
		t.Fatalf("%d routes, want the cap %d", n, maxMSIRoutes)
	}
}
