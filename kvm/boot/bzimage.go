package boot

import (
	"encoding/binary"
	"fmt"
	"io"

	"collective/kvm/guestmem"
)

// zeroPage is struct boot_params (boot.rst, "THE ZERO PAGE"). Its first
// 4 KiB are also the layout of the start of a bzImage file: the setup
// header sits at 0x1F1 in both, so a zeroPage view reads either. The
// accessors return the field's bytes, as archive/tar's headers do.
type zeroPage [zeroPageSize]byte

const zeroPageSize = 4096

// Fields of boot_params outside the setup header.
func (z *zeroPage) extRamdiskImage() []byte { return z[0x0C0:][:4] }
func (z *zeroPage) extRamdiskSize() []byte  { return z[0x0C4:][:4] }
func (z *zeroPage) extCmdLinePtr() []byte   { return z[0x0C8:][:4] }
func (z *zeroPage) e820Entries() []byte     { return z[0x1E8:][:1] }
func (z *zeroPage) e820Table() []byte       { return z[0x2D0:][:e820TableSize] }

// Fields of the setup header (boot.rst, "THE REAL-MODE KERNEL HEADER").
func (z *zeroPage) setupSects() []byte      { return z[0x1F1:][:1] }
func (z *zeroPage) syssize() []byte         { return z[0x1F4:][:4] }
func (z *zeroPage) bootFlag() []byte        { return z[0x1FE:][:2] }
func (z *zeroPage) jump() []byte            { return z[0x200:][:2] }
func (z *zeroPage) header() []byte          { return z[0x202:][:4] }
func (z *zeroPage) version() []byte         { return z[0x206:][:2] }
func (z *zeroPage) typeOfLoader() []byte    { return z[0x210:][:1] }
func (z *zeroPage) loadflags() []byte       { return z[0x211:][:1] }
func (z *zeroPage) code32Start() []byte     { return z[0x214:][:4] }
func (z *zeroPage) ramdiskImage() []byte    { return z[0x218:][:4] }
func (z *zeroPage) ramdiskSize() []byte     { return z[0x21C:][:4] }
func (z *zeroPage) cmdLinePtr() []byte      { return z[0x228:][:4] }
func (z *zeroPage) initrdAddrMax() []byte   { return z[0x22C:][:4] }
func (z *zeroPage) kernelAlignment() []byte { return z[0x230:][:4] }
func (z *zeroPage) relocatable() []byte     { return z[0x234:][:1] }
func (z *zeroPage) xloadflags() []byte      { return z[0x236:][:2] }
func (z *zeroPage) cmdlineSize() []byte     { return z[0x238:][:4] }
func (z *zeroPage) prefAddress() []byte     { return z[0x258:][:8] }
func (z *zeroPage) initSize() []byte        { return z[0x260:][:4] }

const (
	hdrStart      = 0x1F1 // first byte of the setup header
	hdrMaxEnd     = 0x290 // edd_mbr_sig_buffer follows the header
	hdrNeeded     = 0x264 // end of init_size, the last field read
	e820EntrySize = 20    // struct boot_e820_entry: addr u64, size u64, type u32
	e820TableSize = maxMapEntries * e820EntrySize

	bootFlagMagic = 0xAA55
	headerMagic   = "HdrS"

	minProtocol = 0x206 // cmdline_size appears in 2.06
	xlfProtocol = 0x20C // xloadflags appears in 2.12

	loadedHigh  = 1 << 0 // loadflags: protected-mode code at 0x100000
	xlfKernel64 = 1 << 0 // xloadflags: 64-bit entry at load address + 0x200

	entry64Offset       = 0x200 // the 64-bit entry point, from the load address
	typeLoaderUndefined = 0xFF
)

// le is the byte order of every x86 boot structure.
var le = binary.LittleEndian

func isBzImage(head []byte) bool {
	if len(head) < 0x206 {
		return false
	}
	var z zeroPage
	copy(z[:0x206], head)
	return le.Uint16(z.bootFlag()) == bootFlagMagic && string(z.header()) == headerMagic
}

// bzImage is a validated bzImage header.
type bzImage struct {
	hdr      zeroPage // the file's first 4 KiB (zero padded)
	hdrEnd   int      // end of the setup header in hdr
	setup    uint64   // bytes of real-mode setup (setup_sects+1 sectors)
	sysBytes uint64   // bytes of protected-mode kernel (syssize*16)
}

// parseBzImage validates the setup header of a file of the given size whose
// first bytes are head.
func parseBzImage(head []byte, size int64) (*bzImage, error) {
	b := &bzImage{}
	copy(b.hdr[:], head)
	h := &b.hdr
	if len(head) < hdrNeeded {
		return nil, fmt.Errorf("boot: bzImage: file of %d bytes ends inside the setup header: %w", size, ErrMalformed)
	}
	version := le.Uint16(h.version())
	if version < minProtocol {
		return nil, fmt.Errorf("boot: bzImage: protocol %d.%02d, need 2.06: %w", version>>8, version&0xFF, ErrProtocolTooOld)
	}
	// The header ends at 0x202 + the jump's displacement byte (boot.rst);
	// pass on at least the fields validated here.
	b.hdrEnd = min(max(0x202+int(h.jump()[1]), hdrNeeded), hdrMaxEnd)
	if h.loadflags()[0]&loadedHigh == 0 {
		return nil, fmt.Errorf("boot: bzImage: loadflags %#x lack LOADED_HIGH (a zImage): %w", h.loadflags()[0], ErrProtocolTooOld)
	}
	if version < xlfProtocol || le.Uint16(h.xloadflags())&xlfKernel64 == 0 {
		return nil, fmt.Errorf("boot: bzImage: protocol %d.%02d, xloadflags %#x: no 64-bit entry (XLF_KERNEL_64): %w",
			version>>8, version&0xFF, le.Uint16(h.xloadflags()), ErrProtocolTooOld)
	}
	sects := uint64(h.setupSects()[0])
	if sects == 0 {
		sects = 4
	}
	b.setup = (sects + 1) * 512
	if b.setup >= uint64(size) {
		return nil, fmt.Errorf("boot: bzImage: setup_sects %d: %d setup bytes, file has %d: %w", sects, b.setup, size, ErrMalformed)
	}
	b.sysBytes = uint64(le.Uint32(h.syssize())) * 16
	if rest := uint64(size) - b.setup; b.sysBytes > rest {
		return nil, fmt.Errorf("boot: bzImage: syssize %#x paragraphs, only %#x bytes after setup (truncated?): %w",
			le.Uint32(h.syssize()), rest, ErrMalformed)
	}
	if b.sysBytes <= entry64Offset {
		return nil, fmt.Errorf("boot: bzImage: protected-mode kernel of %#x bytes has no 64-bit entry at %#x: %w",
			b.sysBytes, entry64Offset, ErrMalformed)
	}
	return b, nil
}

