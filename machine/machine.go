// Package machine assembles a virtual machine: KVM, guest RAM, the PC
// platform devices on their buses, a loaded kernel, and the vCPUs.
//
// It is the VMM core that the command line, snapshots and migration drive.
// It depends on kvm and devices and knows nothing of VNC or the switch.
//
// # Platform
//
//	COM1 16550A    ports 0x3f8-0x3ff, IRQ 4
//	CMOS RTC       ports 0x70-0x71
//	i8042          ports 0x60, 0x64 (0xfe on 0x64 resets: the VM ends)
//	debug exit     port 0xf4, 4 bytes (isa-debug-exit compatible)
//	POST port      0x80 (writes ignored: Linux uses it as an I/O delay)
//	PCI            config mechanism 1 at 0xcf8-0xcff, host bridge 00:00.0,
//	               BARs in [0xc0000000, 0xfec00000), virtio-pci devices
//	               (virtio-blk per --disk) with MSI-X (GSI routes + irqfds)
//	               and ioeventfd doorbells,
//	               then pvpanic-pci (1b36:0011): a guest panic ends the VM
//	PIC, IOAPIC, LAPIC, PIT: in the kernel (KVM)
//	RAM            [0, 3 GiB) and, above 3 GiB of RAM, [4 GiB, ...)
//	MMIO hole      [3 GiB, 4 GiB)
//
// # Lock order
//
//	Machine.mu
//	  device locks (each device package documents its own)
package machine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"collective/devices"
	"collective/devices/bus"
	"collective/devices/debugexit"
	"collective/devices/i8042"
	"collective/devices/pci"
	"collective/devices/pvpanic"
	"collective/devices/rtc"
	"collective/devices/serial"
	"collective/kvm"
	"collective/kvm/boot"
	"collective/kvm/guestmem"
)

// Port and IRQ assignments of the platform.
const (
	COM1Base      = 0x3f8
	COM1IRQ       = 4
	RTCBase       = 0x70
	I8042Data     = 0x60
	I8042Command  = 0x64
	KeyboardIRQ   = 1
	MouseIRQ      = 12
	DebugExitPort = 0xf4
	POSTPort      = 0x80
)

// Config describes a machine to build.
type Config struct {
	Kernel  string // path of a bzImage or a PVH ELF
	Initrd  string // optional initramfs path
	Cmdline string // kernel command line
	MemSize uint64 // bytes of guest RAM
	CPUs    int    // number of vCPUs

	Disks []string // --disk arguments: PATH[,ro][,serial=ID][,base=BASE]

	Console io.Writer // serial output; nil discards it
	Log     *slog.Logger
}

// ExitReason says why a machine stopped.
type ExitReason int

const (
	// ExitDebug: the guest wrote its exit code to the debug-exit port.
	ExitDebug ExitReason = iota
	// ExitPowerOff: the guest powered off.
	ExitPowerOff
	// ExitReset: the guest reset the machine (i8042, triple fault, or a
	// reset system event); Collective ends the VM.
	ExitReset
	// ExitStopped: the host stopped the machine.
	ExitStopped
	// ExitError: a vCPU failed (internal error, failed entry).
	ExitError
	// ExitPanic: the guest kernel reported a panic (pvpanic).
	ExitPanic
)

func (r ExitReason) String() string {
	return [...]string{"debug-exit", "poweroff", "reset", "stopped", "error", "panic"}[r]
}

// Exit is the outcome of Run.
type Exit struct {
	Reason ExitReason
	Code   int   // the guest's debug-exit code (ExitDebug)
	Err    error // ExitError: what failed
}

// Machine is a built VM ready to run.
type Machine struct {
	cfg Config
	log *slog.Logger

	sys *kvm.System
	vm  *kvm.VM
	mem *guestmem.Memory

	pio  bus.Bus
	mmio bus.Bus

	Serial    *serial.Serial
	RTC       *rtc.RTC
	I8042     *i8042.I8042
	DebugExit *debugexit.DebugExit

	pci     *pci.Bus
	virtio  []*virtioDev
	pvpanic *pvpanic.Device
	msi     *msiRouter
	pciIRQs []boot.PCIInterrupt // INTx wiring of the PCI functions, for the MP table

	exitOnce sync.Once
	exit     Exit
	stopped  chan struct{} // closed on the first exit

	unhandledPIO  atomic.Uint64
	unhandledMMIO atomic.Uint64
}

// ErrConfig is matched by errors about the configuration or the kernel
// file (the command line reports them with exit status 2).
var ErrConfig = errors.New("machine: bad configuration")

type configError struct{ err error }

func (e *configError) Error() string        { return e.err.Error() }
func (e *configError) Unwrap() error        { return e.err }
func (e *configError) Is(target error) bool { return target == ErrConfig }

func badConfig(format string, a ...any) error {
	return &configError{fmt.Errorf(format, a...)}
}

