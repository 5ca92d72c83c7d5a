package boot

import (
	"fmt"

	"collective/kvm/guestmem"
)

// MP table layout (Intel MultiProcessor Specification 1.4, chapter 4).
const (
	mpFloatSize     = 16 // MP floating pointer structure
	mpHeaderSize    = 44 // configuration table header
	mpProcSize      = 20 // processor entry
	mpEntrySize     = 8  // bus, I/O APIC, I/O and local interrupt entries
	mpSpecRev       = 4  // version 1.4
	mpEBDATableAddr = MPFloatAddr + mpFloatSize
	mpEBDATableMax  = 0xA0000 - mpEBDATableAddr
	mpBIOSTableMax  = HighMemStart - MPBIOSTableAddr

	mpEntryProc    = 0
	mpEntryBus     = 1
	mpEntryIOAPIC  = 2
	mpEntryIOIntr  = 3
	mpEntryLocIntr = 4

	mpCPUEnabled = 1 << 0
	mpCPUBSP     = 1 << 1
	lapicVersion = 0x14
	// Processor signature (family 6) and CPUID.1:EDX feature flags (FPU,
	// APIC) reported for every processor entry.
	mpCPUSignature = 0x600
	mpCPUFeatures  = 1<<0 | 1<<9

	ioapicVersion = 0x11
	mpIOAPICOn    = 1 << 0

	mpIntINT    = 0
	mpIntNMI    = 1
	mpIntExtINT = 3
	isaBusID    = 0
	pciBusID    = 0
	ioapicPins  = 24
	mpPCIFlags  = 0x0f // polarity active low (11), trigger level (11 << 2)
	isaIRQs     = 16
	allLAPICs   = 0xFF
)

// PCIInterrupt wires one PCI function's INTx pin to an I/O APIC pin in the
// MP table (MP spec 1.4 D.3): Linux without ACPI finds a PCI device's
// interrupt there when it cannot use MSI or MSI-X.
type PCIInterrupt struct {
	Device    uint8 // PCI device number on bus 0 (0-31)
	Pin       uint8 // INTx pin: 0 = INTA# ... 3 = INTD#
	IOAPICPin uint8 // I/O APIC input (GSI); PCI interrupts are level-triggered, active low
}

// mpTableSize is the length of the configuration table for n CPUs and p
// PCI interrupts.
func mpTableSize(n, p int) int {
	// processors, one bus, one I/O APIC, ISA IRQs, LINT0 and LINT1; with
	// PCI interrupts, the PCI bus and one entry each.
	size := mpHeaderSize + n*mpProcSize + mpEntrySize + mpEntrySize + isaIRQs*mpEntrySize + 2*mpEntrySize
	if p > 0 {
		size += mpEntrySize + p*mpEntrySize
	}
	return size
}

