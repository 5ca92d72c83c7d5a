package i8042_test

import (
	"fmt"

	"collective/devices"
	"collective/devices/bus"
	"collective/devices/i8042"
)

// The VMM puts the controller's data port at 0x60 and its command port at
// 0x64, leaving 0x61 (port B) to another device, wires IRQ 1 and IRQ 12,
// and ends the VM when the guest pulses the reset line.
func Example() {
	var pio bus.Bus
	irq1 := devices.IRQFunc(func(bool) {})
	irq12 := devices.IRQFunc(func(bool) {})
	kbc := i8042.New(irq1, irq12, func() { fmt.Println("reset: stop the VM") })
	if err := pio.Insert("i8042-data", 0x60, 1, kbc.DataPort()); err != nil {
		panic(err)
	}
	if err := pio.Insert("i8042-cmd", 0x64, 1, kbc.CommandPort()); err != nil {
		panic(err)
	}
	pio.Write(0x64, []byte{0xaa}) // self test
	var b [1]byte
	pio.Read(0x60, b[:])
	fmt.Printf("self test %#x\n", b[0])
	pio.Write(0x64, []byte{0xfe}) // Linux's reboot=k
	// Output:
	// self test 0x55
	// reset: stop the VM
}
