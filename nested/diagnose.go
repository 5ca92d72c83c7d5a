package nested

import (
	"collective/internal/qemumon"
	"context"
	"fmt"
	"os"
	"time"
)

// l1NoKASLR keeps L1's kernel at its link address, so that the
// instruction pointers diagnose reads name functions of System.map.
const l1NoKASLR = "nokaslr"

// kallsymsName is the file, beside L1's kernel, that keeps the kernel's
// text symbols as L1's /proc/kallsyms lists them (Debian ships System.map
// only in its -dbg package).
const kallsymsName = "kallsyms-text"

// saveKallsyms copies L1's text symbols beside its kernel once, for
// diagnose. Errors are only a loss of symbol names.
func (h *Host) saveKallsyms(ctx context.Context) error {
	if _, err := os.Stat(h.sysmap); err == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	out, status, err := h.Run(ctx, "grep ' [tT] ' /proc/kallsyms")
	if err != nil || status != 0 {
		return fmt.Errorf("nested: reading L1's kallsyms: status %d, %v", status, err)
	}
	tmp := h.sysmap + ".tmp"
	if err := os.WriteFile(tmp, []byte(out), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, h.sysmap)
}

// diagnose asks QEMU's monitor where L1's vCPUs are, for an L1 that stopped
// answering: each vCPU's instruction pointer (sampled a few times, with
// the kernel function it falls in) and one full register dump. It never
// fails: what it could not learn, it says.
func (h *Host) diagnose() string {
	syms, _ := qemumon.LoadSymbols(h.sysmap)
	return qemumon.VCPUs(h.mon, syms)
}

// KernelSymbols returns the text symbols of L1's kernel (saved from L1's
// /proc/kallsyms at its first boot on this cache). The default appliance
// runs the same kernel, and through PVH at the same addresses (no KASLR
// without the decompressor), so they name an L2 appliance's addresses too.
func (h *Host) KernelSymbols() (qemumon.Symbols, error) {
	return qemumon.LoadSymbols(h.sysmap)
}
