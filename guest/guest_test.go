package guest

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

const qemuBin = "qemu-system-x86_64"

// need skips the test for a missing prerequisite, or fails it when CI=true.
func need(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf(format, args...)
	}
	t.Skipf(format, args...)
}

func buildGuest(t *testing.T) string {
	t.Helper()
	path, err := Build()
	if err != nil {
		if _, lerr := exec.LookPath("gcc"); lerr != nil {
			need(t, "cannot build the guest: %v", err)
		}
		t.Fatalf("Build: %v", err)
	}
	return path
}

// TestELF checks the PVH ELF's shape without running it.
func TestELF(t *testing.T) {
	path := buildGuest(t)
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 {
		t.Fatalf("class %v machine %v, want ELF64 x86-64", f.Class, f.Machine)
	}
	var entry uint64
	var sawLoad bool
	for _, p := range f.Progs {
		switch p.Type {
		case elf.PT_LOAD:
			if p.Paddr == LoadAddr {
				sawLoad = true
			}
			if p.Paddr < LoadAddr {
				t.Errorf("PT_LOAD at %#x, below 1 MiB", p.Paddr)
			}
		case elf.PT_NOTE:
			data := make([]byte, p.Filesz)
			if _, err := p.ReadAt(data, 0); err != nil {
				t.Fatal(err)
			}
			for len(data) >= 12 {
				namesz := binary.LittleEndian.Uint32(data[0:])
				descsz := binary.LittleEndian.Uint32(data[4:])
				typ := binary.LittleEndian.Uint32(data[8:])
				off := 12 + (int(namesz)+3)&^3
				end := off + (int(descsz)+3)&^3
				if end > len(data) {
					t.Fatalf("truncated note")
				}
				name := string(bytes.TrimRight(data[12:12+namesz], "\x00"))
				if name == "Xen" && typ == 18 {
					desc := data[off : off+int(descsz)]
					if len(desc) >= 8 {
						entry = binary.LittleEndian.Uint64(desc)
					} else {
						entry = uint64(binary.LittleEndian.Uint32(desc))
					}
				}
				data = data[end:]
			}
		}
	}
	if !sawLoad {
		t.Errorf("no PT_LOAD at %#x", LoadAddr)
	}
	if entry == 0 {
		t.Fatal("no Xen XEN_ELFNOTE_PHYS32_ENTRY note")
	}
	if entry != f.Entry || entry >= 1<<32 {
		t.Errorf("PVH entry %#x, ELF entry %#x", entry, f.Entry)
	}
	syms, err := f.Symbols()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, s := range syms {
		if s.Name == "heartbeat" {
			found = true
			if s.Value != HeartbeatAddr {
				t.Errorf("heartbeat at %#x, want %#x", s.Value, HeartbeatAddr)
			}
		}
	}
	if !found {
		t.Error("no heartbeat symbol")
	}
}

type qemuRun struct {
	out     string
	status  int // QEMU's exit status: (guest code << 1) | 1 via isa-debug-exit
	elapsed time.Duration
}

func requireQEMU(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath(qemuBin)
	if err != nil {
		need(t, "%s not installed (apt-get install qemu-system-x86)", qemuBin)
	}
	kvm, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		need(t, "/dev/kvm not usable: %v", err)
	}
	kvm.Close()
	return bin
}

func qemuArgs(elfPath, machine, cmdline string, smp int) []string {
	args := []string{"-enable-kvm", "-M", machine, "-cpu", "host", "-m", "128",
		"-nographic", "-no-reboot", "-kernel", elfPath, "-append", cmdline,
		"-device", "isa-debug-exit,iobase=0xf4,iosize=4"}
	if smp > 1 {
		args = append(args, "-smp", strconv.Itoa(smp))
	}
	return args
}

