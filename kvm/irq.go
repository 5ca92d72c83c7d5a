package kvm

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"structs"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Interrupt plumbing for devices that bypass the vCPU loop: irqfds (an
// eventfd write raises a GSI), ioeventfds (a guest write to an address
// signals an eventfd instead of exiting to userspace), GSI routing (which
// GSIs reach the irqchips and which are MSI messages), and KVM_SIGNAL_MSI.
// See Documentation/virt/kvm/api.rst, sections KVM_IRQFD, KVM_IOEVENTFD,
// KVM_SET_GSI_ROUTING and KVM_SIGNAL_MSI.

// Capabilities for this file (include/uapi/linux/kvm.h).
const (
	CapSignalMSI Cap = 77
)

// Request numbers.
var (
	kvmSetGSIRouting = iow(0x6a, 8) // struct kvm_irq_routing, header only
	kvmIRQFD         = iowT[irqfd](0x76)
	kvmIOEventFD     = iowT[ioeventfd](0x79)
	kvmSignalMSI     = iowT[kvmMSI](0xa5)
)

type irqfd struct {
	_          structs.HostLayout
	FD         uint32
	GSI        uint32
	Flags      uint32
	ResampleFD uint32
	_          [16]uint8
}

const irqfdDeassign = 1 << 0

type ioeventfd struct {
	_         structs.HostLayout
	DataMatch uint64
	Addr      uint64
	Len       uint32
	FD        int32
	Flags     uint32
	_         [36]uint8
}

const (
	ioeventfdDataMatch = 1 << 0
	ioeventfdPIO       = 1 << 1
	ioeventfdDeassign  = 1 << 2
)

type kvmMSI struct {
	_         structs.HostLayout
	AddressLo uint32
	AddressHi uint32
	Data      uint32
	Flags     uint32
	DevID     uint32
	_         [12]uint8
}

type irqRoutingHeader struct {
	_     structs.HostLayout
	NR    uint32
	Flags uint32
}

// irqRoutingEntry is struct kvm_irq_routing_entry; U is the union (irqchip:
// chip, pin; msi: address_lo, address_hi, data, devid).
type irqRoutingEntry struct {
	_     structs.HostLayout
	GSI   uint32
	Type  uint32
	Flags uint32
	_     uint32
	U     [8]uint32
}

// Route types (KVM_IRQ_ROUTING_*).
const (
	RouteIRQChip = 1
	RouteMSI     = 2
)

// Irqchip geometry of the in-kernel PIC pair and IOAPIC.
const (
	NumPICPins    = 16
	NumIOAPICPins = 24
	// MaxGSIRoutes is KVM_MAX_IRQ_ROUTES.
	MaxGSIRoutes = 4096
)

// GSIRoute is one entry of the GSI routing table: a GSI delivered either to
// an irqchip pin (Type RouteIRQChip, Chip one of IRQChipPICMaster,
// IRQChipPICSlave, IRQChipIOAPIC) or as an MSI message (Type RouteMSI).
type GSIRoute struct {
	GSI     uint32
	Type    uint32
	Chip    uint32
	Pin     uint32
	MSIAddr uint64
	MSIData uint32
}

// MSIRoute returns a route that delivers gsi as the MSI message (addr, data).
func MSIRoute(gsi uint32, addr uint64, data uint32) GSIRoute {
	return GSIRoute{GSI: gsi, Type: RouteMSI, MSIAddr: addr, MSIData: data}
}

// DefaultGSIRoutes returns the routing KVM sets up with the irqchip: GSIs
// 0-15 to the PIC pair (master pins 0-7, slave pins 0-7) and GSIs 0-23 to
// IOAPIC pins 0-23. KVM_SET_GSI_ROUTING replaces the whole table, so every
// table the VMM sets must start with these.
func DefaultGSIRoutes() []GSIRoute {
	r := make([]GSIRoute, 0, NumPICPins+NumIOAPICPins)
	for i := uint32(0); i < NumIOAPICPins; i++ {
		if i < NumPICPins {
			chip, pin := uint32(IRQChipPICMaster), i
			if i >= 8 {
				chip, pin = IRQChipPICSlave, i-8
			}
			r = append(r, GSIRoute{GSI: i, Type: RouteIRQChip, Chip: chip, Pin: pin})
		}
		r = append(r, GSIRoute{GSI: i, Type: RouteIRQChip, Chip: IRQChipIOAPIC, Pin: i})
	}
	return r
}

// SetGSIRouting replaces the VM's GSI routing table (KVM_SET_GSI_ROUTING).
func (vm *VM) SetGSIRouting(routes []GSIRoute) error {
	if len(routes) > MaxGSIRoutes {
		return fmt.Errorf("kvm: KVM_SET_GSI_ROUTING: %d routes, at most %d", len(routes), MaxGSIRoutes)
	}
	hdr := unsafe.Sizeof(irqRoutingHeader{})
	esz := unsafe.Sizeof(irqRoutingEntry{})
	buf := make([]uint64, (hdr+esz*uintptr(len(routes)))/8)
	base := unsafe.Pointer(&buf[0])
	*(*irqRoutingHeader)(base) = irqRoutingHeader{NR: uint32(len(routes))}
	for i, r := range routes {
		e := irqRoutingEntry{GSI: r.GSI, Type: r.Type}
		switch r.Type {
		case RouteIRQChip:
			e.U[0], e.U[1] = r.Chip, r.Pin
		case RouteMSI:
			e.U[0], e.U[1], e.U[2] = uint32(r.MSIAddr), uint32(r.MSIAddr>>32), r.MSIData
		default:
			return fmt.Errorf("kvm: KVM_SET_GSI_ROUTING: GSI %d: unknown route type %d", r.GSI, r.Type)
		}
		*(*irqRoutingEntry)(unsafe.Add(base, hdr+esz*uintptr(i))) = e
	}
	if err := ioctlPtr(vm.fd, kvmSetGSIRouting, base); err != nil {
		return fmt.Errorf("kvm: KVM_SET_GSI_ROUTING (%d routes): %w", len(routes), err)
	}
	return nil
}

// IRQFD makes a write to the eventfd fd raise gsi (KVM_IRQFD): an edge for
// an MSI route, a pulse for an irqchip pin.
func (vm *VM) IRQFD(fd int, gsi uint32) error {
	f := irqfd{FD: uint32(fd), GSI: gsi}
	if err := ioctlPtr(vm.fd, kvmIRQFD, unsafe.Pointer(&f)); err != nil {
		return fmt.Errorf("kvm: KVM_IRQFD fd %d gsi %d: %w", fd, gsi, err)
	}
	return nil
}

// RemoveIRQFD undoes IRQFD(fd, gsi).
func (vm *VM) RemoveIRQFD(fd int, gsi uint32) error {
	f := irqfd{FD: uint32(fd), GSI: gsi, Flags: irqfdDeassign}
	if err := ioctlPtr(vm.fd, kvmIRQFD, unsafe.Pointer(&f)); err != nil {
		return fmt.Errorf("kvm: KVM_IRQFD deassign fd %d gsi %d: %w", fd, gsi, err)
	}
	return nil
}

// IOEventFD makes a guest write of length bytes (1, 2, 4 or 8; 0 for any
// length where KVM has KVM_CAP_IOEVENTFD_ANY_LENGTH) at addr (a port if pio)
// signal the eventfd fd instead of exiting to userspace (KVM_IOEVENTFD).
// With a datamatch value, only writes of that value do.
func (vm *VM) IOEventFD(addr uint64, length uint32, fd int, pio bool, datamatch ...uint64) error {
	return vm.ioeventfd(addr, length, fd, pio, 0, datamatch)
}

// RemoveIOEventFD undoes IOEventFD with the same arguments.
func (vm *VM) RemoveIOEventFD(addr uint64, length uint32, fd int, pio bool, datamatch ...uint64) error {
	return vm.ioeventfd(addr, length, fd, pio, ioeventfdDeassign, datamatch)
}

func (vm *VM) ioeventfd(addr uint64, length uint32, fd int, pio bool, flags uint32, datamatch []uint64) error {
	e := ioeventfd{Addr: addr, Len: length, FD: int32(fd), Flags: flags}
	if pio {
		e.Flags |= ioeventfdPIO
	}
	switch len(datamatch) {
	case 0:
	case 1:
		e.Flags |= ioeventfdDataMatch
		e.DataMatch = datamatch[0]
	default:
		return errors.New("kvm: KVM_IOEVENTFD: at most one datamatch value")
	}
	if err := ioctlPtr(vm.fd, kvmIOEventFD, unsafe.Pointer(&e)); err != nil {
		return fmt.Errorf("kvm: KVM_IOEVENTFD addr %#x len %d fd %d flags %#x: %w", addr, length, fd, e.Flags, err)
	}
	return nil
}

// SignalMSI injects the MSI message (addr, data) (KVM_SIGNAL_MSI). A
// message the guest's interrupt controller blocks is not an error. It
// implements pci.MSIXSink.
func (vm *VM) SignalMSI(addr uint64, data uint32) error {
	m := kvmMSI{AddressLo: uint32(addr), AddressHi: uint32(addr >> 32), Data: data}
	if err := ioctlPtr(vm.fd, kvmSignalMSI, unsafe.Pointer(&m)); err != nil {
		return fmt.Errorf("kvm: KVM_SIGNAL_MSI addr %#x data %#x: %w", addr, data, err)
	}
	return nil
}

// EventFD is a Linux eventfd for irqfds and ioeventfds. Wait parks the
// calling goroutine in Go's poller, not an OS thread.
type EventFD struct {
	fd   int      // immutable; never obtained through f.Fd(), which would make it blocking
	file *os.File // owns fd
}

// NewEventFD returns a non-blocking, close-on-exec eventfd.
func NewEventFD() (*EventFD, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("kvm: eventfd: %w", err)
	}
	return &EventFD{fd: fd, file: os.NewFile(uintptr(fd), "eventfd")}, nil
}

