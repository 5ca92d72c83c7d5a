// Package devices holds the small interfaces every device model of the
// x86 platform meets at; the device models live in its sub-packages, one
// device per package (serial, rtc, i8042, debugexit, ...), and the buses
// that route port and MMIO exits to them live in devices/bus.
//
// A device sees its register window through Device, guest memory through
// *guestmem.Memory, and its interrupt through an IRQLine: never the VM.
//
// Every device keeps its state in a plain, versioned State struct (exported
// fields, no locks, pointers or host handles) with Save and Restore, so that
// snapshots and migration can capture it.
//
// # Security
//
// Every byte a device receives from the guest (register writes, offsets,
// lengths, addresses in guest memory) is hostile input: a device answers bad
// input with an error to the guest, a counter, or a device reset, and never
// panics.
package devices

import (
	"log/slog"
	"time"
)

// Device is a window of registers on the port-I/O or MMIO bus.
//
// Off is the offset of the access from the base the device was inserted at;
// len(p) is the access size (1, 2, 4 or 8). Read fills p; Write consumes p.
// Implementations must accept any offset and size without panicking.
type Device interface {
	Read(off uint64, p []byte)
	Write(off uint64, p []byte)
}

// IRQLine is one interrupt input of the platform's interrupt controller.
//
// SetLevel drives the line: true asserts it, false deasserts it. Devices
// model their interrupt output as a level; an edge-triggered controller
// input sees the rising edge.
type IRQLine interface {
	SetLevel(high bool)
}

// IRQFunc adapts a function to IRQLine.
type IRQFunc func(high bool)

// SetLevel implements IRQLine.SetLevel.
func (f IRQFunc) SetLevel(high bool) { f(high) }

// WarnInterval is the least time between two log lines a Warner lets
// through: the guest can trigger warnings as often as it likes.
const WarnInterval = 10 * time.Second

// Warner logs guest-triggered warnings at most once per WarnInterval,
// counting the ones it suppresses. The zero value logs to slog.Default.
// A Warner is not safe for concurrent use: guard it with the device's lock.
type Warner struct {
	Log        *slog.Logger // where warnings go; nil means slog.Default()
	next       time.Time
	suppressed int
}

// Warn logs msg with args unless a warning was logged less than
// WarnInterval ago; the next line that gets through carries the count of
// those suppressed meanwhile.
func (w *Warner) Warn(msg string, args ...any) {
	now := time.Now()
	if now.Before(w.next) {
		w.suppressed++
		return
	}
	if w.suppressed > 0 {
		args = append(args, "suppressed", w.suppressed)
	}
	w.suppressed = 0
	w.next = now.Add(WarnInterval)
	log := w.Log
	if log == nil {
		log = slog.Default()
	}
	log.Warn(msg, args...)
}
