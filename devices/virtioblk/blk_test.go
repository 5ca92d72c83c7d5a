package virtioblk_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
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

const (
	ramSize  = 8 << 20
	diskSize = 1 << 20
)

// spy wraps a backend to watch syncs and concurrency.
type spy struct {
	virtioblk.Backend
	syncs     atomic.Int64
	syncGate  chan struct{} // if set, Sync waits for it
	inflight  atomic.Int64
	maxInFlt  atomic.Int64
	readDelay time.Duration
	// beforeRead, if set, runs in ReadAt before the data is read.
	beforeRead func()
}

func (s *spy) Sync() error {
	if s.syncGate != nil {
		<-s.syncGate
	}
	s.syncs.Add(1)
	return s.Backend.Sync()
}

func (s *spy) ReadAt(p []byte, off int64) (int, error) {
	n := s.inflight.Add(1)
	defer s.inflight.Add(-1)
	for {
		m := s.maxInFlt.Load()
		if n <= m || s.maxInFlt.CompareAndSwap(m, n) {
			break
		}
	}
	if s.readDelay > 0 {
		time.Sleep(s.readDelay)
	}
	if s.beforeRead != nil {
		s.beforeRead()
	}
	return s.Backend.ReadAt(p, off)
}

type rig struct {
	path string
	be   *spy
	blk  *virtioblk.Block
	t    *virtio.Transport
	mem  *guestmem.Memory
	drv  *virtiotest.Driver
	q    *virtiotest.Queue
}

func newRig(t testing.TB, ro bool, cfg virtioblk.Config) *rig {
	t.Helper()
	return newRigOn(t, ro, cfg, func(path string, ro bool) (virtioblk.Backend, error) {
		raw, err := virtioblk.OpenRaw(path, ro)
		if err != nil {
			return nil, err
		}
		return &spy{Backend: raw}, nil
	})
}

// newRigOn is newRig on the backend open returns (r.be is nil unless it is
// a *spy).
func newRigOn(t testing.TB, ro bool, cfg virtioblk.Config, open func(path string, ro bool) (virtioblk.Backend, error)) *rig {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	img := make([]byte, diskSize)
	for i := range img {
		img[i] = byte(i / SectorSize)
	}
	if err := os.WriteFile(path, img, 0o644); err != nil {
		t.Fatal(err)
	}
	be, err := open(path, ro)
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{path: path}
	r.be, _ = be.(*spy)
	cfg.Backend, cfg.ReadOnly = be, ro
	if cfg.Serial == "" {
		cfg.Serial = "collective-disk-0001"
	}
	cfg.Log = slog.New(slog.DiscardHandler)
	r.blk, err = virtioblk.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r.mem, _ = guestmem.NewFake(guestmem.Range{GPA: 0, Size: ramSize})
	r.t, err = virtio.NewPCI("blk", r.blk, r.mem, nil)
	if err != nil {
		t.Fatal(err)
	}
	r.t.SetLogger(slog.New(slog.DiscardHandler))
	mmio := &bus.Bus{}
	pb := pci.NewBus(pci.MMIOMapper{Bus: mmio}, pci.Window{Base: 0xc000_0000, Size: 1 << 24})
	slot, err := pb.Add(r.t.PCI())
	if err != nil {
		t.Fatal(err)
	}
	r.drv, err = virtiotest.New(pb, mmio, r.mem, slot, 0x10000, ramSize-0x10000)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.drv.Negotiate(^uint64(0)); err != nil {
		t.Fatal(err)
	}
	if r.q, err = r.drv.SetupQueue(0, 0, virtio.NoVector); err != nil {
		t.Fatal(err)
	}
	if err := r.drv.DriverOK(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.drv.Reset(); r.blk.Close() })
	return r
}

const SectorSize = virtioblk.SectorSize

// req is a request as a guest driver lays it out.
type req struct {
	hdr, data, status uint64
}

// waitUsed waits up to 5 s for the used index to reach n.
func (r *rig) waitUsed(t testing.TB, n uint16, when string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for r.q.UsedIdx() != n {
		if time.Now().After(deadline) {
			t.Fatalf("used idx %d %s, want %d", r.q.UsedIdx(), when, n)
		}
		time.Sleep(time.Millisecond)
	}
}

func (r *rig) newReq(dataLen uint64) req {
	return req{hdr: r.drv.Alloc(16, 16), data: r.drv.Alloc(max(dataLen, 16), 512), status: r.drv.Alloc(1, 1)}
}

func (r *rig) header(q req, typ uint32, sector uint64) {
	var h [16]byte
	binary.LittleEndian.PutUint32(h[0:], typ)
	binary.LittleEndian.PutUint64(h[8:], sector)
	r.mem.WriteAt(h[:], q.hdr)
	r.mem.WriteAt([]byte{0xee}, q.status)
}

