package virtio

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"collective/devices"
	"collective/devices/pci"
	"collective/kvm/guestmem"
)

// PCI identity of virtio devices (section 4.1.2).
const (
	PCIVendor     = 0x1af4
	PCIDeviceBase = 0x1040 // + device type
)

// virtio_pci_cap cfg_type values (section 4.1.4).
const (
	capCommon = 1
	capNotify = 2
	capISR    = 3
	capDevice = 4
)

// Layout of BAR 0 (one 64-bit memory BAR holds every structure).
const (
	BARIndex     = 0
	BARSize      = 0x8000
	CommonOffset = 0x0000
	commonLen    = 0x38 // up to queue_device; notify_data/queue_reset not offered
	ISROffset    = 0x1000
	isrLen       = 4
	DeviceOffset = 0x2000
	deviceMaxLen = 0x1000
	NotifyOffset = 0x3000
	// NotifyMultiplier is notify_off_multiplier: queue q's doorbell is at
	// NotifyOffset + q*NotifyMultiplier.
	NotifyMultiplier = 4
	MSIXTableOffset  = 0x4000
	MSIXPBAOffset    = 0x6000
	maxQueues        = (MSIXTableOffset - NotifyOffset) / NotifyMultiplier
)

// Common configuration register offsets (struct virtio_pci_common_cfg).
const (
	regDeviceFeatureSelect = 0
	regDeviceFeature       = 4
	regDriverFeatureSelect = 8
	regDriverFeature       = 12
	regConfigMSIXVector    = 16
	regNumQueues           = 18
	regDeviceStatus        = 20
	regConfigGeneration    = 21
	regQueueSelect         = 22
	regQueueSize           = 24
	regQueueMSIXVector     = 26
	regQueueEnable         = 28
	regQueueNotifyOff      = 30
	regQueueDesc           = 32
	regQueueDriver         = 40
	regQueueDevice         = 48
)

// ISR status bits.
const (
	isrQueue  = 1
	isrConfig = 2
)

// validStatus lists the status values the driver may move to from each
// status (FAILED may be added from any of them; 0 resets). Firecracker's
// transport/mmio.rs keeps the same table.
var validStatus = map[uint8]uint8{
	0:                                StatusAcknowledge,
	StatusAcknowledge:                StatusAcknowledge | StatusDriver,
	StatusAcknowledge | StatusDriver: StatusAcknowledge | StatusDriver | StatusFeaturesOK,
	StatusAcknowledge | StatusDriver | StatusFeaturesOK: StatusAcknowledge | StatusDriver | StatusFeaturesOK | StatusDriverOK,
}

// pciClass gives a PCI class code per device type.
var pciClass = map[uint16]uint32{TypeNet: 0x020000, TypeBlock: 0x018000, TypeInput: 0x098000}

// Metrics counts what the transport saw from the guest.
type Metrics struct {
	NeedsReset     atomic.Uint64 // times DEVICE_NEEDS_RESET was set
	BadAccess      atomic.Uint64 // register accesses of a bad size or offset, ignored
	BadStatus      atomic.Uint64 // status writes outside the transition table, ignored
	Notifies       atomic.Uint64 // doorbell writes through MMIO
	Interrupts     atomic.Uint64 // interrupts raised (MSI-X or INTx)
	FeaturesRefuse atomic.Uint64 // FEATURES_OK refused (no VERSION_1)
}

// Transport is a virtio device behind the virtio-pci modern interface
// (section 4.1): a PCI function whose BAR 0 holds the common, ISR, device
// and notify structures and the MSI-X table.
type Transport struct {
	dev     Device           // immutable
	mem     *guestmem.Memory // immutable
	cfg     *pci.Config      // immutable
	msix    *pci.MSIX        // immutable
	queues  []*Queue         // immutable slice
	offered uint64           // immutable
	bar     barWindow
	log     *slog.Logger // +checklocks:warnMu

	// Metrics are the transport's counters.
	Metrics Metrics

	mu       sync.Mutex
	devSel   uint32 // +checklocks:mu
	drvSel   uint32 // +checklocks:mu
	acked    uint64 // +checklocks:mu
	status   uint8  // +checklocks:mu; without NEEDS_RESET
	gen      uint8  // +checklocks:mu
	queueSel uint16 // +checklocks:mu
	active   bool   // +checklocks:mu; dev.Activate succeeded

	warnMu    sync.Mutex // taken with or without mu held, last
	lastWarn  time.Time  // +checklocks:warnMu
	warnCount int        // +checklocks:warnMu

	configVector atomic.Uint32
	needsReset   atomic.Bool

	isrMu sync.Mutex // orders ISR updates with the INTx level
	isr   uint8      // +checklocks:isrMu
}