// New opens KVM, creates the VM and its devices and loads the kernel.
func New(cfg Config) (*Machine, error) {
	t0 := time.Now()
	kernel, err := os.Open(cfg.Kernel)
	if err != nil {
		return nil, badConfig("machine: kernel: %w", err)
	}
	defer kernel.Close()
	kst, err := kernel.Stat()
	if err != nil {
		return nil, badConfig("machine: kernel: %w", err)
	}
	var initrd []byte
	if cfg.Initrd != "" {
		if initrd, err = os.ReadFile(cfg.Initrd); err != nil {
			return nil, badConfig("machine: initrd: %w", err)
		}
	}
	t1 := time.Now()
	m, err := NewBare(cfg)
	if err != nil {
		return nil, err
	}
	t2 := time.Now()
	entry, err := boot.Load(m.mem, kernel, kst.Size(), boot.Config{Cmdline: cfg.Cmdline, Initrd: initrd, CPUs: cfg.CPUs, PCIInterrupts: m.pciIRQs})
	if err != nil {
		m.Close()
		return nil, &configError{err}
	}
	if err := setEntry(m.vm.VCPUs()[0], entry); err != nil {
		m.Close()
		return nil, err
	}
	m.log.Debug("machine built", "read_initrd", time.Since(t0)-time.Since(t1), "vm_and_devices", t2.Sub(t1),
		"load_kernel", time.Since(t2), "total", time.Since(t0))
	return m, nil
}

// NewBare creates the VM, its devices and vCPUs in their reset state, with
// no kernel loaded: the start of New, and of a restore from a snapshot,
// which then sets every vCPU's and device's state. Config.Kernel,
// Initrd and Cmdline are ignored.
func NewBare(cfg Config) (*Machine, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Console == nil {
		cfg.Console = io.Discard
	}
	if cfg.CPUs < 1 {
		return nil, badConfig("machine: %d vCPUs: need at least 1", cfg.CPUs)
	}
	if cfg.MemSize < 16<<20 || cfg.MemSize%guestmem.PageSize != 0 {
		return nil, badConfig("machine: memory size %d: need at least 16 MiB, a multiple of 4 KiB", cfg.MemSize)
	}
	sys, err := kvm.Open()
	if err != nil {
		return nil, err
	}
	if max := sys.MaxVCPUs(); cfg.CPUs > max {
		sys.Close()
		return nil, badConfig("machine: %d vCPUs: this host's KVM offers at most %d", cfg.CPUs, max)
	}
	vm, err := sys.NewVM(boot.RAMLayout(cfg.MemSize))
	if err != nil {
		sys.Close()
		return nil, err
	}
	m := &Machine{cfg: cfg, log: cfg.Log, sys: sys, vm: vm, mem: vm.Memory(), stopped: make(chan struct{})}
	if err := m.build(); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// Config returns the configuration the machine was built with.
func (m *Machine) Config() Config { return m.cfg }

func (m *Machine) build() error {
	m.Serial = serial.New(m.cfg.Console, m.vm.IRQLine(COM1IRQ))
	m.RTC = rtc.New(nil)
	m.I8042 = i8042.New(m.vm.IRQLine(KeyboardIRQ), m.vm.IRQLine(MouseIRQ), func() { m.finish(Exit{Reason: ExitReset}) })
	m.DebugExit = debugexit.New(func(code int) { m.finish(Exit{Reason: ExitDebug, Code: code}) })
	m.Serial.SetLogger(m.log.With("device", "serial"))
	m.RTC.SetLogger(m.log.With("device", "rtc"))
	m.I8042.SetLogger(m.log.With("device", "i8042"))
	for _, d := range []struct {
		name       string
		base, size uint64
		dev        devices.Device
	}{
		{"serial", COM1Base, serial.Size, m.Serial},
		{"rtc", RTCBase, rtc.Size, m.RTC},
		{"i8042-data", I8042Data, 1, m.I8042.DataPort()},
		{"i8042-cmd", I8042Command, 1, m.I8042.CommandPort()},
		{"debug-exit", DebugExitPort, debugexit.Size, m.DebugExit},
		{"post", POSTPort, 1, sink{}},
	} {
		if err := m.pio.Insert(d.name, d.base, d.size, d.dev); err != nil {
			return err
		}
	}
	if err := m.addPCI(); err != nil {
		return err
	}
	for _, d := range m.cfg.Disks {
		if err := m.addDisk(d); err != nil {
			return err
		}
	}
	if err := m.addPVPanic(); err != nil {
		return err
	}
	var tscKHz uint32
	for i := 0; i < m.cfg.CPUs; i++ {
		v, err := m.vm.NewVCPU(i)
		if err != nil {
			return err
		}
		if i == 0 {
			if tscKHz, err = v.TSCKHz(); err != nil {
				m.log.Warn("no TSC frequency for the guest", "err", err)
			}
		}
		ids, err := m.sys.CPUID(i, m.cfg.CPUs, tscKHz)
		if err != nil {
			return err
		}
		if err := v.SetCPUID(ids); err != nil {
			return err
		}
		if err := setVirtualWire(v); err != nil {
			return err
		}
	}
	return nil
}

// sink ignores writes and reads as zero.
type sink struct{}

func (sink) Read(_ uint64, p []byte) { clear(p) }
func (sink) Write(uint64, []byte)    {}

// Memory returns the guest's RAM.
func (m *Machine) Memory() *guestmem.Memory { return m.mem }

// VM returns the KVM VM.
func (m *Machine) VM() *kvm.VM { return m.vm }

// PortBus returns the port-I/O bus.
func (m *Machine) PortBus() *bus.Bus { return &m.pio }

// MMIOBus returns the MMIO bus.
func (m *Machine) MMIOBus() *bus.Bus { return &m.mmio }

// finish records the first exit and stops the vCPUs.
func (m *Machine) finish(e Exit) {
	m.exitOnce.Do(func() {
		m.exit = e
		close(m.stopped)
		go m.vm.Stop() // never from a vCPU thread while it holds VM.mu
	})
}

// Pause stops every vCPU and every virtio device's request processing:
// guest memory and all state hold still until Resume.
func (m *Machine) Pause() {
	m.vm.Pause()
	m.quiesceVirtio(true)
}

// Paused reports whether the machine is paused.
func (m *Machine) Paused() bool { return m.vm.Paused() }

// Resume undoes Pause.
func (m *Machine) Resume() {
	m.quiesceVirtio(false)
	m.vm.Resume()
}

// Stop ends a running machine from the host.
func (m *Machine) Stop() { m.finish(Exit{Reason: ExitStopped}) }

// Run runs every vCPU until the guest exits, a vCPU fails, ctx is done or
// Stop is called, and reports why it stopped.
func (m *Machine) Run(ctx context.Context) Exit {
	var wg sync.WaitGroup
	for _, v := range m.vm.VCPUs() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := v.Run(m)
			switch {
			case errors.Is(err, kvm.ErrStopped):
			case errors.Is(err, kvm.ErrGuestPowerOff):
				m.finish(Exit{Reason: ExitPowerOff})
			case errors.Is(err, kvm.ErrShutdown):
				m.logTripleFault(v)
				m.finish(Exit{Reason: ExitReset})
			case errors.Is(err, kvm.ErrGuestReset):
				m.finish(Exit{Reason: ExitReset})
			default:
				m.finish(Exit{Reason: ExitError, Err: err})
			}
		}()
	}
	select {
	case <-ctx.Done():
		m.finish(Exit{Reason: ExitStopped})
	case <-m.stopped:
	}
	wg.Wait()
	return m.exit
}

