package fuzz

import (
	"bytes"
	"errors"
	"testing"

	"collective/kvm/boot"
	"collective/kvm/boot/boottest"
	"collective/kvm/guestmem"
)

// FuzzLoad feeds arbitrary bytes as a kernel to boot.Load over 64 MiB of
// fake guest RAM. Invariants: no panic; an error comes with a nil Entry
// and wraps a boot sentinel; a success has its entry point in guest RAM,
// in the mode its format prescribes.
func FuzzLoad(f *testing.F) {
	// Seeds are kept small (about 1-2 KiB): the fuzzer minimises every
	// new input, and minimising tens of KiB takes minutes.
	bz := boottest.DefaultBzImage()
	bz.SetupSects = 1
	bz.PayloadSize = 0x210
	f.Add(bz.Bytes(), "console=ttyS0", uint16(0), uint8(1))
	bz.Relocatable = false
	f.Add(bz.Bytes(), "", uint16(3), uint8(0))
	pvh := boottest.DefaultPVH()
	pvh.Segments[0].Data = pvh.Segments[0].Data[:0x40]
	f.Add(pvh.Bytes(), "", uint16(1), uint8(2))
	pvh.NoteDesc = 8
	pvh.Segments = append(pvh.Segments, boottest.Segment{Paddr: 0x200000, Data: []byte{0x90}, MemSize: 0x1000})
	f.Add(pvh.Bytes(), "quiet", uint16(4096), uint8(41))

	const ram = 64 << 20
	mem, err := guestmem.NewFake(boot.RAMLayout(ram)...)
	if err != nil {
		f.Fatal(err)
	}
	sentinels := []error{boot.ErrUnknownKernel, boot.ErrProtocolTooOld, boot.ErrTooLarge,
		boot.ErrCmdlineTooLong, boot.ErrMalformed, boot.ErrTooManyCPUs}
	f.Fuzz(func(t *testing.T, kernel []byte, cmdline string, initrdLen uint16, cpus uint8) {
		cfg := boot.Config{Cmdline: cmdline, Initrd: make([]byte, initrdLen), CPUs: int(cpus)}
		e, err := boot.Load(mem, bytes.NewReader(kernel), int64(len(kernel)), cfg)
		if err != nil {
			if e != nil {
				t.Fatalf("Load returned an Entry %+v with error %v", e, err)
			}
			if bytes.IndexByte([]byte(cmdline), 0) >= 0 {
				return // refused by Config's own check
			}
			for _, s := range sentinels {
				if errors.Is(err, s) {
					return
				}
			}
			t.Fatalf("error %v wraps no boot sentinel", err)
		}
		if e == nil {
			t.Fatal("Load returned nil, nil")
		}
		if !mem.Contains(e.RIP, 1) {
			t.Fatalf("entry point %#x outside guest RAM", e.RIP)
		}
		switch e.Mode {
		case boot.Long64:
			if e.RSI != boot.BootParamsAddr || e.PageTable != boot.PML4Addr {
				t.Fatalf("Long64 entry %+v", e)
			}
		case boot.Protected32:
			if e.RBX != boot.StartInfoAddr || e.RIP >= 1<<32 {
				t.Fatalf("Protected32 entry %+v", e)
			}
		default:
			t.Fatalf("unknown mode %v", e.Mode)
		}
	})
}
