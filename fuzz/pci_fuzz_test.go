package fuzz

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"

	"collective/devices/bus"
	"collective/devices/debugexit"
	"collective/devices/pci"
	"collective/devices/virtio"
)

// recDev is a BAR window that counts the accesses it gets.
type recDev struct{ n int }

func (r *recDev) Read(_ uint64, p []byte) { clear(p); r.n++ }
func (r *recDev) Write(uint64, []byte)    { r.n++ }

// pciRig is a PCI bus 0 as the machine builds it: the host bridge in
// slot 0, a virtio-pci function (64-bit BAR 0 with MSI-X) in slot 1, and a
// plain function in slot 2 with a 32-bit BAR 1 and a 64-bit prefetchable
// BAR 2, all mapped on an MMIO bus.
type pciRig struct {
	mmio  *bus.Bus
	pb    *pci.Bus
	tr    *virtio.Transport
	plain *pci.Config
	irq   *fakeIRQ
	funcs []*pci.Config // by slot
}

const pciWindowBase, pciWindowSize = 0xc000_0000, 1 << 24

func newPCIRig(t testing.TB) *pciRig {
	r := &pciRig{mmio: &bus.Bus{}, irq: &fakeIRQ{}}
	r.pb = pci.NewBus(pci.MMIOMapper{Bus: r.mmio}, pci.Window{Base: pciWindowBase, Size: pciWindowSize})
	var err error
	r.tr, err = virtio.NewPCI("virtio", &manualDev{feats: 1 << 5}, virtioMem(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	r.tr.SetLogger(quiet)
	r.tr.PCI().SetINTx(5, &fakeIRQ{})
	r.plain = pci.NewConfig("plain", pci.Identity{Vendor: 0x1234, Device: 0x5678, Revision: 2, Class: 0x0c0330, SubVendor: 0x1234, Subsystem: 1})
	for _, err := range []error{
		r.plain.AddBAR(1, pci.BARMem32, 0x1000, false, &recDev{}),
		r.plain.AddBAR(2, pci.BARMem64, 0x100000, true, &recDev{}),
		r.plain.SetINTx(11, r.irq),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.plain.AddCapability(pci.CapVendor, []byte{4, 1, 2, 3, 4, 5}, []byte{0, 0, 0xff, 0xff, 0, 0}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*pci.Config{r.tr.PCI(), r.plain} {
		if _, err := r.pb.Add(c); err != nil {
			t.Fatal(err)
		}
	}
	r.funcs = []*pci.Config{r.pb.Function(0), r.pb.Function(1), r.pb.Function(2)}
	return r
}

// cfgRead reads configuration register reg of slot through mechanism 1.
func (r *pciRig) cfgRead(slot int, reg uint64, p []byte) {
	var a [4]byte
	binary.LittleEndian.PutUint32(a[:], 0x8000_0000|uint32(slot)<<11|uint32(reg&0xfc))
	r.pb.Write(0, a[:])
	r.pb.Read(4+reg&3, p)
}

// FuzzPCIConfig drives PCI bus 0 through raw port accesses to 0xCF8-0xCFF
// (CONFIG_ADDRESS with any bus, device, function and register, data ports
// at every offset and size), MMIO accesses over the BAR window and the
// device's INTx output. After every step it checks: CONFIG_ADDRESS reads
// back what was written (masked); read-only identification is unchanged;
// every BAR is mapped exactly where its registers and the command register
// say, or unmapped because that range is taken, and the MMIO bus holds
// exactly the mapped BARs; the INTx line follows level and Interrupt
// Disable. At the end: reads through mechanism 1 allocate nothing, each
// function's Save restores into a fresh bus and saves back equal with the
// same BAR mapping, and turning memory decoding off empties the MMIO bus.
//
// Input: 5-byte steps: op (bits 0-2 kind), then a, b, c, d.
//
//	0: CONFIG_ADDRESS write: a bit 7 raw (a,b,c,d as the value), else
//	   enabled, bus (a bit 6), slot b%4, function (a bit 5: a>>2&7), register c
//	1: data write at 0xCFC+(a&3), size 1/2/4/3 (a>>2&3), value b,c,d,a
//	2: data read, same offsets and sizes
//	3: raw access to 0xCF8+(a&7), size 1/2/4/8 (a>>3&3), write if a bit 7
//	4: MMIO write/read (a bit 0) at window base + (b,c,d)<<4 (size 4)
//	5: INTx level of the plain function = a bit 0
func FuzzPCIConfig(f *testing.F) {
	step := func(op, a, b, c, d byte) []byte { return []byte{op, a, b, c, d} }
	addr := func(slot, reg byte) []byte { return step(0, 0, slot, reg, 0) }
	wr32 := func(v uint32) []byte { return step(1, 2<<2, byte(v), byte(v>>8), byte(v>>16)) }
	var seed []byte
	// Size BAR 0 of slot 1 (64-bit), move it, turn memory decoding off and on.
	for _, s := range [][]byte{
		addr(1, 4), step(1, 1<<2, 0, 0, 0), addr(1, 0x10), wr32(0xffffff), step(2, 2<<2, 0, 0, 0),
		addr(1, 0x14), wr32(0xffffff), addr(1, 0x10), wr32(0x100000), addr(1, 0x14), wr32(0), addr(1, 4),
		step(1, 1<<2, 6, 0, 0), step(4, 0, 0, 0, 0x10), step(4, 1, 0, 0, 0x10),
	} {
		seed = append(seed, s...)
	}
	f.Add(seed)
	// Put slot 2's BARs on top of slot 1's, INTx with Interrupt Disable.
	f.Add([]byte{0, 0, 2, 0x14, 0, 1, 2 << 2, 0, 0, 0, 0, 0, 2, 4, 0, 1, 1 << 2, 0x06, 0x04, 0, 5, 1, 0, 0, 0,
		1, 1 << 2, 0x06, 0, 0, 5, 0, 0, 0, 0})
	// Raw CONFIG_ADDRESS values, odd sizes, other buses and functions.
	f.Add([]byte{0, 0x80, 0x08, 0x10, 0x83, 2, 3 << 2, 0, 0, 0, 3, 0x81, 1, 2, 3, 3, 0x19, 0, 0, 0, 0, 0x40, 1, 0, 0,
		2, 8, 0, 0, 0, 0, 0x24, 1, 0x40, 0, 1, 3, 0xff, 0xff, 0xff})
	// MSI-X control and the vendor capability's writable bytes.
	f.Add([]byte{0, 0, 1, 0x40, 0, 1, 1<<2 | 2, 0, 0xc0, 0, 0, 0, 2, 0x40, 0, 1, 2 << 2, 1, 2, 3, 2, 2 << 2, 0, 0, 0})

	f.Fuzz(func(t *testing.T, data []byte) {
		r := newPCIRig(t)
		ids := make([][0x40]byte, len(r.funcs))
		for i, c := range r.funcs {
			st := c.Save()
			copy(ids[i][:], st.Data[:0x40])
		}
		var lastAddr uint32
		p := make([]byte, 8)
		for len(data) >= 5 {
			op, a, b, c, d := data[0]&7, data[1], data[2], data[3], data[4]
			data = data[5:]
			switch op {
			case 0:
				v := uint32(a)<<24 | uint32(b)<<16 | uint32(c)<<8 | uint32(d)
				if a&0x80 == 0 {
					v = 0x8000_0000 | uint32(b%4)<<11 | uint32(c)
					if a&0x40 != 0 {
						v |= 1 << 16
					}
					if a&0x20 != 0 {
						v |= uint32(a>>2&7) << 8
					}
				}
				binary.LittleEndian.PutUint32(p, v)
				r.pb.Write(0, p[:4])
				lastAddr = v & 0x80ff_fffc
			case 1, 2:
				n := [4]int{1, 2, 4, 3}[a>>2&3]
				copy(p, []byte{b, c, d, a})
				if op == 1 {
					r.pb.Write(4+uint64(a&3), p[:n])
				} else {
					r.pb.Read(4+uint64(a&3), p[:n])
				}
			case 3:
				n := [4]int{1, 2, 4, 8}[a>>3&3]
				copy(p, []byte{b, c, d, a, b, c, d, a})
				if a&0x80 != 0 {
					r.pb.Write(uint64(a&7), p[:n])
					if a&7 == 0 && n == 4 {
						lastAddr = binary.LittleEndian.Uint32(p) & 0x80ff_fffc
					}
				} else {
					r.pb.Read(uint64(a&7), p[:n])
				}
			case 4:
				at := pciWindowBase + (uint64(b)|uint64(c)<<8|uint64(d)<<16)<<4
				if a&1 != 0 {
					r.mmio.Read(at, p[:4])
				} else {
					r.mmio.Write(at, p[:4])
				}
			case 5:
				r.plain.SetIRQLevel(a&1 != 0)
			}
			var ca [4]byte
			r.pb.Read(0, ca[:])
			if got := binary.LittleEndian.Uint32(ca[:]); got != lastAddr {
				t.Fatalf("CONFIG_ADDRESS reads %#x, want %#x", got, lastAddr)
			}
			r.check(t, ids)
			// The step may have selected another register: put it back.
			binary.LittleEndian.PutUint32(ca[:], lastAddr)
			r.pb.Write(0, ca[:])
		}

		// Reads through mechanism 1 allocate nothing.
		var q [4]byte
		if n := testing.AllocsPerRun(2, func() {
			for slot := range 4 {
				for reg := uint64(0); reg < pci.ConfigSize; reg += 4 {
					r.cfgRead(slot, reg, q[:])
				}
			}
		}); n != 0 {
			t.Fatalf("configuration reads allocate (%v per run)", n)
		}

		// Save, restore into a fresh bus, save again.
		r2 := newPCIRig(t)
		for slot, c := range r.funcs {
			st := c.Save()
			c2 := r2.funcs[slot]
			if slot > 0 { // the fresh rig's host bridge is alone on its bus
				if err := c2.Restore(st); err != nil {
					t.Fatalf("slot %d: Restore(Save()) = %v", slot, err)
				}
				if diff := cmp.Diff(st, c2.Save()); diff != "" {
					t.Fatalf("slot %d: Save after Restore (-want +got):\n%s", slot, diff)
				}
			}
		}
		// Restoring in slot order may leave a BAR that a later slot's
		// BAR held unmapped on the first try; the next write retries.
		for _, c := range r2.funcs[1:] {
			var cmd [2]byte
			c.Read(pci.RegCommand, cmd[:])
			c.Write(pci.RegCommand, cmd[:])
		}
		// Every BAR of the restored bus decodes where its registers say,
		// or is refused because another window is there (check). Which
		// of two overlapping BARs holds the range depends on the order
		// they were mapped in, which a restore in slot order does not
		// replay; a BAR mapped on both buses is at the same address.
		r2.check(t, ids)
		for slot, c := range r.funcs {
			for i := range pci.NumBARs {
				got, want := r2.funcs[slot].BAR(i), c.BAR(i)
				if got != want && got != pci.Unmapped && want != pci.Unmapped {
					t.Fatalf("slot %d BAR %d restored at %#x, was at %#x", slot, i, got, want)
				}
			}
		}

		// Memory decoding off everywhere: no window is left on the bus.
		for slot, c := range r.funcs {
			c.Write(pci.RegCommand, []byte{0, 0})
			for i := range pci.NumBARs {
				if a := c.BAR(i); a != pci.Unmapped {
					t.Fatalf("slot %d BAR %d still mapped at %#x with decoding off", slot, i, a)
				}
			}
		}
		if rs := r.mmio.Ranges(); len(rs) != 0 {
			t.Fatalf("MMIO bus holds %v with every function's decoding off", rs)
		}
	})
}

// check verifies the rig's invariants (see FuzzPCIConfig).
func (r *pciRig) check(t *testing.T, ids [][0x40]byte) {
	t.Helper()
	ranges := r.mmio.Ranges()
	mapped := 0
	for slot, c := range r.funcs {
		st := c.Save()
		d := st.Data
		le := binary.LittleEndian
		for _, reg := range []int{pci.RegVendor, pci.RegDevice, pci.RegSubVendor, pci.RegSubsystem} {
			if got, want := le.Uint16(d[reg:]), le.Uint16(ids[slot][reg:]); got != want {
				t.Fatalf("slot %d: read-only register %#x changed: %#x, was %#x", slot, reg, got, want)
			}
		}
		if d[pci.RegCapPtr] != ids[slot][pci.RegCapPtr] || d[pci.RegHeaderType] != ids[slot][pci.RegHeaderType] ||
			d[pci.RegClass] != ids[slot][pci.RegClass] || d[pci.RegClass+2] != ids[slot][pci.RegClass+2] {
			t.Fatalf("slot %d: read-only header bytes changed", slot)
		}
		// The same bytes through mechanism 1.
		var w [4]byte
		r.cfgRead(slot, 0, w[:])
		if !(w == [4]byte(d[0:4])) {
			t.Fatalf("slot %d: mechanism 1 reads %x, state %x", slot, w, d[0:4])
		}
		cmd := le.Uint16(d[pci.RegCommand:])
		for i := range pci.NumBARs {
			got := c.BAR(i)
			want := uint64(pci.Unmapped)
			size := uint64(0)
			switch {
			case slot == 1 && i == 0:
				size = virtio.BARSize
			case slot == 2 && i == 1:
				size = 0x1000
			case slot == 2 && i == 2:
				size = 0x100000
			}
			if size != 0 && cmd&pci.CommandMemory != 0 {
				a := uint64(le.Uint32(d[pci.RegBAR0+4*i:]) & 0xffff_fff0)
				if slot == 1 || i == 2 { // 64-bit BARs
					a |= uint64(le.Uint32(d[pci.RegBAR0+4*i+4:])) << 32
				}
				if a&(size-1) != 0 {
					t.Fatalf("slot %d BAR %d register %#x not aligned to its size %#x", slot, i, a, size)
				}
				if a+size > a {
					want = a
				}
			}
			if got == pci.Unmapped {
				if want != pci.Unmapped && !overlapsOther(ranges, want, size, fmt.Sprintf("%s-bar%d", c.Name(), i)) {
					t.Fatalf("slot %d BAR %d unmapped, registers say %#x and nothing else is there: %v", slot, i, want, ranges)
				}
				continue
			}
			if size == 0 || got != want {
				t.Fatalf("slot %d BAR %d mapped at %#x, registers say %#x (command %#x)", slot, i, got, want, cmd)
			}
			found := false
			for _, rg := range ranges {
				if rg.Base == got && rg.Size == size {
					found = true
				}
			}
			if !found {
				t.Fatalf("slot %d BAR %d mapped at %#x but not on the MMIO bus: %v", slot, i, got, ranges)
			}
			mapped++
		}
		if slot == 2 {
			want := st.INTxLevel && cmd&pci.CommandINTxDisable == 0
			if r.irq.level != want || r.irq.redundant != 0 {
				t.Fatalf("INTx line %v (%d redundant), want %v", r.irq.level, r.irq.redundant, want)
			}
			if (d[pci.RegStatus]&pci.StatusINTx != 0) != st.INTxLevel {
				t.Fatalf("status %#x with INTx level %v", d[pci.RegStatus], st.INTxLevel)
			}
		}
	}
	if mapped != len(ranges) {
		t.Fatalf("%d BARs mapped, MMIO bus holds %v", mapped, ranges)
	}
}

// overlapsOther reports whether [base, base+size) overlaps a window on the
// bus other than the one named name (a BAR of the same function counts:
// testdata FuzzPCIConfig/bebebe9853fb8de2 moves one BAR into another).
func overlapsOther(rs []bus.Range, base, size uint64, name string) bool {
	for _, r := range rs {
		if base < r.Base+r.Size && r.Base < base+size && r.Name != name {
			return true
		}
	}
	return false
}

// FuzzDebugExit writes and reads the debug-exit port at any offset and
// size. Invariants: only a write of 1 to 4 bytes inside the 4-byte
// window exits, with the little-endian value; reads never exit and return
// 0 inside the window and all ones outside; Save/Restore round-trips.
func FuzzDebugExit(f *testing.F) {
	f.Add([]byte{1, 0, 0, 1, 0x31})
	f.Add([]byte{1, 0, 0, 4, 0xff, 0xff, 0xff, 0xff, 1, 3, 0, 2, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{1, 0xff, 0xff, 1, 1, 0, 2, 0, 4})
	f.Fuzz(func(t *testing.T, data []byte) {
		var codes []int
		d := debugexit.New(func(c int) { codes = append(codes, c) })
		for len(data) >= 4 {
			write, off, n := data[0]&1 != 0, uint64(binary.LittleEndian.Uint16(data[1:])), int(data[3]%9)
			if data[0]&2 != 0 {
				off <<= 48
			}
			data = data[4:]
			p := make([]byte, n)
			copy(p, data)
			data = data[min(n, len(data)):]
			before := len(codes)
			valid := n >= 1 && n <= 4 && off < debugexit.Size && off+uint64(n) <= debugexit.Size
			if write {
				d.Write(off, p)
				switch {
				case valid && len(codes) != before+1:
					t.Fatalf("write of %d bytes at %d: %d exits", n, off, len(codes)-before)
				case valid:
					var v [4]byte
					copy(v[:], p)
					if want := int(binary.LittleEndian.Uint32(v[:])); codes[before] != want {
						t.Fatalf("write %x at %d: exit code %#x, want %#x", p, off, codes[before], want)
					}
				case len(codes) != before:
					t.Fatalf("invalid write of %d bytes at %d exited with %#x", n, off, codes[before])
				}
				continue
			}
			d.Read(off, p)
			if len(codes) != before {
				t.Fatal("a read exited")
			}
			want := byte(0xff)
			if valid {
				want = 0
			}
			for _, b := range p {
				if b != want {
					t.Fatalf("read of %d bytes at %d = %x", n, off, p)
				}
			}
		}
		st := d.Save()
		d2 := debugexit.New(nil)
		if err := d2.Restore(st); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(st, d2.Save()); diff != "" {
			t.Fatal(diff)
		}
	})
}
