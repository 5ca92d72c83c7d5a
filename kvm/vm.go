package kvm

import (
	"errors"
	"fmt"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"collective/kvm/guestmem"
)

// Fixed addresses KVM needs on Intel hosts for real-mode emulation; they
// sit in the MMIO hole just below the BIOS area, out of guest RAM.
const (
	TSSAddr         = 0xfffbd000
	IdentityMapAddr = 0xfffbc000
)

// pitSpeakerDummy makes KVM emulate port 0x61 (the PC speaker port that
// exposes PIT channel 2's gate and output) in the kernel.
const pitSpeakerDummy = 1

// VM is a KVM virtual machine: its guest RAM, memory slots, in-kernel
// irqchip and PIT, and vCPUs.
type VM struct {
	sys *System
	fd  int
	mem *guestmem.Memory

	slots []slot // immutable after NewVM, except dirty-logging flags (mu)

	mu     sync.Mutex // guards vcpus, slots[i].flags, paused
	vcpus  []*VCPU
	paused bool

	throttle throttler // SetThrottle; its mu is taken before mu
}

type slot struct {
	id    uint32
	gpa   uint64
	host  []byte
	flags uint32
}

// NewVM creates a VM with guest RAM at the given ranges, the TSS and
// identity-map addresses set, the in-kernel irqchip (PIC, IOAPIC, LAPICs)
// and PIT. RAM is anonymous memory, with transparent huge pages requested.
func (s *System) NewVM(ram []guestmem.Range) (*VM, error) {
	fd, err := ioctl(s.fd, kvmCreateVM, 0)
	if err != nil {
		return nil, fmt.Errorf("kvm: KVM_CREATE_VM: %w", err)
	}
	vm := &VM{sys: s, fd: int(fd)}
	if err := vm.setup(ram); err != nil {
		vm.Close()
		return nil, err
	}
	return vm, nil
}

func (vm *VM) setup(ram []guestmem.Range) error {
	// Memory slots go first: registering a slot once the in-kernel
	// irqchip exists costs milliseconds more (measured: 0.2 ms before,
	// 6-7 ms after, for 128 MiB), which is most of a cold start.
	var regions []guestmem.Region
	for i, r := range ram {
		host, err := mmapRAM(r.Size)
		if err != nil {
			return fmt.Errorf("kvm: mmap %d MiB of guest RAM: %w", r.Size>>20, err)
		}
		// Transparent huge pages where the host has them; failure is fine.
		_ = unix.Madvise(host, unix.MADV_HUGEPAGE)
		s := slot{id: uint32(i), gpa: r.GPA, host: host}
		vm.slots = append(vm.slots, s)
		if err := vm.setSlot(&vm.slots[len(vm.slots)-1]); err != nil {
			return err
		}
		regions = append(regions, guestmem.Region{GPA: r.GPA, Host: host})
	}
	mem, err := guestmem.New(regions...)
	if err != nil {
		return err
	}
	vm.mem = mem
	if _, err := ioctl(vm.fd, kvmSetTSSAddr, TSSAddr); err != nil {
		return fmt.Errorf("kvm: KVM_SET_TSS_ADDR: %w", err)
	}
	addr := uint64(IdentityMapAddr)
	if err := ioctlPtr(vm.fd, kvmSetIdentityMapAddr, unsafe.Pointer(&addr)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_IDENTITY_MAP_ADDR: %w", err)
	}
	if _, err := ioctl(vm.fd, kvmCreateIRQChip, 0); err != nil {
		return fmt.Errorf("kvm: KVM_CREATE_IRQCHIP: %w", err)
	}
	pit := pitConfig{Flags: pitSpeakerDummy}
	if err := ioctlPtr(vm.fd, kvmCreatePIT2, unsafe.Pointer(&pit)); err != nil {
		return fmt.Errorf("kvm: KVM_CREATE_PIT2: %w", err)
	}
	return nil
}

func (vm *VM) setSlot(s *slot) error {
	r := userspaceMemoryRegion{
		Slot:          s.id,
		Flags:         s.flags,
		GuestPhysAddr: s.gpa,
		MemorySize:    uint64(len(s.host)),
		UserspaceAddr: uint64(uintptr(unsafe.Pointer(&s.host[0]))),
	}
	if err := ioctlPtr(vm.fd, kvmSetUserMemoryRegion, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_USER_MEMORY_REGION slot %d at %#x: %w", s.id, s.gpa, err)
	}
	return nil
}

// Memory returns the VM's guest RAM.
func (vm *VM) Memory() *guestmem.Memory { return vm.mem }

// System returns the /dev/kvm handle the VM was made from.
func (vm *VM) System() *System { return vm.sys }

// NumSlots returns the number of memory slots; slot i backs
// Memory().Regions()[i].
func (vm *VM) NumSlots() int { return len(vm.slots) }

// SetDirtyLogging turns KVM's dirty-page logging of a memory slot on or off.
func (vm *VM) SetDirtyLogging(slotID int, on bool) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if slotID < 0 || slotID >= len(vm.slots) {
		return fmt.Errorf("kvm: no memory slot %d", slotID)
	}
	s := &vm.slots[slotID]
	if on {
		s.flags |= memLogDirtyPages
	} else {
		s.flags &^= memLogDirtyPages
	}
	return vm.setSlot(s)
}

