// Package i8042 models the PC's 8042 keyboard controller as far as a guest
// needs it to probe the controller, find no keyboard and no mouse, and reset
// the machine: the controller of the IBM PC/AT Technical Reference
// ("Keyboard Controller": status register, command byte, commands) with the
// auxiliary-device additions of the IBM Personal System/2 Hardware Interface
// Technical Reference (commands 0xA7-0xA9, 0xD3, 0xD4).
//
// # Window
//
// The device answers at two ports, data 0x60 and status/command 0x64. An
// *I8042 is itself a 5-byte window at 0x60 with the data port at offset 0
// and the status/command port at offset 4 (offsets 1-3 read 0xff and ignore
// writes). Because that window covers ports 0x61-0x63 (port 0x61 is the
// PC's system control port B), a VMM that models port B inserts the two
// one-byte windows from DataPort and CommandPort at 0x60 and 0x64 instead.
// Accesses wider than one byte read 0xff and are ignored.
//
// # Behaviour
//
//   - Status register: OBF while a byte waits in the output buffer, IBF
//     always 0 (commands complete at once), the system flag from command
//     byte bit 2, A2 (last write was a command), keylock off (not
//     inhibited), AUXB when the waiting byte came from the aux port.
//   - Command byte read/write (0x20/0x60), self test 0xAA -> 0x55 (which
//     sets the system flag), interface tests 0xAB/0xA9 -> 0x00, port
//     disable/enable 0xAD/0xAE/0xA7/0xA8, output port read/write 0xD0/0xD1,
//     write to the keyboard or aux output buffer 0xD2/0xD3 (the aux loop
//     Linux uses to find the aux port), A20 0xDD/0xDF, password 0xA4 ->
//     0xF1 (none), test inputs 0xE0 -> 0.
//   - Reset: command 0xFE, any pulse command 0xF0-0xFF with bit 0 clear, or
//     an output port write with bit 0 clear calls the Reset callback (which
//     ends the VM), after the device's lock is released.
//   - No keyboard and no mouse are attached: a byte written to the keyboard
//     (port 0x60 with no controller command pending) or to the aux device
//     (0xD4) is answered with 0xFE (resend/no device), so Linux's atkbd probe
//     fails fast instead of timing out.
//   - Interrupts: the keyboard line (IRQ 1) is high while a keyboard byte
//     waits and command byte bit 0 is set; the aux line (IRQ 12) likewise
//     with bit 1. Each data-port read lowers the line before the next byte
//     raises it again, so an edge-triggered input sees every byte.
//
// The output buffer queues up to QueueSize bytes (a real 8042 holds one and
// the keyboard holds the rest); further bytes are dropped.
//
// A keyboard model (VNC input) is a later addition: PushScancode is its seam
// and delivers bytes as the guest reads them (after any translation).
//
// Linux probes the 8042 only when ACPI or PNP describes it, or with
// i8042.nopnp on its command line; i8042.noaux skips the aux port checks
// (without an aux IRQ line, Linux waits 250 ms for the aux loop interrupt).
//
// # Concurrency
//
// I8042 is safe for concurrent use. Lock order: I8042.mu, then the IRQ
// lines' own locks (SetLevel is called with I8042.mu held). Reset is called
// with no lock held.
package i8042
