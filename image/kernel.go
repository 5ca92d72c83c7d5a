package image

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Kernel is a Debian kernel extracted into the cache.
type Kernel struct {
	Version    string // uname -r, e.g. "6.1.0-57-amd64"
	BzImage    string // the package's vmlinuz (XZ-compressed, boot protocol 2.15)
	Vmlinux    string // the unpacked ELF with a PVH note
	ModulesDir string // .../lib/modules/<Version>
}

const (
	// metaPackage is Debian's "current generic kernel" package; it depends
	// on the versioned one (linux-image-<version>).
	metaPackage   = "linux-image-amd64"
	kernelPrefix  = "linux-image-"
	completeMark  = ".complete"
	vmlinuxName   = "vmlinux"
	maxPayloadLen = 256 << 20 // a vmlinuz is ~8 MiB; refuse absurd headers
)

// progressKey carries the progress printer in a context.
type progressKey struct{}

// WithProgress returns a context under which DebianKernel and BuildDefault
// report what they are doing (downloads, extraction, timing) through f.
func WithProgress(ctx context.Context, f func(format string, args ...any)) context.Context {
	return context.WithValue(ctx, progressKey{}, f)
}

func progress(ctx context.Context, format string, args ...any) {
	if f, ok := ctx.Value(progressKey{}).(func(string, ...any)); ok && f != nil {
		f(format, args...)
	}
}

// DebianKernel returns Debian 12's current generic kernel, extracted under
// cacheDir/kernel/<version>/. When a complete extraction is in the cache it
// returns at once, without running apt (the newest cached version wins;
// remove cacheDir/kernel to pick up a newer package). Otherwise it asks
// apt-cache which versioned package linux-image-amd64 depends on (running
// apt-get update only when apt knows nothing), downloads it with apt-get
// download, extracts it with dpkg-deb -x and unpacks the bzImage's XZ
// payload into vmlinux.
func DebianKernel(ctx context.Context, cacheDir string) (*Kernel, error) {
	root := filepath.Join(cacheDir, "kernel")
	if k := newestCachedKernel(root); k != nil {
		return k, nil
	}
	pkg, err := kernelPackage(ctx)
	if err != nil {
		return nil, err
	}
	version := strings.TrimPrefix(pkg, kernelPrefix)
	if k, err := kernelAt(root, version); err == nil {
		return k, nil
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("image: kernel cache: %w", err)
	}
	// Work in a temporary folder next to the final one, so the rename
	// that publishes it stays on one file system.
	work, err := os.MkdirTemp(root, ".tmp-"+version+"-")
	if err != nil {
		return nil, fmt.Errorf("image: kernel cache: %w", err)
	}
	defer os.RemoveAll(work)
	// apt-get download drops privileges to _apt when run as root; a
	// world-readable folder spares it the "unsandboxed" warning.
	if err := os.Chmod(work, 0o755); err != nil {
		return nil, fmt.Errorf("image: kernel cache: %w", err)
	}
	dl := filepath.Join(work, "download")
	tree := filepath.Join(work, "tree")
	if err := os.Mkdir(dl, 0o777); err != nil {
		return nil, fmt.Errorf("image: kernel cache: %w", err)
	}
	if err := os.Chmod(dl, 0o777); err != nil {
		return nil, fmt.Errorf("image: kernel cache: %w", err)
	}

	start := time.Now()
	progress(ctx, "downloading %s", pkg)
	if out, err := runIn(ctx, dl, "apt-get", "download", "-q", pkg); err != nil {
		return nil, fmt.Errorf("image: apt-get download %s: %w%s", pkg, err, lastLine(out))
	}
	debs, _ := filepath.Glob(filepath.Join(dl, "*.deb"))
	if len(debs) != 1 {
		return nil, fmt.Errorf("image: apt-get download %s: found %d .deb files, want 1", pkg, len(debs))
	}
	fi, _ := os.Stat(debs[0])
	progress(ctx, "downloaded %s (%s) in %s", filepath.Base(debs[0]), sizeString(fi.Size()), since(start))

	start = time.Now()
	if out, err := runIn(ctx, work, "dpkg-deb", "-x", debs[0], tree); err != nil {
		return nil, fmt.Errorf("image: dpkg-deb -x %s: %w%s", filepath.Base(debs[0]), err, lastLine(out))
	}
	k, err := kernelFiles(tree, version, "modules.order")
	if err != nil {
		return nil, fmt.Errorf("image: package %s: %w", pkg, err)
	}
	if err := writeModulesDep(ctx, k.ModulesDir); err != nil {
		return nil, err
	}
	progress(ctx, "extracted %s and made modules.dep in %s", pkg, since(start))

	start = time.Now()
	if err := unpackVmlinux(ctx, k.BzImage, k.Vmlinux); err != nil {
		return nil, err
	}
	if fi, err := os.Stat(k.Vmlinux); err == nil {
		progress(ctx, "unpacked vmlinux (%s) in %s", sizeString(fi.Size()), since(start))
	}
	if err := os.WriteFile(filepath.Join(tree, completeMark), []byte(pkg+"\n"), 0o644); err != nil {
		return nil, fmt.Errorf("image: kernel cache: %w", err)
	}
	final := filepath.Join(root, version)
	if err := os.Rename(tree, final); err != nil {
		// Another build may have published the same version meanwhile.
		if k, err2 := kernelAt(root, version); err2 == nil {
			return k, nil
		}
		return nil, fmt.Errorf("image: kernel cache: %w", err)
	}
	return kernelAt(root, version)
}

