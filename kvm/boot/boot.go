package boot

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"collective/kvm/guestmem"
)

// Sentinel errors callers can branch on with errors.Is. Every error Load
// returns for a refused kernel or initrd wraps one of them, with context.
var (
	// ErrUnknownKernel: the file is neither a bzImage nor an x86-64 ELF64
	// with a PVH entry note.
	ErrUnknownKernel = errors.New("boot: unknown kernel format")
	// ErrProtocolTooOld: a bzImage whose boot protocol is older than 2.06,
	// that cannot be loaded high, or that lacks the 64-bit entry
	// (XLF_KERNEL_64 in xloadflags).
	ErrProtocolTooOld = errors.New("boot: boot protocol too old or kernel not 64-bit capable")
	// ErrTooLarge: the kernel, one of its segments or the initrd does not
	// fit in the guest RAM available to it.
	ErrTooLarge = errors.New("boot: does not fit in guest RAM")
	// ErrCmdlineTooLong: the command line exceeds the kernel's
	// cmdline_size or CmdlineMax.
	ErrCmdlineTooLong = errors.New("boot: command line too long")
	// ErrMalformed: the kernel file is truncated or its headers are
	// inconsistent (sizes past the end of the file, overflowing offsets,
	// broken notes).
	ErrMalformed = errors.New("boot: malformed kernel image")
	// ErrTooManyCPUs: Config.CPUs exceeds MaxCPUs.
	ErrTooManyCPUs = errors.New("boot: too many CPUs")
)

// MaxCPUs is the largest number of processors the MP table describes:
// APIC IDs 0..MaxCPUs-1 plus the I/O APIC's ID must stay below the
// broadcast ID 0xFF.
const MaxCPUs = 254

// Config is what the loader passes to the kernel besides the kernel itself.
type Config struct {
	Cmdline string // kernel command line, without the NUL
	Initrd  []byte // initial ramdisk, or nil; copied into guest RAM
	CPUs    int    // processors in the MP table; 0 means 1

	// PCIInterrupts lists the PCI functions' INTx wiring for the MP table.
	PCIInterrupts []PCIInterrupt
}

// headSize is how much of the kernel file is read to recognise it: the
// bzImage setup header and the ELF header both lie in the first 4 KiB.
const headSize = 4096

// Load recognises the kernel from its bytes, loads it and everything it
// needs into mem, and returns the state the boot vCPU must start in.
//
// kernel is read at offsets [0, kernelSize). mem must hold RAM at
// [0, HighMemStart) for the loader's structures; see the package doc for
// the layout. On error the returned Entry is nil and mem may have been
// partly written.
func Load(mem *guestmem.Memory, kernel io.ReaderAt, kernelSize int64, cfg Config) (*Entry, error) {
	if mem == nil || kernel == nil {
		return nil, errors.New("boot: nil memory or kernel")
	}
	if kernelSize < 0 {
		return nil, fmt.Errorf("boot: kernel size %d: %w", kernelSize, ErrMalformed)
	}
	if err := cfg.check(); err != nil {
		return nil, err
	}
	if !mem.Contains(0, HighMemStart) {
		return nil, fmt.Errorf("boot: guest RAM must cover [0, %#x) for boot structures: %w", HighMemStart, ErrTooLarge)
	}
	head, err := readFile(kernel, kernelSize, 0, uint64(min(kernelSize, headSize)))
	if err != nil {
		return nil, fmt.Errorf("boot: reading kernel header: %w", err)
	}
	switch {
	case isELF(head):
		return loadPVH(mem, kernel, kernelSize, head, cfg)
	case isBzImage(head):
		return loadBzImage(mem, kernel, kernelSize, head, cfg)
	}
	return nil, fmt.Errorf("boot: kernel is neither a bzImage nor an ELF: %w", ErrUnknownKernel)
}

func (c *Config) check() error {
	if len(c.Cmdline) >= CmdlineMax {
		return fmt.Errorf("boot: command line of %d bytes, at most %d: %w", len(c.Cmdline), CmdlineMax-1, ErrCmdlineTooLong)
	}
	if strings.IndexByte(c.Cmdline, 0) >= 0 {
		return errors.New("boot: command line contains a NUL byte")
	}
	if c.CPUs < 0 || c.CPUs > MaxCPUs {
		return fmt.Errorf("boot: %d CPUs, at most %d: %w", c.CPUs, MaxCPUs, ErrTooManyCPUs)
	}
	return nil
}

