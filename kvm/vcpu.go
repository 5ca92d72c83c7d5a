package kvm

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ExitHandler receives the exits a vCPU cannot finish in the kernel. It is
// called on the vCPU's thread; several vCPUs call it concurrently.
type ExitHandler interface {
	// PortIn fills p with the value of an IN of len(p) bytes from port.
	PortIn(port uint16, p []byte)
	// PortOut handles an OUT of p to port.
	PortOut(port uint16, p []byte)
	// MMIORead fills p with the value of a read of len(p) bytes at addr.
	MMIORead(addr uint64, p []byte)
	// MMIOWrite handles a write of p at addr.
	MMIOWrite(addr uint64, p []byte)
}

// Errors that end a vCPU's Run. Callers branch on them with errors.Is.
var (
	// ErrStopped: VM.Stop was called.
	ErrStopped = errors.New("kvm: vCPU stopped")
	// ErrShutdown: the guest triple-faulted (KVM_EXIT_SHUTDOWN); on a PC
	// that resets the machine.
	ErrShutdown = errors.New("kvm: guest shutdown (triple fault)")
	// ErrGuestReset: the guest asked for a reset (KVM_SYSTEM_EVENT_RESET).
	ErrGuestReset = errors.New("kvm: guest reset")
	// ErrGuestPowerOff: the guest powered off (KVM_SYSTEM_EVENT_SHUTDOWN).
	ErrGuestPowerOff = errors.New("kvm: guest powered off")
	// ErrGuestCrash: the guest reported a crash (KVM_SYSTEM_EVENT_CRASH).
	ErrGuestCrash = errors.New("kvm: guest crashed")
)

// VCPU is one virtual CPU. One locked OS thread creates it and runs it;
// other goroutines reach it through Do. Its state ioctls (registers, MSRs,
// CPUID, the whole state) run on the caller's thread instead while the
// vCPU cannot enter KVM_RUN (parked, or outside Run): the stop phase of a
// migration then waits on no thread wakeup, which costs 50-100 µs here
// (api.rst allows a vCPU ioctl from another thread, at the cost of
// loading the vCPU on that CPU).
type VCPU struct {
	vm  *VM
	id  int
	fd  int
	run *run
	mem []byte // the mmapped kvm_run area

	tid    atomic.Int32 // OS thread id, for kicks
	pause  atomic.Bool  // park before the next KVM_RUN
	stop   atomic.Bool  // return from Run before the next KVM_RUN
	resume chan struct{}
	// sleepNS is a throttle sleep asked for (throttle.go); wake ends it.
	sleepNS atomic.Int64
	wake    chan struct{}
	reqs    chan request
	// busy is held while the vCPU may enter KVM_RUN (in Run, outside
	// park) and while any request or state ioctl runs: requests and state
	// ioctls never overlap each other or KVM_RUN (call).
	busy sync.Mutex
	// closed: the fd is closed (set under busy, by close).
	closed bool
	quit   chan struct{} // closed to end the thread
	done   chan struct{} // closed when the thread exits

	closeOnce sync.Once
	exits     [32]atomic.Uint64 // exits by reason, for benchmarks and reports
}

type request struct {
	f   func() error
	err chan error
}

// NewVCPU creates vCPU id (its APIC ID) on a new locked OS thread.
func (vm *VM) NewVCPU(id int) (*VCPU, error) {
	if max := vm.sys.MaxVCPUs(); id >= max {
		return nil, fmt.Errorf("kvm: vCPU %d: this KVM offers at most %d vCPUs (KVM_CAP_NR_VCPUS)", id, max)
	}
	v := &VCPU{vm: vm, id: id, resume: make(chan struct{}, 1), wake: make(chan struct{}, 1), reqs: make(chan request), quit: make(chan struct{}), done: make(chan struct{})}
	created := make(chan error)
	go v.thread(created)
	if err := <-created; err != nil {
		return nil, err
	}
	vm.mu.Lock()
	vm.vcpus = append(vm.vcpus, v)
	if vm.paused {
		v.pause.Store(true)
	}
	vm.mu.Unlock()
	return v, nil
}