// FD returns the descriptor, for IRQFD and IOEventFD. It stays owned by e.
func (e *EventFD) FD() int { return e.fd }

// Signal adds 1 to the counter, waking a waiter (or KVM's irqfd).
func (e *EventFD) Signal() error {
	var b [8]byte
	*(*uint64)(unsafe.Pointer(&b[0])) = 1
	_, err := e.file.Write(b[:])
	return err
}

// Wait blocks until the counter is nonzero, then returns and clears it. It
// returns an error wrapping os.ErrClosed once Close was called.
func (e *EventFD) Wait() (uint64, error) {
	var b [8]byte
	if _, err := e.file.Read(b[:]); err != nil {
		return 0, err
	}
	return *(*uint64)(unsafe.Pointer(&b[0])), nil
}

// Close closes the eventfd; a goroutine in Wait returns.
func (e *EventFD) Close() error { return e.file.Close() }

// GSIRouter keeps a VM's GSI routing table: the default irqchip routes plus
// MSI routes on GSIs it hands out from NumIOAPICPins up, and sets the whole
// table on KVM after each change. It is safe for concurrent use.
type GSIRouter struct {
	vm *VM

	mu   sync.Mutex
	msi  map[uint32]GSIRoute // +checklocks:mu
	free []uint32            // +checklocks:mu; released GSIs
	next uint32              // +checklocks:mu
}