func (c *Config) cpus() int { return max(c.CPUs, 1) }

func (c *Config) hasInitrd() bool { return len(c.Initrd) > 0 }

// writeCommon writes what both protocols share: the command line, the MP
// table and the GDT.
func writeCommon(mem *guestmem.Memory, cfg Config) error {
	line := make([]byte, len(cfg.Cmdline)+1)
	copy(line, cfg.Cmdline)
	if _, err := mem.WriteAt(line, CmdlineAddr); err != nil {
		return fmt.Errorf("boot: writing command line: %w", err)
	}
	if err := writeMPTable(mem, cfg.cpus(), cfg.PCIInterrupts); err != nil {
		return err
	}
	return writeGDT(mem)
}

// loadInitrd places the initrd page aligned as high as possible below
// limit (exclusive) and above HighMemStart, overlapping none of avoid, and
// copies it there.
func loadInitrd(mem *guestmem.Memory, cfg Config, limit uint64, avoid []guestmem.Range) (guestmem.Range, error) {
	size := uint64(len(cfg.Initrd))
	addr, ok := placeInitrd(size, limit, avoid)
	if !ok {
		return guestmem.Range{}, fmt.Errorf("boot: initrd of %#x bytes: no room below %#x clear of the kernel: %w", size, limit, ErrTooLarge)
	}
	if _, err := mem.WriteAt(cfg.Initrd, addr); err != nil {
		return guestmem.Range{}, fmt.Errorf("boot: loading initrd at %#x: %w", addr, err)
	}
	return guestmem.Range{GPA: addr, Size: size}, nil
}

// placeInitrd returns the highest page-aligned address a with
// a+size <= limit, a >= HighMemStart and [a, a+size) overlapping no range
// of avoid.
func placeInitrd(size, limit uint64, avoid []guestmem.Range) (uint64, bool) {
	const page = guestmem.PageSize
	if size == 0 || size > limit {
		return 0, false
	}
	addr := (limit - size) &^ (page - 1)
	for addr >= HighMemStart {
		moved := false
		for _, r := range avoid {
			if r.Size == 0 || addr >= r.End() || addr+size <= r.GPA {
				continue
			}
			if r.GPA < size {
				return 0, false
			}
			addr = (r.GPA - size) &^ (page - 1)
			moved = true
			break
		}
		if !moved {
			return addr, true
		}
	}
	return 0, false
}

// readFile reads n bytes at off of a file of the given size, refusing
// ranges past its end. Callers bound n.
func readFile(r io.ReaderAt, size int64, off, n uint64) ([]byte, error) {
	end, ok := guestmem.AddLength(off, n)
	if !ok || end > uint64(size) {
		return nil, fmt.Errorf("%#x bytes at offset %#x past the end of the %d-byte file: %w", n, off, size, ErrMalformed)
	}
	b := make([]byte, n)
	if err := readAtFull(r, b, off); err != nil {
		return nil, err
	}
	return b, nil
}

// readAtFull fills p from r at off; io.EOF with a full read is success.
func readAtFull(r io.ReaderAt, p []byte, off uint64) error {
	if off > 1<<63-1 {
		return fmt.Errorf("offset %#x: %w", off, ErrMalformed)
	}
	n, err := r.ReadAt(p, int64(off))
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("reading %#x bytes at offset %#x: %w (%w)", len(p), off, ErrMalformed, err)
}

// copyChunk bounds each read into guest memory.
const copyChunk = 1 << 20

// copyToGuest copies n bytes at off in r into guest memory at gpa, reading
// straight into the guest's backing pages (marked dirty).
func copyToGuest(mem *guestmem.Memory, gpa uint64, r io.ReaderAt, off, n uint64) error {
	if !mem.Contains(gpa, n) {
		return &guestmem.AccessError{GPA: gpa, Len: n}
	}
	for n > 0 {
		chunk := uint64(copyChunk)
		for _, reg := range mem.Regions() {
			if gpa >= reg.GPA && gpa-reg.GPA < reg.Size() {
				chunk = min(chunk, reg.Size()-(gpa-reg.GPA))
				break
			}
		}
		chunk = min(chunk, n)
		dst, err := mem.WriteSlice(gpa, chunk)
		if err != nil {
			return err
		}
		if err := readAtFull(r, dst, off); err != nil {
			return err
		}
		gpa, off, n = gpa+chunk, off+chunk, n-chunk
	}
	return nil
}
