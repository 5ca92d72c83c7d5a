package i8042

import (
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

type fakeIRQ struct {
	mu     sync.Mutex
	levels []bool
}

func (f *fakeIRQ) SetLevel(high bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.levels = append(f.levels, high)
}

func (f *fakeIRQ) take() []bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := f.levels
	f.levels = nil
	return l
}

type harness struct {
	c        *I8042
	kbd, aux fakeIRQ
	resets   int
}

func newHarness() *harness {
	h := &harness{}
	h.c = New(&h.kbd, &h.aux, func() { h.resets++ })
	return h
}

func (h *harness) cmd(v uint8)   { h.c.Write(offStatus, []byte{v}) }
func (h *harness) write(v uint8) { h.c.Write(offData, []byte{v}) }
func (h *harness) status() uint8 { var b [1]byte; h.c.Read(offStatus, b[:]); return b[0] }
func (h *harness) read() uint8   { var b [1]byte; h.c.Read(offData, b[:]); return b[0] }

// response runs a command the way Linux's i8042_command does and returns
// what the controller answered.
func (h *harness) response(t *testing.T, cmd uint8, params ...uint8) []uint8 {
	t.Helper()
	if h.status()&0x02 != 0 {
		t.Fatal("IBF set")
	}
	h.cmd(cmd)
	for _, p := range params {
		h.write(p)
	}
	var got []uint8
	for h.status()&stOBF != 0 {
		got = append(got, h.read())
	}
	return got
}

func TestCommands(t *testing.T) {
	tests := []struct {
		name   string
		cmd    uint8
		params []uint8
		want   []uint8
		after  func(*testing.T, *harness)
	}{
		{"self test", cmdSelfTest, nil, []uint8{0x55}, nil},
		{"keyboard interface test", cmdKbdTest, nil, []uint8{0}, nil},
		{"aux interface test", cmdAuxTest, nil, []uint8{0}, nil},
		{"read command byte", cmdReadCB, nil, []uint8{0x45}, nil},
		{"write command byte", cmdWriteCB, []uint8{0x30}, nil, func(t *testing.T, h *harness) {
			if got := h.response(t, cmdReadCB); !cmp.Equal(got, []uint8{0x30}) {
				t.Errorf("command byte %x, want 30", got)
			}
			if h.status()&stSYS != 0 {
				t.Error("system flag set with command byte bit 2 clear")
			}
		}},
		{"disable keyboard", cmdKbdDisable, nil, nil, func(t *testing.T, h *harness) {
			if got := h.response(t, cmdReadCB); got[0]&cbKbdDis == 0 {
				t.Errorf("command byte %x after 0xAD", got)
			}
			h.cmd(cmdKbdEnable)
			if got := h.response(t, cmdReadCB); got[0]&cbKbdDis != 0 {
				t.Errorf("command byte %x after 0xAE", got)
			}
		}},
		{"disable aux", cmdAuxDisable, nil, nil, func(t *testing.T, h *harness) {
			if got := h.response(t, cmdReadCB); got[0]&cbAuxDis == 0 {
				t.Errorf("command byte %x after 0xA7", got)
			}
			h.cmd(cmdAuxEnable)
			if got := h.response(t, cmdReadCB); got[0]&cbAuxDis != 0 {
				t.Errorf("command byte %x after 0xA8", got)
			}
		}},
		{"aux loop", cmdWriteAuxOut, []uint8{0x5a}, nil, nil}, // checked below
		{"keyboard output buffer", cmdWriteKbdOut, []uint8{0x1c}, []uint8{0x1c}, nil},
		{"unsupported command", 0xb0, nil, nil, nil}, // warns, no answer
		{"password", cmdPassword, nil, []uint8{0xf1}, nil},
		{"output port", cmdReadOutput, nil, []uint8{0x03}, func(t *testing.T, h *harness) {
			h.cmd(cmdA20Off)
			if got := h.response(t, cmdReadOutput); got[0] != 0x01 {
				t.Errorf("output port %x after A20 off", got)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness()
			got := h.response(t, tt.cmd, tt.params...)
			if tt.cmd == cmdWriteAuxOut {
				h.cmd(cmdWriteAuxOut)
				h.write(0x5a)
				if st := h.status(); st&(stOBF|stAUXB) != stOBF|stAUXB {
					t.Fatalf("status %#x after aux loop, want OBF and AUXB", st)
				}
				got = []uint8{h.read()}
				tt.want = []uint8{0x5a}
			}
			if diff := cmp.Diff(tt.want, got, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("response (-want +got):\n%s", diff)
			}
			if tt.after != nil {
				tt.after(t, h)
			}
			if h.resets != 0 {
				t.Errorf("%d resets", h.resets)
			}
		})
	}
}

func TestStatus(t *testing.T) {
	h := newHarness()
	if got := h.status(); got != stUnlock|stSYS {
		t.Errorf("reset status %#x, want %#x", got, stUnlock|stSYS)
	}
	h.cmd(cmdSelfTest)
	if got := h.status(); got != stUnlock|stSYS|stA2|stOBF {
		t.Errorf("status after self test %#x", got)
	}
	h.read()
	h.write(0xff) // to the (absent) keyboard
	if got := h.status(); got != stUnlock|stSYS|stOBF {
		t.Errorf("status after a data write %#x", got)
	}
	if got := h.read(); got != 0xfe {
		t.Errorf("keyboard answered %#x, want 0xfe (no device)", got)
	}
	if got := h.read(); got != 0 {
		t.Errorf("empty output buffer read %#x", got)
	}
}

func TestReset(t *testing.T) {
	tests := []struct {
		name string
		do   func(h *harness)
		want int
	}{
		{"0xFE", func(h *harness) { h.cmd(0xfe) }, 1},
		{"0xF0 pulses all lines", func(h *harness) { h.cmd(0xf0) }, 1},
		{"0xFF pulses none", func(h *harness) { h.cmd(0xff) }, 0},
		{"output port bit 0 clear", func(h *harness) { h.cmd(cmdWriteOutput); h.write(0xde) }, 1},
		{"output port A20 write", func(h *harness) { h.cmd(cmdWriteOutput); h.write(0xdf) }, 0},
		{"0xFE through CommandPort", func(h *harness) { h.c.CommandPort().Write(0, []byte{0xfe}) }, 1},
		{"0xFE on the data port", func(h *harness) { h.write(0xfe) }, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness()
			tt.do(h)
			if h.resets != tt.want {
				t.Errorf("%d resets, want %d", h.resets, tt.want)
			}
		})
	}
	t.Run("callback runs without the lock", func(t *testing.T) {
		var c *I8042
		c = New(nil, nil, func() { c.Save() })
		c.Write(offStatus, []byte{0xfe}) // deadlocks if the lock is held
	})
}