// thread owns the vCPU's OS thread for its whole life.
func (v *VCPU) thread(created chan<- error) {
	runtime.LockOSThread()
	// The thread is never unlocked: it dies with the goroutine, so no
	// other goroutine inherits its signal state.
	defer close(v.done)
	v.tid.Store(int32(unix.Gettid()))
	fd, err := ioctl(v.vm.fd, kvmCreateVCPU, uintptr(v.id))
	if err != nil {
		created <- fmt.Errorf("kvm: KVM_CREATE_VCPU %d: %w", v.id, err)
		return
	}
	v.fd = int(fd)
	mem, err := unix.Mmap(v.fd, 0, v.vm.sys.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(v.fd)
		created <- fmt.Errorf("kvm: mmap kvm_run of vCPU %d: %w", v.id, err)
		return
	}
	v.mem = mem
	v.run = (*run)(unsafe.Pointer(&mem[0]))
	created <- nil
	for {
		select {
		case r := <-v.reqs:
			// Run's loop too: park lets go of busy while parked.
			v.busy.Lock()
			err := r.f()
			v.busy.Unlock()
			r.err <- err
		case <-v.quit:
			return
		}
	}
}

// ID returns the vCPU's index, which is also its APIC ID.
func (v *VCPU) ID() int { return v.id }

// Do runs f on the vCPU's thread and returns its error. While the vCPU is
// inside Run, f runs only once the vCPU is parked by VM.Pause. Never call
// Do from f or from an ExitHandler.
func (v *VCPU) Do(f func() error) error {
	r := request{f, make(chan error, 1)}
	select {
	case v.reqs <- r:
	case <-v.done:
		return fmt.Errorf("kvm: vCPU %d is closed", v.id)
	}
	return <-r.err
}

// call runs f, a state ioctl, on the calling thread when the vCPU can
// neither enter KVM_RUN nor run another request meanwhile; else on the
// vCPU's thread, as Do.
func (v *VCPU) call(f func() error) error {
	if v.busy.TryLock() {
		defer v.busy.Unlock()
		if v.closed {
			return fmt.Errorf("kvm: vCPU %d is closed", v.id)
		}
		return f()
	}
	return v.Do(f)
}

// kick makes a running KVM_RUN return (or the next one return at once).
func (v *VCPU) kick() {
	if v.run == nil {
		return
	}
	// immediate_exit is read by the kernel at KVM_RUN entry; the signal
	// interrupts a KVM_RUN already under way. SIGURG is handled and
	// otherwise ignored by the Go runtime.
	v.run.ImmediateExit = 1
	if tid := v.tid.Load(); tid != 0 {
		_ = unix.Tgkill(unix.Getpid(), int(tid), unix.SIGURG)
	}
}

// Run runs the vCPU until the VM is stopped, the guest shuts down, or an
// exit cannot be handled. Exits are dispatched to h. It never returns nil.
func (v *VCPU) Run(h ExitHandler) error {
	return v.Do(func() error { return v.loop(h) })
}

func (v *VCPU) loop(h ExitHandler) error {
	for {
		v.throttleSleep()
		if v.stop.Load() {
			return ErrStopped
		}
		if v.pause.Load() {
			v.run.ImmediateExit = 0
			if err := v.park(); err != nil {
				return err
			}
			continue
		}
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(v.fd), kvmRun, 0)
		if errno != 0 {
			if errno == unix.EINTR || errno == unix.EAGAIN {
				v.run.ImmediateExit = 0
				v.exits[exitIntr].Add(1)
				continue
			}
			return fmt.Errorf("kvm: vCPU %d: KVM_RUN: %w", v.id, errno)
		}
		reason := v.run.ExitReason
		if reason < uint32(len(v.exits)) {
			v.exits[reason].Add(1)
		}
		if err := v.exit(reason, h); err != nil {
			return err
		}
	}
}

