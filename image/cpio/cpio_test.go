package cpio

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// entry is a member read back.
type entry struct {
	Name             string
	Ino, Mode, Nlink uint32
	Mtime            uint32
	RMajor, RMinor   uint32
	Data             string
}

// readArchive parses a newc archive, checking magic, padding and the
// trailer, and returns its members without the trailer.
func readArchive(t *testing.T, b []byte) []entry {
	t.Helper()
	var out []entry
	off := 0
	for {
		if off+headerSize > len(b) {
			t.Fatalf("truncated header at %d", off)
		}
		h := b[off : off+headerSize]
		if string(h[:6]) != magic {
			t.Fatalf("bad magic %q at %d", h[:6], off)
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(string(h[6+8*i:][:8]), 16, 32)
			if err != nil {
				t.Fatalf("field %d at %d: %v", i, off, err)
			}
			return uint32(v)
		}
		size, namesize := int(field(6)), int(field(11))
		if field(2) != 0 || field(3) != 0 || field(12) != 0 {
			t.Errorf("uid/gid/check not zero at %d", off)
		}
		nameEnd := off + headerSize + namesize
		if namesize == 0 || nameEnd > len(b) || b[nameEnd-1] != 0 {
			t.Fatalf("bad name at %d", off)
		}
		name := string(b[off+headerSize : nameEnd-1])
		dataOff := (nameEnd + 3) &^ 3
		if !allZero(b[nameEnd:dataOff]) {
			t.Errorf("%s: name padding not zero", name)
		}
		end := dataOff + size
		if end > len(b) {
			t.Fatalf("%s: data runs past the end", name)
		}
		next := (end + 3) &^ 3
		if next > len(b) || !allZero(b[end:next]) {
			t.Fatalf("%s: bad data padding", name)
		}
		if name == trailer {
			if next != len(b) {
				t.Errorf("%d bytes after the trailer", len(b)-next)
			}
			return out
		}
		out = append(out, entry{
			Name: name, Ino: field(0), Mode: field(1), Nlink: field(4), Mtime: field(5),
			RMajor: field(9), RMinor: field(10), Data: string(b[dataOff:end]),
		})
		off = next
	}
}

func allZero(b []byte) bool { return len(bytes.Trim(b, "\x00")) == 0 }

// sample writes an archive with every member kind and name lengths that
// exercise every padding.
func sample(t *testing.T) ([]byte, []entry) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.ModTime = 1234
	var want []entry
	ino := uint32(0)
	add := func(err error, e entry) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		ino++
		e.Ino, e.Mtime = ino, 1234
		want = append(want, e)
	}
	add(w.Mkdir("/bin", 0o755), entry{Name: "bin", Mode: TypeDir | 0o755, Nlink: 2})
	add(w.Mkdir("dev", 0o755), entry{Name: "dev", Mode: TypeDir | 0o755, Nlink: 2})
	add(w.Mknod("dev/console", fs.ModeDevice|fs.ModeCharDevice|0o600, 5, 1),
		entry{Name: "dev/console", Mode: TypeChar | 0o600, Nlink: 1, RMajor: 5, RMinor: 1})
	add(w.Mknod("dev/vda", fs.ModeDevice|0o660, 254, 0),
		entry{Name: "dev/vda", Mode: TypeBlock | 0o660, Nlink: 1, RMajor: 254})
	add(w.Symlink("bin/sh", "busybox"), entry{Name: "bin/sh", Mode: TypeSymlink | 0o777, Nlink: 1, Data: "busybox"})
	add(w.WriteFile("init", 0o755, []byte("#!/bin/sh\n")), entry{Name: "init", Mode: TypeReg | 0o755, Nlink: 1, Data: "#!/bin/sh\n"})
	add(w.WriteFile("tmp-sticky", 0o777|fs.ModeSticky|fs.ModeSetuid, nil), entry{Name: "tmp-sticky", Mode: TypeReg | 0o5777, Nlink: 1})
	for n := 1; n <= 8; n++ {
		name := strings.Repeat("n", n)
		data := strings.Repeat("d", n+3)
		add(w.WriteFile(name, 0o644, []byte(data)), entry{Name: name, Mode: TypeReg | 0o644, Nlink: 1, Data: data})
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), want
}

func TestRoundTrip(t *testing.T) {
	b, want := sample(t)
	if len(b)%4 != 0 {
		t.Errorf("archive length %d is not a multiple of 4", len(b))
	}
	if diff := cmp.Diff(want, readArchive(t, b)); diff != "" {
		t.Errorf("members (-want +got):\n%s", diff)
	}
	b2, _ := sample(t)
	if !bytes.Equal(b, b2) {
		t.Error("two identical archives differ")
	}
}