func TestLinuxProbe(t *testing.T) {
	// The sequence of drivers/input/serio/i8042.c: flush, self test, read
	// the command byte twice, write it back, aux checks, enable keyboard.
	h := newHarness()
	for n := 0; h.status()&stOBF != 0; n++ {
		if n > QueueSize {
			t.Fatal("flush does not end")
		}
		h.read()
	}
	if got := h.response(t, cmdSelfTest); !cmp.Equal(got, []uint8{0x55}) {
		t.Fatalf("self test %x", got)
	}
	ctr := h.response(t, cmdReadCB)[0]
	if again := h.response(t, cmdReadCB)[0]; again != ctr {
		t.Fatalf("command byte unstable: %#x, %#x", ctr, again)
	}
	ctr = ctr | cbKbdDis&^cbKbdInt
	h.response(t, cmdWriteCB, ctr)
	if got := h.response(t, cmdWriteAuxOut, 0x5a); !cmp.Equal(got, []uint8{0x5a}) {
		t.Fatalf("aux loop %x", got)
	}
	h.response(t, cmdAuxDisable)
	if h.response(t, cmdReadCB)[0]&cbAuxDis == 0 {
		t.Fatal("aux disable not reflected")
	}
	h.response(t, cmdAuxEnable)
	if h.response(t, cmdReadCB)[0]&cbAuxDis != 0 {
		t.Fatal("aux enable not reflected")
	}
	h.kbd.take()
	h.response(t, cmdWriteCB, (ctr&^cbKbdDis)|cbKbdInt)
	// atkbd: GETID to the keyboard is answered 0xFE with an interrupt.
	h.write(0xf2)
	if got := h.kbd.take(); !cmp.Equal(got, []bool{true}) {
		t.Errorf("keyboard IRQ %v, want [true]", got)
	}
	if got := h.read(); got != 0xfe {
		t.Errorf("GETID answered %#x", got)
	}
	if got := h.kbd.take(); !cmp.Equal(got, []bool{false}) {
		t.Errorf("keyboard IRQ after read %v, want [false]", got)
	}
}