// do submits bufs, waits for completion and returns the status byte and
// the used length.
func (r *rig) do(t testing.TB, q req, bufs []virtiotest.Buf) (uint8, uint32) {
	t.Helper()
	head := r.q.AddChain(bufs)
	r.q.Kick()
	id, n, err := r.q.WaitUsed(2 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if id != uint32(head) {
		t.Fatalf("used id %d, want %d", id, head)
	}
	var s [1]byte
	r.mem.ReadAt(s[:], q.status)
	return s[0], n
}

func (r *rig) simple(t testing.TB, typ uint32, sector uint64, data []byte, write bool) (uint8, uint32, req) {
	q := r.newReq(uint64(len(data)))
	r.header(q, typ, sector)
	bufs := []virtiotest.Buf{{Addr: q.hdr, Len: 16}}
	if len(data) > 0 {
		if !write {
			r.mem.WriteAt(data, q.data)
		}
		bufs = append(bufs, virtiotest.Buf{Addr: q.data, Len: uint32(len(data)), Write: write})
	}
	bufs = append(bufs, virtiotest.Buf{Addr: q.status, Len: 1, Write: true})
	s, n := r.do(t, q, bufs)
	if write {
		r.mem.ReadAt(data, q.data)
	}
	return s, n, q
}

func sectorPattern(s int) []byte { return bytes.Repeat([]byte{byte(s)}, SectorSize) }

func TestConfigAndFeatures(t *testing.T) {
	r := newRig(t, false, virtioblk.Config{})
	d := r.drv
	if c := d.ReadDeviceConfig(0, 8); c != diskSize/SectorSize {
		t.Errorf("capacity %d", c)
	}
	if v := d.ReadDeviceConfig(12, 4); v != virtioblk.DefaultQueueSize-2 {
		t.Errorf("seg_max %d", v)
	}
	if v := d.ReadDeviceConfig(20, 4); v != 512 {
		t.Errorf("blk_size %d", v)
	}
	if v := d.ReadDeviceConfig(40, 4); v != virtioblk.MaxSegments {
		t.Errorf("max_discard_seg %d", v)
	}
	f := d.DeviceFeatures()
	want := uint64(virtio.FVersion1 | virtio.FIndirectDesc | virtio.FEventIdx | virtioblk.FSegMax | virtioblk.FBlkSize |
		virtioblk.FFlush | virtioblk.FDiscard | virtioblk.FWriteZeroes)
	if f != want {
		t.Errorf("features %#x, want %#x", f, want)
	}
	ro := newRig(t, true, virtioblk.Config{})
	if f := ro.drv.DeviceFeatures(); f&virtioblk.FRO == 0 || f&(virtioblk.FDiscard|virtioblk.FWriteZeroes) != 0 {
		t.Errorf("read-only features %#x", f)
	}
	if st := r.t.PCI().Save(); !bytes.Equal(st.Data[2:4], []byte{0x42, 0x10}) {
		got := st.Data[2:4]
		t.Errorf("PCI device ID %x", got)
	}
}

func TestReadWrite(t *testing.T) {
	r := newRig(t, false, virtioblk.Config{})
	buf := make([]byte, 2*SectorSize)
	s, n, _ := r.simple(t, virtioblk.TypeIn, 5, buf, true)
	if s != virtioblk.StatusOK || n != 2*SectorSize+1 {
		t.Fatalf("read: status %d len %d", s, n)
	}
	if !bytes.Equal(buf, append(sectorPattern(5), sectorPattern(6)...)) {
		t.Errorf("read data %x...", buf[:8])
	}
	data := bytes.Repeat([]byte("collective"), 2*SectorSize/10+1)[:2*SectorSize]
	if s, n, _ := r.simple(t, virtioblk.TypeOut, 100, data, false); s != virtioblk.StatusOK || n != 1 {
		t.Fatalf("write: status %d len %d", s, n)
	}
	if s, _, _ := r.simple(t, virtioblk.TypeFlush, 0, nil, false); s != virtioblk.StatusOK {
		t.Fatalf("flush: status %d", s)
	}
	img, _ := os.ReadFile(r.path)
	if !bytes.Equal(img[100*SectorSize:102*SectorSize], data) {
		t.Error("written data not in the file")
	}
	// Read back through an indirect table, header split over two
	// descriptors and the status sharing the last data descriptor.
	q := r.newReq(3 * SectorSize)
	r.header(q, virtioblk.TypeIn, 100)
	sb := r.drv.Alloc(SectorSize+1, 16)
	r.q.AddIndirect([]virtiotest.Buf{
		{Addr: q.hdr, Len: 4}, {Addr: q.hdr + 4, Len: 12},
		{Addr: q.data, Len: SectorSize, Write: true},
		{Addr: sb, Len: SectorSize + 1, Write: true},
	})
	r.q.Kick()
	if _, n, err := r.q.WaitUsed(time.Second); err != nil || n != 2*SectorSize+1 {
		t.Fatalf("indirect read: len %d, %v", n, err)
	}
	got := make([]byte, 2*SectorSize+1)
	r.mem.ReadAt(got[:SectorSize], q.data)
	r.mem.ReadAt(got[SectorSize:], sb)
	if !bytes.Equal(got[:2*SectorSize], data) || got[2*SectorSize] != virtioblk.StatusOK {
		t.Errorf("indirect read data/status wrong (status %d)", got[2*SectorSize])
	}
	if r.blk.Metrics.BytesWritten.Load() != 2*SectorSize {
		t.Errorf("bytes written %d", r.blk.Metrics.BytesWritten.Load())
	}
}

func TestFlushWaitsForSync(t *testing.T) {
	r := newRig(t, false, virtioblk.Config{})
	r.be.syncGate = make(chan struct{})
	q := r.newReq(0)
	r.header(q, virtioblk.TypeFlush, 0)
	r.q.AddChain([]virtiotest.Buf{{Addr: q.hdr, Len: 16}, {Addr: q.status, Len: 1, Write: true}})
	r.q.Kick()
	time.Sleep(20 * time.Millisecond)
	if _, _, ok := r.q.PopUsed(); ok {
		t.Fatal("flush completed before the backend synced")
	}
	close(r.be.syncGate)
	if _, _, err := r.q.WaitUsed(time.Second); err != nil {
		t.Fatal(err)
	}
	if r.be.syncs.Load() != 1 {
		t.Errorf("%d syncs", r.be.syncs.Load())
	}
}

func TestGetID(t *testing.T) {
	r := newRig(t, false, virtioblk.Config{Serial: "serial-1"})
	buf := make([]byte, 20)
	s, n, _ := r.simple(t, virtioblk.TypeGetID, 0, buf, true)
	if s != virtioblk.StatusOK || n != 21 || string(bytes.TrimRight(buf, "\x00")) != "serial-1" {
		t.Errorf("GET_ID: status %d len %d %q", s, n, buf)
	}
	short := make([]byte, 4)
	if s, n, _ := r.simple(t, virtioblk.TypeGetID, 0, short, true); s != 0 || n != 5 || string(short) != "seri" {
		t.Errorf("short GET_ID: status %d len %d %q", s, n, short)
	}
}

func seg(sector uint64, n, flags uint32) []byte {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[0:], sector)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint32(b[12:], flags)
	return b[:]
}

