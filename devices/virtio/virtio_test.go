package virtio_test

import (
	"bytes"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"collective/devices/bus"
	"collective/devices/pci"
	"collective/devices/virtio"
	"collective/devices/virtio/virtiotest"
	"collective/kvm/guestmem"
)

// echo is a test device with one queue: it copies each chain's readable
// bytes into its writable buffers and returns the byte count. Malformed
// chains complete with length 0xdead.
type echo struct {
	mu     sync.Mutex
	stop   chan struct{}
	done   chan struct{}
	bad    atomic.Uint64
	feats  uint64
	cfg    [8]byte
	actErr error
	resets int
}

func (e *echo) Type() uint16                     { return 99 }
func (e *echo) Features() uint64                 { return e.feats }
func (e *echo) QueueSizes() []uint16             { return []uint16{256} }
func (e *echo) ConfigSize() uint64               { return uint64(len(e.cfg)) }
func (e *echo) ReadConfig(off uint64, p []byte)  { copy(p, e.cfg[off:]) }
func (e *echo) WriteConfig(off uint64, p []byte) { copy(e.cfg[off:], p) }

func (e *echo) Activate(mem *guestmem.Memory, qs []*virtio.Queue, irq virtio.Interrupt, _ uint64) error {
	if e.actErr != nil {
		return e.actErr
	}
	e.stop, e.done = make(chan struct{}), make(chan struct{})
	q := qs[0]
	go func() {
		defer close(e.done)
		c := virtio.NewChain()
		buf := make([]byte, 64<<10)
		for {
			for {
				ok, err := q.Pop(c)
				var ce *virtio.ChainError
				if errors.As(err, &ce) {
					e.bad.Add(1)
					if n, _ := q.PushUsed(ce.Head, 0xdead); n {
						irq.SignalQueue(0)
					}
					continue
				}
				if err != nil {
					irq.NeedsReset(err)
					<-e.stop
					return
				}
				if !ok {
					more, _ := q.EnableNotify()
					if more {
						continue
					}
					break
				}
				n := 0
				for _, d := range c.Readable() {
					k, _ := mem.ReadAt(buf[n:n+int(min(uint32(len(buf)-n), d.Len))], d.Addr)
					n += k
				}
				w := 0
				for _, d := range c.Writable() {
					k := min(int(d.Len), n-w)
					mem.WriteAt(buf[w:w+k], d.Addr)
					w += k
				}
				if sig, _ := q.PushUsed(c.Head, uint32(w)); sig {
					irq.SignalQueue(0)
				}
			}
			select {
			case <-q.Doorbell():
			case <-e.stop:
				return
			}
		}
	}()
	return nil
}

func (e *echo) Reset() {
	if e.stop != nil {
		close(e.stop)
		<-e.done
		e.stop = nil
	}
	e.resets++
}

type msiLog struct {
	mu  sync.Mutex
	got []uint32
}

func (m *msiLog) SignalMSI(addr uint64, data uint32) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.got = append(m.got, data)
	return nil
}

type rig struct {
	mem  *guestmem.Memory
	dev  *echo
	t    *virtio.Transport
	drv  *virtiotest.Driver
	msi  *msiLog
	intx atomic.Bool
	mmio *bus.Bus
}

const ramSize = 4 << 20

