package i8042

import (
	"log/slog"
	"sync"

	"collective/devices"
)

// Window layout and limits.
const (
	// Size is the size of the window at port 0x60 (ports 0x60-0x64).
	Size = 5
	// QueueSize is the depth of the output buffer queue.
	QueueSize = 16

	offData   = 0
	offStatus = 4
)

// Status register bits.
const (
	stOBF    = 0x01
	stSYS    = 0x04
	stA2     = 0x08
	stUnlock = 0x10 // keylock off: keyboard not inhibited
	stAUXB   = 0x20
)

// Command byte bits.
const (
	cbKbdInt = 0x01
	cbAuxInt = 0x02
	cbSYS    = 0x04
	cbKbdDis = 0x10
	cbAuxDis = 0x20
	cbXlate  = 0x40

	// resetCommandByte is what a PC's firmware leaves: keyboard interrupt,
	// system flag, translation.
	resetCommandByte = cbKbdInt | cbSYS | cbXlate
)

// Output port bits.
const (
	outReset = 0x01 // 0 holds the CPU in reset
	outA20   = 0x02

	resetOutputPort = outReset | outA20
)

// Controller commands (port 0x64).
const (
	cmdReadCB      = 0x20
	cmdWriteCB     = 0x60
	cmdPassword    = 0xa4
	cmdAuxDisable  = 0xa7
	cmdAuxEnable   = 0xa8
	cmdAuxTest     = 0xa9
	cmdSelfTest    = 0xaa
	cmdKbdTest     = 0xab
	cmdKbdDisable  = 0xad
	cmdKbdEnable   = 0xae
	cmdReadInput   = 0xc0
	cmdReadOutput  = 0xd0
	cmdWriteOutput = 0xd1
	cmdWriteKbdOut = 0xd2
	cmdWriteAuxOut = 0xd3
	cmdWriteAux    = 0xd4
	cmdA20Off      = 0xdd
	cmdA20On       = 0xdf
	cmdReadTest    = 0xe0
	cmdPulse       = 0xf0 // 0xF0-0xFF: pulse output lines 3:0 where the bit is 0

	selfTestOK    = 0x55
	noPassword    = 0xf1
	resendNoDev   = 0xfe
	inputPortIdle = 0x80 // keyboard not inhibited
)

// takesData reports whether controller command c waits for a data byte.
func takesData(c uint8) bool {
	return c >= 0x60 && c <= 0x7f || c >= cmdWriteOutput && c <= cmdWriteAux
}

// I8042 is an 8042 keyboard controller with nothing attached. Create it
// with New.
type I8042 struct {
	kbdIRQ, auxIRQ devices.IRQLine // immutable; may be nil
	reset          func()          // immutable; may be nil

	mu       sync.Mutex
	cb       uint8              // +checklocks:mu
	outPort  uint8              // +checklocks:mu
	pending  uint8              // +checklocks:mu
	lastCmd  bool               // +checklocks:mu
	out      [QueueSize]OutByte // +checklocks:mu (ring buffer)
	outHead  int                // +checklocks:mu
	outLen   int                // +checklocks:mu
	kbdLevel bool               // +checklocks:mu
	auxLevel bool               // +checklocks:mu
	warn     devices.Warner     // +checklocks:mu
}

// New returns a controller in the state a PC's firmware leaves it, driving
// kbd (IRQ 1) and aux (IRQ 12), either of which may be nil, and calling
// reset when the guest pulses the reset line. Warnings go to slog.Default()
// as it is when New runs.
func New(kbd, aux devices.IRQLine, reset func()) *I8042 {
	c := &I8042{
		kbdIRQ:  kbd,
		auxIRQ:  aux,
		reset:   reset,
		cb:      resetCommandByte,
		outPort: resetOutputPort,
	}
	c.warn.Log = slog.Default().With("device", "i8042")
	return c
}