func TestDiscardWriteZeroes(t *testing.T) {
	r := newRig(t, false, virtioblk.Config{})
	segs := append(seg(8, 8, 0), seg(40, 1, 0)...)
	if s, _, _ := r.simple(t, virtioblk.TypeDiscard, 0, segs, false); s != virtioblk.StatusOK {
		t.Fatalf("discard: %d", s)
	}
	if s, _, _ := r.simple(t, virtioblk.TypeWriteZeroes, 0, append(seg(100, 2, 0), seg(200, 8, 1)...), false); s != virtioblk.StatusOK {
		t.Fatalf("write zeroes: %d", s)
	}
	img, _ := os.ReadFile(r.path)
	zero := make([]byte, SectorSize)
	for _, sec := range []int{8, 15, 40, 100, 101, 200, 207} {
		if !bytes.Equal(img[sec*SectorSize:(sec+1)*SectorSize], zero) {
			t.Errorf("sector %d not zero", sec)
		}
	}
	for _, sec := range []int{7, 16, 41, 102, 208} {
		if !bytes.Equal(img[sec*SectorSize:(sec+1)*SectorSize], sectorPattern(sec)) {
			t.Errorf("sector %d changed", sec)
		}
	}
	for _, tc := range []struct {
		name string
		typ  uint32
		segs []byte
		want uint8
	}{
		{"discard with unmap", virtioblk.TypeDiscard, seg(0, 1, 1), virtioblk.StatusUnsupp},
		{"unknown flag", virtioblk.TypeWriteZeroes, seg(0, 1, 2), virtioblk.StatusUnsupp},
		{"beyond capacity", virtioblk.TypeDiscard, seg(diskSize/SectorSize, 1, 0), virtioblk.StatusIOErr},
		{"sector overflow", virtioblk.TypeWriteZeroes, seg(^uint64(0), 2, 0), virtioblk.StatusIOErr},
		{"too many sectors", virtioblk.TypeDiscard, seg(0, virtioblk.MaxDiscardSectors+1, 0), virtioblk.StatusIOErr},
		{"too many segments", virtioblk.TypeDiscard, bytes.Repeat(seg(0, 1, 0), virtioblk.MaxSegments+1), virtioblk.StatusIOErr},
		{"partial segment", virtioblk.TypeDiscard, seg(0, 1, 0)[:12], virtioblk.StatusIOErr},
	} {
		if s, _, _ := r.simple(t, tc.typ, 0, tc.segs, false); s != tc.want {
			t.Errorf("%s: status %d, want %d", tc.name, s, tc.want)
		}
	}
	// A bad segment anywhere means nothing is discarded.
	r.simple(t, virtioblk.TypeDiscard, 0, append(seg(300, 1, 0), seg(^uint64(0)>>9, 9, 0)...), false)
	img, _ = os.ReadFile(r.path)
	if !bytes.Equal(img[300*SectorSize:301*SectorSize], sectorPattern(300)) {
		t.Error("partially executed discard")
	}
}

