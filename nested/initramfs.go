package nested

import (
	"bufio"
	"bytes"
	"context"
	_ "embed"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"

	"collective/image"
	"collective/image/cpio"
)

//go:embed init.sh
var initScript []byte

// l1Modules are the modules L1 loads, by name; their dependencies come
// along. kvm_amd gives /dev/kvm; virtio_pci carries virtio_console (the
// control port and hvc0) and the shared folder (9pnet_virtio, 9p).
var l1Modules = []string{"kvm_amd", "virtio_pci", "virtio_console", "9pnet_virtio", "9p"}

// qemuFirmware are the files under /usr/share/qemu that QEMU needs to
// boot a kernel with -M microvm or -M pc and no network card or display.
var qemuFirmware = []string{
	"bios-microvm.bin", "qboot.rom", "bios-256k.bin", "bios.bin", "kvmvapic.bin",
	"linuxboot.bin", "linuxboot_dma.bin", "pvh.bin", "vgabios-stdvga.bin",
}

// L1 paths of the files a script can rely on.
const (
	// CollectivePath is our command in L1 (the VMM build: run, restore).
	CollectivePath = "/bin/collective"
	// CollectiveToolsPath is the full build next to it, which collective
	// execs for its other commands.
	CollectiveToolsPath = "/bin/" + ToolsName
	// ApplianceDir holds the L2 appliance in L1: vmlinux (PVH ELF),
	// bzImage, initrd.img and cmdline (one line, no newline).
	ApplianceDir = "/appliance"
	// SharePath is where Options.Share is mounted in L1 (9p, read-write);
	// scripts start in it when it is mounted, in / otherwise.
	SharePath = "/host"
	// QEMUPath is qemu-system-x86_64 in L1 when Options.WithQEMU is set.
	QEMUPath = "/usr/bin/qemu-system-x86_64"
	// ApplianceRun is a shell command for L1 that boots the appliance
	// through PVH with its command line; append more flags for collective
	// run (--mem, --cpus, ...).
	ApplianceRun = CollectivePath + " run --kernel " + ApplianceDir + "/vmlinux --initrd " + ApplianceDir +
		"/initrd.img --append \"$(cat " + ApplianceDir + "/cmdline)\""
)

// layout is what goes into L1's initramfs.
type layout struct {
	modulesDir string
	collective string
	tools      string // collective-tools
	busybox    string
	appliance  *image.Appliance // nil: no /appliance
	qemu       string           // "" or the qemu-system-x86_64 to copy with its libraries
	share      bool             // mount Options.Share at /host
}

// archive writes cpio members, creating each parent folder once.
type archive struct {
	w    *cpio.Writer
	dirs map[string]bool
}

func (a *archive) mkdirAll(dir string) error {
	dir = strings.Trim(path.Clean("/"+dir), "/")
	if dir == "" || a.dirs[dir] {
		return nil
	}
	if err := a.mkdirAll(path.Dir(dir)); err != nil {
		return err
	}
	a.dirs[dir] = true
	return a.w.Mkdir(dir, 0o755)
}

func (a *archive) file(name string, perm fs.FileMode, data []byte) error {
	if err := a.mkdirAll(path.Dir(name)); err != nil {
		return err
	}
	return a.w.WriteFile(name, perm, data)
}

// copy adds the host file src (symbolic links followed) as name, keeping
// its permission bits.
func (a *archive) copy(name, src string) error {
	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return a.file(name, fi.Mode().Perm(), data)
}

