package boot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"collective/kvm/boot/boottest"
	"collective/kvm/guestmem"
)

const (
	kib = 1 << 10
	mib = 1 << 20
	gib = 1 << 30
)

func newMem(t testing.TB, size uint64) *guestmem.Memory {
	t.Helper()
	m, err := guestmem.NewFake(RAMLayout(size)...)
	if err != nil {
		t.Fatalf("NewFake(%#x): %v", size, err)
	}
	return m
}

func read(t testing.TB, m *guestmem.Memory, gpa uint64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := m.ReadAt(b, gpa); err != nil {
		t.Fatalf("ReadAt(%#x, %d): %v", gpa, n, err)
	}
	return b
}

func load(t testing.TB, m *guestmem.Memory, img []byte, cfg Config) (*Entry, error) {
	t.Helper()
	return Load(m, bytes.NewReader(img), int64(len(img)), cfg)
}

func initrd(n int) Config {
	return Config{Initrd: bytes.Repeat([]byte{0xA5}, n)}
}

// fieldAt reads a little-endian field of 1, 2, 4 or 8 bytes.
func fieldAt(b []byte, off, size int) uint64 {
	switch size {
	case 1:
		return uint64(b[off])
	case 2:
		return uint64(binary.LittleEndian.Uint16(b[off:]))
	case 4:
		return uint64(binary.LittleEndian.Uint32(b[off:]))
	}
	return binary.LittleEndian.Uint64(b[off:])
}

// decodeMap decodes n memory map entries of the given stride (20 for
// e820, 24 for the PVH memmap).
func decodeMap(b []byte, n, stride int) []MapEntry {
	var out []MapEntry
	for i := range n {
		e := b[i*stride:]
		out = append(out, MapEntry{
			Addr: binary.LittleEndian.Uint64(e[0:]),
			Size: binary.LittleEndian.Uint64(e[8:]),
			Type: MemType(binary.LittleEndian.Uint32(e[16:])),
		})
	}
	return out
}