func TestBadRequests(t *testing.T) {
	r := newRig(t, false, virtioblk.Config{})
	last := uint64(diskSize/SectorSize - 1)
	for _, tc := range []struct {
		name   string
		typ    uint32
		sector uint64
		n      int
		write  bool
		want   uint8
	}{
		{"read past the end", virtioblk.TypeIn, last, 2 * SectorSize, true, virtioblk.StatusIOErr},
		{"read at the end", virtioblk.TypeIn, last, SectorSize, true, virtioblk.StatusOK},
		{"write past the end", virtioblk.TypeOut, last + 1, SectorSize, false, virtioblk.StatusIOErr},
		{"sector overflow", virtioblk.TypeIn, ^uint64(0) / SectorSize, SectorSize, true, virtioblk.StatusIOErr},
		{"huge sector", virtioblk.TypeOut, ^uint64(0), SectorSize, false, virtioblk.StatusIOErr},
		{"length not a multiple of 512", virtioblk.TypeIn, 0, 100, true, virtioblk.StatusIOErr},
		{"write length not a multiple of 512", virtioblk.TypeOut, 0, 513, false, virtioblk.StatusIOErr},
		{"unknown type", 77, 0, 0, false, virtioblk.StatusUnsupp},
	} {
		if s, _, _ := r.simple(t, tc.typ, tc.sector, make([]byte, tc.n), tc.write); s != tc.want {
			t.Errorf("%s: status %d, want %d", tc.name, s, tc.want)
		}
	}
	// Chains that cannot carry a request: used length 0, status untouched.
	q := r.newReq(0)
	r.header(q, virtioblk.TypeIn, 0)
	for name, bufs := range map[string][]virtiotest.Buf{
		"no status":        {{Addr: q.hdr, Len: 16}},
		"short header":     {{Addr: q.hdr, Len: 8}, {Addr: q.status, Len: 1, Write: true}},
		"zero-length last": {{Addr: q.hdr, Len: 16}, {Addr: q.status, Len: 1, Write: true}, {Addr: q.status, Len: 0, Write: true}},
	} {
		if s, n := r.do(t, q, bufs); n != 0 || s != 0xee {
			t.Errorf("%s: status %#x len %d", name, s, n)
		}
	}
	if r.drv.Status()&virtio.StatusNeedsReset != 0 {
		t.Error("request errors set NEEDS_RESET")
	}
}

func TestReadOnly(t *testing.T) {
	r := newRig(t, true, virtioblk.Config{})
	before, _ := os.ReadFile(r.path)
	if s, _, _ := r.simple(t, virtioblk.TypeOut, 0, make([]byte, SectorSize), false); s != virtioblk.StatusIOErr {
		t.Errorf("write: status %d", s)
	}
	if s, _, _ := r.simple(t, virtioblk.TypeDiscard, 0, seg(0, 1, 0), false); s != virtioblk.StatusIOErr {
		t.Errorf("discard: status %d", s)
	}
	buf := make([]byte, SectorSize)
	if s, _, _ := r.simple(t, virtioblk.TypeIn, 3, buf, true); s != virtioblk.StatusOK || !bytes.Equal(buf, sectorPattern(3)) {
		t.Errorf("read: status %d", s)
	}
	after, _ := os.ReadFile(r.path)
	if !bytes.Equal(before, after) {
		t.Error("read-only disk changed")
	}
}