// kernelFiles returns the paths of the kernel's files under dir, checking
// that the bzImage exists and the modules folder holds the file named
// index.
func kernelFiles(dir, version, index string) (*Kernel, error) {
	k := &Kernel{
		Version: version,
		BzImage: filepath.Join(dir, "boot", "vmlinuz-"+version),
		Vmlinux: filepath.Join(dir, vmlinuxName),
	}
	if !fileExists(k.BzImage) {
		return nil, fmt.Errorf("no boot/vmlinuz-%s", version)
	}
	// Bookworm ships /lib/modules; later releases (merged /usr) ship
	// /usr/lib/modules.
	for _, m := range []string{"lib/modules", "usr/lib/modules"} {
		p := filepath.Join(dir, m, version)
		if fileExists(filepath.Join(p, index)) {
			k.ModulesDir = p
			return k, nil
		}
	}
	return nil, fmt.Errorf("no lib/modules/%s/%s", version, index)
}

// kernelAt returns the complete cached kernel root/version.
func kernelAt(root, version string) (*Kernel, error) {
	dir := filepath.Join(root, version)
	if !fileExists(filepath.Join(dir, completeMark)) {
		return nil, fmt.Errorf("image: kernel %s is not cached", version)
	}
	k, err := kernelFiles(dir, version, "modules.dep")
	if err != nil {
		return nil, fmt.Errorf("image: cached kernel %s: %w", version, err)
	}
	if !fileExists(k.Vmlinux) {
		return nil, fmt.Errorf("image: cached kernel %s: no vmlinux", version)
	}
	return k, nil
}

// newestCachedKernel returns the complete cached kernel with the highest
// version, or nil.
func newestCachedKernel(root string) *Kernel {
	ents, err := os.ReadDir(root)
	if err != nil {
		return nil
	}
	var best *Kernel
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		k, err := kernelAt(root, e.Name())
		if err != nil {
			continue
		}
		if best == nil || compareVersions(k.Version, best.Version) > 0 {
			best = k
		}
	}
	return best
}

// compareVersions compares kernel versions such as "6.1.0-57-amd64" the
// way a person would: runs of digits as numbers, the rest as text.
func compareVersions(a, b string) int {
	for a != "" && b != "" {
		ra, rb := leadingRun(a), leadingRun(b)
		da, db := isDigit(ra[0]), isDigit(rb[0])
		switch {
		case da && db:
			na, nb := strings.TrimLeft(ra, "0"), strings.TrimLeft(rb, "0")
			if len(na) != len(nb) {
				return cmpInt(len(na), len(nb))
			}
			if c := strings.Compare(na, nb); c != 0 {
				return c
			}
		case da != db:
			if da {
				return 1
			}
			return -1
		default:
			if c := strings.Compare(ra, rb); c != 0 {
				return c
			}
		}
		a, b = a[len(ra):], b[len(rb):]
	}
	return cmpInt(len(a), len(b))
}

