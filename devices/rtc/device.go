package rtc

import (
	"log/slog"
	"sync"
	"time"

	"collective/devices"
)

// Register indexes (datasheet Figure 3, plus the PC's century byte).
const (
	regSeconds    = 0x00
	regMinutes    = 0x02
	regHours      = 0x04
	regDayOfWeek  = 0x06
	regDayOfMonth = 0x07
	regMonth      = 0x08
	regYear       = 0x09
	regA          = 0x0a
	regB          = 0x0b
	regC          = 0x0c
	regD          = 0x0d
	regCentury    = 0x32

	aUIP   = 0x80
	bSET   = 0x80
	bUIE   = 0x10
	bDM    = 0x04 // binary data mode
	b24    = 0x02 // 24-hour mode
	dVRT   = 0x80
	hourPM = 0x80

	// Size is the size of the register window (ports 0x70 and 0x71).
	Size = 2

	// uipWindow is how long before each update UIP reads 1.
	uipWindow = 244 * time.Microsecond
)

// Reset values of registers A (32.768 kHz time base, 1024 Hz rate) and B
// (BCD, 24-hour), as a PC's firmware leaves them.
const (
	resetA = 0x26
	resetB = b24
)

// isTime reports whether CMOS byte i is a clock register.
func isTime(i uint8) bool {
	switch i {
	case regSeconds, regMinutes, regHours, regDayOfWeek, regDayOfMonth, regMonth, regYear, regCentury:
		return true
	}
	return false
}

// RTC is an MC146818A real-time clock with 128 bytes of CMOS. Create it
// with New.
type RTC struct {
	now func() time.Time // immutable

	mu        sync.Mutex
	index     uint8          // +checklocks:mu
	nmiMasked bool           // +checklocks:mu
	cmos      [128]uint8     // +checklocks:mu
	offset    int64          // +checklocks:mu (guest clock - host clock, seconds)
	warn      devices.Warner // +checklocks:mu
}

// New returns an RTC in its reset state that reads the host clock through
// now (time.Now if nil); the clock reads now's time in UTC. Warnings go to
// slog.Default() as it is when New runs.
func New(now func() time.Time) *RTC {
	if now == nil {
		now = time.Now
	}
	r := &RTC{now: now}
	r.cmos[regA] = resetA
	r.cmos[regB] = resetB
	r.warn.Log = slog.Default().With("device", "rtc")
	return r
}

// SetLogger sends the RTC's warnings to l instead of slog.Default().
func (r *RTC) SetLogger(l *slog.Logger) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.warn.Log = l
}

// Read implements devices.Device.Read. Offset 0 (index port) reads 0xff;
// offset 1 reads the selected byte. Other offsets and sizes read 0xff.
func (r *RTC) Read(off uint64, p []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(p) != 1 || off != 1 {
		for i := range p {
			p[i] = 0xff
		}
		if len(p) != 1 || off >= Size {
			r.warn.Warn("bad read access", "offset", off, "size", len(p))
		}
		return
	}
	p[0] = r.readReg(r.index)
}

// Write implements devices.Device.Write. Offset 0 selects a byte (bit 7
// masks NMI), offset 1 writes it. Other offsets and sizes are ignored.
func (r *RTC) Write(off uint64, p []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(p) != 1 || off >= Size {
		r.warn.Warn("bad write access", "offset", off, "size", len(p))
		return
	}
	if off == 0 {
		r.index = p[0] & 0x7f
		r.nmiMasked = p[0]&0x80 != 0
		return
	}
	r.writeReg(r.index, p[0])
}

// NMIMasked reports whether the guest masked NMI through the index port.
func (r *RTC) NMIMasked() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.nmiMasked
}

// +checklocks:r.mu
func (r *RTC) setMode() bool { return r.cmos[regB]&bSET != 0 }

// guestNow returns the guest's clock.
//
// +checklocks:r.mu
func (r *RTC) guestNow() time.Time { return r.guestAt(r.now()) }

// guestAt returns the guest's clock at host time h: the same phase within
// the second, offset by whole seconds.
//
// +checklocks:r.mu
func (r *RTC) guestAt(h time.Time) time.Time {
	return time.Unix(h.Unix()+r.offset, int64(h.Nanosecond())).UTC()
}