// logTripleFault logs, as a warning, where vCPU v was when the guest
// triple-faulted: on Intel KVM_EXIT_SHUTDOWN leaves its registers as they
// were, and a PC resets, so this line is the only post-mortem there will
// be. On AMD KVM has already reset the vCPU (System.ResetsOnShutdown), and
// the line says so instead of showing the reset state. v has left
// KVM_RUN; the other vCPUs may still run.
func (m *Machine) logTripleFault(v *kvm.VCPU) {
	if m.sys.ResetsOnShutdown() {
		m.log.Warn("guest triple fault; it resets (KVM on "+m.sys.Vendor()+" resets the vCPU before it reports one: no registers are left)", "vcpu", v.ID())
		return
	}
	msrs, err := m.sys.MSRIndexList()
	if err == nil {
		var st *kvm.VCPUState
		if st, err = v.State(msrs); err == nil {
			m.log.Warn("guest triple fault; it resets", "vcpu", st.Brief().String())
			return
		}
	}
	m.log.Warn("guest triple fault; it resets", "vcpu", v.ID(), "err", err)
}

// Close releases the VM and /dev/kvm.
func (m *Machine) Close() error {
	m.vm.Stop()
	err := m.closeVirtio()
	if m.msi != nil {
		m.msi.close()
	}
	err = errors.Join(err, m.vm.Close())
	m.sys.Close()
	return err
}

// ExitCounts sums the vCPUs' exits by kind.
func (m *Machine) ExitCounts() map[string]uint64 {
	out := map[string]uint64{}
	for _, v := range m.vm.VCPUs() {
		for k, n := range v.ExitCounts() {
			out[k] += n
		}
	}
	return out
}

// PortIn implements kvm.ExitHandler.PortIn.
func (m *Machine) PortIn(port uint16, p []byte) {
	if !m.pio.Read(uint64(port), p) {
		m.unhandledPIO.Add(1)
	}
}

// PortOut implements kvm.ExitHandler.PortOut.
func (m *Machine) PortOut(port uint16, p []byte) {
	if !m.pio.Write(uint64(port), p) {
		m.unhandledPIO.Add(1)
	}
}

// MMIORead implements kvm.ExitHandler.MMIORead.
func (m *Machine) MMIORead(addr uint64, p []byte) {
	if !m.mmio.Read(addr, p) {
		m.unhandledMMIO.Add(1)
	}
}

// MMIOWrite implements kvm.ExitHandler.MMIOWrite.
func (m *Machine) MMIOWrite(addr uint64, p []byte) {
	if !m.mmio.Write(addr, p) {
		m.unhandledMMIO.Add(1)
	}
}