// TestBootParamsOffsets loads a synthetic bzImage and reads the written
// boot_params back at the offsets boot.rst gives.
func TestBootParamsOffsets(t *testing.T) {
	img := boottest.DefaultBzImage()
	m := newMem(t, 128*mib)
	cfg := initrd(3*mib + 5)
	cfg.Cmdline = "console=ttyS0 quiet"
	entry, err := load(t, m, img.Bytes(), cfg)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	bp := read(t, m, BootParamsAddr, 4096)
	rdAddr := fieldAt(bp, 0x218, 4)
	for _, f := range []struct {
		name      string
		off, size int
		want      uint64
	}{
		{"setup_sects", 0x1F1, 1, 4},
		{"syssize", 0x1F4, 4, uint64(img.PayloadSize / 16)},
		{"boot_flag", 0x1FE, 2, 0xAA55},
		{"jump", 0x200, 2, 0x6AEB},
		{"header", 0x202, 4, 0x53726448}, // "HdrS"
		{"version", 0x206, 2, 0x20F},
		{"type_of_loader", 0x210, 1, 0xFF},
		{"loadflags", 0x211, 1, 0x01},
		{"code32_start", 0x214, 4, 0x1000000},
		{"ramdisk_size", 0x21C, 4, 3*mib + 5},
		{"cmd_line_ptr", 0x228, 4, CmdlineAddr},
		{"initrd_addr_max", 0x22C, 4, 0x7FFFFFFF},
		{"kernel_alignment", 0x230, 4, 0x200000},
		{"relocatable_kernel", 0x234, 1, 1},
		{"xloadflags", 0x236, 2, 3},
		{"cmdline_size", 0x238, 4, 2047},
		{"pref_address", 0x258, 8, 0x1000000},
		{"init_size", 0x260, 4, 0x400000},
		{"e820_entries", 0x1E8, 1, 4},
		{"sentinel", 0x1EF, 1, 0},
		{"ext_ramdisk_image", 0x0C0, 4, 0},
		{"ext_cmd_line_ptr", 0x0C8, 4, 0},
		{"after the header (0x26C)", 0x26C, 4, 0},
	} {
		if got := fieldAt(bp, f.off, f.size); got != f.want {
			t.Errorf("%s at %#x = %#x, want %#x", f.name, f.off, got, f.want)
		}
	}
	// The initrd: page aligned, as high as possible in 128 MiB, intact.
	if want := uint64(128*mib-(3*mib+5)) &^ 0xFFF; rdAddr != want {
		t.Errorf("ramdisk_image = %#x, want %#x", rdAddr, want)
	}
	if got := read(t, m, rdAddr, 3*mib+5); !bytes.Equal(got, bytes.Repeat([]byte{0xA5}, 3*mib+5)) {
		t.Errorf("initrd contents differ")
	}
	if got := string(read(t, m, CmdlineAddr, len(cfg.Cmdline)+1)); got != cfg.Cmdline+"\x00" {
		t.Errorf("command line = %q", got)
	}
	wantMap := []MapEntry{
		{0, 0x9FC00, MemRAM},
		{0x9FC00, 0x100000 - 0x9FC00, MemReserved},
		{0x100000, 128*mib - 0x100000, MemRAM},
		{0xC0000000, 1 * gib, MemReserved},
	}
	if diff := cmp.Diff(wantMap, decodeMap(bp[0x2D0:], int(bp[0x1E8]), 20)); diff != "" {
		t.Errorf("e820 table at 0x2d0 (-want +got):\n%s", diff)
	}
	wantEntry := &Entry{Mode: Long64, RIP: 0x1000200, RSI: BootParamsAddr, PageTable: PML4Addr, GDT: GDTAddr, GDTLimit: 0x2F}
	if diff := cmp.Diff(wantEntry, entry); diff != "" {
		t.Errorf("Entry (-want +got):\n%s", diff)
	}
	// The accessors of zeroPage agree with boot.rst.
	var z zeroPage
	for name, f := range map[string]struct {
		b   []byte
		off int
	}{
		"setup_sects": {z.setupSects(), 0x1F1}, "boot_flag": {z.bootFlag(), 0x1FE}, "header": {z.header(), 0x202}, "syssize": {z.syssize(), 0x1F4}, "jump": {z.jump(), 0x200},
		"version": {z.version(), 0x206}, "type_of_loader": {z.typeOfLoader(), 0x210}, "loadflags": {z.loadflags(), 0x211},
		"code32_start": {z.code32Start(), 0x214}, "ramdisk_image": {z.ramdiskImage(), 0x218}, "ramdisk_size": {z.ramdiskSize(), 0x21C},
		"cmd_line_ptr": {z.cmdLinePtr(), 0x228}, "initrd_addr_max": {z.initrdAddrMax(), 0x22C},
		"kernel_alignment": {z.kernelAlignment(), 0x230}, "relocatable_kernel": {z.relocatable(), 0x234},
		"xloadflags": {z.xloadflags(), 0x236}, "cmdline_size": {z.cmdlineSize(), 0x238}, "pref_address": {z.prefAddress(), 0x258},
		"init_size": {z.initSize(), 0x260}, "e820_entries": {z.e820Entries(), 0x1E8}, "e820_table": {z.e820Table(), 0x2D0},
		"ext_ramdisk_image": {z.extRamdiskImage(), 0x0C0}, "ext_ramdisk_size": {z.extRamdiskSize(), 0x0C4},
		"ext_cmd_line_ptr": {z.extCmdLinePtr(), 0x0C8},
	} {
		if got := cap(z[:]) - cap(f.b); got != f.off {
			t.Errorf("zeroPage.%s at %#x, want %#x", name, got, f.off)
		}
	}
}

// TestBzImageLoadAddress checks where the protected-mode kernel goes.
func TestBzImageLoadAddress(t *testing.T) {
	for _, tc := range []struct {
		name     string
		ram      uint64
		edit     func(*boottest.BzImage)
		wantLoad uint64
	}{
		{"relocatable at pref_address", 128 * mib, nil, 0x1000000},
		{"pref_address does not fit", 18 * mib, nil, 0x100000},
		{"not relocatable", 128 * mib, func(b *boottest.BzImage) { b.Relocatable = false }, 0x100000},
		{"pref_address misaligned", 128 * mib, func(b *boottest.BzImage) { b.PrefAddress = 0x1001000 }, 0x100000},
		{"setup_sects 0 means 4", 128 * mib, func(b *boottest.BzImage) { b.SetupSects = 0 }, 0x1000000},
		{"setup_sects 30", 128 * mib, func(b *boottest.BzImage) { b.SetupSects = 30 }, 0x1000000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := boottest.DefaultBzImage()
			if tc.edit != nil {
				tc.edit(&img)
			}
			m := newMem(t, tc.ram)
			e, err := load(t, m, img.Bytes(), Config{})
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if e.RIP != tc.wantLoad+0x200 {
				t.Errorf("RIP = %#x, want %#x", e.RIP, tc.wantLoad+0x200)
			}
			got := read(t, m, tc.wantLoad, img.PayloadSize)
			for i := range got {
				if got[i] != boottest.PayloadByte(i) {
					t.Fatalf("payload byte %d at %#x = %#x, want %#x", i, tc.wantLoad+uint64(i), got[i], boottest.PayloadByte(i))
				}
			}
			if got := fieldAt(read(t, m, BootParamsAddr, 4096), 0x214, 4); got != tc.wantLoad {
				t.Errorf("code32_start = %#x, want %#x", got, tc.wantLoad)
			}
		})
	}
}