// park serves requests until Resume or Stop. It holds busy only while it
// serves one: meanwhile state ioctls may run on their callers' threads.
func (v *VCPU) park() error {
	v.busy.Unlock()
	defer v.busy.Lock()
	for {
		select {
		case r := <-v.reqs:
			v.busy.Lock()
			err := r.f()
			v.busy.Unlock()
			r.err <- err
		case <-v.resume:
			return nil
		}
		if v.stop.Load() {
			return ErrStopped
		}
	}
}

func (v *VCPU) exit(reason uint32, h ExitHandler) error {
	switch reason {
	case exitIO:
		e := (*ioExit)(unsafe.Pointer(&v.run.Exit[0]))
		size, count := uintptr(e.Size), uintptr(e.Count)
		off := uintptr(e.DataOffset)
		if size == 0 || size > 8 || off+size*count > uintptr(len(v.mem)) {
			return fmt.Errorf("kvm: vCPU %d: malformed I/O exit (size %d count %d offset %d)", v.id, size, count, off)
		}
		for i := uintptr(0); i < count; i++ {
			p := v.mem[off+i*size : off+(i+1)*size]
			if e.Direction == 0 {
				h.PortIn(e.Port, p)
			} else {
				h.PortOut(e.Port, p)
			}
		}
		return nil
	case exitMMIO:
		e := (*mmioExit)(unsafe.Pointer(&v.run.Exit[0]))
		n := e.Len
		if n == 0 || n > 8 {
			return fmt.Errorf("kvm: vCPU %d: malformed MMIO exit (len %d)", v.id, n)
		}
		if e.IsWrite != 0 {
			h.MMIOWrite(e.PhysAddr, e.Data[:n])
		} else {
			h.MMIORead(e.PhysAddr, e.Data[:n])
		}
		return nil
	case exitIntr:
		v.run.ImmediateExit = 0
		return nil
	case exitHLT:
		// Only without an in-kernel irqchip; ours always has one. Treat a
		// halt as nothing to do.
		return nil
	case exitShutdown:
		return ErrShutdown
	case exitSystemEvent:
		e := (*exitData)(unsafe.Pointer(&v.run.Exit[0]))
		switch e.Type {
		case systemEventShutdown:
			return ErrGuestPowerOff
		case systemEventReset:
			return ErrGuestReset
		case systemEventCrash:
			return ErrGuestCrash
		}
		return fmt.Errorf("kvm: vCPU %d: system event %d", v.id, e.Type)
	case exitInternalError:
		e := (*exitData)(unsafe.Pointer(&v.run.Exit[0]))
		n := min(e.NData, uint32(len(e.Data)))
		return fmt.Errorf("kvm: vCPU %d: internal error, suberror %d, data %#x\n%s", v.id, e.Type, e.Data[:n], v.dump())
	case exitFailEntry:
		reason := *(*uint64)(unsafe.Pointer(&v.run.Exit[0]))
		return fmt.Errorf("kvm: vCPU %d: VM entry failed, hardware reason %#x\n%s", v.id, reason, v.dump())
	}
	name := exitNames[reason]
	if name == "" {
		name = fmt.Sprint(reason)
	}
	return fmt.Errorf("kvm: vCPU %d: unhandled exit %s\n%s", v.id, name, v.dump())
}

// ExitCounts returns how many exits of each kind the vCPU took, by name.
func (v *VCPU) ExitCounts() map[string]uint64 {
	out := map[string]uint64{}
	for i := range v.exits {
		if n := v.exits[i].Load(); n > 0 {
			name := exitNames[uint32(i)]
			if name == "" {
				name = fmt.Sprint(i)
			}
			out[name] = n
		}
	}
	return out
}

// dump formats the registers; it runs on the vCPU thread.
func (v *VCPU) dump() string {
	var r Regs
	var s Sregs
	if ioctlPtr(v.fd, kvmGetRegs, unsafe.Pointer(&r)) != nil || ioctlPtr(v.fd, kvmGetSregs, unsafe.Pointer(&s)) != nil {
		return "  (registers unavailable)"
	}
	return FormatRegs(&r, &s)
}

