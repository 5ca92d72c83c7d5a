package image

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"os"
	"os/exec"
	"testing"
	"time"

	"collective/internal/testenv"
	"collective/kvm/boot"
	"collective/kvm/guestmem"
)

func TestParseDepends(t *testing.T) {
	for _, tc := range []struct {
		name, out, want string
		ok              bool
	}{
		{"plain", "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n", "linux-image-6.1.0-57-amd64", true},
		{"alternative", "linux-image-amd64\n |Depends: linux-image-6.1.0-9-amd64\n", "linux-image-6.1.0-9-amd64", true},
		{"other deps first", "linux-image-amd64\n  Depends: foo\n  Recommends: bar\n  Depends: linux-image-6.12.1-amd64\n", "linux-image-6.12.1-amd64", true},
		{"virtual", "linux-image-amd64\n  Depends: <linux-image-6.1.0-1-amd64>\n", "", false},
		{"none", "E: No packages found\n", "", false},
		{"empty", "", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := parseDepends([]byte(tc.out))
			if got != tc.want || ok != tc.ok {
				t.Errorf("parseDepends = %q, %v; want %q, %v", got, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestCompareVersions(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{
		{"6.1.0-57-amd64", "6.1.0-9-amd64", 1},
		{"6.1.0-9-amd64", "6.1.0-57-amd64", -1},
		{"6.1.0-57-amd64", "6.1.0-57-amd64", 0},
		{"6.10.0-1-amd64", "6.9.0-1-amd64", 1},
		{"6.1.0-1-amd64", "6.1.0-1-amd64-rt", -1},
		{"6.1.0-01-amd64", "6.1.0-1-amd64", 0},
	} {
		if got := compareVersions(tc.a, tc.b); got != tc.want {
			t.Errorf("compareVersions(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}

// fakeBzImage returns a bzImage-shaped buffer whose setup header points
// at payload.
func fakeBzImage(payload []byte, goodHeader bool) []byte {
	const setupSects = 3
	bz := make([]byte, (setupSects+1)*512+100)
	bz[0x1F1] = setupSects
	copy(bz[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(bz[0x206:], 0x20F)
	binary.LittleEndian.PutUint32(bz[0x248:], 100)
	binary.LittleEndian.PutUint32(bz[0x24C:], uint32(len(payload)))
	if !goodHeader {
		binary.LittleEndian.PutUint32(bz[0x248:], 7)
	}
	bz = append(bz, payload...)
	return append(bz, "trailing"...)
}

func TestXZPayload(t *testing.T) {
	stream := append(append([]byte{}, xzMagic...), "stream"...)
	for _, good := range []bool{true, false} {
		got, err := xzPayload(fakeBzImage(stream, good))
		if err != nil {
			t.Fatalf("header ok=%v: %v", good, err)
		}
		if !bytes.HasPrefix(got, stream) {
			t.Errorf("header ok=%v: payload %q, want prefix %q", good, got, stream)
		}
		if good && len(got) != len(stream) {
			t.Errorf("payload length %d, want %d (from the header)", len(got), len(stream))
		}
	}
	if _, err := xzPayload(make([]byte, 4096)); err == nil {
		t.Error("xzPayload of zeros: no error")
	}
}

func TestXZDecompress(t *testing.T) {
	xz := testenv.RequireCommand(t, "xz")
	want := bytes.Repeat([]byte("\x7fELF collective "), 1000)
	cmd := exec.Command(xz, "-c", "--check=crc32")
	cmd.Stdin = bytes.NewReader(want)
	stream, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bzPath, elfPath := dir+"/bz", dir+"/vmlinux"
	if err := os.WriteFile(bzPath, fakeBzImage(stream, true), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unpackVmlinux(context.Background(), bzPath, elfPath); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(elfPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("unpacked %d bytes, want %d", len(got), len(want))
	}
}

// requireAptKernel returns the Debian kernel from the default cache,
// downloading it if needed. It skips under -short, and without apt-get
// (failing under CI=true).
func requireAptKernel(t *testing.T) (*Kernel, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("skipped under -short: downloads the Debian kernel package")
	}
	dir, err := DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	if newestCachedKernel(dir+"/kernel") == nil {
		testenv.RequireCommand(t, "apt-get")
		testenv.RequireCommand(t, "dpkg-deb")
		testenv.RequireCommand(t, "xz")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	ctx = WithProgress(ctx, t.Logf)
	start := time.Now()
	k, err := DebianKernel(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("DebianKernel: %s in %s", k.Version, time.Since(start))
	return k, dir
}

// hasPVHNote reports whether the ELF file has a Xen note of type 18
// (XEN_ELFNOTE_PHYS32_ENTRY).
func hasPVHNote(t *testing.T, path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		b := make([]byte, p.Filesz)
		if _, err := p.ReadAt(b, 0); err != nil {
			t.Fatalf("%s: note segment: %v", path, err)
		}
		for len(b) >= 12 {
			namesz := binary.LittleEndian.Uint32(b[0:])
			descsz := binary.LittleEndian.Uint32(b[4:])
			typ := binary.LittleEndian.Uint32(b[8:])
			name := align4(uint64(namesz))
			desc := align4(uint64(descsz))
			if 12+name+desc > uint64(len(b)) {
				break
			}
			if typ == 18 && string(bytes.TrimRight(b[12:12+uint64(namesz)], "\x00")) == "Xen" {
				return true
			}
			b = b[12+name+desc:]
		}
	}
	return false
}

func align4(n uint64) uint64 { return (n + 3) &^ 3 }

func TestDebianKernel(t *testing.T) {
	k, dir := requireAptKernel(t)
	for _, p := range []string{k.BzImage, k.Vmlinux, k.ModulesDir + "/modules.dep"} {
		if _, err := os.Stat(p); err != nil {
			t.Error(err)
		}
	}
	if !hasPVHNote(t, k.Vmlinux) {
		t.Errorf("%s has no Xen PVH note (type 18)", k.Vmlinux)
	}
	for _, p := range []string{k.BzImage, k.Vmlinux} {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		mem, err := guestmem.NewFake(boot.RAMLayout(512 << 20)...)
		if err != nil {
			t.Fatal(err)
		}
		e, err := boot.Load(mem, bytes.NewReader(b), int64(len(b)), boot.Config{Cmdline: "console=ttyS0", Initrd: []byte("initrd")})
		if err != nil {
			t.Errorf("boot.Load(%s): %v", p, err)
			continue
		}
		t.Logf("boot.Load(%s): %+v", p, *e)
	}
	order, err := loadModuleOrder(k.ModulesDir, ApplianceModules)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("module order: %v", order)
	md, err := os.Open(k.ModulesDir + "/modules.dep")
	if err != nil {
		t.Fatal(err)
	}
	deps, err := ParseModulesDep(md)
	md.Close()
	if err != nil {
		t.Fatal(err)
	}
	checkOrder(t, deps, order)
	// The second call is served from the cache, without apt.
	start := time.Now()
	t.Setenv("PATH", "/nonexistent")
	k2, err := DebianKernel(context.Background(), dir)
	if err != nil {
		t.Fatalf("cached DebianKernel without apt in PATH: %v", err)
	}
	if *k2 != *k {
		t.Errorf("cached kernel %+v, want %+v", *k2, *k)
	}
	t.Logf("cached DebianKernel: %s", time.Since(start))
}
