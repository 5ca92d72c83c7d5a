// Package guest builds Collective's workload guest: a tiny freestanding PVH
// ELF (C and GNU assembly, built with the system gcc) that sets up long mode
// at CPL0 and then does all its work at CPL3, where kvm-pvm runs it at native
// speed. Tests and benchmarks in other packages boot it, under our VMM or
// under QEMU, and read its serial output and exit code.
//
// The guest's modes (hello, spin, dirty, exits, smp), ports and memory layout
// are described in README.md next to this file.
package guest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
)

// Guest-physical addresses and ports the guest uses; the VMM side must agree.
const (
	// LoadAddr is where the ELF is linked and loaded (1 MiB).
	LoadAddr = 0x100000
	// HeartbeatAddr is the guest-physical address of the heartbeat record
	// (see README.md): magic "CLVHBEAT", counter, TSC, pass, TSC kHz, mode.
	HeartbeatAddr = 0x106000
	// HeartbeatMagic is the first 8 bytes of the heartbeat record once the
	// guest runs: "CLVHBEAT" read as a little-endian uint64.
	HeartbeatMagic = 0x5441454248564c43
	// TrampolineAddr is where the smp mode copies its real-mode AP
	// trampoline (SIPI vector 0x08).
	TrampolineAddr = 0x8000
	// DirtyBase is where the dirty mode's generation array starts; the
	// dirtied pages follow it.
	DirtyBase = 0x1000000
	// SerialPort is the COM1 16550 base port.
	SerialPort = 0x3f8
	// ExitPort takes a 32-bit write of the exit code (isa-debug-exit compatible).
	ExitPort = 0xf4
	// ExitsPort is the port the exits mode writes to.
	ExitsPort = 0xf0
	// ExitsMMIO is the unbacked address the exits mode writes to in mmio mode.
	ExitsMMIO = 0xd0000000
)

var buildMu sync.Mutex

// Dir returns the absolute directory holding the guest's sources.
func Dir() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("guest: cannot locate the package source directory")
	}
	return filepath.Dir(file), nil
}

// Build runs make in the guest's source directory and returns the absolute
// path of build/guest.elf. It is safe to call from concurrent goroutines and
// from several test processes at once (an flock serialises the builds).
func Build() (string, error) {
	dir, err := Dir()
	if err != nil {
		return "", err
	}
	for _, tool := range []string{"make", "gcc"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "", fmt.Errorf("guest: building the workload guest needs %q in PATH (apt-get install build-essential): %w", tool, err)
		}
	}
	buildMu.Lock()
	defer buildMu.Unlock()

	bdir := filepath.Join(dir, "build")
	if err := os.MkdirAll(bdir, 0o755); err != nil {
		return "", fmt.Errorf("guest: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(bdir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("guest: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("guest: lock build directory: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)

	var out bytes.Buffer
	cmd := exec.Command("make", "-C", dir)
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("guest: make -C %s failed: %w\n%s", dir, err, out.String())
	}
	elf := filepath.Join(bdir, "guest.elf")
	if _, err := os.Stat(elf); err != nil {
		return "", fmt.Errorf("guest: make succeeded but %s is missing: %w", elf, err)
	}
	return elf, nil
}
