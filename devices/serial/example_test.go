package serial_test

import (
	"context"
	"fmt"
	"os"
	"strings"

	"collective/devices"
	"collective/devices/bus"
	"collective/devices/serial"
)

// The VMM puts COM1 at port 0x3F8 with ISA IRQ 4, writes the guest's output
// to stdout and feeds stdin to the guest with back-pressure.
func Example() {
	var pio bus.Bus
	irq4 := devices.IRQFunc(func(high bool) { /* drive IRQ 4 of the interrupt controller */ })
	com1 := serial.New(os.Stdout, irq4)
	if err := pio.Insert("com1", 0x3f8, serial.Size, com1); err != nil {
		panic(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go com1.Feed(ctx, strings.NewReader("uname -r\n")) // os.Stdin in the VMM

	// What the guest's driver does:
	pio.Write(0x3f8+4, []byte{0x03}) // MCR: DTR and RTS, the port is open
	pio.Write(0x3f8+1, []byte{0x01}) // IER: listen for received data
	for _, b := range []byte("hello\n") {
		pio.Write(0x3f8, []byte{b}) // THR
	}
	var lsr [1]byte
	for lsr[0]&1 == 0 {
		pio.Read(0x3f8+5, lsr[:]) // wait for DR
	}
	var rbr [1]byte
	pio.Read(0x3f8, rbr[:])
	fmt.Printf("guest read %q\n", rbr[0])
	// Output:
	// hello
	// guest read 'u'
}
