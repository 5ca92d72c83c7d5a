// Package serial models a National Semiconductor / Texas Instruments
// PC16550D (16550A) UART, the PC's COM port.
//
// It follows the datasheet ("PC16550D Universal Asynchronous
// Receiver/Transmitter with FIFOs", National Semiconductor, now Texas
// Instruments), section "Registers": the reset configuration and register
// summary tables, the Interrupt Identification Register with Table IV
// (interrupt priorities, sources and resets), and the FIFO Control, Line
// Control, Modem Control (loopback), Line Status and Modem Status
// registers. The register window is 8 bytes; the VMM puts COM1 at port
// 0x3F8 with ISA IRQ 4.
//
// # Model
//
// Transmission is instantaneous: a byte written to THR is written to the
// host's io.Writer and THR is empty again once that write returns (LSR THRE
// and TEMT read 0 while the host write is in progress). Receiving is driven
// by the host through Enqueue. The baud rate, word length, parity and break
// settings are stored and read back but have no effect. There is no DMA
// mode and no 64-byte FIFO (the 16750 bit of FCR is ignored).
//
// The character timeout indication is modelled as already elapsed: with
// FIFOs enabled and fewer bytes in the RX FIFO than the trigger level, IIR
// reports a character timeout (0xCC) at once, so no byte waits for a timer.
//
// Modem inputs: outside loopback the host side is a connected null-modem
// with CTS, DSR and DCD asserted and RI clear. In loopback (MCR bit 4) TX is
// routed into RX, and CTS, DSR, RI, DCD follow RTS, DTR, OUT1, OUT2.
//
// # Interrupt line
//
// As on a PC, the UART's INTR output reaches the interrupt controller only
// through the OUT2 gate (MCR bit 3), and not at all in loopback, where OUT2
// is disconnected from its pin; Linux's 8250 driver sets OUT2 when it opens
// a port with an IRQ. The line is driven as a level: high while OUT2 is set,
// loopback is off, and IIR reports an interrupt, low otherwise. SetLevel is
// only called when that level changes.
//
// # Input and back-pressure
//
// Enqueue accepts host input only while the guest listens: IER bit 0
// (received data available interrupt) is set and loopback is off. Linux's
// 8250 driver resets the FIFOs while it probes and opens the port and clears
// IER bit 0 while the tty is throttled and while the kernel console writes,
// so input offered before the guest can take it stays with the host instead
// of being dropped. A guest that polls LSR must set IER bit 0 too (keeping
// OUT2 clear if it wants no IRQ). Enqueue takes at most what fits (16 bytes
// with FIFOs on, 1 without) and the feeder waits on InputReady for room;
// Feed does this loop for an io.Reader.
//
// # Concurrency
//
// Serial is safe for concurrent use by vCPU threads and host goroutines.
//
// Lock order:
//
//	Serial.txMu (serialises output to the host writer; held across its Write)
//	  Serial.mu (registers and FIFOs)
//	    the IRQLine's own locks (SetLevel is called with Serial.mu held)
//
// The host io.Writer is never called with Serial.mu held, and an IRQLine
// must not call back into the Serial.
package serial
