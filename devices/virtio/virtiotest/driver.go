// Package virtiotest is a virtio-pci guest driver for tests: it finds a
// virtio function on a pci.Bus by walking its capability list through
// configuration mechanism 1, reaches its BAR through an MMIO bus, sets up
// split virtqueues in fake guest memory and builds descriptor chains, well
// formed or not. It is what Firecracker's virtio test_utils VirtQueue is to
// its devices, shared by every virtio device's tests.
package virtiotest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"time"

	"collective/devices/bus"
	"collective/devices/pci"
	"collective/devices/virtio"
	"collective/kvm/guestmem"
)

// Driver drives one virtio-pci function.
type Driver struct {
	PCI  *pci.Bus
	MMIO *bus.Bus
	Mem  *guestmem.Memory
	Slot int

	// Addresses of the structures, found through the capabilities.
	Common, ISR, Device, Notify uint64
	NotifyMult                  uint32
	DeviceLen                   uint32
	MSIXCap                     uint64 // offset of the MSI-X capability, 0 if none

	next, end uint64 // bump allocator in guest memory
}

// cfg accesses configuration space as a guest does.
func (d *Driver) cfgAddr(reg uint64) {
	var a [4]byte
	binary.LittleEndian.PutUint32(a[:], 0x8000_0000|uint32(d.Slot)<<11|uint32(reg&0xfc))
	d.PCI.Write(0, a[:])
}

// ConfigRead reads size bytes of configuration space at reg.
func (d *Driver) ConfigRead(reg uint64, size int) uint32 {
	d.cfgAddr(reg)
	var p [4]byte
	d.PCI.Read(4+reg%4, p[:size])
	return binary.LittleEndian.Uint32(p[:])
}

// ConfigWrite writes size bytes of configuration space at reg.
func (d *Driver) ConfigWrite(reg uint64, size int, v uint32) {
	d.cfgAddr(reg)
	var p [4]byte
	binary.LittleEndian.PutUint32(p[:], v)
	d.PCI.Write(4+reg%4, p[:size])
}

// New finds the virtio function in slot and its structures. Guest memory
// for rings and buffers is taken from [allocBase, allocBase+allocSize).
func New(pciBus *pci.Bus, mmio *bus.Bus, mem *guestmem.Memory, slot int, allocBase, allocSize uint64) (*Driver, error) {
	d := &Driver{PCI: pciBus, MMIO: mmio, Mem: mem, Slot: slot, next: allocBase, end: allocBase + allocSize}
	if v := d.ConfigRead(pci.RegVendor, 2); v != virtio.PCIVendor {
		return nil, fmt.Errorf("virtiotest: slot %d: vendor %#x", slot, v)
	}
	if d.ConfigRead(pci.RegStatus, 2)&pci.StatusCapList == 0 {
		return nil, errors.New("virtiotest: no capability list")
	}
	var bars [pci.NumBARs]uint64
	for i := 0; i < pci.NumBARs; i++ {
		lo := d.ConfigRead(pci.RegBAR0+uint64(4*i), 4)
		bars[i] = uint64(lo &^ 0xf)
		if lo&0x6 == 0x4 && i+1 < pci.NumBARs {
			bars[i] |= uint64(d.ConfigRead(pci.RegBAR0+uint64(4*(i+1)), 4)) << 32
			i++
		}
	}
	found := 0
	for p, n := uint64(d.ConfigRead(pci.RegCapPtr, 1)), 0; p != 0 && n < 48; n++ {
		id := d.ConfigRead(p, 1)
		if id == pci.CapMSIX {
			d.MSIXCap = p
		}
		if id == pci.CapVendor {
			typ := d.ConfigRead(p+3, 1)
			bar := d.ConfigRead(p+4, 1)
			off := uint64(d.ConfigRead(p+8, 4))
			length := d.ConfigRead(p+12, 4)
			if bar >= pci.NumBARs {
				return nil, fmt.Errorf("virtiotest: capability at %#x names BAR %d", p, bar)
			}
			addr := bars[bar] + off
			switch typ {
			case 1:
				d.Common = addr
			case 2:
				d.Notify = addr
				d.NotifyMult = d.ConfigRead(p+16, 4)
			case 3:
				d.ISR = addr
			case 4:
				d.Device, d.DeviceLen = addr, length
			}
			found |= 1 << typ
		}
		p = uint64(d.ConfigRead(p+1, 1))
	}
	if found&0x1e != 0x1e {
		return nil, fmt.Errorf("virtiotest: missing virtio capabilities (found %#x)", found)
	}
	return d, nil
}

