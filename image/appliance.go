package image

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"collective/image/cpio"
)

// FormatVersion is the version of the appliance builder: bump it when the
// builder makes different bytes from the same inputs, so that every cached
// appliance is rebuilt.
const FormatVersion = 1

// DefaultCmdline is the default appliance's kernel command line, for a
// machine with a 16550 on COM1, an i8042, a debug-exit port at 0xf4, an MP
// table and no ACPI tables (and, for now, no PCI devices):
//
//   - console=ttyS0: kernel messages and /dev/console on COM1.
//   - quiet: only warnings on the console; every byte to the UART is a
//     VM exit, the main cost of booting in the nested world.
//   - panic=-1: reboot at once on a panic instead of hanging, so the VMM
//     exits rather than spinning forever.
//   - reboot=k: restart through the i8042 (0xfe), which our VMM turns
//     into an exit; the default would try ACPI and the BIOS first.
//   - acpi=off: there are no ACPI tables; skip the search for them (the
//     MP table describes the CPUs and the I/O APIC).
//   - pci=noearly: skip the early type-1 scan of every bus for chipset
//     quirks (on an old AMD CPU family it scans for a GART twice, about
//     7 s in the nested world); the normal PCI probe still runs.
//   - i8042.nopnp: there is no ACPI/PnP to describe the i8042; probe
//     the legacy ports. i8042.noaux: keyboard only, no PS/2 mouse port.
//   - 8250.nr_uarts=1: probe only COM1, not four legacy UARTs.
//   - tsc=reliable: trust the TSC (no watchdog clocksource to check it
//     against, and no HPET); no_timer_check: skip the check that the
//     timer interrupt works through the IOAPIC, which a vCPU preempted on
//     the host can fail.
const DefaultCmdline = "console=ttyS0 quiet panic=-1 reboot=k acpi=off pci=noearly " +
	"i8042.nopnp i8042.noaux 8250.nr_uarts=1 tsc=reliable no_timer_check"

// Appliance is a built appliance in the cache.
type Appliance struct {
	ID            string    // hex SHA-256 of all the inputs
	Kernel        string    // the unpacked vmlinux (PVH): the default kernel
	BzImage       string    // the same kernel as a bzImage
	Initrd        string    // the gzip-compressed newc initramfs
	Cmdline       string    // the default kernel command line
	Dir           string    // the appliance's folder
	KernelVersion string    // uname -r
	Created       time.Time // when it was built
	Size          int64     // bytes of the kernel files and the initrd
}

// manifest is manifest.json in an appliance's folder; file names are
// relative to it, so the folder can move.
type manifest struct {
	Format        int       `json:"format"`
	ID            string    `json:"id"`
	KernelVersion string    `json:"kernel_version"`
	Kernel        string    `json:"kernel"`
	BzImage       string    `json:"bzimage"`
	Initrd        string    `json:"initrd"`
	Cmdline       string    `json:"cmdline"`
	Created       time.Time `json:"created"`
	Modules       []string  `json:"modules"`
	Inputs        inputs    `json:"inputs"`
}

const (
	manifestName = "manifest.json"
	kernelName   = "vmlinux"
	bzImageName  = "bzImage"
	initrdName   = "initrd.gz"
	appliances   = "appliances"
)

// inputs is everything an appliance is made from; its ID is the SHA-256
// of their JSON encoding.
type inputs struct {
	Format        int         `json:"format"`
	KernelVersion string      `json:"kernel_version"`
	BzImage       string      `json:"bzimage_sha256"`
	Vmlinux       string      `json:"vmlinux_sha256"`
	Busybox       string      `json:"busybox_sha256"`
	Applets       []string    `json:"applets"`
	Modules       []fileInput `json:"modules"`
	Files         []rootFile  `json:"files"`
	Cmdline       string      `json:"cmdline"`
}

type fileInput struct {
	Path   string `json:"path"`
	SHA256 string `json:"sha256"`
}