func TestConcurrentBounded(t *testing.T) {
	r := newRig(t, false, virtioblk.Config{MaxInFlight: 4, Workers: 8})
	r.be.readDelay = 2 * time.Millisecond
	const n = 64
	reqs := make([]req, n)
	for i := range reqs {
		reqs[i] = r.newReq(SectorSize)
		r.header(reqs[i], virtioblk.TypeIn, uint64(i))
		r.q.AddChain([]virtiotest.Buf{{Addr: reqs[i].hdr, Len: 16}, {Addr: reqs[i].data, Len: SectorSize, Write: true}, {Addr: reqs[i].status, Len: 1, Write: true}})
	}
	r.q.Kick()
	for range n {
		if _, _, err := r.q.WaitUsed(5 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
	for i, q := range reqs {
		buf := make([]byte, SectorSize)
		r.mem.ReadAt(buf, q.data)
		if !bytes.Equal(buf, sectorPattern(i)) {
			t.Errorf("request %d: wrong data", i)
		}
	}
	if m := r.be.maxInFlt.Load(); m > 4 || m < 2 {
		t.Errorf("max concurrent backend reads %d, want 2..4", m)
	}
}

func TestResetInFlightAndSaveRestore(t *testing.T) {
	r := newRig(t, false, virtioblk.Config{})
	r.be.readDelay = time.Millisecond
	for i := range 16 {
		q := r.newReq(SectorSize)
		r.header(q, virtioblk.TypeIn, uint64(i))
		r.q.AddChain([]virtiotest.Buf{{Addr: q.hdr, Len: 16}, {Addr: q.data, Len: SectorSize, Write: true}, {Addr: q.status, Len: 1, Write: true}})
	}
	r.q.Kick()
	time.Sleep(2 * time.Millisecond)
	st := r.t.Save() // quiesces: no request in flight in the snapshot
	if used := st.Queues[0].NextUsed; used != st.Queues[0].NextAvail {
		t.Errorf("snapshot with requests in flight: avail %d used %d", st.Queues[0].NextAvail, used)
	}
	bst := r.blk.Save()
	if err := r.drv.Reset(); err != nil { // stops the device with requests in flight
		t.Fatal(err)
	}
	if err := r.blk.Restore(bst); err != nil {
		t.Fatal(err)
	}
	if err := r.t.Restore(st); err != nil {
		t.Fatal(err)
	}
	// The restored device goes on with the ring at once, so its indices
	// may have moved on; everything else must be equal.
	got := r.t.Save()
	if got.Queues[0].NextUsed-st.Queues[0].NextUsed > 16 {
		t.Errorf("used index went back: %d -> %d", st.Queues[0].NextUsed, got.Queues[0].NextUsed)
	}
	want := st
	want.Queues = append([]virtio.QueueState(nil), st.Queues...)
	want.ISR = got.ISR
	want.PCI.Data[pci.RegStatus] = got.PCI.Data[pci.RegStatus]
	want.PCI.INTxLevel = got.PCI.INTxLevel
	want.Queues[0].NextAvail, want.Queues[0].NextUsed, want.Queues[0].SignalledUsed = got.Queues[0].NextAvail, got.Queues[0].NextUsed, got.Queues[0].SignalledUsed
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("round trip (-saved +restored):\n%s", diff)
	}
	// The restored device finishes the rest of the ring.
	r.q.Kick()
	r.waitUsed(t, 16, "after restore")
	bad := bst
	bad.Capacity++
	if err := r.blk.Restore(bad); err == nil {
		t.Error("restored onto a disk of another size")
	}
}

// TestSaveKeepsQuiesced: a device the machine quiesced (Pause) stays
// quiesced through the transport's Save, which quiesces and resumes only a
// device it found running. It used to resume it: a snapshot's device then
// took chains while the paused machine's memory and disks were read, and
// the restored guest saw completions twice and writes lost (snapshot's
// TestSnapshotDiskRaw, one run in ten).
func TestSaveKeepsQuiesced(t *testing.T) {
	r := newRig(t, false, virtioblk.Config{})
	if !r.blk.Quiesce() {
		t.Fatal("Quiesce of a running device reported false")
	}
	if r.blk.Quiesce() {
		t.Fatal("Quiesce of a quiesced device reported true")
	}
	for i := range 4 {
		q := r.newReq(SectorSize)
		r.header(q, virtioblk.TypeIn, uint64(i))
		r.q.AddChain([]virtiotest.Buf{{Addr: q.hdr, Len: 16}, {Addr: q.data, Len: SectorSize, Write: true}, {Addr: q.status, Len: 1, Write: true}})
	}
	r.q.Kick()
	st := r.t.Save()
	time.Sleep(20 * time.Millisecond)
	if u := r.q.UsedIdx(); u != 0 || st.Queues[0].NextAvail != 0 {
		t.Fatalf("the quiesced device took chains during or after Save: used idx %d, saved next avail %d", u, st.Queues[0].NextAvail)
	}
	r.blk.Resume()
	r.waitUsed(t, 4, "after Resume")
}

func TestParseDisk(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want virtioblk.DiskSpec
		err  bool
	}{
		{"/img/root.raw", virtioblk.DiskSpec{Path: "/img/root.raw", Serial: "root.raw"}, false},
		{"a.img,ro", virtioblk.DiskSpec{Path: "a.img", ReadOnly: true, Serial: "a.img"}, false},
		{"a.img,serial=xyz,ro", virtioblk.DiskSpec{Path: "a.img", ReadOnly: true, Serial: "xyz"}, false},
		{"a.img,base=b.img", virtioblk.DiskSpec{Path: "a.img", Base: "b.img", Serial: "a.img"}, false},
		{"/x/a-very-long-disk-image-name.raw", virtioblk.DiskSpec{Path: "/x/a-very-long-disk-image-name.raw", Serial: "a-very-long-disk-ima"}, false},
		{"", virtioblk.DiskSpec{}, true},
		{"a.img,rw", virtioblk.DiskSpec{}, true},
		{"a.img,serial=123456789012345678901", virtioblk.DiskSpec{}, true},
	} {
		got, err := virtioblk.ParseDisk(tc.in)
		if (err != nil) != tc.err {
			t.Errorf("ParseDisk(%q) error %v", tc.in, err)
			continue
		}
		if !tc.err && got != tc.want {
			t.Errorf("ParseDisk(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
	if _, err := virtioblk.Open(virtioblk.DiskSpec{Path: "x", Base: "y"}); err == nil {
		t.Error("Open with base= succeeded")
	}
	if _, err := virtioblk.Open(virtioblk.DiskSpec{Path: t.TempDir()}); err == nil {
		t.Error("Open of a directory succeeded")
	}
}

var errFail = errors.New("backend failure")

type failing struct{ virtioblk.Backend }

func (failing) ReadAt([]byte, int64) (int, error) { return 0, errFail }
func (failing) Sync() error                       { return errFail }

func TestBackendErrors(t *testing.T) {
	r := newRig(t, false, virtioblk.Config{})
	r.be.Backend = failing{r.be.Backend}
	if s, _, _ := r.simple(t, virtioblk.TypeIn, 0, make([]byte, SectorSize), true); s != virtioblk.StatusIOErr {
		t.Errorf("read: %d", s)
	}
	if s, _, _ := r.simple(t, virtioblk.TypeFlush, 0, nil, false); s != virtioblk.StatusIOErr {
		t.Errorf("flush: %d", s)
	}
	if r.blk.Metrics.IOErrors.Load() != 2 {
		t.Errorf("IO errors %d", r.blk.Metrics.IOErrors.Load())
	}
}

// BenchmarkRead4K measures a 4 KiB read request end to end: the driver
// publishes and kicks, the device pops, reads the file, completes.
func BenchmarkRead4K(b *testing.B) {
	r := newRig(b, false, virtioblk.Config{})
	q := r.newReq(4096)
	r.header(q, virtioblk.TypeIn, 8)
	bufs := []virtiotest.Buf{{Addr: q.hdr, Len: 16}, {Addr: q.data, Len: 4096, Write: true}, {Addr: q.status, Len: 1, Write: true}}
	b.ReportAllocs()
	var wg sync.WaitGroup
	for b.Loop() {
		r.q.AddChain(bufs)
		r.q.Kick()
		if _, _, err := r.q.WaitUsed(time.Second); err != nil {
			b.Fatal(err)
		}
	}
	wg.Wait()
}

// TestDirectAsync drives a raw image opened with O_DIRECT, under a Tracker
// as Open sets it up: aligned reads and writes go through native AIO
// (Submitted counts them), an unaligned one through a worker, all of them
// reach the file, and the tracker marks the written block.
func TestDirectAsync(t *testing.T) {
	var tr *virtioblk.Tracker
	r := newRigOn(t, false, virtioblk.Config{}, func(path string, ro bool) (virtioblk.Backend, error) {
		raw, err := virtioblk.OpenRawDirect(path, ro)
		if err != nil {
			return nil, err
		}
		tr = virtioblk.NewTracker(raw)
		return tr, nil
	})
	tr.TakeDirty()
	// Aligned: an 8-sector write, then a read of it back.
	data := bytes.Repeat([]byte("collective"), 8*SectorSize/10+1)[:8*SectorSize]
	if s, _, _ := r.simple(t, virtioblk.TypeOut, 16, data, false); s != virtioblk.StatusOK {
		t.Fatalf("write status %d", s)
	}
	if d := tr.TakeDirty(); d[0] != 1 {
		t.Errorf("tracker's dirty bitmap after a write to block 0: %#x, want 0x1", d[0])
	}
	got := make([]byte, len(data))
	if s, n, _ := r.simple(t, virtioblk.TypeIn, 16, got, true); s != virtioblk.StatusOK || n != uint32(len(data)+1) {
		t.Fatalf("read status %d, used %d", s, n)
	}
	if !bytes.Equal(got, data) {
		t.Error("read back differs from what was written")
	}
	if n := r.blk.Metrics.Submitted.Load(); n != 2 {
		t.Errorf("Submitted = %d, want 2 (the aligned write and read)", n)
	}
	// Unaligned buffer: served by a worker, same result.
	q := r.newReq(2 * SectorSize)
	r.header(q, virtioblk.TypeIn, 16)
	s, n := r.do(t, q, []virtiotest.Buf{{Addr: q.hdr, Len: 16}, {Addr: q.data + 1, Len: SectorSize, Write: true}, {Addr: q.status, Len: 1, Write: true}})
	if s != virtioblk.StatusOK || n != SectorSize+1 {
		t.Fatalf("unaligned read status %d, used %d", s, n)
	}
	un := make([]byte, SectorSize)
	r.mem.ReadAt(un, q.data+1)
	if !bytes.Equal(un, data[:SectorSize]) {
		t.Error("unaligned read differs")
	}
	if n := r.blk.Metrics.Submitted.Load(); n != 2 {
		t.Errorf("Submitted = %d after an unaligned read, want still 2", n)
	}
	// Out of range: refused without reaching the backend.
	if s, _, _ := r.simple(t, virtioblk.TypeIn, diskSize/SectorSize, make([]byte, SectorSize), true); s != virtioblk.StatusIOErr {
		t.Errorf("read past the end: status %d", s)
	}
	// Many in flight at once: 32 aligned reads queued before one kick.
	const k = 32
	var heads []uint16
	var reqs []req
	for i := range k {
		q := r.newReq(SectorSize)
		r.header(q, virtioblk.TypeIn, uint64(i))
		reqs = append(reqs, q)
		heads = append(heads, r.q.AddChain([]virtiotest.Buf{{Addr: q.hdr, Len: 16}, {Addr: q.data, Len: SectorSize, Write: true}, {Addr: q.status, Len: 1, Write: true}}))
	}
	r.q.Kick()
	for range k {
		if _, _, err := r.q.WaitUsed(2 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
	for i, q := range reqs {
		var st [1]byte
		r.mem.ReadAt(st[:], q.status)
		want := sectorPattern(i)
		if i >= 16 && i < 24 {
			want = data[(i-16)*SectorSize : (i-15)*SectorSize]
		}
		got := make([]byte, SectorSize)
		r.mem.ReadAt(got, q.data)
		if st[0] != virtioblk.StatusOK || !bytes.Equal(got, want) {
			t.Errorf("read %d (head %d): status %d, data %q...", i, heads[i], st[0], got[:8])
		}
	}
	if n := r.blk.Metrics.Submitted.Load(); n != 2+k {
		t.Errorf("Submitted = %d, want %d", n, 2+k)
	}
	// The file holds the write, seen through the page cache.
	f, err := os.ReadFile(r.path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(f[16*SectorSize:24*SectorSize], data) {
		t.Error("the file does not hold the written sectors")
	}
}

// TestReadMarksDirtyAfterData takes the VMM's dirty log while a read is
// under way, between the device finding its buffer and the data landing
// in it, as a migration round can: the buffer's page must be in the next
// log, or the target would keep the page as it was before the read.
func TestReadMarksDirtyAfterData(t *testing.T) {
	r := newRig(t, false, virtioblk.Config{})
	reg := r.mem.Regions()[0]
	// The data alone on its page (the header and status elsewhere).
	q := r.newReq(16)
	data := r.drv.Alloc(guestmem.PageSize, guestmem.PageSize)
	r.drv.Alloc(guestmem.PageSize, guestmem.PageSize) // nothing else on data's page
	r.header(q, virtioblk.TypeIn, 3)
	r.be.beforeRead = func() { reg.TakeDirty() }
	if s, _ := r.do(t, q, []virtiotest.Buf{{Addr: q.hdr, Len: 16}, {Addr: data, Len: guestmem.PageSize, Write: true}, {Addr: q.status, Len: 1, Write: true}}); s != virtioblk.StatusOK {
		t.Fatalf("status %d", s)
	}
	r.be.beforeRead = nil
	page := data / guestmem.PageSize
	if q.status/guestmem.PageSize == page || q.hdr/guestmem.PageSize == page {
		t.Fatal("test layout: the header or status shares the data's page")
	}
	if d := reg.TakeDirty(); d[page/64]&(1<<(page%64)) == 0 {
		t.Errorf("the read's buffer (page %d) is not in the dirty log taken after the data landed", page)
	}
}

// failingWritev is a raw image whose vectored writes fail: merged writes
// must then be served one by one.
type failingWritev struct{ *virtioblk.Raw }

func (f failingWritev) VectorWriter() virtioblk.VectorWriter { return f }
func (failingWritev) WritevAt([][]byte, int64) (int64, error) {
	return 0, errFail
}

// TestMergedWrites queues writes before the device looks (it is quiesced
// meanwhile): adjacent ones are served by one vectored write, a read
// between them ends a batch, and every request completes with its data
// on the disk. When the vectored write fails, each write is served on its
// own and still succeeds.
func TestMergedWrites(t *testing.T) {
	for _, tc := range []struct {
		name       string
		open       func(string, bool) (virtioblk.Backend, error)
		wantMerged uint64
	}{
		{"tracked raw", func(path string, ro bool) (virtioblk.Backend, error) {
			raw, err := virtioblk.OpenRaw(path, ro)
			return virtioblk.NewTracker(raw), err
		}, 3},
		{"failing writev", func(path string, ro bool) (virtioblk.Backend, error) {
			raw, err := virtioblk.OpenRaw(path, ro)
			return failingWritev{raw}, err
		}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRigOn(t, false, virtioblk.Config{}, tc.open)
			type w struct {
				sector  uint64
				sectors int
				pieces  int // descriptors for the data
			}
			// 8-9 (two pieces), 10, 11-13 merge; a read of 0; 100, 101 merge.
			writes := []w{{8, 2, 2}, {10, 1, 1}, {11, 3, 1}, {0, 0, 0}, {100, 1, 1}, {101, 2, 2}}
			if !r.blk.Quiesce() {
				t.Fatal("Quiesce: not running")
			}
			var reqs []req
			var want [][]byte
			for i, wr := range writes {
				q := r.newReq(uint64(max(wr.sectors, 1)) * SectorSize)
				reqs = append(reqs, q)
				if wr.sectors == 0 {
					r.header(q, virtioblk.TypeIn, wr.sector)
					want = append(want, nil)
					r.q.AddChain([]virtiotest.Buf{{Addr: q.hdr, Len: 16}, {Addr: q.data, Len: SectorSize, Write: true}, {Addr: q.status, Len: 1, Write: true}})
					continue
				}
				data := bytes.Repeat([]byte{byte(0xa0 + i)}, wr.sectors*SectorSize)
				for j := range data {
					data[j] ^= byte(j / SectorSize)
				}
				want = append(want, data)
				r.header(q, virtioblk.TypeOut, wr.sector)
				r.mem.WriteAt(data, q.data)
				bufs := []virtiotest.Buf{{Addr: q.hdr, Len: 16}}
				piece := len(data) / wr.pieces
				for p := range wr.pieces {
					bufs = append(bufs, virtiotest.Buf{Addr: q.data + uint64(p*piece), Len: uint32(piece)})
				}
				r.q.AddChain(append(bufs, virtiotest.Buf{Addr: q.status, Len: 1, Write: true}))
			}
			r.q.Kick()
			r.blk.Resume()
			r.waitUsed(t, uint16(len(writes)), "after the batch")
			for i, q := range reqs {
				var st [1]byte
				r.mem.ReadAt(st[:], q.status)
				if st[0] != virtioblk.StatusOK {
					t.Errorf("request %d: status %d", i, st[0])
				}
			}
			got := make([]byte, SectorSize)
			r.mem.ReadAt(got, reqs[3].data)
			if !bytes.Equal(got, sectorPattern(0)) {
				t.Errorf("the read between the writes: %x..., want sector 0's pattern", got[:8])
			}
			f, err := os.ReadFile(r.path)
			if err != nil {
				t.Fatal(err)
			}
			for i, wr := range writes {
				if wr.sectors == 0 {
					continue
				}
				if at := f[wr.sector*SectorSize:][:len(want[i])]; !bytes.Equal(at, want[i]) {
					t.Errorf("write %d (sector %d): the file holds %x..., want %x...", i, wr.sector, at[:4], want[i][:4])
				}
			}
			if !bytes.Equal(f[14*SectorSize:15*SectorSize], sectorPattern(14)) {
				t.Error("sector 14, after the merged writes, changed")
			}
			if n := r.blk.Metrics.Merged.Load(); n != tc.wantMerged {
				t.Errorf("Merged = %d, want %d", n, tc.wantMerged)
			}
			if n := r.blk.Metrics.Writes.Load(); n != 5 {
				t.Errorf("Writes = %d, want 5", n)
			}
			if tr, ok := r.blk.Backend().(*virtioblk.Tracker); ok {
				// 8..13 and 100..102 lie in the first tracking block.
				if d := tr.TakeDirty(); d[0] != 1 {
					t.Errorf("tracker's dirty bitmap %#x, want 0x1", d[0])
				}
			}
		})
	}
}
