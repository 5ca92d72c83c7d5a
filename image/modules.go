package image

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
)

// ApplianceModules are the modules the default appliance loads, by name,
// in any order (ModuleOrder sorts them and adds their dependencies). A
// name the kernel has built in (modules.builtin) is skipped.
var ApplianceModules = []string{
	// virtio core and the PCI transport (legacy and modern helpers).
	"virtio", "virtio_ring", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
	// Devices.
	"virtio_blk", "failover", "net_failover", "virtio_net", "virtio_input",
	// /dev/input/event* for virtio-input (a keyboard and tablet for VNC).
	"evdev",
	// ext4 for disk layers: crc16, mbcache and jbd2 are its module
	// dependencies; it asks the crypto API for crc32c at mount time, a
	// request that needs modprobe, so crc32c_generic is loaded up front.
	"crc16", "mbcache", "jbd2", "crc32c_generic", "ext4",
	// pvpanic-pci (QEMU's 1b36:0011): a guest kernel panic is reported
	// to the VMM, which exits with status 1 instead of seeing a reset.
	"pvpanic", "pvpanic_pci",
}

// modName turns a module file name or a module name into the canonical
// name: no folder, no .ko or .ko.xz/.ko.gz/.ko.zst, '-' as '_'.
func modName(s string) string {
	s = filepath.Base(s)
	for _, ext := range []string{".ko.xz", ".ko.gz", ".ko.zst", ".ko"} {
		if strings.HasSuffix(s, ext) {
			s = strings.TrimSuffix(s, ext)
			break
		}
	}
	return strings.ReplaceAll(s, "-", "_")
}

// ModuleDeps is modules.dep read into memory.
type ModuleDeps struct {
	Path map[string]string   // module name -> path relative to the modules folder
	Deps map[string][]string // module name -> names of the modules it needs
}

// ParseModulesDep reads a modules.dep file ("kernel/a/b.ko: kernel/c.ko
// kernel/d.ko" per line; depmod lists all dependencies, transitively, but
// direct ones are enough here).
func ParseModulesDep(r io.Reader) (*ModuleDeps, error) {
	md := &ModuleDeps{Path: map[string]string{}, Deps: map[string][]string{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		mod, deps, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(mod) == "" {
			return nil, fmt.Errorf("modules.dep line %d: no \"module:\"", n)
		}
		mod = strings.TrimSpace(mod)
		name := modName(mod)
		md.Path[name] = mod
		var names []string
		for _, d := range strings.Fields(deps) {
			names = append(names, modName(d))
		}
		md.Deps[name] = names
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("modules.dep: %w", err)
	}
	return md, nil
}

// ModuleOrder returns the paths (relative to the modules folder) of the
// wanted modules and everything they depend on, each once, every module
// after its dependencies; among modules that do not depend on each other,
// the order of wanted is kept. Names in builtin are skipped. A wanted
// module or a dependency that is neither in md nor built in is an error,
// and so is a dependency cycle.
func (md *ModuleDeps) ModuleOrder(wanted []string, builtin map[string]bool) ([]string, error) {
	const (
		visiting = 1
		done     = 2
	)
	state := map[string]int{}
	var order []string
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		switch state[name] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("module dependency cycle: %s -> %s", strings.Join(chain, " -> "), name)
		}
		path, ok := md.Path[name]
		if !ok {
			if builtin[name] {
				state[name] = done
				return nil
			}
			if len(chain) > 0 {
				return fmt.Errorf("module %s (needed by %s) not found", name, chain[len(chain)-1])
			}
			return fmt.Errorf("module %s not found", name)
		}
		state[name] = visiting
		for _, d := range md.Deps[name] {
			if err := visit(d, append(chain, name)); err != nil {
				return err
			}
		}
		state[name] = done
		order = append(order, path)
		return nil
	}
	for _, w := range wanted {
		name := modName(w)
		if builtin[name] {
			continue
		}
		if err := visit(name, nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// readBuiltin reads modules.builtin (one path per line) as a set of names;
// a missing file is an empty set.
func readBuiltin(modulesDir string) (map[string]bool, error) {
	b, err := os.ReadFile(filepath.Join(modulesDir, "modules.builtin"))
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]bool{}, nil
	}
	if err != nil {
		return nil, err
	}
	set := map[string]bool{}
	for _, l := range strings.Fields(string(b)) {
		set[modName(l)] = true
	}
	return set, nil
}

