package rtc_test

import (
	"fmt"
	"time"

	"collective/devices/bus"
	"collective/devices/rtc"
)

// The VMM puts the RTC at ports 0x70-0x71; it has no IRQ line.
func Example() {
	var pio bus.Bus
	clock := rtc.New(func() time.Time { return time.Date(2024, 2, 29, 13, 5, 9, 0, time.UTC) })
	if err := pio.Insert("rtc", 0x70, rtc.Size, clock); err != nil {
		panic(err)
	}
	var b [1]byte
	pio.Write(0x70, []byte{0x04}) // hours
	pio.Read(0x71, b[:])
	fmt.Printf("hours %#x\n", b[0])
	// Output: hours 0x13
}