// +checklocks:r.mu
func (r *RTC) readReg(i uint8) uint8 {
	switch {
	case i == regA:
		v := r.cmos[regA]
		if !r.setMode() && r.guestNow().Nanosecond() >= int(time.Second-uipWindow) {
			v |= aUIP
		}
		return v
	case i == regC:
		return 0
	case i == regD:
		return dVRT
	case isTime(i) && !r.setMode():
		var regs [128]uint8
		r.fill(&regs, r.guestNow())
		return regs[i]
	}
	return r.cmos[i]
}

// +checklocks:r.mu
func (r *RTC) writeReg(i uint8, v uint8) {
	switch {
	case i == regA:
		r.cmos[regA] = v &^ aUIP
	case i == regB:
		wasSet := r.setMode()
		if v&bSET != 0 {
			v &^= bUIE // setting SET clears UIE
		}
		r.cmos[regB] = v
		switch {
		case v&bSET != 0 && !wasSet:
			r.fill(&r.cmos, r.guestNow())
		case v&bSET == 0 && wasSet:
			r.setOffset(r.parse(&r.cmos), r.now())
		}
	case i == regC || i == regD:
		// read-only
	case isTime(i) && !r.setMode():
		if i == regDayOfWeek {
			return // follows the date
		}
		h := r.now()
		var regs [128]uint8
		r.fill(&regs, r.guestAt(h))
		regs[i] = v
		r.setOffset(r.parse(&regs), h)
	default:
		r.cmos[i] = v
	}
}

// setOffset makes the guest clock read t's second at host time h.
//
// +checklocks:r.mu
func (r *RTC) setOffset(t, h time.Time) {
	r.offset = max(-maxOffset, min(maxOffset, t.Unix()-h.Unix()))
}

// +checklocks:r.mu
func (r *RTC) encode(v int) uint8 {
	if r.cmos[regB]&bDM != 0 {
		return uint8(v)
	}
	return uint8(v/10%10<<4 | v%10)
}

// +checklocks:r.mu
func (r *RTC) decode(b uint8) int {
	if r.cmos[regB]&bDM != 0 {
		return int(b)
	}
	return int(b>>4)*10 + int(b&0x0f)
}

// fill writes t into the clock registers of regs in the format of
// register B.
//
// +checklocks:r.mu
func (r *RTC) fill(regs *[128]uint8, t time.Time) {
	regs[regSeconds] = r.encode(t.Second())
	regs[regMinutes] = r.encode(t.Minute())
	h := t.Hour()
	if r.cmos[regB]&b24 != 0 {
		regs[regHours] = r.encode(h)
	} else {
		h12 := h % 12
		if h12 == 0 {
			h12 = 12
		}
		regs[regHours] = r.encode(h12)
		if h >= 12 {
			regs[regHours] |= hourPM
		}
	}
	regs[regDayOfWeek] = r.encode(int(t.Weekday()) + 1)
	regs[regDayOfMonth] = r.encode(t.Day())
	regs[regMonth] = r.encode(int(t.Month()))
	regs[regYear] = r.encode(t.Year() % 100)
	regs[regCentury] = r.encode(t.Year() / 100 % 100)
}

// parse reads the clock registers of regs in the format of register B.
// Out-of-range fields are normalised by time.Date.
//
// +checklocks:r.mu
func (r *RTC) parse(regs *[128]uint8) time.Time {
	hb := regs[regHours]
	var h int
	if r.cmos[regB]&b24 != 0 {
		h = r.decode(hb)
	} else {
		h = r.decode(hb &^ hourPM)
		if h == 12 {
			h = 0
		}
		if hb&hourPM != 0 {
			h += 12
		}
	}
	year := r.decode(regs[regCentury])*100 + r.decode(regs[regYear])
	return time.Date(year, time.Month(r.decode(regs[regMonth])), r.decode(regs[regDayOfMonth]),
		h, r.decode(regs[regMinutes]), r.decode(regs[regSeconds]), 0, time.UTC)
}

// Save returns the RTC's state.
func (r *RTC) Save() State {
	r.mu.Lock()
	defer r.mu.Unlock()
	return State{
		Version:       StateVersion,
		Index:         r.index,
		NMIMasked:     r.nmiMasked,
		CMOS:          r.cmos,
		OffsetSeconds: r.offset,
	}
}

// Restore replaces the RTC's state with st after checking it. On error the
// RTC is unchanged.
func (r *RTC) Restore(st State) error {
	if err := st.validate(); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.index, r.nmiMasked, r.cmos, r.offset = st.Index, st.NMIMasked, st.CMOS, st.OffsetSeconds
	return nil
}