func TestRAMLayoutAndMemoryMap(t *testing.T) {
	for _, tc := range []struct {
		size    uint64
		wantRAM []guestmem.Range
		wantMap []MapEntry
	}{
		{
			size:    128 * mib,
			wantRAM: []guestmem.Range{{GPA: 0, Size: 128 * mib}},
			wantMap: []MapEntry{
				{0, 0x9FC00, MemRAM},
				{0x9FC00, 0x60400, MemReserved},
				{0x100000, 127 * mib, MemRAM},
				{0xC0000000, 0x40000000, MemReserved},
			},
		},
		{
			size:    3 * gib,
			wantRAM: []guestmem.Range{{GPA: 0, Size: 3 * gib}},
			wantMap: []MapEntry{
				{0, 0x9FC00, MemRAM},
				{0x9FC00, 0x60400, MemReserved},
				{0x100000, 3*gib - mib, MemRAM},
				{0xC0000000, 0x40000000, MemReserved},
			},
		},
		{
			size:    5 * gib,
			wantRAM: []guestmem.Range{{GPA: 0, Size: 3 * gib}, {GPA: 4 * gib, Size: 2 * gib}},
			wantMap: []MapEntry{
				{0, 0x9FC00, MemRAM},
				{0x9FC00, 0x60400, MemReserved},
				{0x100000, 3*gib - mib, MemRAM},
				{0xC0000000, 0x40000000, MemReserved},
				{4 * gib, 2 * gib, MemRAM},
			},
		},
	} {
		t.Run(fmt.Sprintf("%dMiB", tc.size/mib), func(t *testing.T) {
			ram := RAMLayout(tc.size)
			if diff := cmp.Diff(tc.wantRAM, ram); diff != "" {
				t.Errorf("RAMLayout (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tc.wantMap, MemoryMap(ram)); diff != "" {
				t.Errorf("MemoryMap (-want +got):\n%s", diff)
			}
		})
	}
	if RAMLayout(0) != nil {
		t.Errorf("RAMLayout(0) != nil")
	}
}

// TestLoadLargeRAM boots into 3 GiB and 5 GiB of fake RAM (host pages are
// only touched where the loader writes) and checks the e820 in boot_params.
func TestLoadLargeRAM(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates up to 5 GiB of (untouched) fake guest RAM")
	}
	for _, size := range []uint64{3 * gib, 5 * gib} {
		t.Run(fmt.Sprintf("%dGiB", size/gib), func(t *testing.T) {
			m := newMem(t, size)
			if _, err := load(t, m, boottest.DefaultBzImage().Bytes(), initrd(4096)); err != nil {
				t.Fatalf("Load: %v", err)
			}
			bp := read(t, m, BootParamsAddr, 4096)
			if diff := cmp.Diff(MemoryMap(RAMLayout(size)), decodeMap(bp[0x2D0:], int(bp[0x1E8]), 20)); diff != "" {
				t.Errorf("e820 (-want +got):\n%s", diff)
			}
			// initrd_addr_max is 2 GiB - 1 in the default image.
			if rd := fieldAt(bp, 0x218, 4); rd+4096 != 2*gib {
				t.Errorf("ramdisk_image = %#x, want %#x", rd, 2*gib-4096)
			}
		})
	}
}

