package rtc

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// fakeClock is a settable host clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// leap day 2024, a Thursday.
var base = time.Date(2024, 2, 29, 13, 5, 9, 0, time.UTC)

func newRTC(t time.Time) (*RTC, *fakeClock) {
	c := &fakeClock{t: t}
	return New(c.now), c
}

func get(r *RTC, i uint8) uint8 {
	r.Write(0, []byte{i})
	var b [1]byte
	r.Read(1, b[:])
	return b[0]
}

func set(r *RTC, i, v uint8) {
	r.Write(0, []byte{i})
	r.Write(1, []byte{v})
}

// clock reads seconds, minutes, hours, day of week, day, month, year, century.
func clock(r *RTC) [8]uint8 {
	return [8]uint8{get(r, 0), get(r, 2), get(r, 4), get(r, 6), get(r, 7), get(r, 8), get(r, 9), get(r, 0x32)}
}

func TestClockFormats(t *testing.T) {
	tests := []struct {
		name string
		t    time.Time
		b    uint8
		want [8]uint8
	}{
		{"BCD 24h", base, 0x02, [8]uint8{0x09, 0x05, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20}},
		{"binary 24h", base, 0x06, [8]uint8{9, 5, 13, 5, 29, 2, 24, 20}},
		{"BCD 12h PM", base, 0x00, [8]uint8{0x09, 0x05, 0x81, 0x05, 0x29, 0x02, 0x24, 0x20}},
		{"binary 12h PM", base, 0x04, [8]uint8{9, 5, 0x81, 5, 29, 2, 24, 20}},
		{"BCD 12h midnight", time.Date(1999, 12, 31, 0, 30, 59, 0, time.UTC), 0x00, [8]uint8{0x59, 0x30, 0x12, 0x06, 0x31, 0x12, 0x99, 0x19}},
		{"BCD 12h noon", time.Date(2000, 1, 2, 12, 0, 0, 0, time.UTC), 0x00, [8]uint8{0, 0, 0x92, 0x01, 0x02, 0x01, 0x00, 0x20}},
		{"binary 24h 23:59", time.Date(2099, 7, 4, 23, 59, 58, 0, time.UTC), 0x06, [8]uint8{58, 59, 23, 7, 4, 7, 99, 20}},
		{"host clock in another zone reads UTC", base.In(time.FixedZone("X", 5*3600)), 0x02, [8]uint8{0x09, 0x05, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, _ := newRTC(tt.t)
			set(r, regB, tt.b)
			if got := clock(r); got != tt.want {
				t.Errorf("clock = % x, want % x", got, tt.want)
			}
		})
	}
}

func TestStatusRegisters(t *testing.T) {
	r, c := newRTC(base)
	for _, tt := range []struct {
		name string
		reg  uint8
		want uint8
	}{{"A", regA, 0x26}, {"B", regB, 0x02}, {"C", regC, 0}, {"D", regD, 0x80}} {
		t.Run("reset "+tt.name, func(t *testing.T) {
			if got := get(r, tt.reg); got != tt.want {
				t.Errorf("register %s = %#x, want %#x", tt.name, got, tt.want)
			}
		})
	}
	t.Run("C and D are read-only, UIP is read-only", func(t *testing.T) {
		set(r, regC, 0xff)
		set(r, regD, 0)
		set(r, regA, 0xa6)
		if a, c, d := get(r, regA), get(r, regC), get(r, regD); a != 0x26 || c != 0 || d != 0x80 {
			t.Errorf("A, C, D = %#x, %#x, %#x; want 0x26, 0, 0x80", a, c, d)
		}
	})
	t.Run("UIP in the last 244us of a second", func(t *testing.T) {
		c.add(time.Second - 200*time.Microsecond)
		if got := get(r, regA); got != 0xa6 {
			t.Errorf("A just before the update = %#x, want 0xa6", got)
		}
		set(r, regB, 0x82)
		if got := get(r, regA); got != 0x26 {
			t.Errorf("A with SET = %#x, want 0x26", got)
		}
		set(r, regB, 0x02)
		c.add(time.Millisecond)
		if got := get(r, regA); got != 0x26 {
			t.Errorf("A just after the update = %#x, want 0x26", got)
		}
	})
	t.Run("UIP poll with the real clock terminates", func(t *testing.T) {
		r := New(nil)
		deadline := time.Now().Add(2 * time.Second)
		for get(r, regA)&aUIP != 0 {
			if time.Now().After(deadline) {
				t.Fatal("UIP stuck")
			}
		}
	})
}