// FormatRegs formats registers for a crash report.
func FormatRegs(r *Regs, s *Sregs) string {
	var b strings.Builder
	fmt.Fprintf(&b, "  rip %016x rflags %016x rsp %016x rbp %016x\n", r.RIP, r.RFLAGS, r.RSP, r.RBP)
	fmt.Fprintf(&b, "  rax %016x rbx %016x rcx %016x rdx %016x\n", r.RAX, r.RBX, r.RCX, r.RDX)
	fmt.Fprintf(&b, "  rsi %016x rdi %016x r8  %016x r9  %016x\n", r.RSI, r.RDI, r.R8, r.R9)
	fmt.Fprintf(&b, "  r10 %016x r11 %016x r12 %016x r13 %016x\n", r.R10, r.R11, r.R12, r.R13)
	fmt.Fprintf(&b, "  r14 %016x r15 %016x\n", r.R14, r.R15)
	fmt.Fprintf(&b, "  cr0 %016x cr2 %016x cr3 %016x cr4 %016x efer %x\n", s.CR0, s.CR2, s.CR3, s.CR4, s.EFER)
	seg := func(n string, g Segment) {
		fmt.Fprintf(&b, "  %-3s sel %04x base %016x limit %08x type %x dpl %d l %d db %d\n", n, g.Selector, g.Base, g.Limit, g.Type, g.DPL, g.L, g.DB)
	}
	seg("cs", s.CS)
	seg("ss", s.SS)
	seg("ds", s.DS)
	seg("tr", s.TR)
	fmt.Fprintf(&b, "  gdt %016x/%04x idt %016x/%04x", s.GDT.Base, s.GDT.Limit, s.IDT.Base, s.IDT.Limit)
	return b.String()
}

// ioctl runs a vCPU state ioctl (through call: on the caller's thread
// when the vCPU is parked or idle).
func (v *VCPU) ioctl(name string, req uintptr, p unsafe.Pointer) error {
	return v.call(func() error {
		if err := ioctlPtr(v.fd, req, p); err != nil {
			return fmt.Errorf("kvm: vCPU %d: %s: %w", v.id, name, err)
		}
		return nil
	})
}

// Regs returns the general-purpose registers.
func (v *VCPU) Regs() (Regs, error) {
	var r Regs
	return r, v.ioctl("KVM_GET_REGS", kvmGetRegs, unsafe.Pointer(&r))
}

// SetRegs sets the general-purpose registers.
func (v *VCPU) SetRegs(r Regs) error {
	return v.ioctl("KVM_SET_REGS", kvmSetRegs, unsafe.Pointer(&r))
}

// Sregs returns the segment and control registers.
func (v *VCPU) Sregs() (Sregs, error) {
	var s Sregs
	return s, v.ioctl("KVM_GET_SREGS", kvmGetSregs, unsafe.Pointer(&s))
}

// SetSregs sets the segment and control registers.
func (v *VCPU) SetSregs(s Sregs) error {
	return v.ioctl("KVM_SET_SREGS", kvmSetSregs, unsafe.Pointer(&s))
}

// FPU returns the legacy FPU/SSE state.
func (v *VCPU) FPU() (FPU, error) {
	var f FPU
	return f, v.ioctl("KVM_GET_FPU", kvmGetFPU, unsafe.Pointer(&f))
}

// SetFPU sets the legacy FPU/SSE state.
func (v *VCPU) SetFPU(f FPU) error {
	return v.ioctl("KVM_SET_FPU", kvmSetFPU, unsafe.Pointer(&f))
}

// LAPIC returns the local APIC state.
func (v *VCPU) LAPIC() (LAPIC, error) {
	var l LAPIC
	return l, v.ioctl("KVM_GET_LAPIC", kvmGetLAPIC, unsafe.Pointer(&l))
}

// SetLAPIC sets the local APIC state.
func (v *VCPU) SetLAPIC(l LAPIC) error {
	return v.ioctl("KVM_SET_LAPIC", kvmSetLAPIC, unsafe.Pointer(&l))
}