func runQEMU(t *testing.T, machine, cmdline string, smp int, timeout time.Duration) qemuRun {
	t.Helper()
	bin := requireQEMU(t)
	path := buildGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, qemuArgs(path, machine, cmdline, smp)...)
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.WaitDelay = 2 * time.Second
	start := time.Now()
	err := cmd.Run()
	r := qemuRun{out: strings.ReplaceAll(out.String(), "\r", ""), elapsed: time.Since(start)}
	if ctx.Err() != nil {
		t.Fatalf("QEMU (%s, %q) timed out after %v; output:\n%s", machine, cmdline, timeout, r.out)
	}
	var ee *exec.ExitError
	switch {
	case err == nil:
		r.status = 0
	case errors.As(err, &ee):
		r.status = ee.ExitCode()
	default:
		t.Fatalf("QEMU: %v\n%s", err, r.out)
	}
	t.Logf("QEMU %s %q: status %d in %v", machine, cmdline, r.status, r.elapsed)
	return r
}

func expect(t *testing.T, r qemuRun, code int, lines ...string) {
	t.Helper()
	if want := code<<1 | 1; r.status != want {
		t.Errorf("exit status %d, want %d (guest code %d)", r.status, want, code)
	}
	for _, l := range lines {
		if !strings.Contains(r.out, l) {
			t.Errorf("output lacks %q", l)
		}
	}
	if t.Failed() {
		t.Logf("output:\n%s", r.out)
	}
}

func TestHelloMicrovm(t *testing.T) {
	r := runQEMU(t, "microvm", "hello", 1, 30*time.Second)
	expect(t, r, 0, "collective-guest: hello")
}

func TestHelloPC(t *testing.T) {
	if testing.Short() {
		t.Skip("-M pc runs its firmware emulated (seconds under kvm-pvm)")
	}
	r := runQEMU(t, "pc", "hello", 1, 90*time.Second)
	expect(t, r, 0, "collective-guest: hello")
}

func TestUnknownMode(t *testing.T) {
	r := runQEMU(t, "microvm", "frobnicate", 1, 30*time.Second)
	expect(t, r, 2, "unknown mode frobnicate")
}

var exitsRE = regexp.MustCompile(`exits: 1000 (port|mmio) writes in \d+ ns, (\d+) ns/exit`)

func TestExits(t *testing.T) {
	for _, kind := range []string{"port", "mmio"} {
		t.Run(kind, func(t *testing.T) {
			r := runQEMU(t, "microvm", "exits 1000 "+kind, 1, 60*time.Second)
			expect(t, r, 0, "exits: 1000 "+kind+" writes in ")
			if m := exitsRE.FindStringSubmatch(r.out); m != nil {
				t.Logf("QEMU microvm: %s ns per %s exit", m[2], kind)
			} else {
				t.Errorf("no exits line in:\n%s", r.out)
			}
		})
	}
}

func TestFault(t *testing.T) {
	r := runQEMU(t, "microvm", "fault", 1, 30*time.Second)
	expect(t, r, 3, "EXCEPTION vector 0x000000000000000e", "cr2 0x0000000100000000")
}

func TestDirtyTooBig(t *testing.T) {
	r := runQEMU(t, "microvm", "dirty 512M 0 1", 1, 30*time.Second)
	expect(t, r, 2, "dirty: area does not fit")
}

func TestSMP(t *testing.T) {
	r := runQEMU(t, "microvm", "smp 2", 2, 30*time.Second)
	expect(t, r, 0, "smp: 2 cpus up")
}

func TestDirty(t *testing.T) {
	r := runQEMU(t, "microvm", "dirty 16M 0 2", 1, 60*time.Second)
	expect(t, r, 0, "dirty: pass 1 verified", "dirty: final verified after 2 s")
	if strings.Contains(r.out, "MISMATCH") {
		t.Errorf("mismatch reported:\n%s", r.out)
	}
}

