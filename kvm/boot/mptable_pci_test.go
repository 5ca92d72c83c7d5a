package boot

import (
	"bytes"
	"testing"
)

// TestMPTablePCIInterrupts: with PCI interrupts the table names bus 0 PCI
// and bus 1 ISA, and wires each function's pin level-triggered, active low.
func TestMPTablePCIInterrupts(t *testing.T) {
	irqs := []PCIInterrupt{{Device: 1, Pin: 0, IOAPICPin: 16}, {Device: 3, Pin: 0, IOAPICPin: 18}}
	tb := buildMPTable(2, irqs)
	if checksum(tb) != 0 {
		t.Fatal("bad checksum")
	}
	if !bytes.Contains(tb, []byte{mpEntryBus, 0, 'P', 'C', 'I', ' ', ' ', ' '}) ||
		!bytes.Contains(tb, []byte{mpEntryBus, 1, 'I', 'S', 'A', ' ', ' ', ' '}) {
		t.Fatal("bus entries missing")
	}
	for _, p := range irqs {
		want := []byte{mpEntryIOIntr, mpIntINT, mpPCIFlags, 0, 0, p.Device << 2, 2, p.IOAPICPin}
		if !bytes.Contains(tb, want) {
			t.Errorf("no entry % x", want)
		}
	}
	if got, want := len(tb), mpTableSize(2, 2); got != want {
		t.Errorf("size %d, want %d", got, want)
	}
	if n := int(tb[34]) | int(tb[35])<<8; n != 2+2+1+16+2+2 {
		t.Errorf("entry count %d", n)
	}
}
