package serial

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"

	"collective/devices"
)

// Register offsets from the base port (datasheet Table II).
const (
	regData = 0 // RBR (read) / THR (write); DLL with DLAB
	regIER  = 1 // IER; DLM with DLAB
	regIIR  = 2 // IIR (read) / FCR (write)
	regLCR  = 3
	regMCR  = 4
	regLSR  = 5
	regMSR  = 6
	regSCR  = 7

	// Size is the size of the register window.
	Size = 8
	// FIFOSize is the depth of the receive FIFO.
	FIFOSize = 16
)

// Register bits.
const (
	ierRDA   = 0x01 // received data available (and character timeout)
	ierTHRE  = 0x02 // transmitter holding register empty
	ierRLS   = 0x04 // receiver line status
	ierMS    = 0x08 // modem status
	ierMask  = 0x0f
	iirNoInt = 0x01
	iirMS    = 0x00
	iirTHRE  = 0x02
	iirRDA   = 0x04
	iirRLS   = 0x06
	iirCTO   = 0x0c // character timeout
	iirFIFO  = 0xc0

	fcrEnable  = 0x01
	fcrRXReset = 0x02
	fcrDMA     = 0x08
	fcrTrigger = 0xc0
	fcrStored  = fcrEnable | fcrDMA | fcrTrigger

	lcrDLAB = 0x80

	mcrDTR  = 0x01
	mcrRTS  = 0x02
	mcrOUT1 = 0x04
	mcrOUT2 = 0x08
	mcrLoop = 0x10
	mcrMask = 0x1f

	lsrDR     = 0x01
	lsrOE     = 0x02
	lsrErrors = 0x1e // OE, PE, FE, BI
	lsrTHRE   = 0x20
	lsrTEMT   = 0x40

	msrDCTS   = 0x01
	msrDDSR   = 0x02
	msrTERI   = 0x04
	msrDDCD   = 0x08
	msrDeltas = 0x0f
	msrCTS    = 0x10
	msrDSR    = 0x20
	msrRI     = 0x40
	msrDCD    = 0x80

	// msrConnected is what the modem inputs read outside loopback: the
	// host end is a connected null-modem.
	msrConnected = msrCTS | msrDSR | msrDCD

	// resetDivisor is 9600 baud from the 1.8432 MHz PC clock.
	resetDivisor = 12
)

// Serial is a 16550A UART. Create it with New.
type Serial struct {
	out   io.Writer       // immutable
	irq   devices.IRQLine // immutable; may be nil
	ready chan struct{}   // immutable; capacity 1
	log   *slog.Logger    // immutable
	txMu  sync.Mutex      // serialises writes to out; before mu
	txBuf [1]byte         // +checklocks:txMu

	mu          sync.Mutex
	ier         uint8          // +checklocks:mu
	fcr         uint8          // +checklocks:mu
	lcr         uint8          // +checklocks:mu
	mcr         uint8          // +checklocks:mu
	lsrErr      uint8          // +checklocks:mu
	msrDelta    uint8          // +checklocks:mu
	scr         uint8          // +checklocks:mu
	dll, dlm    uint8          // +checklocks:mu
	threPending bool           // +checklocks:mu
	txBusy      bool           // +checklocks:mu (a byte is being written to out)
	rx          [FIFOSize]byte // +checklocks:mu (ring buffer)
	rxHead      int            // +checklocks:mu
	rxLen       int            // +checklocks:mu
	irqLevel    bool           // +checklocks:mu (last level given to irq)
	warn        devices.Warner // +checklocks:mu
	outErr      devices.Warner // +checklocks:txMu
}

// New returns a UART in its reset state that writes transmitted bytes to out
// and drives irq (nil for none). out may block; it is never called with the
// register lock held. Warnings go to slog.Default() as it is when New runs.
func New(out io.Writer, irq devices.IRQLine) *Serial {
	if out == nil {
		out = io.Discard
	}
	log := slog.Default().With("device", "serial")
	s := &Serial{
		out:   out,
		irq:   irq,
		ready: make(chan struct{}, 1),
		dll:   resetDivisor,
	}
	s.warn.Log = log
	s.outErr.Log = log
	return s
}