func TestDirtyRate(t *testing.T) {
	r := runQEMU(t, "microvm", "dirty 4M 50 1", 1, 60*time.Second)
	expect(t, r, 0, "dirty: pass 1 verified", "dirty: final verified after 1 s")
	m := regexp.MustCompile(`final verified .* (\d+) MB/s overall`).FindStringSubmatch(r.out)
	if m == nil {
		t.Fatalf("no rate in:\n%s", r.out)
	}
	if rate, _ := strconv.Atoi(m[1]); rate < 25 || rate > 75 {
		t.Errorf("overall rate %d MB/s, want about 50", rate)
	}
}

// TestSpin checks that spin prints its line and keeps running.
func TestSpin(t *testing.T) {
	bin := requireQEMU(t)
	path := buildGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, qemuArgs(path, "microvm", "spin", 1)...)
	cmd.WaitDelay = 2 * time.Second
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "spin: looping at CPL3") {
				done <- nil
				return
			}
		}
		done <- errors.New("output ended without the spin line")
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-ctx.Done():
		t.Fatal("timed out waiting for the spin line")
	}
	// Still running half a second later?
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		t.Fatalf("spin guest exited: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	cmd.Process.Kill()
	<-exited
}

// blkPattern is word w of sector s in the blk verify mode (pat() in
// src/virtio_blk.c); machine/blk_guest_test.go has the same function.
func blkPattern(seed, s, w uint64) uint64 {
	z := (seed ^ 0x5851f42d4c957f2d) + (s*64+w+1)*0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// TestBlkVerifyQEMU proves the guest's virtio-blk driver against a second
// implementation: QEMU's virtio-blk-pci (modern only) under -M pc, whose
// SeaBIOS assigns the BARs. The host then checks the file.
func TestBlkVerifyQEMU(t *testing.T) {
	if testing.Short() {
		t.Skip("-M pc runs its firmware emulated (seconds under kvm-pvm)")
	}
	bin := requireQEMU(t)
	path := buildGuest(t)
	const size = 16 << 20
	junk := make([]byte, size)
	for i := range junk {
		junk[i] = byte(i*7 + i>>9)
	}
	disk := t.TempDir() + "/disk.img"
	if err := os.WriteFile(disk, junk, 0o644); err != nil {
		t.Fatal(err)
	}
	const sectors, seed = size/512 - 33, 12345
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, "-enable-kvm", "-M", "pc", "-cpu", "host", "-m", "128",
		"-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
		"-device", "isa-debug-exit,iobase=0xf4,iosize=4",
		"-kernel", path, "-append", fmt.Sprintf("blk verify %d %d", sectors, seed),
		"-drive", "file="+disk+",if=none,id=d0,format=raw,cache=writeback",
		"-device", "virtio-blk-pci,drive=d0,disable-legacy=on,serial=qemu-blk-test")
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 2 * time.Second
	err := cmd.Run()
	r := qemuRun{out: strings.ReplaceAll(out.String(), "\r", "")}
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		t.Fatalf("QEMU timed out; output:\n%s", r.out)
	case errors.As(err, &ee):
		r.status = ee.ExitCode()
	case err != nil:
		t.Fatalf("QEMU: %v\n%s", err, r.out)
	}
	t.Logf("output:\n%s", r.out)
	expect(t, r, 0, `blk: virtio-blk 0x1042`, `blk: serial "qemu-blk-test"`, "blk: flushed",
		"blk: read past the end: status IOERR (as expected)",
		"blk: unknown request type: status UNSUPP (as expected)",
		fmt.Sprintf("blk: verified %d sectors", sectors))
	got, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	for s := uint64(0); s < sectors; s++ {
		for w := uint64(0); w < 64; w++ {
			if v, e := binary.LittleEndian.Uint64(got[s*512+w*8:]), blkPattern(seed, s, w); v != e {
				t.Fatalf("sector %d word %d: %#x, want %#x", s, w, v, e)
			}
		}
	}
	if tail := sectors * 512; !bytes.Equal(got[tail:], junk[tail:]) {
		t.Errorf("the guest changed sectors at or beyond %d", sectors)
	}
}
