package boot

import (
	"fmt"
	"io"

	"collective/kvm/guestmem"
)

// elfHeader is an ELF64 file header (System V gABI, "ELF Header").
type elfHeader [elfHeaderSize]byte

func (h *elfHeader) ident() []byte     { return h[0:][:16] }
func (h *elfHeader) typ() []byte       { return h[16:][:2] }
func (h *elfHeader) machine() []byte   { return h[18:][:2] }
func (h *elfHeader) phoff() []byte     { return h[32:][:8] }
func (h *elfHeader) phentsize() []byte { return h[54:][:2] }
func (h *elfHeader) phnum() []byte     { return h[56:][:2] }

// progHeader is an ELF64 program header (gABI, "Program Header").
type progHeader [progHeaderSize]byte

func (p *progHeader) typ() []byte    { return p[0:][:4] }
func (p *progHeader) offset() []byte { return p[8:][:8] }
func (p *progHeader) paddr() []byte  { return p[24:][:8] }
func (p *progHeader) filesz() []byte { return p[32:][:8] }
func (p *progHeader) memsz() []byte  { return p[40:][:8] }
func (p *progHeader) align() []byte  { return p[48:][:8] }

const (
	elfHeaderSize  = 64
	progHeaderSize = 56

	elfClass64  = 2  // EI_CLASS: ELFCLASS64
	elfDataLSB  = 1  // EI_DATA: ELFDATA2LSB
	elfVersion  = 1  // EI_VERSION: EV_CURRENT
	elfTypeExec = 2  // e_type: ET_EXEC
	elfMachine  = 62 // e_machine: EM_X86_64
	ptLoad      = 1
	ptNote      = 4

	// maxPhnum caps the program headers read: a vmlinux has about 5, our
	// guest 2 or 3. (PN_XNUM, 0xffff, is refused with it.)
	maxPhnum = 64
	// maxNoteSize caps a PT_NOTE segment read into host memory; vmlinux's
	// notes take well under 4 KiB.
	maxNoteSize = 64 << 10

	// xenElfnotePhys32Entry is XEN_ELFNOTE_PHYS32_ENTRY (xen/include/
	// public/elfnote.h): the 32-bit physical entry point of a PVH kernel.
	xenElfnotePhys32Entry = 18
	xenNoteName           = "Xen\x00"
)

// Layout of hvm_start_info and friends (start_info.h).
const (
	startInfoMagic   = 0x336EC578
	startInfoVersion = 1
	startInfoSize    = 56
	modlistEntrySize = 32
	memmapEntrySize  = 24
)

func isELF(head []byte) bool {
	return len(head) >= 4 && string(head[:4]) == "\x7fELF"
}

// segment is a validated PT_LOAD.
type segment struct {
	off, paddr, filesz, memsz uint64
}

// pvhKernel is a validated PVH ELF.
type pvhKernel struct {
	segs  []segment
	entry uint64
}

