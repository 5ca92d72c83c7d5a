// Package boottest builds minimal, valid kernel images for tests and fuzz
// seeds of package boot: a bzImage (Linux boot protocol, boot.rst) and a
// PVH ELF (ELF64 x86-64 with a XEN_ELFNOTE_PHYS32_ENTRY note). The images
// carry no runnable code; their payload is a byte pattern a test can find
// again in guest memory.
package boottest

import "encoding/binary"

var le = binary.LittleEndian

// BzImage describes a synthetic bzImage. Start from DefaultBzImage and
// change the fields a test is about.
type BzImage struct {
	SetupSects      uint8  // setup_sects (0 means 4)
	Version         uint16 // boot protocol version, e.g. 0x20F for 2.15
	Loadflags       uint8  // loadflags
	XLoadflags      uint16 // xloadflags
	Relocatable     bool   // relocatable_kernel
	KernelAlignment uint32 // kernel_alignment
	PrefAddress     uint64 // pref_address
	InitSize        uint32 // init_size
	InitrdAddrMax   uint32 // initrd_addr_max
	CmdlineSize     uint32 // cmdline_size
	PayloadSize     int    // bytes of protected-mode kernel (a multiple of 16)
	// Syssize overrides syssize (in 16-byte units) when non-zero; it is
	// PayloadSize/16 otherwise.
	Syssize uint32
}

// DefaultBzImage returns a valid 64-bit relocatable bzImage description:
// protocol 2.15, 4 setup sectors, 64 KiB of payload, pref_address 16 MiB,
// init_size 4 MiB.
func DefaultBzImage() BzImage {
	return BzImage{
		SetupSects:      4,
		Version:         0x20F,
		Loadflags:       0x01,        // LOADED_HIGH
		XLoadflags:      0x01 | 0x02, // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
		Relocatable:     true,
		KernelAlignment: 0x200000,
		PrefAddress:     0x1000000,
		InitSize:        0x400000,
		InitrdAddrMax:   0x7FFFFFFF,
		CmdlineSize:     2047,
		PayloadSize:     0x10000,
	}
}

// PayloadByte is the byte at offset i of a synthetic kernel's payload.
func PayloadByte(i int) byte { return byte(i*7 + i>>8 + 1) }

// Bytes returns the bzImage file.
func (b BzImage) Bytes() []byte {
	sects := int(b.SetupSects)
	if sects == 0 {
		sects = 4
	}
	setup := (sects + 1) * 512
	f := make([]byte, setup+b.PayloadSize)
	f[0x1F1] = b.SetupSects
	sys := b.Syssize
	if sys == 0 {
		sys = uint32(b.PayloadSize / 16)
	}
	le.PutUint32(f[0x1F4:], sys)
	le.PutUint16(f[0x1FE:], 0xAA55)
	f[0x200], f[0x201] = 0xEB, 0x6A // jmp short: header ends at 0x26C
	copy(f[0x202:], "HdrS")
	le.PutUint16(f[0x206:], b.Version)
	f[0x211] = b.Loadflags
	le.PutUint32(f[0x214:], 0x100000) // code32_start
	le.PutUint32(f[0x22C:], b.InitrdAddrMax)
	le.PutUint32(f[0x230:], b.KernelAlignment)
	if b.Relocatable {
		f[0x234] = 1
	}
	le.PutUint16(f[0x236:], b.XLoadflags)
	le.PutUint32(f[0x238:], b.CmdlineSize)
	le.PutUint64(f[0x258:], b.PrefAddress)
	le.PutUint32(f[0x260:], b.InitSize)
	for i := range b.PayloadSize {
		f[setup+i] = PayloadByte(i)
	}
	return f
}

// Segment is one PT_LOAD of a synthetic ELF.
type Segment struct {
	Paddr   uint64 // p_paddr (and p_vaddr)
	Data    []byte // file contents (p_filesz = len(Data))
	MemSize uint64 // p_memsz; at least len(Data)
}

// PVH describes a synthetic PVH ELF.
type PVH struct {
	Segments []Segment
	Entry    uint64 // value of the PVH entry note
	// NoteDesc is the size of the note's descriptor, 4 or 8; 0 omits the
	// PVH note (the ELF then carries only an unrelated note).
	NoteDesc int
}

