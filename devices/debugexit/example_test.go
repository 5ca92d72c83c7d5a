package debugexit_test

import (
	"fmt"

	"collective/devices/bus"
	"collective/devices/debugexit"
)

// The VMM puts the exit port at 0xF4 and exits with the guest's value.
func Example() {
	var pio bus.Bus
	port := debugexit.New(func(code int) { fmt.Println("exit status", code) }) // os.Exit in the VMM
	if err := pio.Insert("debug-exit", 0xf4, debugexit.Size, port); err != nil {
		panic(err)
	}
	pio.Write(0xf4, []byte{3, 0, 0, 0}) // outl(3, 0xf4)
	// Output: exit status 3
}