// parsePVH validates an ELF64 x86-64 executable with a PVH entry note, for
// loading into mem.
func parsePVH(mem *guestmem.Memory, r io.ReaderAt, size int64, head []byte) (*pvhKernel, error) {
	if len(head) < elfHeaderSize {
		return nil, fmt.Errorf("boot: elf: file of %d bytes ends inside the ELF header: %w", size, ErrMalformed)
	}
	var h elfHeader
	copy(h[:], head)
	id := h.ident()
	if id[4] != elfClass64 || id[5] != elfDataLSB || id[6] != elfVersion || le.Uint16(h.machine()) != elfMachine {
		return nil, fmt.Errorf("boot: elf: class %d, data %d, version %d, machine %d: not a little-endian x86-64 ELF64: %w",
			id[4], id[5], id[6], le.Uint16(h.machine()), ErrUnknownKernel)
	}
	if t := le.Uint16(h.typ()); t != elfTypeExec {
		return nil, fmt.Errorf("boot: elf: e_type %d, not an executable (ET_EXEC): %w", t, ErrUnknownKernel)
	}
	phnum := uint64(le.Uint16(h.phnum()))
	if es := le.Uint16(h.phentsize()); es != progHeaderSize {
		return nil, fmt.Errorf("boot: elf: e_phentsize %d, want %d: %w", es, progHeaderSize, ErrMalformed)
	}
	if phnum == 0 || phnum > maxPhnum {
		return nil, fmt.Errorf("boot: elf: e_phnum %d, want 1..%d: %w", phnum, maxPhnum, ErrMalformed)
	}
	phoff := le.Uint64(h.phoff())
	raw, err := readFile(r, size, phoff, phnum*progHeaderSize)
	if err != nil {
		return nil, fmt.Errorf("boot: elf: program headers: %w", err)
	}

	k := &pvhKernel{}
	var haveEntry bool
	for i := range phnum {
		var p progHeader
		copy(p[:], raw[i*progHeaderSize:])
		off, filesz := le.Uint64(p.offset()), le.Uint64(p.filesz())
		if end, ok := guestmem.AddLength(off, filesz); !ok || end > uint64(size) {
			return nil, fmt.Errorf("boot: elf: program header %d: offset %#x + filesz %#x past the end of the %d-byte file: %w",
				i, off, filesz, size, ErrMalformed)
		}
		switch le.Uint32(p.typ()) {
		case ptNote:
			if haveEntry {
				continue
			}
			if filesz > maxNoteSize {
				return nil, fmt.Errorf("boot: elf: note segment %d of %#x bytes, at most %#x: %w", i, filesz, maxNoteSize, ErrMalformed)
			}
			notes, err := readFile(r, size, off, filesz)
			if err != nil {
				return nil, fmt.Errorf("boot: elf: note segment %d: %w", i, err)
			}
			align := uint64(4)
			if le.Uint64(p.align()) == 8 {
				align = 8
			}
			k.entry, haveEntry, err = findPVHEntry(notes, align)
			if err != nil {
				return nil, fmt.Errorf("boot: elf: note segment %d: %w", i, err)
			}
		case ptLoad:
			s := segment{off: off, paddr: le.Uint64(p.paddr()), filesz: filesz, memsz: le.Uint64(p.memsz())}
			if s.filesz > s.memsz {
				return nil, fmt.Errorf("boot: elf: segment %d: filesz %#x > memsz %#x: %w", i, s.filesz, s.memsz, ErrMalformed)
			}
			if s.memsz == 0 {
				continue
			}
			if _, ok := guestmem.AddLength(s.paddr, s.memsz); !ok {
				return nil, fmt.Errorf("boot: elf: segment %d: paddr %#x + memsz %#x overflows: %w", i, s.paddr, s.memsz, ErrMalformed)
			}
			if s.paddr < HighMemStart {
				return nil, fmt.Errorf("boot: elf: segment %d at %#x: below %#x, where the boot structures live: %w",
					i, s.paddr, HighMemStart, ErrTooLarge)
			}
			if !mem.Contains(s.paddr, s.memsz) {
				return nil, fmt.Errorf("boot: elf: segment %d [%#x, +%#x) outside guest RAM: %w", i, s.paddr, s.memsz, ErrTooLarge)
			}
			k.segs = append(k.segs, s)
		}
	}
	if !haveEntry {
		return nil, fmt.Errorf("boot: elf: no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): %w", ErrUnknownKernel)
	}
	if len(k.segs) == 0 {
		return nil, fmt.Errorf("boot: elf: no loadable segment: %w", ErrMalformed)
	}
	inside := false
	for _, s := range k.segs {
		if k.entry >= s.paddr && k.entry-s.paddr < s.memsz {
			inside = true
		}
	}
	if !inside {
		return nil, fmt.Errorf("boot: elf: PVH entry %#x lies in no loadable segment: %w", k.entry, ErrMalformed)
	}
	return k, nil
}

