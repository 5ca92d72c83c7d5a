package pci

import (
	"encoding/binary"
	"testing"

	"github.com/google/go-cmp/cmp"

	"collective/devices"
	"collective/devices/bus"
)

type regs struct{ name string }

func (regs) Read(_ uint64, p []byte) { clear(p) }
func (regs) Write(uint64, []byte)    {}

type msi struct {
	addr uint64
	data uint32
}

type sink struct{ got []msi }

func (s *sink) SignalMSI(addr uint64, data uint32) error {
	s.got = append(s.got, msi{addr, data})
	return nil
}

// cfgIO drives a Bus the way a guest does: an address write, then a data
// access.
type cfgIO struct {
	t *testing.T
	b *Bus
}

func (c cfgIO) addr(slot int, reg uint64) {
	var a [4]byte
	binary.LittleEndian.PutUint32(a[:], 0x8000_0000|uint32(slot)<<11|uint32(reg&0xfc))
	c.b.Write(0, a[:])
}

func (c cfgIO) read(slot int, reg uint64, size int) uint32 {
	c.addr(slot, reg)
	var p [4]byte
	c.b.Read(4+reg%4, p[:size])
	return binary.LittleEndian.Uint32(p[:])
}

func (c cfgIO) write(slot int, reg uint64, size int, v uint32) {
	c.addr(slot, reg)
	var p [4]byte
	binary.LittleEndian.PutUint32(p[:], v)
	c.b.Write(4+reg%4, p[:size])
}