func newRig(t testing.TB) *rig {
	t.Helper()
	mem, err := guestmem.NewFake(guestmem.Range{GPA: 0, Size: ramSize})
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{mem: mem, dev: &echo{feats: 1 << 3}, msi: &msiLog{}, mmio: &bus.Bus{}}
	r.t, err = virtio.NewPCI("echo", r.dev, mem, r.msi)
	if err != nil {
		t.Fatal(err)
	}
	r.t.SetLogger(slog.New(slog.DiscardHandler))
	r.t.PCI().SetINTx(11, irqFunc(func(h bool) { r.intx.Store(h) }))
	pb := pci.NewBus(pci.MMIOMapper{Bus: r.mmio}, pci.Window{Base: 0xc000_0000, Size: 1 << 24})
	slot, err := pb.Add(r.t.PCI())
	if err != nil {
		t.Fatal(err)
	}
	r.drv, err = virtiotest.New(pb, r.mmio, mem, slot, 0x10000, ramSize-0x10000)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

type irqFunc func(bool)

func (f irqFunc) SetLevel(h bool) { f(h) }

// start negotiates everything offered and sets up queue 0.
func (r *rig) start(t testing.TB, want uint64) *virtiotest.Queue {
	t.Helper()
	if _, err := r.drv.Negotiate(want); err != nil {
		t.Fatal(err)
	}
	q, err := r.drv.SetupQueue(0, 0, virtio.NoVector)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.drv.DriverOK(); err != nil {
		t.Fatal(err)
	}
	return q
}

const all = ^uint64(0)

func TestNegotiation(t *testing.T) {
	r := newRig(t)
	d := r.drv
	offered := d.DeviceFeatures()
	if want := uint64(virtio.FVersion1 | virtio.FIndirectDesc | virtio.FEventIdx | 1<<3); offered != want {
		t.Errorf("offered %#x, want %#x", offered, want)
	}
	acked, err := d.Negotiate(all)
	if err != nil || acked != offered {
		t.Fatalf("Negotiate = %#x, %v", acked, err)
	}
	if got := r.t.Acked(); got != offered {
		t.Errorf("transport acked %#x: unoffered bits kept", got)
	}
	// Without VERSION_1 FEATURES_OK is refused.
	if _, err := d.Negotiate(virtio.FEventIdx); err == nil {
		t.Error("FEATURES_OK accepted without VERSION_1")
	}
	// Features cannot change after FEATURES_OK.
	d.Negotiate(all)
	d.CommonWrite(virtiotest.DriverFeatureSelect, 4, 0)
	d.CommonWrite(virtiotest.DriverFeature, 4, 0)
	if r.t.Acked() != offered {
		t.Error("features changed after FEATURES_OK")
	}
	if n := d.CommonRead(virtiotest.NumQueues, 2); n != 1 {
		t.Errorf("num_queues = %d", n)
	}
	// Queue 1 does not exist: size reads 0.
	d.CommonWrite(virtiotest.QueueSelect, 2, 1)
	if n := d.CommonRead(virtiotest.QueueSize, 2); n != 0 {
		t.Errorf("absent queue size %d", n)
	}
	// Device configuration is reachable through the BAR.
	r.dev.cfg = [8]byte{1, 2, 3, 4, 5, 6, 7, 8}
	if v := d.ReadDeviceConfig(4, 4); v != 0x08070605 {
		t.Errorf("device config = %#x", v)
	}
}

func TestStatusTransitions(t *testing.T) {
	r := newRig(t)
	d := r.drv
	for _, tc := range []struct {
		from, write, want uint8
	}{
		{0, virtio.StatusDriver, 0},
		{0, virtio.StatusDriverOK, 0},
		{virtio.StatusAcknowledge, virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK, virtio.StatusAcknowledge},
		{virtio.StatusAcknowledge, virtio.StatusAcknowledge | virtio.StatusFailed, virtio.StatusAcknowledge | virtio.StatusFailed},
		{virtio.StatusAcknowledge, virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusNeedsReset, virtio.StatusAcknowledge | virtio.StatusDriver},
	} {
		d.Reset()
		if tc.from != 0 {
			d.SetStatus(tc.from)
		}
		d.SetStatus(tc.write)
		if got := d.Status(); got != tc.want {
			t.Errorf("%#x then %#x: status %#x, want %#x", tc.from, tc.write, got, tc.want)
		}
	}
	if r.t.Metrics.BadStatus.Load() == 0 {
		t.Error("no bad status counted")
	}
}

func TestEchoDirectAndIndirect(t *testing.T) {
	r := newRig(t)
	q := r.start(t, all)
	in := r.drv.Alloc(4096, 16)
	out := r.drv.Alloc(4096, 16)
	r.mem.WriteAt([]byte("hello, virtio"), in)
	q.AddChain([]virtiotest.Buf{{Addr: in, Len: 5}, {Addr: in + 5, Len: 8}, {Addr: out, Len: 100, Write: true}})
	q.Kick()
	id, n, err := q.WaitUsed(time.Second)
	if err != nil || id != 0 || n != 13 {
		t.Fatalf("used %d len %d, %v", id, n, err)
	}
	got := make([]byte, 13)
	r.mem.ReadAt(got, out)
	if string(got) != "hello, virtio" {
		t.Errorf("echo %q", got)
	}
	head := q.AddIndirect([]virtiotest.Buf{{Addr: in, Len: 5}, {Addr: out + 200, Len: 3, Write: true}, {Addr: out + 300, Len: 3, Write: true}})
	q.Kick()
	if id, n, err := q.WaitUsed(time.Second); err != nil || id != uint32(head) || n != 5 {
		t.Fatalf("indirect: used %d len %d, %v", id, n, err)
	}
	// The VMM's writes are in the dirty log.
	bm := r.mem.Regions()[0].TakeDirty()
	if p := out / guestmem.PageSize; bm[p/64]&(1<<(p%64)) == 0 {
		t.Error("written buffer page not dirty")
	}
}

func TestInterrupts(t *testing.T) {
	r := newRig(t)
	q := r.start(t, all&^virtio.FEventIdx)
	buf := r.drv.Alloc(64, 16)
	// INTx: ISR bit 0, the line goes high, reading the ISR lowers it.
	q.AddChain([]virtiotest.Buf{{Addr: buf, Len: 8, Write: true}})
	q.Kick()
	q.WaitUsed(time.Second)
	waitFor(t, func() bool { return r.intx.Load() })
	if isr := r.drv.ReadISR(); isr != 1 || r.intx.Load() {
		t.Errorf("ISR %#x, INTx %v after read", isr, r.intx.Load())
	}
	// NO_INTERRUPT suppresses.
	q.SetAvailFlags(virtio.AvailFNoInterrupt)
	q.AddChain([]virtiotest.Buf{{Addr: buf, Len: 8, Write: true}})
	q.Kick()
	q.WaitUsed(time.Second)
	time.Sleep(5 * time.Millisecond)
	if r.intx.Load() {
		t.Error("interrupt despite NO_INTERRUPT")
	}
	q.SetAvailFlags(0)

	// MSI-X: the queue's vector fires, not INTx.
	r.drv.Reset()
	r.drv.Negotiate(all &^ virtio.FEventIdx)
	r.drv.EnableMSIX(2)
	q, err := r.drv.SetupQueue(0, 16, 1)
	if err != nil {
		t.Fatal(err)
	}
	r.drv.CommonWrite(virtiotest.ConfigMSIXVector, 2, 0)
	if v := r.drv.CommonRead(virtiotest.ConfigMSIXVector, 2); v != 0 {
		t.Errorf("config vector reads %#x", v)
	}
	r.drv.CommonWrite(virtiotest.ConfigMSIXVector, 2, 100)
	if v := r.drv.CommonRead(virtiotest.ConfigMSIXVector, 2); v != virtio.NoVector {
		t.Errorf("out-of-range config vector reads %#x", v)
	}
	r.drv.CommonWrite(virtiotest.ConfigMSIXVector, 2, 0)
	r.drv.DriverOK()
	q.AddChain([]virtiotest.Buf{{Addr: buf, Len: 8, Write: true}})
	q.Kick()
	q.WaitUsed(time.Second)
	waitFor(t, func() bool { r.msi.mu.Lock(); defer r.msi.mu.Unlock(); return len(r.msi.got) == 1 })
	if r.msi.got[0] != 0x41 || r.intx.Load() {
		t.Errorf("MSI data %#x, INTx %v", r.msi.got, r.intx.Load())
	}
}

func TestEventIdx(t *testing.T) {
	r := newRig(t)
	q := r.start(t, all)
	buf := r.drv.Alloc(64, 16)
	// used_event = 1: the first completion (used idx 0->1) does not
	// interrupt... except the first decision, which always does.
	q.SetUsedEvent(0)
	q.AddChain([]virtiotest.Buf{{Addr: buf, Len: 8, Write: true}})
	q.Kick()
	q.WaitUsed(time.Second)
	waitFor(t, func() bool { return r.intx.Load() })
	r.drv.ReadISR()
	// used_event far ahead: no interrupt for the next completions.
	q.SetUsedEvent(10)
	for range 3 {
		q.AddChain([]virtiotest.Buf{{Addr: buf, Len: 8, Write: true}})
		q.Kick()
		q.WaitUsed(time.Second)
	}
	time.Sleep(5 * time.Millisecond)
	if r.intx.Load() {
		t.Error("interrupt before used_event")
	}
	// Crossing used_event (used idx 10 -> 11) interrupts.
	for range 7 {
		q.AddChain([]virtiotest.Buf{{Addr: buf, Len: 8, Write: true}})
		q.Kick()
		q.WaitUsed(time.Second)
	}
	waitFor(t, func() bool { return r.intx.Load() })
	// The device publishes avail_event when it goes idle.
	waitFor(t, func() bool { return q.AvailEvent() == q.AvailIdx })
}

func waitFor(t testing.TB, f func() bool) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Second); !f(); {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached")
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// TestMalformed builds each kind of bad chain. Every one either fails its
// request (length 0xdead) or sets NEEDS_RESET; nothing panics and nothing
// outside the fake RAM is touched (guestmem would return an error).
func TestMalformed(t *testing.T) {
	type setup func(r *rig, q *virtiotest.Queue, buf uint64)
	for _, tc := range []struct {
		name       string
		build      setup
		needsReset bool
	}{
		{"loop", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(q.Desc, 0, buf, 8, virtio.DescFNext, 1)
			q.SetDesc(q.Desc, 1, buf, 8, virtio.DescFNext, 0)
			q.Publish(0)
		}, false},
		{"self loop", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(q.Desc, 3, buf, 8, virtio.DescFNext, 3)
			q.Publish(3)
		}, false},
		{"next out of range", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(q.Desc, 0, buf, 8, virtio.DescFNext, 300)
			q.Publish(0)
		}, false},
		{"buffer outside memory", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(q.Desc, 0, ramSize-4, 8, 0, 0)
			q.Publish(0)
		}, false},
		{"buffer wraps", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(q.Desc, 0, ^uint64(0)-3, 8, virtio.DescFWrite, 0)
			q.Publish(0)
		}, false},
		{"too long", func(r *rig, q *virtiotest.Queue, buf uint64) {
			for i := uint16(0); i < q.Size; i++ {
				q.SetDesc(q.Desc, i, buf, 1, virtio.DescFNext, (i+1)%q.Size)
			}
			q.Publish(0)
		}, false},
		{"readable after writable", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(q.Desc, 0, buf, 8, virtio.DescFNext|virtio.DescFWrite, 1)
			q.SetDesc(q.Desc, 1, buf, 8, 0, 0)
			q.Publish(0)
		}, false},
		{"avail index jump", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetAvailIdx(q.Size + 1)
		}, true},
		{"head out of range", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.Publish(q.Size + 7)
		}, true},
		{"indirect length not a multiple of 16", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(q.Desc, 0, buf, 24, virtio.DescFIndirect, 0)
			q.Publish(0)
		}, false},
		{"indirect empty", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(q.Desc, 0, buf, 0, virtio.DescFIndirect, 0)
			q.Publish(0)
		}, false},
		{"indirect with next", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(buf, 0, buf, 8, 0, 0)
			q.SetDesc(q.Desc, 0, buf, 16, virtio.DescFIndirect|virtio.DescFNext, 1)
			q.Publish(0)
		}, false},
		{"nested indirect", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(buf, 0, buf, 16, virtio.DescFIndirect, 0)
			q.SetDesc(q.Desc, 0, buf, 16, virtio.DescFIndirect, 0)
			q.Publish(0)
		}, false},
		{"indirect loop", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(buf, 0, buf+64, 8, virtio.DescFNext, 1)
			q.SetDesc(buf, 1, buf+64, 8, virtio.DescFNext, 0)
			q.SetDesc(q.Desc, 0, buf, 32, virtio.DescFIndirect, 0)
			q.Publish(0)
		}, false},
		{"indirect next out of table", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(buf, 0, buf+64, 8, virtio.DescFNext, 2)
			q.SetDesc(buf, 1, buf+64, 8, 0, 0)
			q.SetDesc(q.Desc, 0, buf, 32, virtio.DescFIndirect, 0)
			q.Publish(0)
		}, false},
		{"indirect table outside memory", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(q.Desc, 0, ramSize-16, 32, virtio.DescFIndirect, 0)
			q.Publish(0)
		}, false},
		{"indirect table huge", func(r *rig, q *virtiotest.Queue, buf uint64) {
			q.SetDesc(q.Desc, 0, 0, 0xfffffff0, virtio.DescFIndirect, 0)
			q.Publish(0)
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			q := r.start(t, all)
			buf := r.drv.Alloc(4096, 16)
			tc.build(r, q, buf)
			q.Kick()
			if tc.needsReset {
				waitFor(t, func() bool { return r.drv.Status()&virtio.StatusNeedsReset != 0 })
				if r.t.Metrics.NeedsReset.Load() == 0 {
					t.Error("no NEEDS_RESET counted")
				}
			} else {
				_, n, err := q.WaitUsed(time.Second)
				if err != nil || n != 0xdead {
					t.Fatalf("used len %#x, %v", n, err)
				}
				if r.drv.Status()&virtio.StatusNeedsReset != 0 {
					t.Error("NEEDS_RESET for a request error")
				}
			}
			// The device recovers after a reset.
			q = r.start(t, all)
			q.AddChain([]virtiotest.Buf{{Addr: buf, Len: 4}, {Addr: buf + 8, Len: 4, Write: true}})
			q.Kick()
			if _, n, err := q.WaitUsed(time.Second); err != nil || n != 4 {
				t.Fatalf("after reset: len %d, %v", n, err)
			}
		})
	}
}

