package debugexit

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestExitCodes(t *testing.T) {
	tests := []struct {
		name  string
		off   uint64
		p     []byte
		codes []int
	}{
		{"byte 0", 0, []byte{0}, []int{0}},
		{"byte 1", 0, []byte{1}, []int{1}},
		{"byte 0x31", 0, []byte{0x31}, []int{0x31}},
		{"word", 0, []byte{0x34, 0x12}, []int{0x1234}},
		{"dword", 0, []byte{0x78, 0x56, 0x34, 0x12}, []int{0x12345678}},
		{"dword all ones", 0, []byte{0xff, 0xff, 0xff, 0xff}, []int{0xffffffff}},
		{"byte at offset 3", 3, []byte{7}, []int{7}},
		{"word at offset 2", 2, []byte{2, 0}, []int{2}},
		{"word across the end", 3, []byte{2, 0}, nil},
		{"qword", 0, make([]byte, 8), nil},
		{"empty", 0, nil, nil},
		{"outside", 4, []byte{1}, nil},
		{"far outside", 1 << 63, []byte{1}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var codes []int
			d := New(func(code int) { codes = append(codes, code) })
			d.Write(tt.off, tt.p)
			if diff := cmp.Diff(tt.codes, codes); diff != "" {
				t.Errorf("exit codes (-want +got):\n%s", diff)
			}
		})
	}
	New(nil).Write(0, []byte{1}) // no callback: nothing happens
}

func TestRead(t *testing.T) {
	d := New(func(int) { t.Error("read called Exit") })
	for _, tt := range []struct {
		off  uint64
		size int
		want byte
	}{{0, 1, 0}, {0, 4, 0}, {2, 2, 0}, {4, 1, 0xff}, {0, 8, 0xff}} {
		p := make([]byte, tt.size)
		d.Read(tt.off, p)
		for _, b := range p {
			if b != tt.want {
				t.Errorf("read %d bytes at %d = %x, want all %#x", tt.size, tt.off, p, tt.want)
				break
			}
		}
	}
}

func TestSaveRestore(t *testing.T) {
	d := New(nil)
	st := d.Save()
	d2 := New(nil)
	if err := d2.Restore(st); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if diff := cmp.Diff(st, d2.Save()); diff != "" {
		t.Errorf("Save after Restore (-want +got):\n%s", diff)
	}
	if err := d2.Restore(State{Version: 3}); err == nil || !strings.Contains(err.Error(), "version 3, want version 1") {
		t.Errorf("Restore of version 3 = %v", err)
	}
}