func leadingRun(s string) string {
	d := isDigit(s[0])
	i := 1
	for i < len(s) && isDigit(s[i]) == d {
		i++
	}
	return s[:i]
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

func cmpInt(a, b int) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// kernelPackage returns the versioned package linux-image-amd64 depends on,
// running apt-get update once if apt-cache does not know it.
func kernelPackage(ctx context.Context) (string, error) {
	pkg, err := dependsOn(ctx)
	if err == nil {
		return pkg, nil
	}
	progress(ctx, "apt-cache knows no %s (%v): running apt-get update", metaPackage, err)
	if out, err := runIn(ctx, "", "apt-get", "update", "-q"); err != nil {
		return "", fmt.Errorf("image: apt-get update: %w%s", err, lastLine(out))
	}
	return dependsOn(ctx)
}

func dependsOn(ctx context.Context) (string, error) {
	out, err := runIn(ctx, "", "apt-cache", "depends", metaPackage)
	if err != nil {
		return "", fmt.Errorf("image: apt-cache depends %s: %w%s", metaPackage, err, lastLine(out))
	}
	pkg, ok := parseDepends(out)
	if !ok {
		return "", fmt.Errorf("image: apt-cache depends %s: no %s* dependency%s", metaPackage, kernelPrefix, lastLine(out))
	}
	return pkg, nil
}

// parseDepends finds the versioned kernel package in apt-cache depends
// output ("  Depends: linux-image-6.1.0-57-amd64").
func parseDepends(out []byte) (string, bool) {
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && strings.TrimPrefix(f[0], "|") == "Depends:" &&
			strings.HasPrefix(f[1], kernelPrefix) && f[1] != metaPackage &&
			!strings.ContainsAny(f[1], "<>/ ") {
			return f[1], true
		}
	}
	return "", false
}

// runIn runs a command in dir and returns its combined output.
func runIn(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive")
	return cmd.CombinedOutput()
}

// lastLine returns ": <the last non-empty line of out>", or "".
func lastLine(out []byte) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if l := strings.TrimSpace(lines[len(lines)-1]); l != "" {
		return ": " + l
	}
	return ""
}

// xzMagic starts every XZ stream.
var xzMagic = []byte{0xFD, '7', 'z', 'X', 'Z', 0x00}

// xzPayload returns the XZ stream inside a bzImage: where the setup
// header's payload_offset (boot protocol 2.08+) says, or else the first XZ
// magic in the file. The slice may run past the stream's end (xz
// --single-stream ignores what follows).
func xzPayload(bz []byte) ([]byte, error) {
	if len(bz) >= 0x250 && string(bz[0x202:0x206]) == "HdrS" && binary.LittleEndian.Uint16(bz[0x206:]) >= 0x208 {
		setup := int(bz[0x1F1])
		if setup == 0 {
			setup = 4
		}
		off := uint64(setup+1)*512 + uint64(binary.LittleEndian.Uint32(bz[0x248:]))
		n := uint64(binary.LittleEndian.Uint32(bz[0x24C:]))
		if n <= maxPayloadLen && off+n <= uint64(len(bz)) && bytes.HasPrefix(bz[off:], xzMagic) {
			return bz[off : off+n], nil
		}
	}
	i := bytes.Index(bz, xzMagic)
	if i < 0 {
		return nil, errors.New("no XZ stream (is the kernel compressed with another method?)")
	}
	return bz[i:], nil
}

// unpackVmlinux decompresses the bzImage's XZ payload into an ELF file at
// dst, atomically.
func unpackVmlinux(ctx context.Context, bzImage, dst string) error {
	bz, err := os.ReadFile(bzImage)
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	payload, err := xzPayload(bz)
	if err != nil {
		return fmt.Errorf("image: %s: %w", bzImage, err)
	}
	elf, err := xzDecompress(ctx, payload)
	if err != nil {
		return fmt.Errorf("image: unpacking %s: %w", filepath.Base(bzImage), err)
	}
	if !bytes.HasPrefix(elf, []byte("\x7fELF")) {
		return fmt.Errorf("image: unpacking %s: the payload is not an ELF file", filepath.Base(bzImage))
	}
	if err := writeFileAtomic(dst, elf, 0o644); err != nil {
		return fmt.Errorf("image: writing vmlinux: %w", err)
	}
	return nil
}

// xzDecompress runs xz -dc --single-stream over data (trailing bytes after
// the first stream are ignored).
func xzDecompress(ctx context.Context, data []byte) ([]byte, error) {
	if _, err := exec.LookPath("xz"); err != nil {
		return nil, errors.New("xz is not installed (apt-get install xz-utils)")
	}
	cmd := exec.CommandContext(ctx, "xz", "-dc", "--single-stream")
	cmd.Stdin = bytes.NewReader(data)
	var out, stderr bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("xz -dc: %w%s", err, lastLine(stderr.Bytes()))
	}
	return out.Bytes(), nil
}

func since(t time.Time) string { return time.Since(t).Round(time.Millisecond).String() }

// sizeString formats a byte count in binary units.
func sizeString(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