func TestEmpty(t *testing.T) {
	var buf bytes.Buffer
	if err := NewWriter(&buf).Close(); err != nil {
		t.Fatal(err)
	}
	if got := readArchive(t, buf.Bytes()); len(got) != 0 {
		t.Errorf("members %v, want none", got)
	}
	// The trailer alone: 110 + 11 bytes, padded to 124.
	if buf.Len() != 124 {
		t.Errorf("empty archive is %d bytes, want 124", buf.Len())
	}
}

func TestErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		f    func(w *Writer) error
	}{
		{"empty name", func(w *Writer) error { return w.WriteFile("", 0o644, nil) }},
		{"root", func(w *Writer) error { return w.Mkdir("/", 0o755) }},
		{"dotdot", func(w *Writer) error { return w.WriteFile("a/../b", 0o644, nil) }},
		{"double slash", func(w *Writer) error { return w.WriteFile("a//b", 0o644, nil) }},
		{"NUL", func(w *Writer) error { return w.WriteFile("a\x00b", 0o644, nil) }},
		{"trailer name", func(w *Writer) error { return w.WriteFile(trailer, 0o644, nil) }},
		{"long name", func(w *Writer) error { return w.WriteFile(strings.Repeat("a", MaxNameLen+1), 0o644, nil) }},
		{"empty target", func(w *Writer) error { return w.Symlink("a", "") }},
		{"not a device", func(w *Writer) error { return w.Mknod("a", 0o644, 1, 1) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			w := NewWriter(&buf)
			if err := tc.f(w); err == nil {
				t.Fatal("no error")
			}
			// The error is sticky.
			if err := w.WriteFile("ok", 0o644, nil); err == nil {
				t.Error("no error after a failed call")
			}
			if err := w.Close(); err == nil {
				t.Error("Close: no error after a failed call")
			}
		})
	}
	w := NewWriter(&bytes.Buffer{})
	w.Close()
	if err := w.Mkdir("a", 0o755); !errors.Is(err, ErrClosed) {
		t.Errorf("Mkdir after Close: %v, want ErrClosed", err)
	}
}

type failWriter struct{ n int }

func (f *failWriter) Write(p []byte) (int, error) {
	if f.n--; f.n < 0 {
		return 0, fmt.Errorf("disk full")
	}
	return len(p), nil
}

func TestWriteError(t *testing.T) {
	w := NewWriter(&failWriter{n: 1})
	if err := w.WriteFile("a", 0o644, []byte("data")); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("err = %v, want disk full", err)
	}
	if err := w.Close(); err == nil {
		t.Error("Close: no error")
	}
}

// TestCpioTool lists the archive with GNU cpio, when it is installed: an
// extra check (TestRoundTrip is the one that must run), so it skips even
// under CI=true.
func TestCpioTool(t *testing.T) {
	cpio, err := exec.LookPath("cpio")
	if err != nil {
		t.Skip("cpio is not installed (apt-get install cpio)")
	}
	b, want := sample(t)
	cmd := exec.Command(cpio, "-itv", "--quiet")
	cmd.Stdin = bytes.NewReader(b)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -itv: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != len(want) {
		t.Fatalf("cpio -itv listed %d members, want %d:\n%s", len(lines), len(want), out)
	}
	for i, l := range lines {
		if !strings.Contains(l, want[i].Name) {
			t.Errorf("line %d %q does not name %s", i, l, want[i].Name)
		}
	}
	if !strings.HasPrefix(lines[2], "crw-------") || !strings.Contains(lines[4], "bin/sh -> busybox") {
		t.Errorf("cpio -itv:\n%s", out)
	}
	// Extract and compare a file's content.
	dir := t.TempDir()
	cmd = exec.Command(cpio, "-id", "--quiet", "--no-absolute-filenames", "init", "nnnn")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(b)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -id: %v\n%s", err, out)
	}
	for _, f := range []string{"init", "nnnn"} {
		got, err := os.ReadFile(dir + "/" + f)
		if err != nil {
			t.Fatal(err)
		}
		if fi, _ := os.Stat(dir + "/" + f); f == "init" && fi.Mode().Perm() != 0o755 {
			t.Errorf("init mode %v", fi.Mode())
		}
		for _, e := range want {
			if e.Name == f && string(got) != e.Data {
				t.Errorf("%s = %q, want %q", f, got, e.Data)
			}
		}
	}
}
