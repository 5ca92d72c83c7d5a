package virtio_test

import (
	"log/slog"
	"testing"

	"collective/devices/bus"
	"collective/devices/pci"
	"collective/devices/virtio"
	"collective/devices/virtio/virtiotest"
	"collective/kvm/guestmem"
)

// manual is a device whose queue the test drives by hand.
type manual struct{ q *virtio.Queue }

func (m *manual) Type() uint16               { return 99 }
func (m *manual) Features() uint64           { return 0 }
func (m *manual) QueueSizes() []uint16       { return []uint16{256} }
func (m *manual) ConfigSize() uint64         { return 0 }
func (m *manual) ReadConfig(uint64, []byte)  {}
func (m *manual) WriteConfig(uint64, []byte) {}
func (m *manual) Reset()                     { m.q = nil }
func (m *manual) Activate(_ *guestmem.Memory, qs []*virtio.Queue, _ virtio.Interrupt, _ uint64) error {
	m.q = qs[0]
	return nil
}

func newManual(tb testing.TB, features uint64) (*manual, *virtiotest.Queue, *virtiotest.Driver) {
	mem, _ := guestmem.NewFake(guestmem.Range{GPA: 0, Size: ramSize})
	m := &manual{}
	tr, err := virtio.NewPCI("manual", m, mem, nil)
	if err != nil {
		tb.Fatal(err)
	}
	tr.SetLogger(slog.New(slog.DiscardHandler))
	mmio := &bus.Bus{}
	pb := pci.NewBus(pci.MMIOMapper{Bus: mmio}, pci.Window{Base: 0xc000_0000, Size: 1 << 24})
	slot, _ := pb.Add(tr.PCI())
	d, err := virtiotest.New(pb, mmio, mem, slot, 0x10000, ramSize-0x10000)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := d.Negotiate(features); err != nil {
		tb.Fatal(err)
	}
	q, err := d.SetupQueue(0, 0, virtio.NoVector)
	if err != nil {
		tb.Fatal(err)
	}
	if err := d.DriverOK(); err != nil {
		tb.Fatal(err)
	}
	return m, q, d
}

// BenchmarkPopPush measures the device side of one request: pop a
// three-descriptor chain and push it to the used ring (EVENT_IDX on).
func BenchmarkPopPush(b *testing.B) {
	m, q, d := newManual(b, all)
	buf := d.Alloc(4096, 16)
	bufs := []virtiotest.Buf{{Addr: buf, Len: 16}, {Addr: buf + 16, Len: 4096 - 17, Write: true}, {Addr: buf + 4095, Len: 1, Write: true}}
	c := virtio.NewChain()
	b.ReportAllocs()
	for b.Loop() {
		q.AddChain(bufs)
		ok, err := m.q.Pop(c)
		if !ok || err != nil {
			b.Fatal(ok, err)
		}
		if _, err := m.q.PushUsed(c.Head, 4096); err != nil {
			b.Fatal(err)
		}
		q.PopUsed()
	}
}

func TestPopPushAllocs(t *testing.T) {
	m, q, d := newManual(t, all)
	buf := d.Alloc(4096, 16)
	bufs := []virtiotest.Buf{{Addr: buf, Len: 16}, {Addr: buf + 16, Len: 512, Write: true}}
	c := virtio.NewChain()
	ind := d.Alloc(32, 16)
	n := testing.AllocsPerRun(100, func() {
		q.AddChain(bufs)
		m.q.Pop(c)
		m.q.PushUsed(c.Head, 1)
		q.PopUsed()
		// and an indirect chain
		q.SetDesc(ind, 0, buf, 16, virtio.DescFNext, 1)
		q.SetDesc(ind, 1, buf+16, 16, virtio.DescFWrite, 0)
		q.SetDesc(q.Desc, 0, ind, 32, virtio.DescFIndirect, 0)
		q.Publish(0)
		m.q.Pop(c)
		m.q.PushUsed(c.Head, 1)
		q.PopUsed()
		m.q.EnableNotify()
		m.q.DisableNotify()
	})
	if n != 0 {
		t.Errorf("pop + push allocate %v times", n)
	}
}

// TestPushUsedBatch returns three chains with one used index update, in
// order, with their lengths; with EVENT_IDX, the batch asks for an
// interrupt only when it crosses used_event.
func TestPushUsedBatch(t *testing.T) {
	m, q, d := newManual(t, all)
	buf := d.Alloc(64, 16)
	c := virtio.NewChain()
	pop := func(n int) []virtio.Used {
		var used []virtio.Used
		for i := range n {
			q.AddChain([]virtiotest.Buf{{Addr: buf, Len: 8, Write: true}})
			if ok, err := m.q.Pop(c); !ok || err != nil {
				t.Fatalf("pop: %v %v", ok, err)
			}
			used = append(used, virtio.Used{Head: c.Head, Len: uint32(100 + i)})
		}
		return used
	}
	used := pop(3)
	before := q.UsedIdx()
	if _, err := m.q.PushUsedBatch(used); err != nil {
		t.Fatal(err)
	}
	if got := q.UsedIdx(); got != before+3 {
		t.Fatalf("used idx %d after a batch of 3 from %d", got, before)
	}
	for i, u := range used {
		id, n, ok := q.PopUsed()
		if !ok || id != uint32(u.Head) || n != u.Len {
			t.Errorf("used element %d: %d, %d, %v; want head %d, %d bytes", i, id, n, ok, u.Head, u.Len)
		}
	}
	// used_event 5: a batch taking the index from 3 to 5 does not cross
	// it, one from 5 to 7 does.
	q.SetUsedEvent(5)
	if sig, err := m.q.PushUsedBatch(pop(2)); err != nil || sig {
		t.Errorf("batch to used idx 5, used_event 5: interrupt %v, %v", sig, err)
	}
	if sig, err := m.q.PushUsedBatch(pop(2)); err != nil || !sig {
		t.Errorf("batch across used_event 5: interrupt %v, %v", sig, err)
	}
}