// findPVHEntry walks the notes of one PT_NOTE segment (gABI, "Note
// Section": namesz, descsz, type, then name and desc, each padded to
// align) and returns the XEN_ELFNOTE_PHYS32_ENTRY value, if present.
func findPVHEntry(b []byte, align uint64) (entry uint64, found bool, err error) {
	pad := func(n uint64) uint64 { return (n + align - 1) &^ (align - 1) }
	for len(b) > 0 {
		if len(b) < 12 {
			return 0, false, fmt.Errorf("%d trailing bytes, not a note header: %w", len(b), ErrMalformed)
		}
		namesz, descsz, typ := uint64(le.Uint32(b[0:])), uint64(le.Uint32(b[4:])), le.Uint32(b[8:])
		// namesz and descsz are below 2^32, so these sums cannot overflow.
		nameEnd := 12 + pad(namesz)
		descEnd := nameEnd + descsz
		if descEnd > uint64(len(b)) || nameEnd > uint64(len(b)) {
			return 0, false, fmt.Errorf("note of namesz %#x, descsz %#x past the end of the segment: %w", namesz, descsz, ErrMalformed)
		}
		name, desc := b[12:12+namesz], b[nameEnd:descEnd]
		if typ == xenElfnotePhys32Entry && string(name) == xenNoteName {
			switch len(desc) {
			case 4:
				entry = uint64(le.Uint32(desc))
			case 8:
				entry = le.Uint64(desc)
			default:
				return 0, false, fmt.Errorf("PVH entry note with a %d-byte descriptor: %w", len(desc), ErrMalformed)
			}
			if entry >= MMIOHoleEnd {
				return 0, false, fmt.Errorf("PVH entry %#x is not a 32-bit address: %w", entry, ErrMalformed)
			}
			return entry, true, nil
		}
		next := nameEnd + pad(descsz)
		if next >= uint64(len(b)) {
			break
		}
		b = b[next:]
	}
	return 0, false, nil
}

// loadPVH loads a PVH ELF and writes hvm_start_info.
func loadPVH(mem *guestmem.Memory, kernel io.ReaderAt, size int64, head []byte, cfg Config) (*Entry, error) {
	k, err := parsePVH(mem, kernel, size, head)
	if err != nil {
		return nil, err
	}
	var avoid []guestmem.Range
	for _, s := range k.segs {
		if err := copyToGuest(mem, s.paddr, kernel, s.off, s.filesz); err != nil {
			return nil, fmt.Errorf("boot: elf: loading segment at %#x: %w", s.paddr, err)
		}
		if err := mem.Zero(s.paddr+s.filesz, s.memsz-s.filesz); err != nil {
			return nil, fmt.Errorf("boot: elf: zeroing bss at %#x: %w", s.paddr+s.filesz, err)
		}
		avoid = append(avoid, guestmem.Range{GPA: s.paddr, Size: s.memsz})
	}

	var si [startInfoSize]byte
	le.PutUint32(si[0:], startInfoMagic)
	le.PutUint32(si[4:], startInfoVersion)
	le.PutUint64(si[24:], CmdlineAddr)
	if cfg.hasInitrd() {
		rd, err := loadInitrd(mem, cfg, lowRAMTop(mem), avoid)
		if err != nil {
			return nil, err
		}
		var mod [modlistEntrySize]byte
		le.PutUint64(mod[0:], rd.GPA)
		le.PutUint64(mod[8:], rd.Size)
		if _, err := mem.WriteAt(mod[:], modlistAddr); err != nil {
			return nil, fmt.Errorf("boot: writing hvm_modlist_entry: %w", err)
		}
		le.PutUint32(si[12:], 1)
		le.PutUint64(si[16:], modlistAddr)
	}
	mm, err := guestMap(mem)
	if err != nil {
		return nil, err
	}
	table := make([]byte, len(mm)*memmapEntrySize)
	for i, e := range mm {
		putMapEntry(table[i*memmapEntrySize:][:memmapEntrySize], e)
	}
	if _, err := mem.WriteAt(table, memmapAddr); err != nil {
		return nil, fmt.Errorf("boot: writing PVH memory map: %w", err)
	}
	le.PutUint64(si[40:], memmapAddr)
	le.PutUint32(si[48:], uint32(len(mm)))
	if _, err := mem.WriteAt(si[:], StartInfoAddr); err != nil {
		return nil, fmt.Errorf("boot: writing hvm_start_info: %w", err)
	}
	if err := writeCommon(mem, cfg); err != nil {
		return nil, err
	}
	return &Entry{
		Mode:     Protected32,
		RIP:      k.entry,
		RBX:      StartInfoAddr,
		GDT:      GDTAddr,
		GDTLimit: gdtLimit,
	}, nil
}