// NewPCI wraps dev in a virtio-pci transport over guest memory mem. MSI-X
// messages go to msi (one vector per queue plus one for configuration
// changes). name labels the PCI function and its BAR on the MMIO bus.
//
// Before putting t.PCI() on a pci.Bus the machine may connect INTx with
// t.PCI().SetINTx(gsi, line), the fallback for drivers without MSI-X.
func NewPCI(name string, dev Device, mem *guestmem.Memory, msi pci.MSIXSink) (*Transport, error) {
	sizes := dev.QueueSizes()
	if len(sizes) == 0 || len(sizes) > maxQueues {
		return nil, fmt.Errorf("virtio: %s: %d queues, want 1-%d", name, len(sizes), maxQueues)
	}
	if dev.ConfigSize() > deviceMaxLen {
		return nil, fmt.Errorf("virtio: %s: device configuration of %d bytes is too large", name, dev.ConfigSize())
	}
	t := &Transport{dev: dev, mem: mem, offered: dev.Features() | transportFeatures,
		log: slog.Default().With("device", name)}
	t.bar.t = t
	for i, s := range sizes {
		if s == 0 || s&(s-1) != 0 || s > MaxQueueSize {
			return nil, fmt.Errorf("virtio: %s: queue %d maximum size %d", name, i, s)
		}
		t.queues = append(t.queues, newQueue(i, s))
	}
	t.configVector.Store(NoVector)
	class, ok := pciClass[dev.Type()]
	if !ok {
		class = 0xff0000
	}
	t.cfg = pci.NewConfig(name, pci.Identity{Vendor: PCIVendor, Device: PCIDeviceBase + dev.Type(), Revision: 1,
		Class: class, SubVendor: PCIVendor, Subsystem: 0x40 + dev.Type()})
	if err := t.cfg.AddBAR(BARIndex, pci.BARMem64, BARSize, false, &t.bar); err != nil {
		return nil, err
	}
	caps := []struct {
		typ      uint8
		off, len uint32
	}{
		{capCommon, CommonOffset, commonLen},
		{capISR, ISROffset, isrLen},
		{capDevice, DeviceOffset, uint32(max(dev.ConfigSize(), 4))},
	}
	for _, c := range caps {
		if _, err := t.cfg.AddCapability(pci.CapVendor, virtioCap(c.typ, c.off, c.len, nil), nil); err != nil {
			return nil, err
		}
	}
	notifyLen := uint32(len(sizes) * NotifyMultiplier)
	var mult [4]byte
	binary.LittleEndian.PutUint32(mult[:], NotifyMultiplier)
	if _, err := t.cfg.AddCapability(pci.CapVendor, virtioCap(capNotify, NotifyOffset, notifyLen, mult[:]), nil); err != nil {
		return nil, err
	}
	m, err := t.cfg.AddMSIX(len(sizes)+1, BARIndex, MSIXTableOffset, MSIXPBAOffset, msi)
	if err != nil {
		return nil, err
	}
	t.msix = m
	return t, nil
}

// virtioCap builds struct virtio_pci_cap after its vendor ID and next
// pointer: cap_len, cfg_type, bar, id, padding, offset, length, extra.
func virtioCap(typ uint8, off, length uint32, extra []byte) []byte {
	b := make([]byte, 14, 14+len(extra))
	b[0] = uint8(16 + len(extra)) // cap_len counts from cap_vndr
	b[1] = typ
	b[2] = BARIndex
	binary.LittleEndian.PutUint32(b[6:], off)
	binary.LittleEndian.PutUint32(b[10:], length)
	return append(b, extra...)
}

// PCI returns the transport's PCI function, to put on a pci.Bus.
func (t *Transport) PCI() *pci.Config { return t.cfg }

// Device returns the device behind the transport.
func (t *Transport) Device() Device { return t.dev }

// BAR returns the window of BAR 0 (what a pci.BARMapper maps; compare
// BARInfo.Dev with it to find the transport of a BAR).
func (t *Transport) BAR() devices.Device { return &t.bar }

