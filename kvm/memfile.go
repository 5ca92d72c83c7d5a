package kvm

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// MapFile replaces the anonymous backing of memory slot slotID with a
// private (copy-on-write) mapping of f at offset off, so that guest RAM
// reads come from the file, lazily, as the guest touches pages, and guest
// writes stay in this process. It is the fast path of a snapshot restore:
// nothing is read before the guest runs.
//
// The mapping is placed at the slot's host address (MAP_FIXED), so the
// memory slot, guestmem's regions and every slice of guest RAM stay valid;
// KVM follows the change through its MMU notifier. Call it before the
// vCPUs first run. Off must be page aligned and the file must hold the
// slot's whole size from off (holes read as zeros).
//
// Preconditions: no vCPU is running; nothing holds a copy of the old
// contents of the slot that it expects to stay.
func (vm *VM) MapFile(slotID int, f *os.File, off int64) error {
	if slotID < 0 || slotID >= len(vm.slots) {
		return fmt.Errorf("kvm: no memory slot %d", slotID)
	}
	if off < 0 || off%int64(os.Getpagesize()) != 0 {
		return fmt.Errorf("kvm: map file at offset %d: not page aligned", off)
	}
	s := &vm.slots[slotID]
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("kvm: map file: %w", err)
	}
	if st.Size() < off+int64(len(s.host)) {
		return fmt.Errorf("kvm: map file %s: %d bytes, slot %d needs %d from offset %d", f.Name(), st.Size(), slotID, len(s.host), off)
	}
	addr := uintptr(unsafe.Pointer(&s.host[0]))
	r, _, errno := unix.Syscall6(unix.SYS_MMAP, addr, uintptr(len(s.host)),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_FIXED|unix.MAP_NORESERVE,
		f.Fd(), uintptr(off))
	if errno != 0 {
		return fmt.Errorf("kvm: mmap %s over slot %d: %w", f.Name(), slotID, errno)
	}
	if r != addr {
		return fmt.Errorf("kvm: mmap %s over slot %d: placed at %#x, want %#x", f.Name(), slotID, r, addr)
	}
	return nil
}