func TestSetTime(t *testing.T) {
	t.Run("SET freezes, clearing it stores an offset", func(t *testing.T) {
		r, c := newRTC(base)
		set(r, regB, 0x82)
		c.add(5 * time.Second)
		if got := get(r, 0); got != 0x09 {
			t.Errorf("seconds while SET = %#x, want frozen 0x09", got)
		}
		for i, v := range map[uint8]uint8{0: 0x05, 2: 0x04, 4: 0x03, 7: 0x02, 8: 0x01, 9: 0x30, 0x32: 0x20} {
			set(r, i, v)
		}
		set(r, regB, 0x02)
		want := [8]uint8{0x05, 0x04, 0x03, 0x04, 0x02, 0x01, 0x30, 0x20} // Wednesday
		if got := clock(r); got != want {
			t.Errorf("clock after set = % x, want % x", got, want)
		}
		c.add(61 * time.Second)
		want = [8]uint8{0x06, 0x05, 0x03, 0x04, 0x02, 0x01, 0x30, 0x20}
		if got := clock(r); got != want {
			t.Errorf("clock 61 s later = % x, want % x", got, want)
		}
		if st := r.Save(); st.OffsetSeconds != time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC).Unix()-base.Add(5*time.Second).Unix() {
			t.Errorf("offset %d", st.OffsetSeconds)
		}
	})
	t.Run("set in binary 12h", func(t *testing.T) {
		r, _ := newRTC(base)
		set(r, regB, 0x84)
		for i, v := range map[uint8]uint8{0: 0, 2: 0, 4: 0x80 | 11, 7: 31, 8: 12, 9: 99, 0x32: 20} {
			set(r, i, v)
		}
		set(r, regB, 0x04) // clear SET in the format the time was written in
		set(r, regB, 0x06)
		dow := uint8(time.Date(2099, 12, 31, 0, 0, 0, 0, time.UTC).Weekday()) + 1
		want := [8]uint8{0, 0, 23, dow, 31, 12, 99, 20}
		if got := clock(r); got != want {
			t.Errorf("clock = % x, want % x", got, want)
		}
	})
	t.Run("write without SET adjusts one field", func(t *testing.T) {
		r, _ := newRTC(base)
		set(r, 2, 0x45)
		set(r, 6, 0x01) // day of week follows the date
		want := [8]uint8{0x09, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20}
		if got := clock(r); got != want {
			t.Errorf("clock = % x, want % x", got, want)
		}
	})
	t.Run("out-of-range values are normalised", func(t *testing.T) {
		r, _ := newRTC(base)
		set(r, 8, 0x13) // month 13 of 2024
		if got := [2]uint8{get(r, 8), get(r, 9)}; got != [2]uint8{0x01, 0x25} {
			t.Errorf("month, year = % x, want 01 25", got)
		}
	})
	t.Run("absurd dates do not overflow", func(t *testing.T) {
		r, _ := newRTC(base)
		set(r, regB, 0x86)
		set(r, 0x32, 0xff)
		set(r, 9, 0xff)
		set(r, regB, 0x06)
		_ = clock(r)
		if err := New(nil).Restore(r.Save()); err != nil {
			t.Errorf("Restore of the saved state: %v", err)
		}
	})
}

func TestCMOSMemory(t *testing.T) {
	r, _ := newRTC(base)
	set(r, 0x40, 0x5a)
	set(r, 0x01, 0x33) // seconds alarm
	set(r, 0x7f, 0xa5)
	r.Write(0, []byte{0x80 | 0x40})
	if !r.NMIMasked() {
		t.Error("index bit 7 did not mask NMI")
	}
	var b [1]byte
	r.Read(1, b[:])
	if b[0] != 0x5a {
		t.Errorf("byte 0x40 = %#x, want 0x5a", b[0])
	}
	r.Read(0, b[:])
	if b[0] != 0xff {
		t.Errorf("index port read = %#x, want 0xff", b[0])
	}
	if got := [2]uint8{get(r, 0x01), get(r, 0x7f)}; got != [2]uint8{0x33, 0xa5} {
		t.Errorf("alarm, 0x7f = % x", got)
	}
	if r.NMIMasked() {
		t.Error("NMI still masked after an index write without bit 7")
	}
	p := make([]byte, 4)
	r.Read(1, p)
	r.Write(1, p)
	r.Read(7, p[:1])
	if p[0] != 0xff {
		t.Errorf("bad offset read %#x", p[0])
	}
}

func TestSaveRestore(t *testing.T) {
	tests := []struct {
		name  string
		setup func(*RTC)
	}{
		{"reset", func(*RTC) {}},
		{"memory and index", func(r *RTC) { set(r, 0x50, 7); r.Write(0, []byte{0x8f}) }},
		{"offset", func(r *RTC) { set(r, 9, 0x50) }},
		{"frozen by SET", func(r *RTC) { set(r, regB, 0x86); set(r, 0, 30) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, c := newRTC(base)
			tt.setup(r)
			st := r.Save()
			r2 := New(c.now)
			if err := r2.Restore(st); err != nil {
				t.Fatalf("Restore: %v", err)
			}
			if diff := cmp.Diff(st, r2.Save()); diff != "" {
				t.Errorf("Save after Restore (-want +got):\n%s", diff)
			}
			if a, b := clock(r), clock(r2); a != b {
				t.Errorf("restored clock % x, want % x", b, a)
			}
		})
	}
}

func TestRestoreRejects(t *testing.T) {
	good := New(nil).Save()
	tests := []struct {
		name   string
		mutate func(*State)
		want   string
	}{
		{"unknown version", func(s *State) { s.Version = 9 }, "version 9, want version 1"},
		{"index", func(s *State) { s.Index = 0x80 }, "index"},
		{"UIP", func(s *State) { s.CMOS[regA] |= aUIP }, "UIP"},
		{"register C", func(s *State) { s.CMOS[regC] = 1 }, "registers C and D"},
		{"register D", func(s *State) { s.CMOS[regD] = 0x80 }, "registers C and D"},
		{"offset", func(s *State) { s.OffsetSeconds = -1 << 50 }, "offset"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := good
			tt.mutate(&st)
			r := New(nil)
			if err := r.Restore(st); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Restore = %v, want an error containing %q", err, tt.want)
			}
			if diff := cmp.Diff(good, r.Save()); diff != "" {
				t.Errorf("failed Restore changed the state:\n%s", diff)
			}
		})
	}
}
