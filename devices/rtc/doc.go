// Package rtc models the PC's CMOS real-time clock, a Motorola MC146818A
// (datasheet "MC146818A Real-Time Clock Plus RAM (RTC)", Motorola: the
// address map, the time, calendar and alarm data modes table (BCD and
// binary formats, 12- and 24-hour hours), registers A to D, and the update
// cycle with its UIP bit), with the PC/AT's use of it (index port 0x70 with
// the NMI mask in bit 7, century byte 0x32).
//
// The device has a 2-byte window for ports 0x70 and 0x71: offset 0 is the
// index port (bits 6:0 select one of 128 bytes; bit 7 masks NMI on a PC
// and is only stored), offset 1 is the data port. Reads of the index port
// return 0xff.
//
// # Model
//
// The time registers (0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of
// week, 0x07 day of month, 0x08 month, 0x09 year, and the PC's century byte
// at 0x32) read the host's clock in UTC plus a per-device offset in whole
// seconds, formatted per register B: BCD unless bit 2 (DM) is set, 12-hour
// with bit 7 as PM unless bit 1 (24/12) is set. Day of week runs 1 (Sunday)
// to 7 and always follows the date; a write to it is ignored.
//
// Setting register B bit 7 (SET) freezes the time registers, which the guest
// may then write freely; clearing SET parses them (out-of-range values are
// normalised, so month 13 is January of the next year) and stores the
// difference from the host clock as the offset. A write to a time register
// while SET is clear adjusts the offset at once. So the guest's date stays
// what it set across snapshots and migration between hosts whose clocks
// agree.
//
// UIP (register A bit 7) reads 1 during the last 244 µs of each second, as
// the datasheet's update cycle would, and 0 otherwise or while SET is set:
// a guest that reads UIP as 0 has at least 244 µs of host time before the
// registers change, and a guest that polls UIP (Linux's mach_get_cmos_time)
// always sees it fall. The divider bits of register A are stored but the
// clock never stops.
//
// No interrupts: periodic, alarm and update-ended interrupts (register B
// bits 6:4) are stored but never raised, register C reads 0, and the
// device has no IRQ line. Register D reads 0x80 (valid RAM and time).
// The alarm registers and the other 113 bytes are plain CMOS memory.
//
// # Concurrency
//
// RTC is safe for concurrent use. Lock order: RTC.mu only; the clock
// function is called with it held and must not call back into the RTC.
package rtc