// NewGSIRouter returns a router for vm. It changes nothing until used.
func NewGSIRouter(vm *VM) *GSIRouter {
	return &GSIRouter{vm: vm, msi: make(map[uint32]GSIRoute), next: NumIOAPICPins}
}

// Alloc reserves a GSI for an MSI route.
func (r *GSIRouter) Alloc() (uint32, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if n := len(r.free); n > 0 {
		g := r.free[n-1]
		r.free = r.free[:n-1]
		return g, nil
	}
	if r.next >= MaxGSIRoutes-NumPICPins {
		return 0, errors.New("kvm: no free GSI")
	}
	r.next++
	return r.next - 1, nil
}

// SetMSI routes gsi (from Alloc) to the MSI message (addr, data).
func (r *GSIRouter) SetMSI(gsi uint32, addr uint64, data uint32) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if gsi < NumIOAPICPins {
		return fmt.Errorf("kvm: GSI %d belongs to the irqchip", gsi)
	}
	old, had := r.msi[gsi]
	nr := MSIRoute(gsi, addr, data)
	if had && old == nr {
		return nil
	}
	r.msi[gsi] = nr
	if err := r.apply(); err != nil {
		if had {
			r.msi[gsi] = old
		} else {
			delete(r.msi, gsi)
		}
		return err
	}
	return nil
}

// Release removes gsi's route and returns the GSI to the pool.
func (r *GSIRouter) Release(gsi uint32) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.msi[gsi]; !ok {
		return nil
	}
	delete(r.msi, gsi)
	r.free = append(r.free, gsi)
	return r.apply()
}

// +checklocks:r.mu
func (r *GSIRouter) apply() error {
	routes := DefaultGSIRoutes()
	start := len(routes)
	for _, m := range r.msi {
		routes = append(routes, m)
	}
	sort.Slice(routes[start:], func(i, j int) bool { return routes[start+i].GSI < routes[start+j].GSI })
	return r.vm.SetGSIRouting(routes)
}