// loadBzImage loads a bzImage through the 64-bit boot protocol.
func loadBzImage(mem *guestmem.Memory, kernel io.ReaderAt, size int64, head []byte, cfg Config) (*Entry, error) {
	b, err := parseBzImage(head, size)
	if err != nil {
		return nil, err
	}
	h := &b.hdr
	if lim := le.Uint32(h.cmdlineSize()); uint64(len(cfg.Cmdline)) > uint64(lim) {
		return nil, fmt.Errorf("boot: bzImage: command line of %d bytes, kernel's cmdline_size is %d: %w", len(cfg.Cmdline), lim, ErrCmdlineTooLong)
	}

	// The kernel occupies init_size bytes from its load address while it
	// decompresses and starts (2.10+), at least what is loaded.
	need := max(b.sysBytes, uint64(le.Uint32(h.initSize())))
	top := lowRAMTop(mem)
	fits := func(addr uint64) bool {
		end, ok := guestmem.AddLength(addr, need)
		return ok && addr >= HighMemStart && end <= top
	}
	// A relocatable kernel goes at pref_address when it fits (it would
	// move itself there anyway); otherwise, and for a kernel that is not
	// relocatable, at 0x100000 as boot.rst prescribes.
	pref := le.Uint64(h.prefAddress())
	align := uint64(le.Uint32(h.kernelAlignment()))
	load := uint64(HighMemStart)
	if h.relocatable()[0] != 0 && (align == 0 || pref%align == 0) && fits(pref) {
		load = pref
	}
	if !fits(load) {
		return nil, fmt.Errorf("boot: bzImage: kernel needs %#x bytes (init_size) at %#x, low RAM ends at %#x: %w", need, load, top, ErrTooLarge)
	}
	if err := copyToGuest(mem, load, kernel, b.setup, b.sysBytes); err != nil {
		return nil, fmt.Errorf("boot: bzImage: loading %#x bytes at %#x: %w", b.sysBytes, load, err)
	}

	var bp zeroPage
	copy(bp[hdrStart:b.hdrEnd], h[hdrStart:b.hdrEnd])
	bp.typeOfLoader()[0] = typeLoaderUndefined
	le.PutUint32(bp.code32Start(), uint32(load))
	le.PutUint32(bp.cmdLinePtr(), CmdlineAddr)
	le.PutUint32(bp.extCmdLinePtr(), 0)

	if cfg.hasInitrd() {
		// Keep the initrd clear of the kernel where it was loaded and of
		// where it relocates itself to (pref_address) while it starts.
		avoid := []guestmem.Range{{GPA: load, Size: need}}
		if pref != 0 && pref != load {
			avoid = append(avoid, guestmem.Range{GPA: pref, Size: need})
		}
		limit := min(uint64(le.Uint32(h.initrdAddrMax()))+1, top)
		rd, err := loadInitrd(mem, cfg, limit, avoid)
		if err != nil {
			return nil, err
		}
		le.PutUint32(bp.ramdiskImage(), uint32(rd.GPA))
		le.PutUint32(bp.ramdiskSize(), uint32(rd.Size))
		le.PutUint32(bp.extRamdiskImage(), uint32(rd.GPA>>32))
		le.PutUint32(bp.extRamdiskSize(), uint32(rd.Size>>32))
	}

	mm, err := guestMap(mem)
	if err != nil {
		return nil, err
	}
	bp.e820Entries()[0] = byte(len(mm))
	t := bp.e820Table()
	for i, e := range mm {
		putMapEntry(t[i*e820EntrySize:][:e820EntrySize], e)
	}
	if _, err := mem.WriteAt(bp[:], BootParamsAddr); err != nil {
		return nil, fmt.Errorf("boot: writing boot_params: %w", err)
	}
	if err := writeCommon(mem, cfg); err != nil {
		return nil, err
	}
	if err := writePageTables(mem); err != nil {
		return nil, err
	}
	return &Entry{
		Mode:      Long64,
		RIP:       load + entry64Offset,
		RSI:       BootParamsAddr,
		PageTable: PML4Addr,
		GDT:       GDTAddr,
		GDTLimit:  gdtLimit,
	}, nil
}

// putMapEntry writes e as a struct boot_e820_entry (20 bytes); the PVH
// memmap entry has the same first 20 bytes.
func putMapEntry(b []byte, e MapEntry) {
	le.PutUint64(b[0:], e.Addr)
	le.PutUint64(b[8:], e.Size)
	le.PutUint32(b[16:], uint32(e.Type))
}