// buildMPTable returns the MP configuration table for n CPUs (1..MaxCPUs)
// and the given PCI interrupts. With PCI interrupts, bus 0 is PCI (the MP
// bus ID must equal the PCI bus number) and the ISA bus is bus 1.
func buildMPTable(n int, pciIRQs []PCIInterrupt) []byte {
	t := make([]byte, mpTableSize(n, len(pciIRQs)))
	copy(t[0:], "PCMP")
	le.PutUint16(t[4:], uint16(len(t)))
	t[6] = mpSpecRev
	copy(t[8:16], "COLLECTV")      // OEM ID
	copy(t[16:28], "VMM         ") // product ID
	count := 0
	le.PutUint32(t[36:], LAPICAddr)
	e := t[mpHeaderSize:]
	for id := range n {
		p := e[:mpProcSize]
		p[0] = mpEntryProc
		p[1] = byte(id) // local APIC ID
		p[2] = lapicVersion
		p[3] = mpCPUEnabled
		if id == 0 {
			p[3] |= mpCPUBSP
		}
		le.PutUint32(p[4:], mpCPUSignature)
		le.PutUint32(p[8:], mpCPUFeatures)
		e, count = e[mpProcSize:], count+1
	}
	ioapicID := byte(n)
	put := func(b ...byte) {
		copy(e[:mpEntrySize], b)
		e, count = e[mpEntrySize:], count+1
	}
	isa := byte(isaBusID)
	if len(pciIRQs) > 0 {
		isa = pciBusID + 1
		put(mpEntryBus, pciBusID, 'P', 'C', 'I', ' ', ' ', ' ')
	}
	put(mpEntryBus, isa, 'I', 'S', 'A', ' ', ' ', ' ')
	put(mpEntryIOAPIC, ioapicID, ioapicVersion, mpIOAPICOn, 0, 0, 0, 0)
	le.PutUint32(t[len(t)-len(e)-mpEntrySize+4:], IOAPICAddr)
	// ISA IRQs to I/O APIC pins with the bus's default polarity and
	// trigger (flags 0), each to the pin of the same number: this is how
	// KVM's default GSI routing wires its in-kernel PIT (GSI 0) and ISA
	// devices to the IOAPIC.
	for irq := byte(0); irq < isaIRQs; irq++ {
		put(mpEntryIOIntr, mpIntINT, 0, 0, isa, irq, ioapicID, irq)
	}
	for _, p := range pciIRQs {
		// Source bus IRQ: device number in bits 6:2, pin in 1:0.
		put(mpEntryIOIntr, mpIntINT, mpPCIFlags, 0, pciBusID, p.Device<<2|p.Pin&3, ioapicID, p.IOAPICPin)
	}
	put(mpEntryLocIntr, mpIntExtINT, 0, 0, isa, 0, allLAPICs, 0)
	put(mpEntryLocIntr, mpIntNMI, 0, 0, isa, 0, allLAPICs, 1)
	le.PutUint16(t[34:], uint16(count))
	t[7] = checksum(t)
	return t
}

// buildMPFloat returns the MP floating pointer for a table at addr.
func buildMPFloat(addr uint32) []byte {
	f := make([]byte, mpFloatSize)
	copy(f[0:], "_MP_")
	le.PutUint32(f[4:], addr)
	f[8] = 1 // length in 16-byte paragraphs
	f[9] = mpSpecRev
	// Feature bytes 1..5 zero: a configuration table is present, and the
	// system is in virtual wire mode (no IMCR).
	f[10] = checksum(f)
	return f
}

// checksum returns the byte that makes the sum of b (with that byte zero)
// zero modulo 256.
func checksum(b []byte) byte {
	var s byte
	for _, c := range b {
		s += c
	}
	return -s
}

// writeMPTable writes the MP floating pointer at MPFloatAddr and the
// configuration table for n CPUs right after it when it fits below
// 0xA0000, else at MPBIOSTableAddr. Both areas are reserved in the e820 map.
func writeMPTable(mem *guestmem.Memory, n int, pciIRQs []PCIInterrupt) error {
	if n < 1 || n > MaxCPUs {
		return fmt.Errorf("boot: MP table for %d CPUs, want 1..%d: %w", n, MaxCPUs, ErrTooManyCPUs)
	}
	for _, p := range pciIRQs {
		if p.Device > 31 || p.Pin > 3 || p.IOAPICPin >= ioapicPins {
			return fmt.Errorf("boot: MP table: PCI interrupt %+v out of range", p)
		}
	}
	t := buildMPTable(n, pciIRQs)
	addr := uint64(mpEBDATableAddr)
	if len(t) > mpEBDATableMax {
		addr = MPBIOSTableAddr
	}
	if len(t) > mpBIOSTableMax {
		return fmt.Errorf("boot: MP table of %d bytes: %w", len(t), ErrTooManyCPUs)
	}
	if _, err := mem.WriteAt(t, addr); err != nil {
		return fmt.Errorf("boot: writing MP configuration table: %w", err)
	}
	if _, err := mem.WriteAt(buildMPFloat(uint32(addr)), MPFloatAddr); err != nil {
		return fmt.Errorf("boot: writing MP floating pointer: %w", err)
	}
	return nil
}