// SetLogger sends the controller's warnings to l instead of slog.Default().
func (c *I8042) SetLogger(l *slog.Logger) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.warn.Log = l
}

// Read implements devices.Device.Read: offset 0 is the data port (0x60),
// offset 4 the status register (0x64).
func (c *I8042) Read(off uint64, p []byte) {
	if len(p) != 1 || (off != offData && off != offStatus) {
		for i := range p {
			p[i] = 0xff
		}
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if off == offStatus {
		p[0] = c.status()
		return
	}
	p[0] = c.pop()
}

// Write implements devices.Device.Write: offset 0 is the data port (0x60),
// offset 4 the command port (0x64).
func (c *I8042) Write(off uint64, p []byte) {
	if len(p) != 1 || (off != offData && off != offStatus) {
		return
	}
	c.mu.Lock()
	var reset bool
	if off == offStatus {
		reset = c.command(p[0])
	} else {
		reset = c.data(p[0])
	}
	c.update(false)
	c.mu.Unlock()
	if reset && c.reset != nil {
		c.reset()
	}
}

// port is a one-byte window onto one of the controller's two ports.
type port struct {
	c   *I8042
	off uint64
}

// Read implements devices.Device.Read.
func (p port) Read(off uint64, b []byte) {
	if off != 0 {
		for i := range b {
			b[i] = 0xff
		}
		return
	}
	p.c.Read(p.off, b)
}

// Write implements devices.Device.Write.
func (p port) Write(off uint64, b []byte) {
	if off == 0 {
		p.c.Write(p.off, b)
	}
}

// DataPort returns a one-byte window onto the data port, for port 0x60.
func (c *I8042) DataPort() devices.Device { return port{c, offData} }

// CommandPort returns a one-byte window onto the status/command port, for
// port 0x64.
func (c *I8042) CommandPort() devices.Device { return port{c, offStatus} }

// PushScancode queues bytes from the keyboard, as the guest will read them
// (after any translation), and reports how many it took: none while the
// keyboard port is disabled, and no more than the output buffer holds.
func (c *I8042) PushScancode(b ...uint8) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cb&cbKbdDis != 0 {
		return 0
	}
	n := 0
	for n < len(b) && c.outLen < QueueSize {
		c.push(b[n], false)
		n++
	}
	c.update(false)
	return n
}

// +checklocks:c.mu
func (c *I8042) status() uint8 {
	v := uint8(stUnlock)
	if c.outLen > 0 {
		v |= stOBF
		if c.out[c.outHead].Aux {
			v |= stAUXB
		}
	}
	if c.cb&cbSYS != 0 {
		v |= stSYS
	}
	if c.lastCmd {
		v |= stA2
	}
	return v
}

// command runs a controller command and reports whether it resets the
// machine.
//
// +checklocks:c.mu
func (c *I8042) command(cmd uint8) bool {
	c.lastCmd = true
	c.pending = 0
	switch {
	case cmd == cmdReadCB:
		c.push(c.cb, false)
	case cmd > cmdReadCB && cmd < cmdWriteCB:
		c.push(0, false) // controller RAM beyond the command byte
	case takesData(cmd):
		c.pending = cmd
	case cmd == cmdPassword:
		c.push(noPassword, false)
	case cmd == cmdAuxDisable:
		c.cb |= cbAuxDis
	case cmd == cmdAuxEnable:
		c.cb &^= cbAuxDis
	case cmd == cmdAuxTest, cmd == cmdKbdTest:
		c.push(0, false)
	case cmd == cmdSelfTest:
		c.cb |= cbSYS
		c.push(selfTestOK, false)
	case cmd == cmdKbdDisable:
		c.cb |= cbKbdDis
	case cmd == cmdKbdEnable:
		c.cb &^= cbKbdDis
	case cmd == cmdReadInput:
		c.push(inputPortIdle, false)
	case cmd == cmdReadOutput:
		c.push(c.outPort, false)
	case cmd == cmdA20Off:
		c.outPort &^= outA20
	case cmd == cmdA20On:
		c.outPort |= outA20
	case cmd == cmdReadTest:
		c.push(0, false)
	case cmd >= cmdPulse:
		return cmd&outReset == 0
	default:
		c.warn.Warn("unsupported controller command", "command", cmd)
	}
	return false
}