// Alloc returns n bytes of guest memory aligned to align (a power of two).
func (d *Driver) Alloc(n, align uint64) uint64 {
	a := (d.next + align - 1) &^ (align - 1)
	if a+n > d.end {
		panic("virtiotest: out of guest memory")
	}
	d.next = a + n
	return a
}

// Read8/16/32/64 and Write8/16/32/64 access the BAR through the MMIO bus.
func (d *Driver) read(addr uint64, n int) uint64 {
	var p [8]byte
	d.MMIO.Read(addr, p[:n])
	return binary.LittleEndian.Uint64(p[:])
}

func (d *Driver) write(addr uint64, n int, v uint64) {
	var p [8]byte
	binary.LittleEndian.PutUint64(p[:], v)
	d.MMIO.Write(addr, p[:n])
}

// Common configuration offsets, as in struct virtio_pci_common_cfg.
const (
	DeviceFeatureSelect = 0
	DeviceFeature       = 4
	DriverFeatureSelect = 8
	DriverFeature       = 12
	ConfigMSIXVector    = 16
	NumQueues           = 18
	DeviceStatus        = 20
	ConfigGeneration    = 21
	QueueSelect         = 22
	QueueSize           = 24
	QueueMSIXVector     = 26
	QueueEnable         = 28
	QueueNotifyOff      = 30
	QueueDesc           = 32
	QueueDriver         = 40
	QueueDevice         = 48
)

// CommonRead reads n bytes of the common configuration at off.
func (d *Driver) CommonRead(off uint64, n int) uint64 { return d.read(d.Common+off, n) }

// CommonWrite writes n bytes of the common configuration at off.
func (d *Driver) CommonWrite(off uint64, n int, v uint64) { d.write(d.Common+off, n, v) }

// Status reads device_status.
func (d *Driver) Status() uint8 { return uint8(d.CommonRead(DeviceStatus, 1)) }

// SetStatus writes device_status.
func (d *Driver) SetStatus(s uint8) { d.CommonWrite(DeviceStatus, 1, uint64(s)) }

// Reset writes 0 to device_status and waits until it reads back 0.
func (d *Driver) Reset() error {
	d.SetStatus(0)
	if s := d.Status(); s != 0 {
		return fmt.Errorf("virtiotest: status %#x after reset", s)
	}
	return nil
}

// DeviceFeatures reads the 64 feature bits the device offers.
func (d *Driver) DeviceFeatures() uint64 {
	d.CommonWrite(DeviceFeatureSelect, 4, 0)
	lo := d.CommonRead(DeviceFeature, 4)
	d.CommonWrite(DeviceFeatureSelect, 4, 1)
	hi := d.CommonRead(DeviceFeature, 4)
	return hi<<32 | lo
}

// Negotiate resets the device and runs the initialisation sequence up to
// FEATURES_OK (section 3.1.1), acknowledging want & offered. It returns
// the acknowledged features.
func (d *Driver) Negotiate(want uint64) (uint64, error) {
	if err := d.Reset(); err != nil {
		return 0, err
	}
	d.SetStatus(virtio.StatusAcknowledge)
	d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver)
	acked := d.DeviceFeatures() & want
	d.CommonWrite(DriverFeatureSelect, 4, 0)
	d.CommonWrite(DriverFeature, 4, acked&0xffffffff)
	d.CommonWrite(DriverFeatureSelect, 4, 1)
	d.CommonWrite(DriverFeature, 4, acked>>32)
	d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK)
	if d.Status()&virtio.StatusFeaturesOK == 0 {
		return acked, errors.New("virtiotest: device refused FEATURES_OK")
	}
	return acked, nil
}