// DefaultPVH returns a valid PVH ELF description: one segment at 1 MiB
// with 8 KiB of payload and 8 KiB of bss, entry 16 bytes in, a 4-byte
// note (as our workload guest emits).
func DefaultPVH() PVH {
	data := make([]byte, 0x2000)
	for i := range data {
		data[i] = PayloadByte(i)
	}
	return PVH{
		Segments: []Segment{{Paddr: 0x100000, Data: data, MemSize: 0x4000}},
		Entry:    0x100010,
		NoteDesc: 4,
	}
}

// ELF header and program header offsets used by tests that corrupt
// images (System V gABI).
const (
	ELFPhoff   = 32 // e_phoff
	ELFPhnum   = 56 // e_phnum
	ELFPhdrs   = 64 // where Bytes puts the program headers
	PhdrSize   = 56 // e_phentsize: bytes per program header
	PhdrOffset = 8  // p_offset within a program header
	PhdrPaddr  = 24 // p_paddr
	PhdrFilesz = 32 // p_filesz
	PhdrMemsz  = 40 // p_memsz
	NotePhdr   = 0  // index of the PT_NOTE program header
)

// Bytes returns the ELF file: header, program headers (the PT_NOTE first,
// then one PT_LOAD per segment), the notes, then the segments' data.
func (p PVH) Bytes() []byte {
	// Notes: an unrelated GNU build-id-like note, then the PVH note.
	var notes []byte
	note := func(name string, typ uint32, desc []byte) {
		h := make([]byte, 12)
		le.PutUint32(h[0:], uint32(len(name)))
		le.PutUint32(h[4:], uint32(len(desc)))
		le.PutUint32(h[8:], typ)
		notes = append(notes, h...)
		notes = append(notes, pad4([]byte(name))...)
		notes = append(notes, pad4(desc)...)
	}
	note("GNU\x00", 3, []byte{1, 2, 3, 4, 5, 6, 7, 8})
	switch p.NoteDesc {
	case 4:
		d := make([]byte, 4)
		le.PutUint32(d, uint32(p.Entry))
		note("Xen\x00", 18, d)
	case 8:
		d := make([]byte, 8)
		le.PutUint64(d, p.Entry)
		note("Xen\x00", 18, d)
	}
	phnum := 1 + len(p.Segments)
	off := ELFPhdrs + phnum*PhdrSize
	f := make([]byte, off)
	copy(f, "\x7fELF")
	f[4], f[5], f[6] = 2, 1, 1                       // ELFCLASS64, little endian, EV_CURRENT
	le.PutUint16(f[16:], 2)                          // ET_EXEC
	le.PutUint16(f[18:], 62)                         // EM_X86_64
	le.PutUint32(f[20:], 1)                          // e_version
	le.PutUint64(f[24:], p.Entry|0xFFFFFFFF80000000) // e_entry (virtual; unused by PVH)
	le.PutUint64(f[ELFPhoff:], ELFPhdrs)
	le.PutUint16(f[52:], 64)       // e_ehsize
	le.PutUint16(f[54:], PhdrSize) // e_phentsize
	le.PutUint16(f[ELFPhnum:], uint16(phnum))

	ph := func(i int, typ uint32, offset, paddr, filesz, memsz, align uint64) {
		h := f[ELFPhdrs+i*PhdrSize:][:PhdrSize]
		le.PutUint32(h[0:], typ)
		le.PutUint32(h[4:], 4) // PF_R
		le.PutUint64(h[PhdrOffset:], offset)
		le.PutUint64(h[16:], paddr)
		le.PutUint64(h[PhdrPaddr:], paddr)
		le.PutUint64(h[PhdrFilesz:], filesz)
		le.PutUint64(h[PhdrMemsz:], memsz)
		le.PutUint64(h[48:], align)
	}
	ph(0, 4, uint64(off), 0, uint64(len(notes)), 0, 4) // PT_NOTE
	f = append(f, notes...)
	for i, s := range p.Segments {
		for len(f)%16 != 0 {
			f = append(f, 0)
		}
		ph(1+i, 1, uint64(len(f)), s.Paddr, uint64(len(s.Data)), max(s.MemSize, uint64(len(s.Data))), 16)
		f = append(f, s.Data...)
	}
	return f
}

func pad4(b []byte) []byte {
	out := append([]byte(nil), b...)
	for len(out)%4 != 0 {
		out = append(out, 0)
	}
	return out
}