// data handles a byte written to port 0x60 and reports whether it resets
// the machine.
//
// +checklocks:c.mu
func (c *I8042) data(v uint8) bool {
	c.lastCmd = false
	cmd := c.pending
	c.pending = 0
	switch {
	case cmd == 0:
		c.push(resendNoDev, false) // no keyboard
	case cmd == cmdWriteCB:
		c.cb = v
	case cmd == cmdWriteOutput:
		if v&outReset == 0 {
			return true
		}
		c.outPort = v
	case cmd == cmdWriteKbdOut:
		c.push(v, false)
	case cmd == cmdWriteAuxOut:
		c.push(v, true)
	case cmd == cmdWriteAux:
		c.push(resendNoDev, true) // no mouse
	}
	// 0x61-0x7F write controller RAM beyond the command byte: dropped.
	return false
}

// +checklocks:c.mu
func (c *I8042) push(b uint8, aux bool) {
	if c.outLen == QueueSize {
		c.warn.Warn("output buffer full; byte dropped", "byte", b)
		return
	}
	c.out[(c.outHead+c.outLen)%QueueSize] = OutByte{b, aux}
	c.outLen++
}

// pop takes the byte at the head of the output buffer (0 if empty) and
// lowers the interrupt line before the next byte raises it.
//
// +checklocks:c.mu
func (c *I8042) pop() uint8 {
	if c.outLen == 0 {
		return 0
	}
	b := c.out[c.outHead].Data
	c.out[c.outHead] = OutByte{}
	c.outHead = (c.outHead + 1) % QueueSize
	c.outLen--
	c.update(true)
	return b
}

// update drives the IRQ lines; with pulse it lowers them first.
//
// +checklocks:c.mu
func (c *I8042) update(pulse bool) {
	var kbd, aux bool
	if c.outLen > 0 {
		if c.out[c.outHead].Aux {
			aux = c.cb&cbAuxInt != 0
		} else {
			kbd = c.cb&cbKbdInt != 0
		}
	}
	if pulse {
		setLevel(c.kbdIRQ, &c.kbdLevel, false)
		setLevel(c.auxIRQ, &c.auxLevel, false)
	}
	setLevel(c.kbdIRQ, &c.kbdLevel, kbd)
	setLevel(c.auxIRQ, &c.auxLevel, aux)
}

func setLevel(irq devices.IRQLine, cur *bool, level bool) {
	if *cur == level {
		return
	}
	*cur = level
	if irq != nil {
		irq.SetLevel(level)
	}
}

// IRQLevels reports the levels the controller drives on its keyboard and
// aux interrupt lines.
func (c *I8042) IRQLevels() (kbd, aux bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.kbdLevel, c.auxLevel
}

// Save returns the controller's state.
func (c *I8042) Save() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := State{
		Version:        StateVersion,
		CommandByte:    c.cb,
		OutputPort:     c.outPort,
		Pending:        c.pending,
		LastWasCommand: c.lastCmd,
	}
	for i := 0; i < c.outLen; i++ {
		st.Out = append(st.Out, c.out[(c.outHead+i)%QueueSize])
	}
	return st
}

// Restore replaces the controller's state with st after checking it, and
// drives the IRQ lines to match. On error the controller is unchanged.
func (c *I8042) Restore(st State) error {
	if err := st.validate(); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cb, c.outPort, c.pending, c.lastCmd = st.CommandByte, st.OutputPort, st.Pending, st.LastWasCommand
	c.out = [QueueSize]OutByte{}
	c.outHead = 0
	c.outLen = copy(c.out[:], st.Out)
	c.update(false)
	return nil
}