// DriverOK sets DRIVER_OK.
func (d *Driver) DriverOK() error {
	d.SetStatus(d.Status() | virtio.StatusDriverOK)
	if s := d.Status(); s&virtio.StatusNeedsReset != 0 || s&virtio.StatusDriverOK == 0 {
		return fmt.Errorf("virtiotest: status %#x after DRIVER_OK", s)
	}
	return nil
}

// ReadDeviceConfig reads n bytes (1, 2, 4 or 8) of device configuration.
func (d *Driver) ReadDeviceConfig(off uint64, n int) uint64 { return d.read(d.Device+off, n) }

// ReadISR reads (and clears) the ISR status.
func (d *Driver) ReadISR() uint8 { return uint8(d.read(d.ISR, 1)) }

// EnableMSIX enables MSI-X and programs vector v with message (addr, v).
func (d *Driver) EnableMSIX(vectors int) {
	if d.MSIXCap == 0 {
		panic("virtiotest: no MSI-X capability")
	}
	tbl := d.ConfigRead(d.MSIXCap+4, 4)
	bar := tbl & 7
	base := uint64(d.ConfigRead(pci.RegBAR0+uint64(4*bar), 4)&^0xf) | uint64(d.ConfigRead(pci.RegBAR0+uint64(4*bar)+4, 4))<<32
	base += uint64(tbl &^ 7)
	for v := 0; v < vectors; v++ {
		e := base + uint64(v)*16
		d.write(e, 4, 0xfee0_0000)
		d.write(e+4, 4, 0)
		d.write(e+8, 4, uint64(0x40+v))
		d.write(e+12, 4, 0)
	}
	d.ConfigWrite(d.MSIXCap+2, 2, 1<<15)
}

// Queue is the driver side of one split virtqueue.
type Queue struct {
	d                 *Driver
	Index             int
	Size              uint16
	Desc, Avail, Used uint64
	NotifyAddr        uint64

	AvailIdx uint16 // next avail->idx the driver publishes
	LastUsed uint16 // used entries consumed
	nextDesc uint16 // descriptor allocation cursor (round robin)
}

// SetupQueue configures and enables queue i with the given size (0: the
// device's maximum) and MSI-X vector (virtio.NoVector for none).
func (d *Driver) SetupQueue(i int, size uint16, vector uint16) (*Queue, error) {
	d.CommonWrite(QueueSelect, 2, uint64(i))
	maxSize := uint16(d.CommonRead(QueueSize, 2))
	if maxSize == 0 {
		return nil, fmt.Errorf("virtiotest: queue %d absent", i)
	}
	if size == 0 {
		size = maxSize
	}
	q := &Queue{d: d, Index: i, Size: size}
	s := uint64(size)
	q.Desc = d.Alloc(16*s, 16)
	q.Avail = d.Alloc(6+2*s, 2)
	q.Used = d.Alloc(6+8*s, 4)
	d.CommonWrite(QueueSize, 2, uint64(size))
	d.CommonWrite(QueueDesc, 8, q.Desc)
	d.CommonWrite(QueueDriver, 4, q.Avail&0xffffffff)
	d.CommonWrite(QueueDriver+4, 4, q.Avail>>32)
	d.CommonWrite(QueueDevice, 8, q.Used)
	d.CommonWrite(QueueMSIXVector, 2, uint64(vector))
	off := d.CommonRead(QueueNotifyOff, 2)
	q.NotifyAddr = d.Notify + off*uint64(d.NotifyMult)
	d.CommonWrite(QueueEnable, 2, 1)
	if d.CommonRead(QueueEnable, 2) != 1 {
		return q, fmt.Errorf("virtiotest: queue %d not enabled (status %#x)", i, d.Status())
	}
	return q, nil
}

// Buf is one buffer of a chain the driver builds.
type Buf struct {
	Addr  uint64
	Len   uint32
	Write bool
}

// SetDesc writes descriptor i of the table at table.
func (q *Queue) SetDesc(table uint64, i uint16, addr uint64, length uint32, flags, next uint16) {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[0:], addr)
	binary.LittleEndian.PutUint32(b[8:], length)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
	if _, err := q.d.Mem.WriteAt(b[:], table+16*uint64(i)); err != nil {
		panic(err)
	}
}