// SetLogger sends the UART's warnings to l instead of slog.Default().
func (s *Serial) SetLogger(l *slog.Logger) {
	s.txMu.Lock()
	defer s.txMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.warn.Log = l
	s.outErr.Log = l
}

// Read implements devices.Device.Read. Accesses that are not one byte wide
// or lie outside the 8-byte window read as 0xff without side effects.
func (s *Serial) Read(off uint64, p []byte) {
	if len(p) != 1 || off >= Size {
		for i := range p {
			p[i] = 0xff
		}
		s.mu.Lock()
		s.warn.Warn("bad read access", "offset", off, "size", len(p))
		s.mu.Unlock()
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p[0] = s.readReg(off)
	s.update()
}

// Write implements devices.Device.Write. Accesses that are not one byte wide
// or lie outside the 8-byte window are ignored.
func (s *Serial) Write(off uint64, p []byte) {
	if len(p) != 1 || off >= Size {
		s.mu.Lock()
		s.warn.Warn("bad write access", "offset", off, "size", len(p))
		s.mu.Unlock()
		return
	}
	if off == regData {
		s.writeData(p[0])
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writeReg(off, p[0])
	s.update()
}

// +checklocks:s.mu
func (s *Serial) readReg(off uint64) uint8 {
	dlab := s.lcr&lcrDLAB != 0
	switch off {
	case regData:
		if dlab {
			return s.dll
		}
		return s.popRX()
	case regIER:
		if dlab {
			return s.dlm
		}
		return s.ier
	case regIIR:
		v := s.iir()
		if v&0x0f == iirTHRE {
			// Table IV: reading IIR clears a THRE interrupt it reports.
			s.threPending = false
		}
		return v
	case regLCR:
		return s.lcr
	case regMCR:
		return s.mcr
	case regLSR:
		v := s.lsr()
		s.lsrErr = 0
		return v
	case regMSR:
		v := s.msrInputs() | s.msrDelta
		s.msrDelta = 0
		return v
	default: // regSCR
		return s.scr
	}
}

// +checklocks:s.mu
func (s *Serial) writeReg(off uint64, v uint8) {
	dlab := s.lcr&lcrDLAB != 0
	switch off {
	case regIER:
		if dlab {
			s.dlm = v
			return
		}
		old := s.ier
		s.ier = v & ierMask
		switch {
		case s.ier&ierTHRE == 0:
			s.threPending = false
		case old&ierTHRE == 0 && !s.txBusy:
			// Enabling the THRE interrupt with THR empty raises it.
			s.threPending = true
		}
		if s.ier&ierRDA != 0 && old&ierRDA == 0 {
			s.notify()
		}
	case regIIR: // FCR
		s.writeFCR(v)
	case regLCR:
		s.lcr = v
	case regMCR:
		s.writeMCR(v)
	case regSCR:
		s.scr = v
	}
	// LSR and MSR are read-only (writes are for factory test only).
}

// +checklocks:s.mu
func (s *Serial) writeFCR(v uint8) {
	if (v^s.fcr)&fcrEnable != 0 {
		// Changing FCR bit 0 clears both FIFOs.
		s.clearRX()
	}
	if v&fcrEnable == 0 {
		// The other bits are only programmed together with bit 0.
		s.fcr = 0
		return
	}
	s.fcr = v & fcrStored
	if v&fcrRXReset != 0 {
		s.clearRX()
	}
	// The TX FIFO reset bit has nothing to clear: transmission is
	// instantaneous.
}

// +checklocks:s.mu
func (s *Serial) writeMCR(v uint8) {
	oldIn := s.msrInputs()
	oldLoop := s.mcr&mcrLoop != 0
	oldRTS := s.mcr & mcrRTS
	s.mcr = v & mcrMask
	newIn := s.msrInputs()
	changed := oldIn ^ newIn
	if changed&msrCTS != 0 {
		s.msrDelta |= msrDCTS
	}
	if changed&msrDSR != 0 {
		s.msrDelta |= msrDDSR
	}
	if changed&msrDCD != 0 {
		s.msrDelta |= msrDDCD
	}
	if oldIn&msrRI != 0 && newIn&msrRI == 0 {
		s.msrDelta |= msrTERI // trailing edge of RI
	}
	if oldLoop && s.mcr&mcrLoop == 0 || oldRTS == 0 && s.mcr&mcrRTS != 0 {
		s.notify() // the guest may listen now
	}
}

// writeData handles a write to offset 0: THR, or DLL with DLAB set.
func (s *Serial) writeData(b uint8) {
	s.txMu.Lock()
	defer s.txMu.Unlock()
	s.mu.Lock()
	if s.lcr&lcrDLAB != 0 {
		s.dll = b
		s.mu.Unlock()
		return
	}
	s.threPending = false // Table IV: writing THR clears the THRE interrupt
	if s.mcr&mcrLoop != 0 {
		s.receive(b)
		s.txDone()
		s.update()
		s.mu.Unlock()
		return
	}
	s.txBusy = true
	s.update()
	s.mu.Unlock()

	s.txBuf[0] = b
	_, err := s.out.Write(s.txBuf[:])

	s.mu.Lock()
	s.txBusy = false
	s.txDone()
	s.update()
	s.mu.Unlock()
	if err != nil {
		s.outErr.Warn("host output failed; byte dropped", "err", err)
	}
}

// txDone marks THR empty again after a transmission.
//
// +checklocks:s.mu
func (s *Serial) txDone() {
	if s.ier&ierTHRE != 0 {
		s.threPending = true
	}
}

// Enqueue offers host input to the receiver and reports how many bytes of b
// it took: as many as fit in the receive FIFO (16 bytes with FIFOs enabled,
// 1 without), and none while the guest does not listen: RTS clear (MCR bit
// 1: a driver raises it when the port is opened, and Linux keeps it low
// while it probes the UART and clears its buffers), IER bit 0 clear, or the
// UART in loopback. When it takes fewer than len(b), the caller waits on
// InputReady and offers the rest again: nothing typed ahead is lost.
func (s *Serial) Enqueue(b []byte) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ier&ierRDA == 0 || s.mcr&mcrRTS == 0 || s.mcr&mcrLoop != 0 {
		return 0
	}
	n := 0
	for n < len(b) && s.rxLen < s.rxLimit() {
		s.pushRX(b[n])
		n++
	}
	s.update()
	return n
}

// InputReady returns a channel that receives a value whenever room for
// input may have appeared (the guest read a byte, reset the FIFO, or
// started listening). It has a buffer of one, so a wake-up between a short
// Enqueue and the wait is not lost. One feeder should wait on it at a time.
func (s *Serial) InputReady() <-chan struct{} { return s.ready }

// Feed copies r to the receiver until r reports EOF (Feed then returns nil),
// r fails, or ctx ends, waiting on InputReady whenever the guest has no room,
// so no input is dropped however slowly the guest reads. A Read of r that
// blocks is not interrupted by ctx.
func (s *Serial) Feed(ctx context.Context, r io.Reader) error {
	buf := make([]byte, 512)
	for {
		n, err := r.Read(buf)
		for p := buf[:n]; len(p) > 0; {
			k := s.Enqueue(p)
			p = p[k:]
			if len(p) == 0 {
				break
			}
			select {
			case <-s.ready:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}

// notify wakes the input feeder, if it waits.
func (s *Serial) notify() {
	select {
	case s.ready <- struct{}{}:
	default:
	}
}

// +checklocks:s.mu
func (s *Serial) rxLimit() int {
	if s.fcr&fcrEnable != 0 {
		return FIFOSize
	}
	return 1
}

// +checklocks:s.mu
func (s *Serial) pushRX(b uint8) {
	s.rx[(s.rxHead+s.rxLen)%FIFOSize] = b
	s.rxLen++
}

// +checklocks:s.mu
func (s *Serial) popRX() uint8 {
	if s.rxLen == 0 {
		return 0
	}
	b := s.rx[s.rxHead]
	s.rxHead = (s.rxHead + 1) % FIFOSize
	s.rxLen--
	s.notify()
	return b
}

// +checklocks:s.mu
func (s *Serial) clearRX() {
	s.rxHead, s.rxLen = 0, 0
	s.notify()
}

// receive puts a byte received from the line (loopback) into the receiver,
// with the overrun rules of the LSR's OE bit: with FIFOs enabled a byte that finds the
// FIFO full is lost; without, it overwrites the unread byte in RBR.
//
// +checklocks:s.mu
func (s *Serial) receive(b uint8) {
	if s.rxLen < s.rxLimit() {
		s.pushRX(b)
		return
	}
	s.lsrErr |= lsrOE
	if s.fcr&fcrEnable == 0 {
		s.rx[s.rxHead] = b
	}
}

// triggerLevel returns the RX FIFO trigger level programmed in FCR.
//
// +checklocks:s.mu
func (s *Serial) triggerLevel() int {
	return [4]int{1, 4, 8, 14}[s.fcr>>6]
}

// iir computes the Interrupt Identification Register, highest priority
// source first (Table IV).
//
// +checklocks:s.mu
func (s *Serial) iir() uint8 {
	fifo := s.fcr&fcrEnable != 0
	id := uint8(iirNoInt)
	switch {
	case s.ier&ierRLS != 0 && s.lsrErr != 0:
		id = iirRLS
	case s.ier&ierRDA != 0 && s.rxLen > 0 && (!fifo || s.rxLen >= s.triggerLevel()):
		id = iirRDA
	case s.ier&ierRDA != 0 && s.rxLen > 0:
		id = iirCTO
	case s.ier&ierTHRE != 0 && s.threPending:
		id = iirTHRE
	case s.ier&ierMS != 0 && s.msrDelta != 0:
		id = iirMS
	}
	if fifo {
		id |= iirFIFO
	}
	return id
}

// +checklocks:s.mu
func (s *Serial) lsr() uint8 {
	v := s.lsrErr
	if s.rxLen > 0 {
		v |= lsrDR
	}
	if !s.txBusy {
		v |= lsrTHRE | lsrTEMT
	}
	return v
}

// msrInputs returns MSR bits 7:4, the modem inputs.
//
// +checklocks:s.mu
func (s *Serial) msrInputs() uint8 {
	if s.mcr&mcrLoop == 0 {
		return msrConnected
	}
	var v uint8
	if s.mcr&mcrRTS != 0 {
		v |= msrCTS
	}
	if s.mcr&mcrDTR != 0 {
		v |= msrDSR
	}
	if s.mcr&mcrOUT1 != 0 {
		v |= msrRI
	}
	if s.mcr&mcrOUT2 != 0 {
		v |= msrDCD
	}
	return v
}

// update drives the IRQ line from the interrupt state.
//
// +checklocks:s.mu
func (s *Serial) update() {
	level := s.mcr&mcrOUT2 != 0 && s.mcr&mcrLoop == 0 && s.iir()&iirNoInt == 0
	if level == s.irqLevel {
		return
	}
	s.irqLevel = level
	if s.irq != nil {
		s.irq.SetLevel(level)
	}
}

// IRQLevel reports the level the UART drives on its interrupt line.
func (s *Serial) IRQLevel() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.irqLevel
}

// Save returns the UART's state. A byte still being written to the host is
// saved as sent.
func (s *Serial) Save() State {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := State{
		Version:     StateVersion,
		IER:         s.ier,
		FCR:         s.fcr,
		LCR:         s.lcr,
		MCR:         s.mcr,
		LSRErrors:   s.lsrErr,
		MSRDeltas:   s.msrDelta,
		SCR:         s.scr,
		DLL:         s.dll,
		DLM:         s.dlm,
		THREPending: s.threPending || (s.txBusy && s.ier&ierTHRE != 0),
	}
	for i := 0; i < s.rxLen; i++ {
		st.RX = append(st.RX, s.rx[(s.rxHead+i)%FIFOSize])
	}
	return st
}

// Restore replaces the UART's state with st after checking it, and drives
// the IRQ line to match. It waits for a host write in progress to finish.
// On error the UART is unchanged.
func (s *Serial) Restore(st State) error {
	if err := st.validate(); err != nil {
		return err
	}
	s.txMu.Lock()
	defer s.txMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ier, s.fcr, s.lcr, s.mcr = st.IER, st.FCR, st.LCR, st.MCR
	s.lsrErr, s.msrDelta, s.scr = st.LSRErrors, st.MSRDeltas, st.SCR
	s.dll, s.dlm = st.DLL, st.DLM
	s.threPending = st.THREPending
	s.txBusy = false
	s.rx = [FIFOSize]byte{}
	s.rxHead = 0
	s.rxLen = copy(s.rx[:], st.RX)
	s.update()
	s.notify()
	return nil
}
