package fuzz

import (
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"collective/devices/bus"
	"collective/devices/pci"
	"collective/devices/virtio"
	"collective/devices/virtio/virtiotest"
	"collective/devices/virtioblk"
	"collective/kvm/guestmem"
)

// Fake guest RAM for the virtio targets: two regions with a hole, so that
// buffers can fall between them or off the end.
const (
	vRAM0     = 0x0
	vRAM0Size = 0x40000
	vRAM1     = 0x80000
	vRAM1Size = 0x10000
	vAlloc    = 0x20000 // driver allocations from here
)

func virtioMem(t testing.TB) *guestmem.Memory {
	m, err := guestmem.NewFake(guestmem.Range{GPA: vRAM0, Size: vRAM0Size}, guestmem.Range{GPA: vRAM1, Size: vRAM1Size})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// manualDev exposes its queues to the fuzz target instead of serving them.
type manualDev struct {
	qs      []*virtio.Queue
	feats   uint64
	cfg     [16]byte
	actives int
}

func (m *manualDev) Type() uint16                   { return 42 }
func (m *manualDev) Features() uint64               { return m.feats }
func (m *manualDev) QueueSizes() []uint16           { return []uint16{16, 8} }
func (m *manualDev) ConfigSize() uint64             { return uint64(len(m.cfg)) }
func (m *manualDev) ReadConfig(o uint64, p []byte)  { copy(p, m.cfg[o:]) }
func (m *manualDev) WriteConfig(o uint64, p []byte) { copy(m.cfg[o:], p) }
func (m *manualDev) Reset()                         { m.qs = nil; m.actives-- }
func (m *manualDev) Activate(_ *guestmem.Memory, qs []*virtio.Queue, _ virtio.Interrupt, _ uint64) error {
	m.qs = qs
	m.actives++
	return nil
}

type virtioRig struct {
	mem  *guestmem.Memory
	tr   *virtio.Transport
	mmio *bus.Bus
	pb   *pci.Bus
	drv  *virtiotest.Driver
}

func newVirtioRig(t testing.TB, dev virtio.Device, withDriver bool) *virtioRig {
	r := &virtioRig{mem: virtioMem(t), mmio: &bus.Bus{}}
	var err error
	r.tr, err = virtio.NewPCI("fuzz", dev, r.mem, nil)
	if err != nil {
		t.Fatal(err)
	}
	r.tr.SetLogger(quiet)
	r.tr.PCI().SetINTx(5, &fakeIRQ{})
	r.pb = pci.NewBus(pci.MMIOMapper{Bus: r.mmio}, pci.Window{Base: 0xc000_0000, Size: 1 << 20})
	slot, err := r.pb.Add(r.tr.PCI())
	if err != nil {
		t.Fatal(err)
	}
	if withDriver {
		r.drv, err = virtiotest.New(r.pb, r.mmio, r.mem, slot, vAlloc, vRAM0Size-vAlloc)
		if err != nil {
			t.Fatal(err)
		}
	}
	return r
}

// FuzzVirtqueue fills a queue's descriptor table and available ring with
// fuzz bytes and walks every chain. Invariants: a chain never has more
// descriptors than the queue size; every buffer of a good chain lies in
// guest RAM; readable buffers come first and the sums match; an error
// leaves no descriptors behind; nothing panics.
//
// Input: byte 0 selects features (bit 0 INDIRECT_DESC, bit 1 EVENT_IDX)
// and the queue size (bits 4-5: 2, 4, 8, 16); byte 1 moves the avail
// index; the rest is copied over the descriptor table, the available ring
// and an area indirect tables and buffers can point into.
func FuzzVirtqueue(f *testing.F) {
	// One chain of three, one indirect chain.
	seed := make([]byte, 2, 2+16*16+64)
	seed[0], seed[1] = 0x33, 2
	desc := func(addr uint64, l uint32, flags, next uint16) []byte {
		var b [16]byte
		binary.LittleEndian.PutUint64(b[0:], addr)
		binary.LittleEndian.PutUint32(b[8:], l)
		binary.LittleEndian.PutUint16(b[12:], flags)
		binary.LittleEndian.PutUint16(b[14:], next)
		return b[:]
	}
	seed = append(seed, desc(0x30000, 16, virtio.DescFNext, 1)...)
	seed = append(seed, desc(0x30100, 512, virtio.DescFNext|virtio.DescFWrite, 2)...)
	seed = append(seed, desc(0x30400, 1, virtio.DescFWrite, 0)...)
	seed = append(seed, desc(0x38000, 32, virtio.DescFIndirect, 0)...)
	f.Add(seed)
	f.Add([]byte{0x31, 1, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 1, 0, 0, 0})             // self loop
	f.Add([]byte{0x33, 0xff, 0, 0, 0xfc, 0xff, 0x03, 0, 0, 0, 16, 0, 0, 0, 2, 0, 0, 0}) // off the end of RAM, avail jump
	f.Add([]byte{0x01, 1, 0, 0, 0x08, 0, 0, 0, 0, 0, 0xf0, 0xff, 0, 0, 4, 0, 0, 0})     // huge indirect table

	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 2 {
			return
		}
		feats := uint64(virtio.FVersion1)
		if data[0]&1 != 0 {
			feats |= virtio.FIndirectDesc
		}
		if data[0]&2 != 0 {
			feats |= virtio.FEventIdx
		}
		size := uint16(2) << (data[0] >> 4 & 3)
		dev := &manualDev{}
		r := newVirtioRig(t, dev, true)
		if _, err := r.drv.Negotiate(feats); err != nil {
			t.Fatal(err)
		}
		dq, err := r.drv.SetupQueue(0, size, virtio.NoVector)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.drv.DriverOK(); err != nil {
			t.Fatal(err)
		}
		q := dev.qs[0]
		// Fuzz bytes over the descriptor table, then the avail ring
		// entries, then a data area at 0x30000 (indirect tables).
		rest := data[2:]
		n := min(len(rest), 16*int(size))
		r.mem.WriteAt(rest[:n], dq.Desc)
		rest = rest[n:]
		n = min(len(rest), 2*int(size))
		r.mem.WriteAt(rest[:n], dq.Avail+4)
		rest = rest[n:]
		r.mem.WriteAt(rest[:min(len(rest), 0x10000)], 0x30000)
		r.mem.WriteAt(rest[:min(len(rest), 0x1000)], 0x38000)
		dq.SetAvailIdx(uint16(data[1]))

		c := virtio.NewChain()
		for range 3 * int(size) {
			ok, err := q.Pop(c)
			var ce *virtio.ChainError
			switch {
			case errors.As(err, &ce):
				if len(c.Descs) != 0 || c.ReadLen != 0 || c.WriteLen != 0 {
					t.Fatalf("error %v with %d descriptors", err, len(c.Descs))
				}
				if ce.Head >= size {
					t.Fatalf("chain error for head %d, queue size %d", ce.Head, size)
				}
				if _, err := q.PushUsed(ce.Head, 0); err != nil {
					t.Fatal(err)
				}
				continue
			case err != nil:
				if !errors.Is(err, virtio.ErrAvailIdx) && !errors.Is(err, virtio.ErrHeadIndex) {
					t.Fatalf("unexpected queue error %v", err)
				}
				return
			case !ok:
				if more, err := q.EnableNotify(); more || err != nil {
					t.Fatalf("EnableNotify on an empty ring = %v, %v", more, err)
				}
				return
			}
			if len(c.Descs) > int(size) {
				t.Fatalf("chain of %d descriptors in a queue of %d", len(c.Descs), size)
			}
			var rl, wl uint64
			for i, d := range c.Descs {
				if d.Len > 0 && !r.mem.Contains(d.Addr, uint64(d.Len)) {
					t.Fatalf("descriptor %d outside guest RAM: %#x+%#x", i, d.Addr, d.Len)
				}
				if d.Write != (i >= c.NumReadable) {
					t.Fatalf("descriptor %d: write %v, %d readable", i, d.Write, c.NumReadable)
				}
				if d.Write {
					wl += uint64(d.Len)
				} else {
					rl += uint64(d.Len)
				}
			}
			if rl != c.ReadLen || wl != c.WriteLen {
				t.Fatalf("lengths %d/%d, chain says %d/%d", rl, wl, c.ReadLen, c.WriteLen)
			}
			if _, err := q.PushUsed(c.Head, uint32(wl)); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// FuzzVirtioPCI drives a virtio-pci function with sequences of
// configuration-space and BAR accesses. Invariants: nothing panics; the
// state Save returns is accepted by Restore on a fresh function and saves
// back equal; after a reset (status 0) every queue is back to its
// initial state and the status reads 0.
//
// Input: 4-byte steps: op (bit 0 write, bit 1 BAR instead of config,
// bits 2-3 size 1/2/4/8), offset low, offset high (BAR) , value.
func FuzzVirtioPCI(f *testing.F) {
	f.Add([]byte{
		3 | 0<<2, 20, 0, 1, // status ACK
		3 | 0<<2, 20, 0, 3, // DRIVER
		3 | 2<<2, 8, 0, 1, 3 | 2<<2, 12, 0, 1, // driver features word 1 = VERSION_1
		3 | 0<<2, 20, 0, 11, // FEATURES_OK
		3 | 1<<2, 22, 0, 0, 3 | 1<<2, 24, 0, 8, // queue 0 size 8
		3 | 2<<2, 32, 0, 0, 3 | 2<<2, 36, 0, 0, // desc 0
		3 | 1<<2, 28, 0, 1, // enable
		3 | 0<<2, 20, 0, 15, // DRIVER_OK
		1 | 1<<2, 4, 0, 0, // config: command 0
		1 | 2<<2, 0x10, 0, 0xff, // size BAR0
		0 | 2<<2, 0x10, 0, 0,
		3 | 1<<2, 0x0c, 0x40, 0, // MSI-X table
	})
	f.Add([]byte{3, 20, 0, 0x80, 3, 20, 0, 0, 1 | 1<<2, 0x4a, 0, 0xc0})
	f.Fuzz(func(t *testing.T, data []byte) {
		dev := &manualDev{feats: 1 << 5}
		r := newVirtioRig(t, dev, false)
		cfgIO := r.pb
		bar := r.tr.BAR()
		p := make([]byte, 8)
		for len(data) >= 4 {
			op, off, val := data[0], uint64(data[1])|uint64(data[2])<<8, data[3]
			data = data[4:]
			n := 1 << (op >> 2 & 3)
			for i := range n {
				p[i] = val + uint8(i)
			}
			if op&2 != 0 {
				off %= virtio.BARSize + 0x100
				if op&1 != 0 {
					bar.Write(off, p[:n])
				} else {
					bar.Read(off, p[:n])
				}
				continue
			}
			// Configuration space through mechanism 1, slot 1.
			var a [4]byte
			binary.LittleEndian.PutUint32(a[:], 0x8000_0800|uint32(off&0xfc))
			cfgIO.Write(0, a[:])
			k := min(n, 4)
			port := 4 + off%4
			if port-4+uint64(k) > 4 {
				k = 1
			}
			if op&1 != 0 {
				cfgIO.Write(port, p[:k])
			} else {
				cfgIO.Read(port, p[:k])
			}
		}
		st := r.tr.Save()
		r2 := newVirtioRig(t, &manualDev{feats: 1 << 5}, false)
		if err := r2.tr.Restore(st); err != nil {
			t.Fatalf("Restore(Save()) = %v", err)
		}
		if diff := cmp.Diff(st, r2.tr.Save()); diff != "" {
			t.Fatalf("Save/Restore round trip (-saved +restored):\n%s", diff)
		}
		// Reset.
		binary.LittleEndian.PutUint16(p, 0)
		// Memory decoding may be off or the BAR moved: reset through the
		// BAR window directly, as a driver that found it would.
		bar.Write(20, p[:1])
		if s := r.tr.Status(); s != 0 {
			t.Fatalf("status %#x after reset", s)
		}
		after := r.tr.Save()
		for i, q := range after.Queues {
			if q.Enabled || q.NextAvail != 0 || q.NextUsed != 0 || q.Desc != 0 || q.MSIXVector != virtio.NoVector || q.Size != dev.QueueSizes()[i] {
				t.Fatalf("queue %d after reset: %+v", i, q)
			}
		}
		if after.Acked != 0 || after.NeedsReset || after.ISR != 0 {
			t.Fatalf("after reset: acked %#x needs reset %v ISR %#x", after.Acked, after.NeedsReset, after.ISR)
		}
		if dev.actives != 0 && dev.actives != 1 {
			t.Fatalf("device activated %d times without reset", dev.actives)
		}
	})
}

// memDisk is an in-memory Backend that fails any access beyond its size.
type memDisk struct {
	mu   sync.Mutex
	b    []byte
	oob  bool
	sync int
}

func (m *memDisk) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.b)) {
		m.oob = true
		return 0, errors.New("out of range")
	}
	return copy(p, m.b[off:]), nil
}