// AddChain writes bufs as a chain of direct descriptors, publishes it and
// returns its head.
func (q *Queue) AddChain(bufs []Buf) uint16 {
	head := q.nextDesc
	for i, b := range bufs {
		idx := q.nextDesc
		q.nextDesc = (q.nextDesc + 1) % q.Size
		var flags uint16
		if b.Write {
			flags |= virtio.DescFWrite
		}
		if i+1 < len(bufs) {
			flags |= virtio.DescFNext
		}
		q.SetDesc(q.Desc, idx, b.Addr, b.Len, flags, q.nextDesc)
	}
	q.Publish(head)
	return head
}

// AddIndirect writes bufs into a new indirect table, points one
// descriptor at it, publishes it and returns its head.
func (q *Queue) AddIndirect(bufs []Buf) uint16 {
	table := q.d.Alloc(16*uint64(len(bufs)), 16)
	for i, b := range bufs {
		var flags uint16
		if b.Write {
			flags |= virtio.DescFWrite
		}
		if i+1 < len(bufs) {
			flags |= virtio.DescFNext
		}
		q.SetDesc(table, uint16(i), b.Addr, b.Len, flags, uint16(i+1))
	}
	head := q.nextDesc
	q.nextDesc = (q.nextDesc + 1) % q.Size
	q.SetDesc(q.Desc, head, table, uint32(16*len(bufs)), virtio.DescFIndirect, 0)
	q.Publish(head)
	return head
}

// Publish puts head in the available ring and advances avail->idx.
func (q *Queue) Publish(head uint16) {
	m := q.d.Mem
	if err := m.PutUint16(q.Avail+4+2*uint64(q.AvailIdx%q.Size), head); err != nil {
		panic(err)
	}
	q.AvailIdx++
	q.SetAvailIdx(q.AvailIdx)
}

// SetAvailIdx writes avail->idx (tests use it to make the index jump).
func (q *Queue) SetAvailIdx(v uint16) {
	if err := q.d.Mem.PutUint16(q.Avail+2, v); err != nil {
		panic(err)
	}
}

// SetAvailFlags writes avail->flags.
func (q *Queue) SetAvailFlags(v uint16) { q.d.Mem.PutUint16(q.Avail, v) }

// SetUsedEvent writes used_event (the driver's EVENT_IDX threshold).
func (q *Queue) SetUsedEvent(v uint16) { q.d.Mem.PutUint16(q.Avail+4+2*uint64(q.Size), v) }

// AvailEvent reads avail_event (the device's EVENT_IDX threshold).
func (q *Queue) AvailEvent() uint16 {
	v, _ := q.d.Mem.Uint16(q.Used + 4 + 8*uint64(q.Size))
	return v
}

// UsedFlags reads used->flags.
func (q *Queue) UsedFlags() uint16 {
	v, _ := q.d.Mem.Uint16(q.Used)
	return v
}

// Kick notifies the queue through its notify address, as a guest does.
func (q *Queue) Kick() { q.d.write(q.NotifyAddr, 2, uint64(q.Index)) }

// UsedIdx reads used->idx.
func (q *Queue) UsedIdx() uint16 {
	v, _ := q.d.Mem.Uint16(q.Used + 2)
	return v
}

// PopUsed returns the next used element, if any.
func (q *Queue) PopUsed() (id, length uint32, ok bool) {
	if q.UsedIdx() == q.LastUsed {
		return 0, 0, false
	}
	e := q.Used + 4 + 8*uint64(q.LastUsed%q.Size)
	id, _ = q.d.Mem.Uint32(e)
	length, _ = q.d.Mem.Uint32(e + 4)
	q.LastUsed++
	return id, length, true
}

// WaitUsed polls for the next used element for up to timeout.
func (q *Queue) WaitUsed(timeout time.Duration) (id, length uint32, err error) {
	deadline := time.Now().Add(timeout)
	for i := 0; ; i++ {
		if id, length, ok := q.PopUsed(); ok {
			return id, length, nil
		}
		if time.Now().After(deadline) {
			return 0, 0, fmt.Errorf("virtiotest: queue %d: no used buffer after %v (status %#x)", q.Index, timeout, q.d.Status())
		}
		if i < 1000 {
			runtime.Gosched() // a device goroutine is usually about to finish
		} else {
			time.Sleep(50 * time.Microsecond)
		}
	}
}