func TestIndirectWithoutFeature(t *testing.T) {
	r := newRig(t)
	q := r.start(t, all&^virtio.FIndirectDesc)
	buf := r.drv.Alloc(64, 16)
	q.AddIndirect([]virtiotest.Buf{{Addr: buf, Len: 4}})
	q.Kick()
	if _, n, err := q.WaitUsed(time.Second); err != nil || n != 0xdead {
		t.Fatalf("used len %#x, %v", n, err)
	}
}

func TestQueueSetupChecks(t *testing.T) {
	for _, tc := range []struct {
		name  string
		write func(d *virtiotest.Driver)
	}{
		{"size not a power of two", func(d *virtiotest.Driver) { d.CommonWrite(virtiotest.QueueSize, 2, 100) }},
		{"size too large", func(d *virtiotest.Driver) { d.CommonWrite(virtiotest.QueueSize, 2, 512) }},
		{"size zero", func(d *virtiotest.Driver) { d.CommonWrite(virtiotest.QueueSize, 2, 0) }},
		{"descriptor table misaligned", func(d *virtiotest.Driver) { d.CommonWrite(virtiotest.QueueDesc, 8, 0x20008) }},
		{"used ring misaligned", func(d *virtiotest.Driver) { d.CommonWrite(virtiotest.QueueDevice, 8, 0x20002) }},
		{"avail ring outside memory", func(d *virtiotest.Driver) { d.CommonWrite(virtiotest.QueueDriver, 8, ramSize-4) }},
		{"table at the top of the address space", func(d *virtiotest.Driver) { d.CommonWrite(virtiotest.QueueDesc, 8, ^uint64(0xf)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			d := r.drv
			d.Negotiate(all)
			d.CommonWrite(virtiotest.QueueSelect, 2, 0)
			d.CommonWrite(virtiotest.QueueDesc, 8, 0x20000)
			d.CommonWrite(virtiotest.QueueDriver, 8, 0x30000)
			d.CommonWrite(virtiotest.QueueDevice, 8, 0x40000)
			tc.write(d)
			d.CommonWrite(virtiotest.QueueEnable, 2, 1)
			if d.CommonRead(virtiotest.QueueEnable, 2) != 0 || d.Status()&virtio.StatusNeedsReset == 0 {
				t.Errorf("enable: %d, status %#x", d.CommonRead(virtiotest.QueueEnable, 2), d.Status())
			}
			if err := d.Reset(); err != nil {
				t.Error(err)
			}
		})
	}
}

func TestResetRestoresQueues(t *testing.T) {
	r := newRig(t)
	q := r.start(t, all)
	buf := r.drv.Alloc(64, 16)
	q.AddChain([]virtiotest.Buf{{Addr: buf, Len: 8, Write: true}})
	q.Kick()
	q.WaitUsed(time.Second)
	fresh := newRig(t).t.Save()
	r.drv.Reset()
	st := r.t.Save()
	// After a reset everything but the PCI function matches a new device.
	st.PCI, fresh.PCI = pci.ConfigState{}, pci.ConfigState{}
	if diff := cmp.Diff(fresh, st); diff != "" {
		t.Errorf("after reset (-new +reset):\n%s", diff)
	}
	if r.dev.resets != 1 {
		t.Errorf("device reset %d times", r.dev.resets)
	}
}

func TestActivateFailure(t *testing.T) {
	r := newRig(t)
	r.dev.actErr = errors.New("no backend")
	r.drv.Negotiate(all)
	r.drv.SetupQueue(0, 0, virtio.NoVector)
	r.drv.SetStatus(r.drv.Status() | virtio.StatusDriverOK)
	if r.drv.Status()&virtio.StatusNeedsReset == 0 {
		t.Errorf("status %#x after failed activation", r.drv.Status())
	}
}

func TestSaveRestore(t *testing.T) {
	r := newRig(t)
	r.drv.EnableMSIX(2)
	q := r.start(t, all)
	buf := r.drv.Alloc(64, 16)
	for range 5 {
		q.AddChain([]virtiotest.Buf{{Addr: buf, Len: 8, Write: true}})
		q.Kick()
		q.WaitUsed(time.Second)
	}
	st := r.t.Save()

	// Restore into a new transport over the same memory.
	r2 := newRig(t)
	r2.mem = r.mem
	tr, err := virtio.NewPCI("echo", r2.dev, r.mem, r2.msi)
	if err != nil {
		t.Fatal(err)
	}
	tr.PCI().SetINTx(11, irqFunc(func(bool) {}))
	pb := pci.NewBus(pci.MMIOMapper{Bus: &bus.Bus{}}, pci.Window{Base: 0xc000_0000, Size: 1 << 24})
	pb.Add(tr.PCI())
	if err := tr.Restore(st); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(st, tr.Save()); diff != "" {
		t.Errorf("round trip (-saved +restored):\n%s", diff)
	}
	if r2.dev.stop == nil {
		t.Error("device not activated by Restore")
	}
	tr.Restore(st) // restoring over an active transport resets the device first

	for _, tc := range []struct {
		name string
		mod  func(*virtio.State)
	}{
		{"version", func(s *virtio.State) { s.Version = 7 }},
		{"type", func(s *virtio.State) { s.DeviceType = 1 }},
		{"acked not offered", func(s *virtio.State) { s.Acked |= 1 << 40 }},
		{"queue size", func(s *virtio.State) { s.Queues[0].Size = 100 }},
		{"queue too big", func(s *virtio.State) { s.Queues[0].Size = 512 }},
		{"misaligned", func(s *virtio.State) { s.Queues[0].Desc |= 8 }},
		{"ring outside memory", func(s *virtio.State) { s.Queues[0].Device = ramSize }},
		{"status", func(s *virtio.State) { s.Status = virtio.StatusDriverOK }},
		{"no VERSION_1", func(s *virtio.State) { s.Acked &^= virtio.FVersion1 }},
		{"vector", func(s *virtio.State) { s.Queues[0].MSIXVector = 9 }},
		{"queue count", func(s *virtio.State) { s.Queues = nil }},
		{"PCI identity", func(s *virtio.State) { s.PCI.Data[0] = 0 }},
	} {
		bad := st
		bad.Queues = append([]virtio.QueueState(nil), st.Queues...)
		tc.mod(&bad)
		if err := tr.Restore(bad); err == nil {
			t.Errorf("%s: restored", tc.name)
		}
	}
}

func TestBARAccessesNeverPanic(t *testing.T) {
	r := newRig(t)
	r.start(t, all)
	base := r.t.PCI().BAR(0)
	p := make([]byte, 8)
	for off := uint64(0); off < virtio.BARSize; off += 1 {
		for _, n := range []int{1, 2, 3, 4, 8} {
			r.mmio.Read(base+off, p[:n])
			if off >= virtio.ISROffset { // leave the common config to the other tests
				r.mmio.Write(base+off, bytes.Repeat([]byte{0xff}, n))
			}
		}
	}
}