func (m *memDisk) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.b)) {
		m.oob = true
		return 0, errors.New("out of range")
	}
	return copy(m.b[off:], p), nil
}

func (m *memDisk) zero(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || n < 0 || off+n > int64(len(m.b)) {
		m.oob = true
		return errors.New("out of range")
	}
	clear(m.b[off : off+n])
	return nil
}

// VectorWriter makes the device merge adjacent writes (its dispatcher
// then parses every request itself).
func (m *memDisk) VectorWriter() virtioblk.VectorWriter { return m }

// WritevAt implements virtioblk.VectorWriter, with WriteAt's range check.
func (m *memDisk) WritevAt(bufs [][]byte, off int64) (int64, error) {
	var n int64
	for _, p := range bufs {
		k, err := m.WriteAt(p, off+n)
		n += int64(k)
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func (m *memDisk) Sync() error              { m.mu.Lock(); m.sync++; m.mu.Unlock(); return nil }
func (m *memDisk) Punch(off, n int64) error { return m.zero(off, n) }
func (m *memDisk) Zero(off, n int64) error  { return m.zero(off, n) }
func (m *memDisk) Size() int64              { return int64(len(m.b)) }
func (m *memDisk) Close() error             { return nil }

// FuzzVirtioBlk sends random requests to a virtio-blk device. Invariants:
// nothing panics; the backend is never accessed out of range; every
// published chain comes back (or the device asks for a reset); a used
// length never exceeds the chain's writable bytes; reset stops the device.
//
// Input: 12-byte requests: type, sector (2 bytes, high values run off the
// disk), data length in sectors (1 byte), layout (bit 0: indirect, bit 1:
// split header, bit 2: status inside the data buffer, bit 3: write flag
// inverted on the data, bit 4: drop the status, bit 5: odd length), then 6
// bytes of payload for discard segments.
func FuzzVirtioBlk(f *testing.F) {
	f.Add([]byte{
		virtioblk.TypeOut, 3, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0,
		virtioblk.TypeIn, 3, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0,
		virtioblk.TypeFlush, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
		virtioblk.TypeGetID, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0,
		virtioblk.TypeDiscard, 0, 0, 1, 0, 1, 0, 0, 0, 4, 0, 0,
		virtioblk.TypeWriteZeroes, 0, 0, 1, 0, 9, 0, 0, 0, 4, 0, 1,
	})
	f.Add([]byte{virtioblk.TypeIn, 0xff, 0xff, 8, 0x24, 0, 0, 0, 0, 0, 0, 0, 99, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		disk := &memDisk{b: make([]byte, 64*512)}
		blk, err := virtioblk.New(virtioblk.Config{Backend: disk, Serial: "fuzz", QueueSize: 32, MaxInFlight: 4, Workers: 2, Log: quiet})
		if err != nil {
			t.Fatal(err)
		}
		r := newVirtioRig(t, blk, true)
		if _, err := r.drv.Negotiate(^uint64(0)); err != nil {
			t.Fatal(err)
		}
		q, err := r.drv.SetupQueue(0, 0, virtio.NoVector)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.drv.DriverOK(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			r.drv.Reset()
			if disk.oob {
				t.Fatal("backend accessed out of range")
			}
		}()
		published := 0
		writable := map[uint16]uint64{}
		buf := r.drv.Alloc(16*512+64, 512)
		hdr := r.drv.Alloc(16, 16)
		status := r.drv.Alloc(1, 1)
		for len(data) >= 12 && published < 24 {
			typ, sector, nsec, layout := data[0], uint64(binary.LittleEndian.Uint16(data[1:])), uint32(data[3]%17), data[4]
			payload := data[6:12]
			data = data[12:]
			if sector > 0xff00 {
				sector = ^uint64(0) - sector
			}
			var h [16]byte
			binary.LittleEndian.PutUint32(h[0:], uint32(typ)%16)
			binary.LittleEndian.PutUint64(h[8:], sector)
			r.mem.WriteAt(h[:], hdr)
			r.mem.WriteAt(payload, buf)
			dlen := nsec * 512
			if layout&0x20 != 0 {
				dlen += 7
			}
			write := typ == virtioblk.TypeIn || typ == virtioblk.TypeGetID
			if layout&8 != 0 {
				write = !write
			}
			var bufs []virtiotest.Buf
			if layout&2 != 0 {
				bufs = append(bufs, virtiotest.Buf{Addr: hdr, Len: 5}, virtiotest.Buf{Addr: hdr + 5, Len: 11})
			} else {
				bufs = append(bufs, virtiotest.Buf{Addr: hdr, Len: 16})
			}
			if dlen > 0 {
				bufs = append(bufs, virtiotest.Buf{Addr: buf, Len: dlen, Write: write})
			}
			if layout&0x10 == 0 {
				bufs = append(bufs, virtiotest.Buf{Addr: status, Len: 1, Write: true})
			}
			var wl uint64
			for _, b := range bufs {
				if b.Write {
					wl += uint64(b.Len)
				}
			}
			var head uint16
			if layout&1 != 0 {
				head = q.AddIndirect(bufs)
			} else {
				head = q.AddChain(bufs)
			}
			writable[head] = wl
			published++
			q.Kick()
			// Wait for each request: buffers are reused.
			id, n, err := q.WaitUsed(2 * time.Second)
			if err != nil {
				if r.tr.Status()&virtio.StatusNeedsReset != 0 {
					return
				}
				t.Fatal(err)
			}
			if w, ok := writable[uint16(id)]; !ok || uint64(n) > w {
				t.Fatalf("used id %d len %d, writable %d (known %v)", id, n, w, ok)
			}
		}
	})
}