func TestIRQ(t *testing.T) {
	h := newHarness()
	h.cmd(cmdWriteCB)
	h.write(cbKbdInt | cbAuxInt)
	if n := h.c.PushScancode(0x1e, 0x9e); n != 2 {
		t.Fatalf("PushScancode took %d", n)
	}
	h.cmd(cmdWriteAuxOut)
	h.write(0x08)
	h.read()
	h.read()
	h.read()
	if diff := cmp.Diff([]bool{true, false, true, false}, h.kbd.take()); diff != "" {
		t.Errorf("keyboard line (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]bool{true, false}, h.aux.take()); diff != "" {
		t.Errorf("aux line (-want +got):\n%s", diff)
	}
	h.cmd(cmdKbdDisable)
	if n := h.c.PushScancode(1); n != 0 {
		t.Errorf("PushScancode with the keyboard disabled took %d", n)
	}
	h.cmd(cmdKbdEnable)
	if n := h.c.PushScancode(make([]uint8, 20)...); n != QueueSize {
		t.Errorf("PushScancode took %d, want %d", n, QueueSize)
	}
}

func TestBadAccess(t *testing.T) {
	h := newHarness()
	before := h.c.Save()
	for _, off := range []uint64{1, 2, 3, 5, 1 << 40} {
		var b [1]byte
		h.c.Read(off, b[:])
		h.c.Write(off, []byte{0xfe})
		if b[0] != 0xff {
			t.Errorf("read offset %d = %#x", off, b[0])
		}
	}
	p := make([]byte, 2)
	h.c.Read(0, p)
	h.c.Write(4, []byte{0xfe, 0})
	h.c.DataPort().Read(1, p)
	if !cmp.Equal(p, []byte{0xff, 0xff}) {
		t.Errorf("wide read %x", p)
	}
	if diff := cmp.Diff(before, h.c.Save()); diff != "" || h.resets != 0 {
		t.Errorf("bad accesses changed the state (resets %d):\n%s", h.resets, diff)
	}
}

func TestSaveRestore(t *testing.T) {
	tests := []struct {
		name string
		do   func(h *harness)
	}{
		{"reset", func(*harness) {}},
		{"pending command", func(h *harness) { h.cmd(cmdWriteCB) }},
		{"bytes waiting, IRQs high", func(h *harness) {
			h.cmd(cmdWriteCB)
			h.write(0x47)
			h.cmd(cmdWriteAuxOut)
			h.write(1)
			h.c.PushScancode(2, 3)
		}},
		{"A20 off", func(h *harness) { h.cmd(cmdA20Off) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness()
			tt.do(h)
			st := h.c.Save()
			h2 := newHarness()
			if err := h2.c.Restore(st); err != nil {
				t.Fatalf("Restore: %v", err)
			}
			if diff := cmp.Diff(st, h2.c.Save(), cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("Save after Restore (-want +got):\n%s", diff)
			}
			k1, a1 := h.c.IRQLevels()
			k2, a2 := h2.c.IRQLevels()
			if k1 != k2 || a1 != a2 {
				t.Errorf("restored IRQ levels %v %v, want %v %v", k2, a2, k1, a1)
			}
		})
	}
}

func TestRestoreRejects(t *testing.T) {
	good := New(nil, nil, nil).Save()
	tests := []struct {
		name   string
		mutate func(*State)
		want   string
	}{
		{"unknown version", func(s *State) { s.Version = 2 }, "version 2, want version 1"},
		{"pending", func(s *State) { s.Pending = 0xaa }, "pending"},
		{"queue", func(s *State) { s.Out = make([]OutByte, QueueSize+1) }, "limit"},
		{"reset held", func(s *State) { s.OutputPort = 0 }, "reset"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := good
			tt.mutate(&st)
			c := New(nil, nil, nil)
			if err := c.Restore(st); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Restore = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}