func TestInitrdPlacement(t *testing.T) {
	for _, tc := range []struct {
		name          string
		ram           uint64
		initrdAddrMax uint32
		size          int
		want          uint64 // 0: expect ErrTooLarge
	}{
		{"top of RAM", 64 * mib, 0x7FFFFFFF, 1*mib + 1, 63*mib - 4096},
		{"below initrd_addr_max", 128 * mib, 48*mib - 1, 4 * mib, 44 * mib},
		{"initrd_addr_max not page aligned", 128 * mib, 48*mib - 1 - 0x800, 4 * mib, 44*mib - 4096},
		// The kernel occupies [16 MiB, 20 MiB): an initrd that would
		// overlap it from below initrd_addr_max goes below it.
		{"below the kernel", 128 * mib, 18*mib - 1, 2 * mib, 14 * mib},
		{"no room", 128 * mib, 18*mib - 1, 15*mib + 1, 0},
		{"larger than RAM", 64 * mib, 0x7FFFFFFF, 65 * mib, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := boottest.DefaultBzImage()
			img.InitrdAddrMax = tc.initrdAddrMax
			m := newMem(t, tc.ram)
			e, err := load(t, m, img.Bytes(), initrd(tc.size))
			if tc.want == 0 {
				if !errors.Is(err, ErrTooLarge) || e != nil {
					t.Fatalf("Load = %v, %v; want nil, ErrTooLarge", e, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			bp := read(t, m, BootParamsAddr, 4096)
			addr, size := fieldAt(bp, 0x218, 4), fieldAt(bp, 0x21C, 4)
			if addr != tc.want || size != uint64(tc.size) {
				t.Errorf("initrd at %#x size %#x, want %#x size %#x", addr, size, tc.want, tc.size)
			}
			kernel := e.RIP - 0x200
			if addr < kernel+uint64(img.InitSize) && kernel < addr+size {
				t.Errorf("initrd [%#x, +%#x) overlaps the kernel [%#x, +%#x)", addr, size, kernel, img.InitSize)
			}
			if addr+size-1 > uint64(tc.initrdAddrMax) || addr%4096 != 0 {
				t.Errorf("initrd [%#x, +%#x) not page aligned below initrd_addr_max %#x", addr, size, tc.initrdAddrMax)
			}
		})
	}
}

func TestPlaceInitrd(t *testing.T) {
	for _, tc := range []struct {
		name        string
		size, limit uint64
		avoid       []guestmem.Range
		want        uint64
		wantOK      bool
	}{
		{"simple", 0x1000, 0x200000, nil, 0x1FF000, true},
		{"rounds down", 0x1800, 0x200000, nil, 0x1FE000, true},
		{"hops two ranges", 0x1000, 0x400000, []guestmem.Range{{GPA: 0x300000, Size: 0x100000}, {GPA: 0x2FF800, Size: 0x1000}}, 0x2FE000, true},
		{"not below 1 MiB", 0x1000, 0x100800, nil, 0, false},
		{"zero size", 0, 0x400000, nil, 0, false},
		{"larger than limit", 0x500000, 0x400000, nil, 0, false},
		{"range at 0", 0x1000, 0x400000, []guestmem.Range{{GPA: 0, Size: 0x400000}}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := placeInitrd(tc.size, tc.limit, tc.avoid)
			if got != tc.want || ok != tc.wantOK {
				t.Errorf("placeInitrd = %#x, %v; want %#x, %v", got, ok, tc.want, tc.wantOK)
			}
		})
	}
}

func TestPVH(t *testing.T) {
	for _, desc := range []int{4, 8} {
		t.Run(fmt.Sprintf("note%d", desc), func(t *testing.T) {
			img := boottest.DefaultPVH()
			img.NoteDesc = desc
			m := newMem(t, 64*mib)
			// Garbage where the bss goes, to see it zeroed.
			if _, err := m.WriteAt(bytes.Repeat([]byte{0xEE}, 0x2000), 0x102000); err != nil {
				t.Fatal(err)
			}
			cfg := initrd(10000)
			cfg.Cmdline = "root=/dev/vda"
			cfg.CPUs = 2
			e, err := load(t, m, img.Bytes(), cfg)
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			want := &Entry{Mode: Protected32, RIP: 0x100010, RBX: StartInfoAddr, GDT: GDTAddr, GDTLimit: 0x2F}
			if diff := cmp.Diff(want, e); diff != "" {
				t.Errorf("Entry (-want +got):\n%s", diff)
			}
			if got := read(t, m, 0x100000, 0x2000); !bytes.Equal(got, img.Segments[0].Data) {
				t.Errorf("segment data differs")
			}
			if got := read(t, m, 0x102000, 0x2000); !bytes.Equal(got, make([]byte, 0x2000)) {
				t.Errorf("bss not zeroed")
			}
			si := read(t, m, StartInfoAddr, 56)
			rdAddr := uint64(64*mib-10000) &^ 0xFFF
			for _, f := range []struct {
				name      string
				off, size int
				want      uint64
			}{
				{"magic", 0, 4, 0x336EC578},
				{"version", 4, 4, 1},
				{"flags", 8, 4, 0},
				{"nr_modules", 12, 4, 1},
				{"modlist_paddr", 16, 8, StartInfoAddr + 0x40},
				{"cmdline_paddr", 24, 8, CmdlineAddr},
				{"rsdp_paddr", 32, 8, 0},
				{"memmap_paddr", 40, 8, StartInfoAddr + 0x80},
				{"memmap_entries", 48, 4, 4},
				{"reserved", 52, 4, 0},
			} {
				if got := fieldAt(si, f.off, f.size); got != f.want {
					t.Errorf("hvm_start_info.%s at %d = %#x, want %#x", f.name, f.off, got, f.want)
				}
			}
			mod := read(t, m, fieldAt(si, 16, 8), 32)
			if diff := cmp.Diff([]uint64{rdAddr, 10000, 0, 0},
				[]uint64{fieldAt(mod, 0, 8), fieldAt(mod, 8, 8), fieldAt(mod, 16, 8), fieldAt(mod, 24, 8)}); diff != "" {
				t.Errorf("hvm_modlist_entry {paddr, size, cmdline_paddr, reserved} (-want +got):\n%s", diff)
			}
			mm := read(t, m, fieldAt(si, 40, 8), 4*24)
			if diff := cmp.Diff(MemoryMap(RAMLayout(64*mib)), decodeMap(mm, 4, 24)); diff != "" {
				t.Errorf("memmap (-want +got):\n%s", diff)
			}
			for i := range 4 {
				if r := fieldAt(mm, i*24+20, 4); r != 0 {
					t.Errorf("memmap[%d].reserved = %#x", i, r)
				}
			}
			if got := string(read(t, m, CmdlineAddr, len(cfg.Cmdline)+1)); got != cfg.Cmdline+"\x00" {
				t.Errorf("command line = %q", got)
			}
		})
	}
}

// TestPVHInitrdAvoidsSegments puts a segment at the top of RAM: the initrd
// goes below it.
func TestPVHInitrdAvoidsSegments(t *testing.T) {
	img := boottest.DefaultPVH()
	img.Segments = append(img.Segments, boottest.Segment{Paddr: 60 * mib, Data: []byte{1}, MemSize: 4 * mib})
	m := newMem(t, 64*mib)
	if _, err := load(t, m, img.Bytes(), initrd(mib)); err != nil {
		t.Fatalf("Load: %v", err)
	}
	mod := read(t, m, StartInfoAddr+0x40, 16)
	if got := fieldAt(mod, 0, 8); got != 59*mib {
		t.Errorf("initrd at %#x, want %#x", got, 59*mib)
	}
}

// mpEntry is a decoded MP configuration table entry.
type mpEntry struct {
	Type  byte
	Bytes []byte
}

func TestMPTable(t *testing.T) {
	for _, n := range []int{0, 1, 2, 40, 41, 254} {
		t.Run(fmt.Sprintf("%dCPUs", n), func(t *testing.T) {
			m := newMem(t, 64*mib)
			if _, err := load(t, m, boottest.DefaultPVH().Bytes(), Config{CPUs: n}); err != nil {
				t.Fatalf("Load: %v", err)
			}
			cpus := max(n, 1)
			f := read(t, m, MPFloatAddr, 16)
			if string(f[:4]) != "_MP_" || f[8] != 1 || f[9] != 4 || sum(f) != 0 || f[11] != 0 || f[12] != 0 {
				t.Fatalf("floating pointer % x: bad signature, length, revision, checksum or features", f)
			}
			addr := fieldAt(f, 4, 4)
			wantAddr := uint64(0x9FC10)
			if cpus > 40 {
				wantAddr = 0xF0000
			}
			if addr != wantAddr {
				t.Errorf("config table at %#x, want %#x", addr, wantAddr)
			}
			hdr := read(t, m, addr, 44)
			length := int(fieldAt(hdr, 4, 2))
			tab := read(t, m, addr, length)
			if string(tab[:4]) != "PCMP" || tab[6] != 4 || sum(tab) != 0 {
				t.Fatalf("config table header % x: bad signature, revision or checksum", hdr)
			}
			if addr == 0x9FC10 && addr+uint64(length) > 0xA0000 {
				t.Errorf("config table [%#x, +%#x) crosses 0xA0000", addr, length)
			}
			if got := fieldAt(tab, 36, 4); got != 0xFEE00000 {
				t.Errorf("local APIC address %#x", got)
			}
			var ents []mpEntry
			for p := tab[44:]; len(p) > 0; {
				sz := 8
				if p[0] == 0 {
					sz = 20
				}
				ents = append(ents, mpEntry{p[0], p[:sz]})
				p = p[sz:]
			}
			if got := int(fieldAt(tab, 34, 2)); got != len(ents) {
				t.Errorf("entry count %d, table has %d", got, len(ents))
			}
			var procs, irqs, locals []mpEntry
			for _, e := range ents {
				switch e.Type {
				case 0:
					procs = append(procs, e)
				case 1:
					if e.Bytes[1] != 0 || string(e.Bytes[2:8]) != "ISA   " {
						t.Errorf("bus entry % x", e.Bytes)
					}
				case 2:
					if e.Bytes[1] != byte(cpus) || e.Bytes[2] != 0x11 || e.Bytes[3] != 1 || fieldAt(e.Bytes, 4, 4) != 0xFEC00000 {
						t.Errorf("I/O APIC entry % x", e.Bytes)
					}
				case 3:
					irqs = append(irqs, e)
				case 4:
					locals = append(locals, e)
				default:
					t.Errorf("unknown entry % x", e.Bytes)
				}
			}
			if len(procs) != cpus {
				t.Fatalf("%d processor entries, want %d", len(procs), cpus)
			}
			for i, p := range procs {
				wantFlags := byte(1)
				if i == 0 {
					wantFlags = 3
				}
				if p.Bytes[1] != byte(i) || p.Bytes[3] != wantFlags {
					t.Errorf("processor %d: APIC ID %d flags %#x, want %d %#x", i, p.Bytes[1], p.Bytes[3], i, wantFlags)
				}
			}
			pins := map[byte]byte{}
			for _, e := range irqs {
				if e.Bytes[1] != 0 || e.Bytes[4] != 0 || e.Bytes[6] != byte(cpus) {
					t.Errorf("I/O interrupt entry % x: want INT from bus 0 to I/O APIC %d", e.Bytes, cpus)
				}
				pins[e.Bytes[5]] = e.Bytes[7]
			}
			wantPins := map[byte]byte{}
			for irq := byte(0); irq < 16; irq++ {
				wantPins[irq] = irq
			}
			if diff := cmp.Diff(wantPins, pins); diff != "" {
				t.Errorf("ISA IRQ -> pin (-want +got):\n%s", diff)
			}
			wantLocals := []mpEntry{
				{4, []byte{4, 3, 0, 0, 0, 0, 0xFF, 0}}, // ExtINT -> LINT0
				{4, []byte{4, 1, 0, 0, 0, 0, 0xFF, 1}}, // NMI -> LINT1
			}
			if diff := cmp.Diff(wantLocals, locals); diff != "" {
				t.Errorf("local interrupt entries (-want +got):\n%s", diff)
			}
		})
	}
}

func sum(b []byte) byte {
	var s byte
	for _, c := range b {
		s += c
	}
	return s
}

// TestGDTAndPageTables walks the written page tables and decodes the GDT.
func TestGDTAndPageTables(t *testing.T) {
	m := newMem(t, 64*mib)
	e, err := load(t, m, boottest.DefaultBzImage().Bytes(), Config{})
	if err != nil {
		t.Fatal(err)
	}
	gdt := read(t, m, e.GDT, int(e.GDTLimit)+1)
	desc := func(sel int) uint64 { return binary.LittleEndian.Uint64(gdt[sel:]) }
	for _, tc := range []struct {
		name     string
		sel      int
		typ      uint64 // access byte
		longMode bool
		big      bool
	}{
		{"code32", SelCode32, 0x9B, false, true},
		{"code64", SelCode64, 0x9B, true, false},
		{"data", SelData, 0x93, false, true},
	} {
		d := desc(tc.sel)
		base := d>>16&0xFFFFFF | d>>56<<24
		limit := d&0xFFFF | d>>48&0xF<<16
		if base != 0 || limit != 0xFFFFF || d>>40&0xFF != tc.typ || d>>53&1 == 1 != tc.longMode || d>>54&1 == 1 != tc.big || d>>55&1 != 1 {
			t.Errorf("%s descriptor %#016x", tc.name, d)
		}
	}
	if d, hi := desc(SelTSS), desc(SelTSS+8); d&0xFFFF != 0x67 || d>>40&0xFF != 0x8B || d>>16&0xFFFFFF != 0 || hi != 0 {
		t.Errorf("TSS descriptor %#016x %#016x", d, hi)
	}
	if desc(0) != 0 {
		t.Errorf("null descriptor %#x", desc(0))
	}
	entry := func(table, i uint64) uint64 {
		v, err := m.Uint64(table + i*8)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for _, va := range []uint64{0, 0x1234, 0x200000, 0x1000200, 0xBFFFFFFF, 0xFEE00000, 0xFFFFFFFF} {
		pml4e := entry(e.PageTable, va>>39&511)
		pdpte := entry(pml4e&^0xFFF, va>>30&511)
		pde := entry(pdpte&^0xFFF, va>>21&511)
		if pml4e&3 != 3 || pdpte&3 != 3 || pde&0x83 != 0x83 {
			t.Errorf("va %#x: entries %#x %#x %#x not present/writable/2 MiB", va, pml4e, pdpte, pde)
		}
		if pa := pde&^0x1FFFFF&(1<<52-1) | va&0x1FFFFF; pa != va {
			t.Errorf("va %#x maps to %#x", va, pa)
		}
	}
}

func TestRefusals(t *testing.T) {
	bz := func(edit func(*boottest.BzImage)) []byte {
		b := boottest.DefaultBzImage()
		edit(&b)
		return b.Bytes()
	}
	pvh := func(edit func(*boottest.PVH)) []byte {
		p := boottest.DefaultPVH()
		if edit != nil {
			edit(&p)
		}
		return p.Bytes()
	}
	// phdr patches program header i of a default PVH ELF at field off.
	phdr := func(i, off int, v uint64) []byte {
		f := pvh(nil)
		binary.LittleEndian.PutUint64(f[boottest.ELFPhdrs+i*boottest.PhdrSize+off:], v)
		return f
	}
	goodBz := boottest.DefaultBzImage().Bytes()
	goodPVH := pvh(nil)
	for _, tc := range []struct {
		name string
		img  []byte
		ram  uint64
		cfg  Config
		want error
	}{
		{"empty file", nil, 0, Config{}, ErrUnknownKernel},
		{"text", []byte("#!/bin/sh\necho hello\n"), 0, Config{}, ErrUnknownKernel},
		{"bzImage truncated in header", goodBz[:0x240], 0, Config{}, ErrMalformed},
		{"bzImage truncated in setup", goodBz[:0x500], 0, Config{}, ErrMalformed},
		{"bzImage truncated payload", goodBz[:len(goodBz)-16], 0, Config{}, ErrMalformed},
		{"bzImage syssize past the end", bz(func(b *boottest.BzImage) { b.Syssize = 0xFFFFFFFF }), 0, Config{}, ErrMalformed},
		{"bzImage no 64-bit entry in payload", bz(func(b *boottest.BzImage) { b.PayloadSize = 0x200 }), 0, Config{}, ErrMalformed},
		{"protocol 2.05", bz(func(b *boottest.BzImage) { b.Version = 0x205 }), 0, Config{}, ErrProtocolTooOld},
		{"protocol 2.11 has no xloadflags", bz(func(b *boottest.BzImage) { b.Version = 0x20B }), 0, Config{}, ErrProtocolTooOld},
		{"not 64-bit", bz(func(b *boottest.BzImage) { b.XLoadflags = 0 }), 0, Config{}, ErrProtocolTooOld},
		{"zImage", bz(func(b *boottest.BzImage) { b.Loadflags = 0 }), 0, Config{}, ErrProtocolTooOld},
		{"kernel larger than memory", bz(func(b *boottest.BzImage) { b.InitSize = 200 * mib }), 0, Config{}, ErrTooLarge},
		{"payload larger than memory", goodBz, 1 * mib, Config{}, ErrTooLarge},
		{"initrd larger than memory", goodBz, 0, initrd(70 * mib), ErrTooLarge},
		{"cmdline over cmdline_size", bz(func(b *boottest.BzImage) { b.CmdlineSize = 10 }), 0, Config{Cmdline: "console=ttyS0"}, ErrCmdlineTooLong},
		{"cmdline over CmdlineMax", goodPVH, 0, Config{Cmdline: strings.Repeat("x", CmdlineMax)}, ErrCmdlineTooLong},
		{"255 CPUs", goodPVH, 0, Config{CPUs: 255}, ErrTooManyCPUs},
		{"RAM below 1 MiB", goodPVH, 512 * kib, Config{}, ErrTooLarge},
		{"ELF without PVH note", pvh(func(p *boottest.PVH) { p.NoteDesc = 0 }), 0, Config{}, ErrUnknownKernel},
		{"ELF32", func() []byte { f := pvh(nil); f[4] = 1; return f }(), 0, Config{}, ErrUnknownKernel},
		{"ELF not x86-64", func() []byte { f := pvh(nil); f[18] = 183; return f }(), 0, Config{}, ErrUnknownKernel},
		{"ELF truncated header", goodPVH[:40], 0, Config{}, ErrMalformed},
		{"ELF truncated segments", goodPVH[:len(goodPVH)-1], 0, Config{}, ErrMalformed},
		{"ELF segment outside RAM", phdr(1, boottest.PhdrPaddr, 64*mib), 0, Config{}, ErrTooLarge},
		{"ELF segment in the MMIO hole", phdr(1, boottest.PhdrPaddr, 0xC0000000), 0, Config{}, ErrTooLarge},
		{"ELF segment below 1 MiB", phdr(1, boottest.PhdrPaddr, 0x8000), 0, Config{}, ErrTooLarge},
		{"ELF segment straddling the end of RAM", phdr(1, boottest.PhdrPaddr, 64*mib-0x1000), 0, Config{}, ErrTooLarge},
		{"ELF overflowing p_offset", phdr(1, boottest.PhdrOffset, 1<<64-0x100), 0, Config{}, ErrMalformed},
		{"ELF overflowing p_paddr+p_memsz", phdr(1, boottest.PhdrMemsz, 1<<64-0x1000), 0, Config{}, ErrMalformed},
		{"ELF filesz > memsz", phdr(1, boottest.PhdrMemsz, 0x10), 0, Config{}, ErrMalformed},
		{"ELF overflowing note offset", phdr(boottest.NotePhdr, boottest.PhdrOffset, 1<<63), 0, Config{}, ErrMalformed},
		{"ELF huge note", phdr(boottest.NotePhdr, boottest.PhdrFilesz, 1<<40), 0, Config{}, ErrMalformed},
		{"ELF phoff past the end", func() []byte {
			f := pvh(nil)
			binary.LittleEndian.PutUint64(f[boottest.ELFPhoff:], 1<<64-8)
			return f
		}(), 0, Config{}, ErrMalformed},
		{"ELF phnum 0xffff", func() []byte { f := pvh(nil); binary.LittleEndian.PutUint16(f[boottest.ELFPhnum:], 0xFFFF); return f }(), 0, Config{}, ErrMalformed},
		{"ELF entry outside segments", pvh(func(p *boottest.PVH) { p.Entry = 0x200000 }), 0, Config{}, ErrMalformed},
		{"ELF entry above 4 GiB", pvh(func(p *boottest.PVH) { p.NoteDesc = 8; p.Entry = 1<<32 | 0x100010 }), 0, Config{}, ErrMalformed},
		{"ELF note descsz past the segment", func() []byte {
			f := pvh(nil)
			noteOff := binary.LittleEndian.Uint64(f[boottest.ELFPhdrs+boottest.PhdrOffset:])
			binary.LittleEndian.PutUint32(f[noteOff+4:], 0xFFFFFFFF)
			return f
		}(), 0, Config{}, ErrMalformed},
		{"ELF PVH note with 2-byte desc", func() []byte {
			f := pvh(nil)
			noteOff := binary.LittleEndian.Uint64(f[boottest.ELFPhdrs+boottest.PhdrOffset:])
			// Second note (after the 12+4+8-byte GNU note): descsz 4 -> 2.
			binary.LittleEndian.PutUint32(f[noteOff+24+4:], 2)
			return f
		}(), 0, Config{}, ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ram := tc.ram
			if ram == 0 {
				ram = 64 * mib
			}
			m := newMem(t, ram)
			e, err := load(t, m, tc.img, tc.cfg)
			if !errors.Is(err, tc.want) || e != nil {
				t.Fatalf("Load = %v, %v; want nil, %v", e, err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "boot: ") {
				t.Errorf("error %q lacks the package prefix", err)
			}
			t.Logf("%v", err)
		})
	}
}

// TestLoadRejectsShortReader checks a kernelSize larger than the file.
func TestLoadRejectsShortReader(t *testing.T) {
	img := boottest.DefaultPVH().Bytes()
	m := newMem(t, 64*mib)
	_, err := Load(m, bytes.NewReader(img[:len(img)-100]), int64(len(img)), Config{})
	if !errors.Is(err, ErrMalformed) {
		t.Fatalf("Load = %v, want ErrMalformed", err)
	}
}

// TestDirtyTracking checks that the loader's writes are recorded as dirty.
func TestDirtyTracking(t *testing.T) {
	m := newMem(t, 64*mib)
	if _, err := load(t, m, boottest.DefaultBzImage().Bytes(), initrd(8192)); err != nil {
		t.Fatal(err)
	}
	bits := m.Regions()[0].TakeDirty()
	dirty := func(gpa uint64) bool { p := gpa / 4096; return bits[p/64]>>(p%64)&1 == 1 }
	for _, gpa := range []uint64{GDTAddr, BootParamsAddr, PML4Addr, CmdlineAddr, MPFloatAddr, 0x1000000, 64*mib - 8192} {
		if !dirty(gpa) {
			t.Errorf("page at %#x not marked dirty", gpa)
		}
	}
}

func TestModeString(t *testing.T) {
	if Long64.String() != "long64" || Protected32.String() != "protected32" {
		t.Errorf("Mode strings %q %q", Long64, Protected32)
	}
}

// TestRealKernels loads real kernel files when they are present: our
// workload guest (built by guest/'s Makefile) and, when the environment
// names them, a Debian vmlinux (PVH) or vmlinuz (bzImage) through
// COLLECTIVE_TEST_KERNELS (a list separated by the OS path list separator).
func TestRealKernels(t *testing.T) {
	paths := []string{"../../guest/build/guest.elf"}
	if env := os.Getenv("COLLECTIVE_TEST_KERNELS"); env != "" {
		paths = append(paths, filepath.SplitList(env)...)
	}
	for _, p := range paths {
		t.Run(filepath.Base(p), func(t *testing.T) {
			f, err := os.Open(p)
			if errors.Is(err, os.ErrNotExist) {
				t.Skipf("%s not present", p)
			}
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			st, err := f.Stat()
			if err != nil {
				t.Fatal(err)
			}
			m := newMem(t, 256*mib)
			cfg := initrd(2 * mib)
			cfg.Cmdline = "console=ttyS0 quiet"
			cfg.CPUs = 2
			e, err := Load(m, f, st.Size(), cfg)
			if err != nil {
				t.Fatalf("Load(%s): %v", p, err)
			}
			if !m.Contains(e.RIP, 1) {
				t.Errorf("entry %#x outside RAM", e.RIP)
			}
			t.Logf("%s: %+v", p, *e)
		})
	}
}