// maxModinfo bounds the .modinfo section we read from a module.
const maxModinfo = 1 << 20

// modinfo returns a module's name (from name=, else the file name) and
// dependencies (depends=), read from its .modinfo ELF section.
func modinfo(ctx context.Context, path string) (name string, deps []string, err error) {
	var r io.ReaderAt
	if strings.HasSuffix(path, ".ko.xz") {
		data, err := os.ReadFile(path)
		if err != nil {
			return "", nil, err
		}
		raw, err := xzDecompress(ctx, data)
		if err != nil {
			return "", nil, fmt.Errorf("%s: %w", path, err)
		}
		r = bytes.NewReader(raw)
	} else {
		f, err := os.Open(path)
		if err != nil {
			return "", nil, err
		}
		defer f.Close()
		r = f
	}
	ef, err := elf.NewFile(r)
	if err != nil {
		return "", nil, fmt.Errorf("%s: %w", path, err)
	}
	sec := ef.Section(".modinfo")
	if sec == nil {
		return "", nil, fmt.Errorf("%s: no .modinfo section", path)
	}
	if sec.Size > maxModinfo {
		return "", nil, fmt.Errorf("%s: .modinfo of %d bytes", path, sec.Size)
	}
	data, err := sec.Data()
	if err != nil {
		return "", nil, fmt.Errorf("%s: .modinfo: %w", path, err)
	}
	name = modName(path)
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, _ := strings.Cut(string(kv), "=")
		switch k {
		case "name":
			if v != "" {
				name = modName(v)
			}
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d != "" {
					deps = append(deps, modName(d))
				}
			}
		}
	}
	return name, deps, nil
}

// writeModulesDep generates modulesDir/modules.dep, as depmod would (but
// listing direct dependencies only), from every module's .modinfo. Debian
// ships no modules.dep (its postinst runs depmod), and the host need not
// have kmod installed.
func writeModulesDep(ctx context.Context, modulesDir string) error {
	var files []string
	err := filepath.WalkDir(filepath.Join(modulesDir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && (strings.HasSuffix(p, ".ko") || strings.HasSuffix(p, ".ko.xz")) {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("image: modules: %w", err)
	}
	type info struct {
		rel, name string
		deps      []string
		err       error
	}
	infos := make([]info, len(files))
	var wg sync.WaitGroup
	next := make(chan int)
	for range min(runtime.NumCPU(), 8) {
		wg.Go(func() {
			for i := range next {
				rel, _ := filepath.Rel(modulesDir, files[i])
				name, deps, err := modinfo(ctx, files[i])
				infos[i] = info{rel: filepath.ToSlash(rel), name: name, deps: deps, err: err}
			}
		})
	}
	for i := range files {
		next <- i
	}
	close(next)
	wg.Wait()

	path := map[string]string{}
	for _, in := range infos {
		if in.err != nil {
			return fmt.Errorf("image: modules: %w", in.err)
		}
		path[in.name] = in.rel
	}
	sort.Slice(infos, func(i, j int) bool { return infos[i].rel < infos[j].rel })
	var buf bytes.Buffer
	for _, in := range infos {
		buf.WriteString(in.rel + ":")
		for _, d := range in.deps {
			p, ok := path[d]
			if !ok {
				return fmt.Errorf("image: modules: %s depends on %s, which is not in the package", in.rel, d)
			}
			buf.WriteString(" " + p)
		}
		buf.WriteByte('\n')
	}
	if err := writeFileAtomic(filepath.Join(modulesDir, "modules.dep"), buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("image: modules.dep: %w", err)
	}
	return nil
}

// loadModuleOrder reads modulesDir's modules.dep and modules.builtin and
// returns the order of the wanted modules and their dependencies.
func loadModuleOrder(modulesDir string, wanted []string) ([]string, error) {
	f, err := os.Open(filepath.Join(modulesDir, "modules.dep"))
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	defer f.Close()
	md, err := ParseModulesDep(f)
	if err != nil {
		return nil, fmt.Errorf("image: %s/%w", modulesDir, err)
	}
	builtin, err := readBuiltin(modulesDir)
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	order, err := md.ModuleOrder(slices.Clone(wanted), builtin)
	if err != nil {
		return nil, fmt.Errorf("image: %s: %w", modulesDir, err)
	}
	return order, nil
}