// id returns the hex SHA-256 of in.
func (in *inputs) id() string {
	b, err := json.Marshal(in)
	if err != nil {
		panic(fmt.Sprintf("image: marshalling inputs: %v", err)) // plain data: cannot fail
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// BuildDefault returns the default appliance, building it under
// cacheDir/appliances/<ID>/ unless a build from the same inputs is there.
// It fetches the kernel (DebianKernel) and busybox-static as needed.
func BuildDefault(ctx context.Context, cacheDir string) (*Appliance, error) {
	k, err := DebianKernel(ctx, cacheDir)
	if err != nil {
		return nil, err
	}
	bb, err := staticBusybox(ctx, cacheDir)
	if err != nil {
		return nil, err
	}
	modules, err := loadModuleOrder(k.ModulesDir, ApplianceModules)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	in, err := gatherInputs(ctx, k, bb, modules)
	if err != nil {
		return nil, err
	}
	id := in.id()
	progress(ctx, "hashed the inputs in %s", since(start))
	root := filepath.Join(cacheDir, appliances)
	if a, err := load(filepath.Join(root, id)); err == nil {
		progress(ctx, "appliance %s is up to date", id[:12])
		return a, nil
	}

	start = time.Now()
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	work, err := os.MkdirTemp(root, ".tmp-"+id[:12]+"-")
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	defer os.RemoveAll(work)
	if err := os.Chmod(work, 0o755); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	initrd, err := buildInitrd(k, bb, in)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(work, initrdName), initrd, 0o644); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	progress(ctx, "wrote the initramfs (%s, %d modules) in %s", sizeString(int64(len(initrd))), len(modules), since(start))
	for _, f := range []struct{ src, dst string }{{k.Vmlinux, kernelName}, {k.BzImage, bzImageName}} {
		if err := linkOrCopy(f.src, filepath.Join(work, f.dst)); err != nil {
			return nil, fmt.Errorf("image: %w", err)
		}
	}
	m := manifest{
		Format:        FormatVersion,
		ID:            id,
		KernelVersion: k.Version,
		Kernel:        kernelName,
		BzImage:       bzImageName,
		Initrd:        initrdName,
		Cmdline:       in.Cmdline,
		Created:       time.Now().UTC().Truncate(time.Second),
		Modules:       modules,
		Inputs:        *in,
	}
	mb, err := json.MarshalIndent(m, "", "\t")
	if err != nil {
		return nil, fmt.Errorf("image: manifest: %w", err)
	}
	if err := os.WriteFile(filepath.Join(work, manifestName), append(mb, '\n'), 0o644); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	final := filepath.Join(root, id)
	if err := os.Rename(work, final); err != nil {
		// A concurrent build of the same inputs won the race.
		if a, err2 := load(final); err2 == nil {
			return a, nil
		}
		return nil, fmt.Errorf("image: %w", err)
	}
	return load(final)
}

// gatherInputs hashes everything the appliance is made from.
func gatherInputs(ctx context.Context, k *Kernel, busybox string, modules []string) (*inputs, error) {
	in := &inputs{
		Format:        FormatVersion,
		KernelVersion: k.Version,
		Files:         rootFiles(k.Version, modules),
		Cmdline:       DefaultCmdline,
	}
	var err error
	for _, f := range []struct {
		dst  *string
		path string
	}{{&in.BzImage, k.BzImage}, {&in.Vmlinux, k.Vmlinux}, {&in.Busybox, busybox}} {
		if *f.dst, err = hashFile(f.path); err != nil {
			return nil, fmt.Errorf("image: %w", err)
		}
	}
	for _, m := range modules {
		h, err := hashFile(filepath.Join(k.ModulesDir, m))
		if err != nil {
			return nil, fmt.Errorf("image: %w", err)
		}
		in.Modules = append(in.Modules, fileInput{Path: m, SHA256: h})
	}
	if in.Applets, err = busyboxApplets(ctx, busybox); err != nil {
		return nil, err
	}
	return in, nil
}

func hashFile(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("%s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// busyboxApplets returns busybox's applets as paths relative to / (from
// busybox --list-full: "bin/sh", "sbin/init", ...), sorted.
func busyboxApplets(ctx context.Context, busybox string) ([]string, error) {
	out, err := exec.CommandContext(ctx, busybox, "--list-full").Output()
	if err != nil {
		return nil, fmt.Errorf("image: %s --list-full: %w", busybox, err)
	}
	var applets []string
	for _, l := range strings.Fields(string(out)) {
		l = strings.TrimLeft(path.Clean("/"+l), "/")
		if l == "" || l == "init" || l == "bin/busybox" {
			continue
		}
		applets = append(applets, l)
	}
	if !slices.Contains(applets, "bin/sh") || !slices.Contains(applets, "sbin/init") {
		return nil, fmt.Errorf("image: %s has no sh or init applet", busybox)
	}
	sort.Strings(applets)
	return slices.Compact(applets), nil
}

// buildInitrd writes the initramfs: a gzip-compressed newc cpio archive.
func buildInitrd(k *Kernel, busybox string, in *inputs) ([]byte, error) {
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	if err := writeRoot(cpio.NewWriter(zw), k, busybox, in); err != nil {
		return nil, fmt.Errorf("image: initramfs: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("image: initramfs: %w", err)
	}
	return buf.Bytes(), nil
}

// writeRoot writes the appliance's root file system to w and closes w.
func writeRoot(w *cpio.Writer, k *Kernel, busybox string, in *inputs) error {
	made := map[string]bool{}
	var mkdirAll func(dir string) error
	mkdirAll = func(dir string) error {
		if dir == "." || dir == "" || made[dir] {
			return nil
		}
		if err := mkdirAll(path.Dir(dir)); err != nil {
			return err
		}
		made[dir] = true
		perm := fs.FileMode(0o755)
		if dir == "tmp" {
			perm = 0o777 | fs.ModeSticky
		}
		if dir == "root" {
			perm = 0o700
		}
		return w.Mkdir(dir, perm)
	}
	for _, d := range []string{"bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "root", "mnt", "etc"} {
		if err := mkdirAll(d); err != nil {
			return err
		}
	}
	// The kernel opens /dev/console for /init's stdio before /init mounts
	// devtmpfs over /dev.
	if err := w.Mknod("dev/console", fs.ModeDevice|fs.ModeCharDevice|0o600, 5, 1); err != nil {
		return err
	}
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return err
	}
	if err := w.WriteFile("bin/busybox", 0o755, bb); err != nil {
		return err
	}
	for _, a := range in.Applets {
		if err := mkdirAll(path.Dir(a)); err != nil {
			return err
		}
		if err := w.Symlink(a, "/bin/busybox"); err != nil {
			return err
		}
	}
	for _, f := range in.Files {
		if err := mkdirAll(path.Dir(f.Name)); err != nil {
			return err
		}
		if err := w.WriteFile(f.Name, fs.FileMode(f.Mode), []byte(f.Text)); err != nil {
			return err
		}
	}
	// The modules, and a modules.dep limited to them so that modprobe
	// works in the guest.
	modDir := "lib/modules/" + k.Version
	var dep strings.Builder
	md, err := readModuleDeps(k.ModulesDir)
	if err != nil {
		return err
	}
	for _, m := range in.Modules {
		data, err := os.ReadFile(filepath.Join(k.ModulesDir, m.Path))
		if err != nil {
			return err
		}
		if h := sha256.Sum256(data); hex.EncodeToString(h[:]) != m.SHA256 {
			return fmt.Errorf("%s changed while building", m.Path)
		}
		name := path.Join(modDir, m.Path)
		if before, ok := strings.CutSuffix(name, ".xz"); ok {
			// busybox insmod may lack XZ support: store it plain.
			if data, err = xzDecompress(context.Background(), data); err != nil {
				return fmt.Errorf("%s: %w", m.Path, err)
			}
			name = before
		}
		if err := mkdirAll(path.Dir(name)); err != nil {
			return err
		}
		if err := w.WriteFile(name, 0o644, data); err != nil {
			return err
		}
		dep.WriteString(strings.TrimSuffix(m.Path, ".xz") + ":")
		for _, d := range md.Deps[modName(m.Path)] {
			dep.WriteString(" " + strings.TrimSuffix(md.Path[d], ".xz"))
		}
		dep.WriteByte('\n')
	}
	if err := w.WriteFile(modDir+"/modules.dep", 0o644, []byte(dep.String())); err != nil {
		return err
	}
	return w.Close()
}

func readModuleDeps(modulesDir string) (*ModuleDeps, error) {
	f, err := os.Open(filepath.Join(modulesDir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ParseModulesDep(f)
}

// linkOrCopy hard-links src to dst, or copies it when they are on
// different file systems.
func linkOrCopy(src, dst string) error {
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, data, 0o644)
}

// load reads the appliance in dir.
func load(dir string) (*Appliance, error) {
	b, err := os.ReadFile(filepath.Join(dir, manifestName))
	if err != nil {
		return nil, err
	}
	var m manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("image: %s: %w", filepath.Join(dir, manifestName), err)
	}
	if m.ID != filepath.Base(dir) {
		return nil, fmt.Errorf("image: %s: id %q does not match the folder", dir, m.ID)
	}
	a := &Appliance{
		ID:            m.ID,
		Kernel:        filepath.Join(dir, m.Kernel),
		BzImage:       filepath.Join(dir, m.BzImage),
		Initrd:        filepath.Join(dir, m.Initrd),
		Cmdline:       m.Cmdline,
		Dir:           dir,
		KernelVersion: m.KernelVersion,
		Created:       m.Created,
	}
	for _, p := range []string{a.Kernel, a.BzImage, a.Initrd} {
		fi, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("image: appliance %s: %w", m.ID, err)
		}
		a.Size += fi.Size()
	}
	return a, nil
}

// List returns the appliances in cacheDir, newest first. Folders that are
// not complete appliances are skipped.
func List(cacheDir string) ([]Appliance, error) {
	ents, err := os.ReadDir(filepath.Join(cacheDir, appliances))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	var list []Appliance
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		if a, err := load(filepath.Join(cacheDir, appliances, e.Name())); err == nil {
			list = append(list, *a)
		}
	}
	sort.SliceStable(list, func(i, j int) bool { return list[i].Created.After(list[j].Created) })
	return list, nil
}

// isStaticELF reports whether p is an x86-64 ELF executable without an
// interpreter (statically linked).
func isStaticELF(p string) bool {
	f, err := elf.Open(p)
	if err != nil {
		return false
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return false
	}
	for _, ph := range f.Progs {
		if ph.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}

// staticBusybox returns a statically linked busybox: the host's
// /bin/busybox when it is one (Debian's busybox-static installs it there),
// else Debian's busybox-static package fetched with apt-get download and
// extracted into cacheDir/busybox-static (the host's own busybox package
// is left alone: busybox-static conflicts with it).
func staticBusybox(ctx context.Context, cacheDir string) (string, error) {
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		if isStaticELF(p) {
			return p, nil
		}
	}
	dir := filepath.Join(cacheDir, "busybox-static")
	bb := filepath.Join(dir, "bin", "busybox")
	if isStaticELF(bb) {
		return bb, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", fmt.Errorf("image: %w", err)
	}
	work, err := os.MkdirTemp(cacheDir, ".tmp-busybox-")
	if err != nil {
		return "", fmt.Errorf("image: %w", err)
	}
	defer os.RemoveAll(work)
	if err := os.Chmod(work, 0o777); err != nil {
		return "", fmt.Errorf("image: %w", err)
	}
	progress(ctx, "no static /bin/busybox: downloading busybox-static")
	if out, err := runIn(ctx, work, "apt-get", "download", "-q", "busybox-static"); err != nil {
		if _, err2 := runIn(ctx, "", "apt-get", "update", "-q"); err2 != nil {
			return "", fmt.Errorf("image: apt-get download busybox-static: %w%s", err, lastLine(out))
		}
		if out, err := runIn(ctx, work, "apt-get", "download", "-q", "busybox-static"); err != nil {
			return "", fmt.Errorf("image: apt-get download busybox-static: %w%s", err, lastLine(out))
		}
	}
	debs, _ := filepath.Glob(filepath.Join(work, "*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("image: apt-get download busybox-static: found %d .deb files, want 1", len(debs))
	}
	tree := filepath.Join(work, "tree")
	if out, err := runIn(ctx, work, "dpkg-deb", "-x", debs[0], tree); err != nil {
		return "", fmt.Errorf("image: dpkg-deb -x %s: %w%s", filepath.Base(debs[0]), err, lastLine(out))
	}
	if !isStaticELF(filepath.Join(tree, "bin", "busybox")) {
		return "", fmt.Errorf("image: %s has no static bin/busybox", filepath.Base(debs[0]))
	}
	os.RemoveAll(dir)
	if err := os.Rename(tree, dir); err != nil && !isStaticELF(bb) {
		return "", fmt.Errorf("image: %w", err)
	}
	return bb, nil
}