// writeInitramfs writes L1's initramfs, an uncompressed newc archive (the
// L1 kernel copies it to its rootfs faster than it would inflate it under
// TCG).
func writeInitramfs(ctx context.Context, w io.Writer, l layout) error {
	a := &archive{w: cpio.NewWriter(w), dirs: map[string]bool{}}
	for _, d := range []string{"bin", "dev", "proc", "sys", "tmp", "run", "root", "etc/nested", SharePath} {
		if err := a.mkdirAll(d); err != nil {
			return err
		}
	}
	if err := a.file("init", 0o755, initScript); err != nil {
		return err
	}
	if err := a.copy("bin/busybox", l.busybox); err != nil {
		return fmt.Errorf("busybox: %w", err)
	}
	if err := a.copy(CollectivePath, l.collective); err != nil {
		return fmt.Errorf("collective binary: %w", err)
	}
	if err := a.copy(CollectiveToolsPath, l.tools); err != nil {
		return fmt.Errorf("collective-tools binary: %w", err)
	}

	order, err := loadModuleOrder(l.modulesDir)
	if err != nil {
		return err
	}
	for _, m := range order {
		if err := a.copy("lib/modules/"+m, filepath.Join(l.modulesDir, m)); err != nil {
			return fmt.Errorf("module: %w", err)
		}
	}
	if err := a.file("etc/nested/modules", 0o644, []byte(strings.Join(order, "\n")+"\n")); err != nil {
		return err
	}
	if l.share {
		if err := a.file("etc/nested/share", 0o644, nil); err != nil {
			return err
		}
	}

	if ap := l.appliance; ap != nil {
		for _, f := range []struct{ name, src string }{
			{"vmlinux", ap.Kernel}, {"bzImage", ap.BzImage}, {"initrd.img", ap.Initrd},
		} {
			if err := a.copy(path.Join(ApplianceDir, f.name), f.src); err != nil {
				return fmt.Errorf("appliance: %w", err)
			}
		}
		if err := a.file(path.Join(ApplianceDir, "cmdline"), 0o644, []byte(ap.Cmdline)); err != nil {
			return err
		}
	}

	if l.qemu != "" {
		if err := addQEMU(ctx, a, l.qemu); err != nil {
			return fmt.Errorf("qemu for L1: %w", err)
		}
	}
	return a.w.Close()
}

// loadModuleOrder returns L1's modules in insmod order, as paths relative
// to modulesDir, from its modules.dep.
func loadModuleOrder(modulesDir string) ([]string, error) {
	f, err := os.Open(filepath.Join(modulesDir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	md, err := image.ParseModulesDep(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", modulesDir, err)
	}
	order, err := md.ModuleOrder(l1Modules, nil)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", modulesDir, err)
	}
	return order, nil
}

// addQEMU adds qemu-system-x86_64 at QEMUPath, the shared libraries ldd
// lists at their own paths, and the firmware it needs.
func addQEMU(ctx context.Context, a *archive, qemu string) error {
	if err := a.copy(QEMUPath, qemu); err != nil {
		return err
	}
	libs, err := lddPaths(ctx, qemu)
	if err != nil {
		return err
	}
	for _, lib := range libs {
		if err := a.copy(lib, lib); err != nil {
			return err
		}
	}
	// Debian's QEMU looks in its firmware path: /usr/share/qemu, then
	// /usr/share/seabios (package seabios: bios-256k.bin for -M pc).
	for _, dir := range []string{"usr/share/qemu", "usr/share/seabios"} {
		for _, f := range qemuFirmware {
			src := filepath.Join("/", dir, f)
			if _, err := os.Stat(src); err != nil {
				continue // not every QEMU build ships every file
			}
			if err := a.copy(path.Join(dir, f), src); err != nil {
				return err
			}
		}
	}
	return nil
}

// lddPaths returns the absolute paths of the shared libraries (and the
// dynamic loader) that ldd lists for bin.
func lddPaths(ctx context.Context, bin string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", bin).Output()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w", bin, err)
	}
	return parseLdd(out), nil
}

// parseLdd reads ldd's output: "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1
// (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)", "linux-vdso.so.1 (0x...)".
func parseLdd(out []byte) []string {
	var paths []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			paths = append(paths, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			paths = append(paths, f[0])
		}
	}
	return paths
}
