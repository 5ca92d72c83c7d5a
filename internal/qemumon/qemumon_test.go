package qemumon

import (
	"os"
	"path/filepath"
	"testing"
)

func TestName(t *testing.T) {
	syms := Symbols{{0xffffffff81000000, "_stext"}, {0xffffffff81000100, "native_safe_halt"}, {0xffffffff81000200, "next"}}
	for _, tc := range []struct{ in, want string }{
		{"ffffffff81000123", "ffffffff81000123(native_safe_halt+0x23)"},
		{"ffffffff81000000", "ffffffff81000000(_stext+0x0)"},
		{"0000000000001000", "0000000000001000"},
		{"zz", "zz"},
	} {
		if got := syms.Name(tc.in); got != tc.want {
			t.Errorf("Name(%s) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

func TestLoadSymbols(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kallsyms")
	data := "ffffffff81000200 T next\nffffffff81000100 t native_safe_halt\t[kvm]\nffffffff81000000 D data\nbad line\n"
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	syms, err := LoadSymbols(path)
	if err != nil {
		t.Fatal(err)
	}
	want := Symbols{{0xffffffff81000100, "native_safe_halt"}, {0xffffffff81000200, "next"}}
	if len(syms) != len(want) || syms[0] != want[0] || syms[1] != want[1] {
		t.Errorf("LoadSymbols = %v, want %v", syms, want)
	}
}