// NumQueues returns the number of queues.
func (t *Transport) NumQueues() int { return len(t.queues) }

// NotifyOffset returns the offset in BAR 0 of queue q's doorbell: a guest
// 2-byte write there notifies the queue. Back it with an ioeventfd
// (kvm.VM.IOEventFD(barAddr+NotifyOffset(q), 2, fd, false)) whose waiter
// calls Notify(q).
func (t *Transport) NotifyOffset(q int) uint64 {
	return NotifyOffset + uint64(q)*NotifyMultiplier
}

// Notify rings queue q's doorbell, as a guest write to its notify address
// does. It never blocks.
func (t *Transport) Notify(q int) {
	if q >= 0 && q < len(t.queues) {
		t.queues[q].Notify()
	}
}

// Status returns the device status register as the driver reads it.
func (t *Transport) Status() uint8 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.statusLocked()
}

// +checklocks:t.mu
func (t *Transport) statusLocked() uint8 {
	s := t.status
	if t.needsReset.Load() {
		s |= StatusNeedsReset
	}
	return s
}

// Acked returns the features the driver acknowledged.
func (t *Transport) Acked() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.acked
}

// Offered returns the features offered to the driver.
func (t *Transport) Offered() uint64 { return t.offered }

func (t *Transport) warn(msg string, args ...any) {
	t.warnMu.Lock()
	defer t.warnMu.Unlock()
	now := time.Now()
	if now.Sub(t.lastWarn) < 10*time.Second {
		t.warnCount++
		return
	}
	if t.warnCount > 0 {
		args = append(args, "suppressed", t.warnCount)
	}
	t.lastWarn, t.warnCount = now, 0
	t.log.Warn(msg, args...)
}

// SetLogger sends the transport's warnings to l.
func (t *Transport) SetLogger(l *slog.Logger) {
	t.warnMu.Lock()
	defer t.warnMu.Unlock()
	t.log = l
}

// barWindow is BAR 0: it dispatches to the structures by offset.
type barWindow struct{ t *Transport }

// Read implements devices.Device.Read.
func (b *barWindow) Read(off uint64, p []byte) {
	t := b.t
	switch {
	case off < CommonOffset+commonLen:
		t.readCommon(off, p)
	case off >= ISROffset && off < ISROffset+isrLen:
		clear(p)
		if off == ISROffset && len(p) >= 1 {
			p[0] = t.readISR()
		}
	case off >= DeviceOffset && off < DeviceOffset+deviceMaxLen:
		clear(p)
		d := off - DeviceOffset
		if n := t.dev.ConfigSize(); d < n {
			t.dev.ReadConfig(d, p[:min(uint64(len(p)), n-d)])
		}
	case off >= MSIXTableOffset && off < MSIXPBAOffset:
		t.msix.ReadTable(off-MSIXTableOffset, p)
	case off >= MSIXPBAOffset:
		t.msix.ReadPBA(off-MSIXPBAOffset, p)
	default:
		clear(p)
	}
}

// Write implements devices.Device.Write.
func (b *barWindow) Write(off uint64, p []byte) {
	t := b.t
	switch {
	case off < CommonOffset+commonLen:
		t.writeCommon(off, p)
	case off >= DeviceOffset && off < DeviceOffset+deviceMaxLen:
		d := off - DeviceOffset
		if n := t.dev.ConfigSize(); d < n {
			t.dev.WriteConfig(d, p[:min(uint64(len(p)), n-d)])
		}
	case off >= NotifyOffset && off < NotifyOffset+uint64(len(t.queues))*NotifyMultiplier:
		t.Metrics.Notifies.Add(1)
		t.Notify(int((off - NotifyOffset) / NotifyMultiplier))
	case off >= MSIXTableOffset && off < MSIXPBAOffset:
		t.msix.WriteTable(off-MSIXTableOffset, p)
	default:
		t.Metrics.BadAccess.Add(1)
	}
}

func (t *Transport) readISR() uint8 {
	t.isrMu.Lock()
	defer t.isrMu.Unlock()
	v := t.isr
	t.isr = 0
	if v != 0 {
		t.cfg.SetIRQLevel(false)
	}
	return v
}