// DirtyLog returns and clears KVM's log of the pages vCPUs wrote in a slot
// since the previous call (KVM_GET_DIRTY_LOG): one bit per 4 KiB page.
// Merge it with the VMM's own log (guestmem.Region.TakeDirty).
func (vm *VM) DirtyLog(slotID int) ([]uint64, error) {
	if slotID < 0 || slotID >= len(vm.slots) {
		return nil, fmt.Errorf("kvm: no memory slot %d", slotID)
	}
	s := &vm.slots[slotID]
	pages := len(s.host) / guestmem.PageSize
	bm := make([]uint64, (pages+63)/64)
	dl := dirtyLog{Slot: s.id, Bitmap: uint64(uintptr(unsafe.Pointer(&bm[0])))}
	if err := ioctlPtr(vm.fd, kvmGetDirtyLog, unsafe.Pointer(&dl)); err != nil {
		return nil, fmt.Errorf("kvm: KVM_GET_DIRTY_LOG slot %d: %w", s.id, err)
	}
	return bm, nil
}

// IRQLine is an input of the in-kernel interrupt controllers (PIC and
// IOAPIC pins share GSI numbers 0-15; the IOAPIC has 24 pins).
type IRQLine struct {
	vm  *VM
	gsi uint32
}

// IRQLine returns the interrupt input gsi.
func (vm *VM) IRQLine(gsi uint32) *IRQLine { return &IRQLine{vm, gsi} }

// SetLevel drives the line (KVM_IRQ_LINE). It implements devices.IRQLine.
func (l *IRQLine) SetLevel(high bool) {
	lv := irqLevel{IRQ: l.gsi}
	if high {
		lv.Level = 1
	}
	// KVM_IRQ_LINE fails only for a bad GSI, which is our bug, not the
	// guest's: there is no one to return the error to.
	if err := ioctlPtr(l.vm.fd, kvmIRQLine, unsafe.Pointer(&lv)); err != nil {
		panic(fmt.Sprintf("kvm: KVM_IRQ_LINE gsi %d: %v", l.gsi, err))
	}
}

// IRQChip returns the state of an in-kernel interrupt controller.
func (vm *VM) IRQChip(id uint32) (IRQChip, error) {
	c := IRQChip{ChipID: id}
	err := ioctlPtr(vm.fd, kvmGetIRQChip, unsafe.Pointer(&c))
	if err != nil {
		err = fmt.Errorf("kvm: KVM_GET_IRQCHIP %d: %w", id, err)
	}
	return c, err
}

// SetIRQChip restores the state of an in-kernel interrupt controller.
func (vm *VM) SetIRQChip(c IRQChip) error {
	if err := ioctlPtr(vm.fd, kvmSetIRQChip, unsafe.Pointer(&c)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_IRQCHIP %d: %w", c.ChipID, err)
	}
	return nil
}

// VCPUs returns the VM's vCPUs in creation order.
func (vm *VM) VCPUs() []*VCPU {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return append([]*VCPU(nil), vm.vcpus...)
}

// Pause stops every vCPU outside KVM_RUN and returns when all of them are
// parked. A paused VM's vCPU state can be read and written.
func (vm *VM) Pause() {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.paused {
		return
	}
	vm.paused = true
	for _, v := range vm.vcpus {
		v.pause.Store(true)
		v.kick()
		v.wakeUp()
	}
	for _, v := range vm.vcpus {
		v.Do(func() error { return nil }) // served only once parked or idle
	}
}

// Resume lets paused vCPUs run again.
func (vm *VM) Resume() {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if !vm.paused {
		return
	}
	vm.paused = false
	for _, v := range vm.vcpus {
		v.pause.Store(false)
		select {
		case v.resume <- struct{}{}:
		default:
		}
	}
}

// Paused reports whether the VM is paused.
func (vm *VM) Paused() bool {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.paused
}

// Stop makes every vCPU's Run return ErrStopped as soon as it leaves
// KVM_RUN (paused vCPUs return at once).
func (vm *VM) Stop() {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	for _, v := range vm.vcpus {
		v.stop.Store(true)
		v.kick()
		v.wakeUp()
		select {
		case v.resume <- struct{}{}:
		default:
		}
	}
}

// Close stops the vCPUs, closes their file descriptors and the VM's, and
// unmaps guest RAM. The VM must not be used afterwards.
func (vm *VM) Close() error {
	vm.SetThrottle(0)
	vm.Stop()
	var errs []error
	for _, v := range vm.VCPUs() {
		errs = append(errs, v.close())
	}
	errs = append(errs, unix.Close(vm.fd))
	for _, s := range vm.slots {
		errs = append(errs, munmapRAM(s.host))
	}
	vm.slots = nil
	return errors.Join(errs...)
}

// hugeAlign is the alignment of guest RAM in the VMM's address space.
const hugeAlign = 2 << 20

// mmapRAM maps n bytes of anonymous memory at a 2 MiB-aligned address. KVM
// maps guest memory with 2 MiB pages only where the host address and the
// guest address agree modulo 2 MiB, and transparent huge pages need an
// aligned range; mmap alone gives 4 KiB alignment (a Linux 6.1 L1 in the
// nested world then backed all of L2 with 4 KiB pages).
func mmapRAM(n uint64) ([]byte, error) {
	if n == 0 || n > 1<<47 {
		return nil, fmt.Errorf("%d bytes: %w", n, unix.EINVAL)
	}
	span := uintptr(n) + hugeAlign
	p, err := unix.MmapPtr(-1, 0, nil, span, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, err
	}
	// Give back the unaligned head and the tail beyond n.
	head := (hugeAlign - uintptr(p)%hugeAlign) % hugeAlign
	start := unsafe.Add(p, head)
	if head > 0 {
		unix.MunmapPtr(p, head)
	}
	if tail := span - head - uintptr(n); tail > 0 {
		unix.MunmapPtr(unsafe.Add(start, n), tail)
	}
	return unsafe.Slice((*byte)(start), n), nil
}

// munmapRAM unmaps memory from mmapRAM.
func munmapRAM(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	return unix.MunmapPtr(unsafe.Pointer(&b[0]), uintptr(len(b)))
}
