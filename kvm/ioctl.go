package kvm

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl request encoding (include/uapi/asm-generic/ioctl.h).
const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2

	kvmio = 0xAE
)

func ioc(dir, nr, size uintptr) uintptr {
	return dir<<30 | size<<16 | kvmio<<8 | nr
}

func io(nr uintptr) uintptr           { return ioc(iocNone, nr, 0) }
func ior(nr, size uintptr) uintptr    { return ioc(iocRead, nr, size) }
func iow(nr, size uintptr) uintptr    { return ioc(iocWrite, nr, size) }
func iowr(nr, size uintptr) uintptr   { return ioc(iocRead|iocWrite, nr, size) }
func sizeOf[T any]() uintptr          { var v T; return unsafe.Sizeof(v) }
func iorT[T any](nr uintptr) uintptr  { return ior(nr, sizeOf[T]()) }
func iowT[T any](nr uintptr) uintptr  { return iow(nr, sizeOf[T]()) }
func iowrT[T any](nr uintptr) uintptr { return iowr(nr, sizeOf[T]()) }

// Request numbers from Documentation/virt/kvm/api.rst and
// include/uapi/linux/kvm.h.
var (
	kvmGetAPIVersion       = io(0x00)
	kvmCreateVM            = io(0x01)
	kvmGetMSRIndexList     = iowr(0x02, 4)
	kvmCheckExtension      = io(0x03)
	kvmGetVCPUMmapSize     = io(0x04)
	kvmGetSupportedCPUID   = iowr(0x05, 8)
	kvmCreateVCPU          = io(0x41)
	kvmGetDirtyLog         = iowT[dirtyLog](0x42)
	kvmSetUserMemoryRegion = iowT[userspaceMemoryRegion](0x46)
	kvmSetTSSAddr          = io(0x47)
	kvmSetIdentityMapAddr  = iow(0x48, 8)
	kvmCreateIRQChip       = io(0x60)
	kvmIRQLine             = iowT[irqLevel](0x61)
	kvmGetIRQChip          = iowrT[IRQChip](0x62)
	kvmSetIRQChip          = iorT[IRQChip](0x63)
	kvmCreatePIT2          = iowT[pitConfig](0x77)
	kvmSetBootCPUID        = io(0x78)
	kvmRun                 = io(0x80)
	kvmGetRegs             = iorT[Regs](0x81)
	kvmSetRegs             = iowT[Regs](0x82)
	kvmGetSregs            = iorT[Sregs](0x83)
	kvmSetSregs            = iowT[Sregs](0x84)
	kvmGetMSRs             = iowr(0x88, 8)
	kvmSetMSRs             = iow(0x89, 8)
	kvmGetFPU              = iorT[FPU](0x8c)
	kvmSetFPU              = iowT[FPU](0x8d)
	kvmGetLAPIC            = iorT[LAPIC](0x8e)
	kvmSetLAPIC            = iowT[LAPIC](0x8f)
	kvmSetCPUID2           = iow(0x90, 8)
	kvmGetMPState          = iorT[MPState](0x98)
	kvmSetMPState          = iowT[MPState](0x99)
	kvmGetTSCKHz           = io(0xa3)
)

// ioctl issues a KVM ioctl other than KVM_RUN, retrying when a signal
// interrupts it: the Go runtime preempts long-running threads with SIGURG,
// and KVM returns EINTR (before doing anything) from calls that can wait,
// such as KVM_CREATE_VM (seen in CI).
func ioctl(fd int, req, arg uintptr) (uintptr, error) {
	for {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
		switch errno {
		case 0:
			return r, nil
		case unix.EINTR:
			continue
		}
		return r, errno
	}
}

// ioctlPtr is ioctl with a pointer argument; p must point to memory the Go
// garbage collector will not move while the call runs (any Go pointer
// passed directly as a syscall argument is kept alive and pinned).
// It retries on EINTR as ioctl does.
func ioctlPtr(fd int, req uintptr, p unsafe.Pointer) error {
	for {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(p))
		switch errno {
		case 0:
			return nil
		case unix.EINTR:
			continue
		}
		return errno
	}
}