// readCommon reads the common configuration structure. Reads have no side
// effects, so any size at any offset is served from a snapshot.
func (t *Transport) readCommon(off uint64, p []byte) {
	var b [commonLen]byte
	le := binary.LittleEndian
	t.mu.Lock()
	le.PutUint32(b[regDeviceFeatureSelect:], t.devSel)
	if t.devSel < 2 {
		le.PutUint32(b[regDeviceFeature:], uint32(t.offered>>(32*t.devSel)))
	}
	le.PutUint32(b[regDriverFeatureSelect:], t.drvSel)
	if t.drvSel < 2 {
		le.PutUint32(b[regDriverFeature:], uint32(t.acked>>(32*t.drvSel)))
	}
	le.PutUint16(b[regConfigMSIXVector:], uint16(t.configVector.Load()))
	le.PutUint16(b[regNumQueues:], uint16(len(t.queues)))
	b[regDeviceStatus] = t.statusLocked()
	b[regConfigGeneration] = t.gen
	le.PutUint16(b[regQueueSelect:], t.queueSel)
	if int(t.queueSel) < len(t.queues) {
		q := t.queues[t.queueSel]
		le.PutUint16(b[regQueueSize:], q.size)
		le.PutUint16(b[regQueueMSIXVector:], uint16(q.vector.Load()))
		if q.enabled {
			le.PutUint16(b[regQueueEnable:], 1)
		}
		le.PutUint16(b[regQueueNotifyOff:], t.queueSel)
		le.PutUint64(b[regQueueDesc:], q.desc)
		le.PutUint64(b[regQueueDriver:], q.avail)
		le.PutUint64(b[regQueueDevice:], q.used)
	} else {
		le.PutUint16(b[regQueueMSIXVector:], NoVector)
	}
	t.mu.Unlock()
	clear(p)
	if off < commonLen {
		copy(p, b[off:])
	}
}

// writeCommon writes the common configuration structure. Fields must be
// written with their natural size (64-bit addresses also as two 32-bit
// halves); other writes are ignored.
func (t *Transport) writeCommon(off uint64, p []byte) {
	var v uint64
	switch len(p) {
	case 1:
		v = uint64(p[0])
	case 2:
		v = uint64(binary.LittleEndian.Uint16(p))
	case 4:
		v = uint64(binary.LittleEndian.Uint32(p))
	case 8:
		v = binary.LittleEndian.Uint64(p)
	}
	type field struct {
		off  uint64
		size int
	}
	f := field{off, len(p)}
	t.mu.Lock()
	defer t.mu.Unlock()
	var q *Queue
	if int(t.queueSel) < len(t.queues) {
		q = t.queues[t.queueSel]
	}
	// Queue configuration is frozen while the queue is enabled.
	qw := q != nil && !q.enabled
	switch f {
	case field{regDeviceFeatureSelect, 4}:
		t.devSel = uint32(v)
	case field{regDriverFeatureSelect, 4}:
		t.drvSel = uint32(v)
	case field{regDriverFeature, 4}:
		if t.status&(StatusDriver|StatusFeaturesOK) != StatusDriver || t.drvSel >= 2 {
			t.Metrics.BadAccess.Add(1)
			return
		}
		shift := 32 * t.drvSel
		// Keep only what was offered.
		t.acked = t.acked&^(0xffffffff<<shift) | v<<shift&t.offered
	case field{regConfigMSIXVector, 2}:
		t.configVector.Store(uint32(t.vector(uint16(v))))
	case field{regDeviceStatus, 1}:
		t.writeStatus(uint8(v))
	case field{regQueueSelect, 2}:
		t.queueSel = uint16(v)
	case field{regQueueSize, 2}:
		if qw {
			q.size = uint16(v)
		}
	case field{regQueueMSIXVector, 2}:
		if q != nil {
			q.vector.Store(uint32(t.vector(uint16(v))))
		}
	case field{regQueueEnable, 2}:
		if qw && v == 1 {
			t.enableQueue(q)
		}
	case field{regQueueDesc, 8}, field{regQueueDesc, 4}, field{regQueueDesc + 4, 4}:
		if qw {
			q.desc = setAddr(q.desc, off-regQueueDesc, len(p), v)
		}
	case field{regQueueDriver, 8}, field{regQueueDriver, 4}, field{regQueueDriver + 4, 4}:
		if qw {
			q.avail = setAddr(q.avail, off-regQueueDriver, len(p), v)
		}
	case field{regQueueDevice, 8}, field{regQueueDevice, 4}, field{regQueueDevice + 4, 4}:
		if qw {
			q.used = setAddr(q.used, off-regQueueDevice, len(p), v)
		}
	default:
		t.Metrics.BadAccess.Add(1)
	}
}

