package debugexit

// Size is the size of the register window.
const Size = 4

// DebugExit is a QEMU-compatible debug exit port. Create it with New.
type DebugExit struct {
	exit func(code int) // immutable; may be nil
}

// New returns a debug exit port that calls exit with the value the guest
// writes.
func New(exit func(code int)) *DebugExit {
	return &DebugExit{exit: exit}
}

// Read implements devices.Device.Read: the window reads 0, anything else
// 0xff.
func (d *DebugExit) Read(off uint64, p []byte) {
	fill := byte(0)
	if !valid(off, len(p)) {
		fill = 0xff
	}
	for i := range p {
		p[i] = fill
	}
}

// Write implements devices.Device.Write: a 1- to 4-byte write inside the
// window calls Exit with its little-endian value.
func (d *DebugExit) Write(off uint64, p []byte) {
	if !valid(off, len(p)) || d.exit == nil {
		return
	}
	var v uint32
	for i, b := range p {
		v |= uint32(b) << (8 * i)
	}
	d.exit(int(v))
}

func valid(off uint64, size int) bool {
	return size >= 1 && size <= Size && off < Size && off+uint64(size) <= Size
}

// Save returns the device's state.
func (d *DebugExit) Save() State { return State{Version: StateVersion} }

// Restore checks st; the device has nothing else to restore.
func (d *DebugExit) Restore(st State) error { return st.validate() }