// MPState returns the multiprocessing state (runnable, halted, waiting
// for SIPI, ...).
func (v *VCPU) MPState() (MPState, error) {
	var m MPState
	return m, v.ioctl("KVM_GET_MP_STATE", kvmGetMPState, unsafe.Pointer(&m))
}

// SetMPState sets the multiprocessing state.
func (v *VCPU) SetMPState(m MPState) error {
	return v.ioctl("KVM_SET_MP_STATE", kvmSetMPState, unsafe.Pointer(&m))
}

// MSRs reads the given MSRs.
func (v *VCPU) MSRs(indices []uint32) ([]MSR, error) {
	if len(indices) == 0 {
		return nil, nil
	}
	buf := make([]byte, 8+len(indices)*int(unsafe.Sizeof(MSR{})))
	*(*uint32)(unsafe.Pointer(&buf[0])) = uint32(len(indices))
	ents := unsafe.Slice((*MSR)(unsafe.Pointer(&buf[8])), len(indices))
	for i, idx := range indices {
		ents[i].Index = idx
	}
	var n uintptr
	err := v.call(func() error {
		var err error
		n, err = ioctl(v.fd, kvmGetMSRs, uintptr(unsafe.Pointer(&buf[0])))
		runtime.KeepAlive(buf)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("kvm: vCPU %d: KVM_GET_MSRS: %w", v.id, err)
	}
	return append([]MSR(nil), ents[:n]...), nil
}

// SetMSRs writes MSRs.
func (v *VCPU) SetMSRs(msrs []MSR) error {
	if len(msrs) == 0 {
		return nil
	}
	buf := make([]byte, 8+len(msrs)*int(unsafe.Sizeof(MSR{})))
	*(*uint32)(unsafe.Pointer(&buf[0])) = uint32(len(msrs))
	copy(unsafe.Slice((*MSR)(unsafe.Pointer(&buf[8])), len(msrs)), msrs)
	var n uintptr
	err := v.call(func() error {
		var err error
		n, err = ioctl(v.fd, kvmSetMSRs, uintptr(unsafe.Pointer(&buf[0])))
		runtime.KeepAlive(buf)
		return err
	})
	if err != nil {
		return fmt.Errorf("kvm: vCPU %d: KVM_SET_MSRS: %w", v.id, err)
	}
	if int(n) != len(msrs) {
		return fmt.Errorf("kvm: vCPU %d: KVM_SET_MSRS: MSR %#x refused", v.id, msrs[n].Index)
	}
	return nil
}

// SetCPUID sets the vCPU's CPUID table (KVM_SET_CPUID2).
func (v *VCPU) SetCPUID(ents []CPUIDEntry) error {
	buf := make([]byte, 8+len(ents)*int(unsafe.Sizeof(CPUIDEntry{})))
	*(*uint32)(unsafe.Pointer(&buf[0])) = uint32(len(ents))
	copy(unsafe.Slice((*CPUIDEntry)(unsafe.Pointer(&buf[8])), len(ents)), ents)
	return v.ioctl("KVM_SET_CPUID2", kvmSetCPUID2, unsafe.Pointer(&buf[0]))
}

// TSCKHz returns the vCPU's TSC frequency in kHz (KVM_GET_TSC_KHZ).
func (v *VCPU) TSCKHz() (uint32, error) {
	if !v.vm.sys.Has(CapGetTSCKHz) {
		return 0, &CapError{CapGetTSCKHz}
	}
	var khz uintptr
	err := v.call(func() error {
		var err error
		khz, err = ioctl(v.fd, kvmGetTSCKHz, 0)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("kvm: vCPU %d: KVM_GET_TSC_KHZ: %w", v.id, err)
	}
	return uint32(khz), nil
}

func (v *VCPU) close() error {
	var err error
	v.closeOnce.Do(func() {
		err = v.Do(func() error {
			e1 := unix.Munmap(v.mem)
			e2 := unix.Close(v.fd)
			v.run = nil
			v.closed = true
			return errors.Join(e1, e2)
		})
		close(v.quit)
		<-v.done
	})
	return err
}