func setAddr(old, off uint64, size int, v uint64) uint64 {
	switch {
	case size == 8:
		return v
	case off == 0:
		return old&^0xffffffff | v
	default:
		return old&0xffffffff | v<<32
	}
}

// vector returns v if the MSI-X table has it, else NoVector (what the
// driver then reads back: section 4.1.5.1.2).
func (t *Transport) vector(v uint16) uint16 {
	if int(v) < t.msix.Vectors() {
		return v
	}
	return NoVector
}

// +checklocks:t.mu
func (t *Transport) enableQueue(q *Queue) {
	if err := q.check(t.mem); err != nil {
		t.needsResetLocked(err)
		return
	}
	q.enabled = true
}

// +checklocks:t.mu
func (t *Transport) writeStatus(v uint8) {
	v &^= StatusNeedsReset // device-owned
	if v == 0 {
		t.reset()
		return
	}
	cur := t.status
	if v == cur {
		return
	}
	if v&StatusFailed != 0 && v&^StatusFailed == cur&^StatusFailed {
		t.status = v
		return
	}
	if cur&StatusFailed != 0 || validStatus[cur] != v {
		t.Metrics.BadStatus.Add(1)
		t.warn("virtio: invalid status transition", "from", cur, "to", v)
		return
	}
	switch v &^ cur {
	case StatusFeaturesOK:
		if t.acked&FVersion1 == 0 {
			// Refuse: FEATURES_OK stays clear (section 3.1.1).
			t.Metrics.FeaturesRefuse.Add(1)
			return
		}
	case StatusDriverOK:
		t.status = v
		t.activate()
		return
	}
	t.status = v
}

// +checklocks:t.mu
func (t *Transport) activate() {
	if t.needsReset.Load() {
		return
	}
	for _, q := range t.queues {
		if q.enabled {
			q.activate(t.mem, t.acked)
		}
	}
	if err := t.dev.Activate(t.mem, t.queues, t, t.acked); err != nil {
		t.needsResetLocked(fmt.Errorf("virtio: activate: %w", err))
		return
	}
	t.active = true
}

// reset is a device reset (status 0): the device stops, every queue
// returns to its initial state, negotiation starts over.
// +checklocks:t.mu
func (t *Transport) reset() {
	if t.active {
		t.dev.Reset()
		t.active = false
	}
	for _, q := range t.queues {
		q.reset()
	}
	t.devSel, t.drvSel, t.acked, t.status, t.queueSel = 0, 0, 0, 0, 0
	t.configVector.Store(NoVector)
	t.needsReset.Store(false)
	t.isrMu.Lock()
	t.isr = 0
	t.cfg.SetIRQLevel(false)
	t.isrMu.Unlock()
}

// +checklocks:t.mu
func (t *Transport) needsResetLocked(err error) {
	t.Metrics.NeedsReset.Add(1)
	if !t.needsReset.Swap(true) {
		t.warn("virtio: device needs reset", "err", err)
		if t.status&StatusDriverOK != 0 {
			t.SignalConfig()
		}
	}
}

// NeedsReset implements Interrupt.NeedsReset.
func (t *Transport) NeedsReset(err error) {
	t.Metrics.NeedsReset.Add(1)
	if !t.needsReset.Swap(true) {
		t.warn("virtio: device needs reset", "err", err)
		t.SignalConfig()
	}
}

// SignalQueue implements Interrupt.SignalQueue.
func (t *Transport) SignalQueue(q int) {
	if q < 0 || q >= len(t.queues) {
		return
	}
	t.signal(uint16(t.queues[q].vector.Load()), isrQueue)
}

// SignalConfig implements Interrupt.SignalConfig.
func (t *Transport) SignalConfig() {
	t.signal(uint16(t.configVector.Load()), isrConfig)
}

func (t *Transport) signal(vector uint16, isrBit uint8) {
	t.Metrics.Interrupts.Add(1)
	if t.msix.Enabled() {
		if vector != NoVector {
			t.msix.Signal(vector)
		}
		return
	}
	t.isrMu.Lock()
	defer t.isrMu.Unlock()
	t.isr |= isrBit
	t.cfg.SetIRQLevel(true)
}