func newTestBus(t *testing.T) (*Bus, *bus.Bus, *Config, *sink) {
	t.Helper()
	mmio := &bus.Bus{}
	b := NewBus(MMIOMapper{mmio}, Window{Base: 0xc000_0000, Size: 0x1000_0000})
	c := NewConfig("dev", Identity{Vendor: 0x1af4, Device: 0x1042, Revision: 1, Class: 0x018000, SubVendor: 0x1af4, Subsystem: 0x40})
	if err := c.AddBAR(0, BARMem64, 0x8000, false, regs{"bar0"}); err != nil {
		t.Fatal(err)
	}
	if err := c.AddBAR(2, BARMem32, 0x1000, false, regs{"bar2"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.AddCapability(CapVendor, []byte{14, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13}, nil); err != nil {
		t.Fatal(err)
	}
	s := &sink{}
	if _, err := c.AddMSIX(3, 0, 0x4000, 0x5000, s); err != nil {
		t.Fatal(err)
	}
	var level bool
	if err := c.SetINTx(10, devices.IRQFunc(func(h bool) { level = h })); err != nil {
		t.Fatal(err)
	}
	_ = level
	if slot, err := b.Add(c); err != nil || slot != 1 {
		t.Fatalf("Add = %d, %v", slot, err)
	}
	return b, mmio, c, s
}

func TestHostBridgeAndAbsent(t *testing.T) {
	b := NewBus(nil, Window{})
	io := cfgIO{t, b}
	if got := io.read(0, 0, 4); got != HostBridgeDevice<<16|HostBridgeVendor {
		t.Errorf("host bridge ID = %#x", got)
	}
	if got := io.read(0, RegClass-1, 4) >> 8; got != classHostBridge {
		t.Errorf("host bridge class = %#x", got)
	}
	if got := io.read(5, 0, 4); got != 0xffffffff {
		t.Errorf("absent slot reads %#x", got)
	}
	// Function 1 and bus 1 are absent.
	var a [4]byte
	binary.LittleEndian.PutUint32(a[:], 0x8000_0100)
	b.Write(0, a[:])
	var p [4]byte
	b.Read(4, p[:])
	if binary.LittleEndian.Uint32(p[:]) != 0xffffffff {
		t.Errorf("function 1 reads %x", p)
	}
	// The address register reads back with bits 1:0 clear.
	binary.LittleEndian.PutUint32(a[:], 0x8000_0003)
	b.Write(0, a[:])
	b.Read(0, p[:])
	if binary.LittleEndian.Uint32(p[:]) != 0x8000_0000 {
		t.Errorf("CONFIG_ADDRESS = %x", p)
	}
	// Odd accesses never panic.
	for off := uint64(0); off < 16; off++ {
		for _, n := range []int{0, 1, 2, 3, 4, 8} {
			q := make([]byte, n)
			b.Read(off, q)
			b.Write(off, q)
		}
	}
}

func TestReadOnlyFields(t *testing.T) {
	b, _, _, _ := newTestBus(t)
	io := cfgIO{t, b}
	for _, reg := range []uint64{RegVendor, RegRevision, RegHeaderType, RegSubVendor, RegCapPtr, RegInterruptPn} {
		before := io.read(1, reg&^3, 4)
		io.write(1, reg&^3, 4, ^before)
		after := io.read(1, reg&^3, 4)
		if reg == RegInterruptPn {
			before &^= 0xff // interrupt line is writable
			after &^= 0xff
		}
		if reg == RegHeaderType {
			before &^= 0xffff // cache line, latency timer
			after &^= 0xffff
		}
		if before != after {
			t.Errorf("register %#x changed: %#x -> %#x", reg, before, after)
		}
	}
	io.write(1, RegInterruptLn, 1, 11)
	if got := io.read(1, RegInterruptLn, 1); got != 11 {
		t.Errorf("interrupt line = %d", got)
	}
	// Expansion ROM: absent, reads 0 even after all ones.
	io.write(1, RegROM, 4, 0xffffffff)
	if got := io.read(1, RegROM, 4); got != 0 {
		t.Errorf("ROM BAR = %#x", got)
	}
	// Unimplemented BAR 4 sizes to zero.
	io.write(1, RegBAR0+16, 4, 0xffffffff)
	if got := io.read(1, RegBAR0+16, 4); got != 0 {
		t.Errorf("BAR4 = %#x", got)
	}
}

func TestBARSizingAndRelocation(t *testing.T) {
	b, mmio, c, _ := newTestBus(t)
	io := cfgIO{t, b}
	bar0 := uint64(io.read(1, RegBAR0, 4)) | uint64(io.read(1, RegBAR0+4, 4))<<32
	if bar0&0xf != 0x4 || bar0&^0xf != c.BAR(0) || c.BAR(0) == Unmapped {
		t.Fatalf("BAR0 = %#x, mapped %#x", bar0, c.BAR(0))
	}
	if c.BAR(2) != 0xc000_8000 {
		t.Errorf("BAR2 at %#x, want after BAR0", c.BAR(2))
	}
	if got := io.read(1, RegCommand, 2); got&CommandMemory == 0 {
		t.Errorf("memory decoding off after Add: %#x", got)
	}

	// Size BAR0 with decoding off, as Linux does.
	io.write(1, RegCommand, 2, 0)
	if c.BAR(0) != Unmapped || len(mmio.Ranges()) != 0 {
		t.Fatalf("decoding off: BAR0 %#x, bus %v", c.BAR(0), mmio.Ranges())
	}
	io.write(1, RegBAR0, 4, 0xffffffff)
	io.write(1, RegBAR0+4, 4, 0xffffffff)
	lo, hi := io.read(1, RegBAR0, 4), io.read(1, RegBAR0+4, 4)
	if size := ^(uint64(hi)<<32 | uint64(lo&^0xf)) + 1; size != 0x8000 || lo&0xf != 4 {
		t.Errorf("BAR0 sizes to %#x (lo %#x hi %#x)", size, lo, hi)
	}
	io.write(1, RegBAR2, 4, 0xffffffff)
	if got := io.read(1, RegBAR2, 4); got != 0xfffff000 {
		t.Errorf("BAR2 sizes to %#x", got)
	}
	// Move BAR0 above 4 GiB and turn decoding on.
	io.write(1, RegBAR0, 4, 0x0001_0000)
	io.write(1, RegBAR0+4, 4, 0x1)
	io.write(1, RegBAR2, 4, 0xd000_0000)
	io.write(1, RegCommand, 2, CommandMemory)
	if c.BAR(0) != 0x1_0001_0000 || c.BAR(2) != 0xd000_0000 {
		t.Errorf("after move: BAR0 %#x BAR2 %#x", c.BAR(0), c.BAR(2))
	}
	want := []bus.Range{{Name: "dev-bar2", Base: 0xd000_0000, Size: 0x1000}, {Name: "dev-bar0", Base: 0x1_0001_0000, Size: 0x8000}}
	if diff := cmp.Diff(want, mmio.Ranges()); diff != "" {
		t.Errorf("MMIO bus (-want +got):\n%s", diff)
	}
	// A BAR moved onto another stays unmapped until moved again.
	io.write(1, RegBAR2, 4, 0x0001_0000)
	io.write(1, RegBAR0+4, 4, 0)
	if c.BAR(0) != Unmapped || c.BAR(2) != 0x1_0000 {
		t.Errorf("collision: BAR0 %#x BAR2 %#x", c.BAR(0), c.BAR(2))
	}
	// Moving BAR2 away lets BAR0 map on the next configuration write.
	io.write(1, RegBAR2, 4, 0xe000_0000)
	if c.BAR(2) != 0xe000_0000 || c.BAR(0) != 0x1_0000 {
		t.Errorf("after collision: BAR0 %#x BAR2 %#x", c.BAR(0), c.BAR(2))
	}
}

const RegBAR2 = RegBAR0 + 8

func TestCapabilityList(t *testing.T) {
	b, _, _, _ := newTestBus(t)
	io := cfgIO{t, b}
	if io.read(1, RegStatus, 2)&StatusCapList == 0 {
		t.Fatal("status has no capability list bit")
	}
	var ids []uint32
	for p, n := io.read(1, RegCapPtr, 1), 0; p != 0 && n < 48; n++ {
		ids = append(ids, io.read(1, uint64(p), 1))
		p = io.read(1, uint64(p)+1, 1)
	}
	if diff := cmp.Diff([]uint32{CapVendor, CapMSIX}, ids); diff != "" {
		t.Errorf("capabilities (-want +got):\n%s", diff)
	}
}

func findCap(io cfgIO, slot int, id uint32) uint64 {
	for p, n := io.read(slot, RegCapPtr, 1), 0; p != 0 && n < 48; n++ {
		if io.read(slot, uint64(p), 1) == id {
			return uint64(p)
		}
		p = io.read(slot, uint64(p)+1, 1)
	}
	return 0
}

func TestMSIX(t *testing.T) {
	b, _, c, s := newTestBus(t)
	io := cfgIO{t, b}
	m := c.MSIX()
	cp := findCap(io, 1, CapMSIX)
	ctl := io.read(1, cp+2, 2)
	if ctl&0x7ff != 2 {
		t.Errorf("table size field %d, want 2", ctl&0x7ff)
	}
	if tbl := io.read(1, cp+4, 4); tbl != 0x4000 {
		t.Errorf("table offset/BIR = %#x", tbl)
	}
	if m.Signal(0) {
		t.Error("Signal with MSI-X disabled reported delivery")
	}
	w32 := func(off uint64, v uint32) {
		var p [4]byte
		binary.LittleEndian.PutUint32(p[:], v)
		m.WriteTable(off, p[:])
	}
	w32(16+0, 0xfee0_0000)
	w32(16+4, 0)
	w32(16+8, 0x41)
	io.write(1, cp+2, 2, msixEnable)
	if !m.Signal(1) || len(s.got) != 0 || !m.Pending(1) {
		t.Fatalf("masked vector: delivered %v, pending %v", s.got, m.Pending(1))
	}
	var pba [8]byte
	m.ReadPBA(0, pba[:])
	if pba[0] != 2 {
		t.Errorf("PBA = %x", pba)
	}
	w32(16+12, 0) // unmask: the pending message goes out
	if diff := cmp.Diff([]msi{{0xfee0_0000, 0x41}}, s.got, cmp.AllowUnexported(msi{})); diff != "" || m.Pending(1) {
		t.Errorf("after unmask (-want +got):\n%s pending %v", diff, m.Pending(1))
	}
	io.write(1, cp+2, 2, msixEnable|msixFuncMask)
	m.Signal(1)
	if len(s.got) != 1 || !m.Pending(1) {
		t.Errorf("function mask: %v", s.got)
	}
	io.write(1, cp+2, 2, msixEnable)
	if len(s.got) != 2 || m.Pending(1) {
		t.Errorf("function unmask: %v", s.got)
	}
	m.Signal(1)
	m.Signal(7) // beyond the table: dropped
	if len(s.got) != 3 {
		t.Errorf("unmasked: %v", s.got)
	}
	// Reserved vector-control bits stay zero; odd accesses are dropped.
	w32(12, 0xffff_fffe)
	var p [4]byte
	m.ReadTable(12, p[:])
	if binary.LittleEndian.Uint32(p[:]) != 0 {
		t.Errorf("vector control = %x", p)
	}
	m.WriteTable(1, []byte{1, 2})
	m.ReadTable(1000, p[:])
	m.ReadPBA(1000, p[:])
}

func TestINTx(t *testing.T) {
	c := NewConfig("intx", Identity{Vendor: 1})
	var level bool
	c.SetINTx(5, devices.IRQFunc(func(h bool) { level = h }))
	b := NewBus(nil, Window{})
	b.Add(c)
	io := cfgIO{t, b}
	if got := io.read(1, RegInterruptLn, 2); got != 0x0105 {
		t.Errorf("interrupt line/pin = %#x", got)
	}
	c.SetIRQLevel(true)
	if !level || io.read(1, RegStatus, 2)&StatusINTx == 0 {
		t.Error("INTx not asserted")
	}
	io.write(1, RegCommand, 2, CommandINTxDisable)
	if level || io.read(1, RegStatus, 2)&StatusINTx == 0 {
		t.Error("Interrupt Disable did not mask the line")
	}
	io.write(1, RegCommand, 2, 0)
	if !level {
		t.Error("line not driven again")
	}
	c.SetIRQLevel(false)
	if level {
		t.Error("INTx not deasserted")
	}
}

func TestSaveRestore(t *testing.T) {
	b, mmio, c, _ := newTestBus(t)
	io := cfgIO{t, b}
	cp := findCap(io, 1, CapMSIX)
	io.write(1, RegInterruptLn, 1, 9)
	io.write(1, cp+2, 2, msixEnable|msixFuncMask)
	c.MSIX().WriteTable(0, []byte{0, 0, 0xe0, 0xfe})
	c.MSIX().Signal(0)
	io.write(1, RegBAR2, 4, 0xd000_0000)
	st := c.Save()

	b2, mmio2, c2, _ := newTestBus(t)
	_ = b2
	if err := c2.Restore(st); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(st, c2.Save()); diff != "" {
		t.Errorf("round trip (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(mmio.Ranges(), mmio2.Ranges()); diff != "" {
		t.Errorf("BAR mappings (-want +got):\n%s", diff)
	}
	bad := st
	bad.Data[RegVendor] ^= 1
	if err := c2.Restore(bad); err == nil {
		t.Error("restored a state with another vendor ID")
	}
	bad = st
	bad.MSIXTable = bad.MSIXTable[:1]
	if err := c2.Restore(bad); err == nil {
		t.Error("restored a short MSI-X table")
	}
	bad = st
	bad.Version = 99
	if err := c2.Restore(bad); err == nil {
		t.Error("restored version 99")
	}
}

func TestAddErrors(t *testing.T) {
	c := NewConfig("x", Identity{})
	for _, tc := range []struct {
		i    int
		kind BARKind
		size uint64
	}{{-1, BARMem32, 16}, {6, BARMem32, 16}, {5, BARMem64, 16}, {0, BARMem32, 8}, {0, BARMem32, 24}, {0, BARMem32, 1 << 32}, {0, 7, 16}} {
		if err := c.AddBAR(tc.i, tc.kind, tc.size, false, regs{}); err == nil {
			t.Errorf("AddBAR(%d, %d, %#x) succeeded", tc.i, tc.kind, tc.size)
		}
	}
	c.AddBAR(0, BARMem64, 16, false, regs{})
	if err := c.AddBAR(1, BARMem32, 16, false, regs{}); err == nil {
		t.Error("AddBAR on the upper half of a 64-bit BAR succeeded")
	}
	if _, err := c.AddCapability(9, make([]byte, 250), nil); err == nil {
		t.Error("oversized capability accepted")
	}
	b := NewBus(nil, Window{Base: 0x1000, Size: 0x10})
	big := NewConfig("big", Identity{})
	big.AddBAR(0, BARMem32, 0x1000, false, regs{})
	if _, err := b.Add(big); err == nil {
		t.Error("BAR larger than the window accepted")
	}
}

// BenchmarkConfigRead measures a guest's configuration read: an address
// write and a 4-byte data read, as Linux's pci_conf1_read does.
func BenchmarkConfigRead(b *testing.B) {
	pb := NewBus(nil, Window{Base: 0xc000_0000, Size: 1 << 28})
	c := NewConfig("dev", Identity{Vendor: 0x1af4})
	c.AddBAR(0, BARMem64, 0x4000, false, regs{})
	pb.Add(c)
	var a, p [4]byte
	binary.LittleEndian.PutUint32(a[:], 0x8000_0800|RegVendor)
	b.ReportAllocs()
	for b.Loop() {
		pb.Write(0, a[:])
		pb.Read(4, p[:])
	}
}

func TestConfigReadAllocs(t *testing.T) {
	pb := NewBus(nil, Window{})
	var a, p [4]byte
	binary.LittleEndian.PutUint32(a[:], 0x8000_0000)
	if n := testing.AllocsPerRun(100, func() { pb.Write(0, a[:]); pb.Read(4, p[:]); pb.Write(4, p[:2]) }); n != 0 {
		t.Errorf("configuration access allocates %v times", n)
	}
}
