package nested

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
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

var ripRe = regexp.MustCompile(`RIP=([0-9a-f]{16})`)

// diagnose asks QEMU's monitor where L1's vCPUs are, for an L1 that stopped
// answering: each vCPU's instruction pointer (sampled a few times, with
// the kernel function it falls in) and one full register dump. It never
// fails: what it could not learn, it says.
func (h *Host) diagnose() string {
	var b strings.Builder
	var last string
	syms, _ := loadSystemMap(h.sysmap)
	for i := range 3 {
		out, err := h.monitor("info registers -a")
		if err != nil {
			return fmt.Sprintf("monitor: %v", err)
		}
		last = out
		fmt.Fprintf(&b, "sample %d:", i)
		for _, m := range ripRe.FindAllStringSubmatch(out, -1) {
			fmt.Fprintf(&b, " %s", symbolize(syms, m[1]))
		}
		b.WriteString("\n")
		time.Sleep(200 * time.Millisecond)
	}
	if len(last) > 4096 {
		last = last[:4096]
	}
	b.WriteString(last)
	return b.String()
}

// monitor runs one human-monitor command and returns its output.
func (h *Host) monitor(cmd string) (string, error) {
	c, err := net.DialTimeout("unix", h.mon, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	// The greeting ends with the first prompt.
	if err := readPrompt(r, nil); err != nil {
		return "", fmt.Errorf("greeting: %w", err)
	}
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
		return "", err
	}
	var out bytes.Buffer
	if err := readPrompt(r, &out); err != nil {
		return out.String(), fmt.Errorf("%s: %w", cmd, err)
	}
	return out.String(), nil
}

// readPrompt reads up to the monitor's "(qemu) " prompt, keeping what came
// before it in out.
func readPrompt(r *bufio.Reader, out *bytes.Buffer) error {
	const prompt = "(qemu) "
	var buf []byte
	for {
		c, err := r.ReadByte()
		if err != nil {
			return err
		}
		buf = append(buf, c)
		if bytes.HasSuffix(buf, []byte(prompt)) {
			if out != nil {
				out.Write(buf[:len(buf)-len(prompt)])
			}
			return nil
		}
		if len(buf) > 1<<20 {
			return fmt.Errorf("no prompt in 1 MiB")
		}
	}
}

// symbolize names the function of syms (sorted) holding address hex.
func symbolize(syms []symbol, hex string) string {
	addr, err := strconv.ParseUint(hex, 16, 64)
	if err != nil || len(syms) == 0 {
		return hex
	}
	i := sort.Search(len(syms), func(i int) bool { return syms[i].addr > addr }) - 1
	if i < 0 {
		return hex
	}
	return fmt.Sprintf("%s(%s+%#x)", hex, syms[i].name, addr-syms[i].addr)
}

type symbol struct {
	addr uint64
	name string
}

// loadSystemMap reads a System.map's text symbols, sorted by address.
func loadSystemMap(path string) ([]symbol, error) {
	if path == "" {
		return nil, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var syms []symbol
	for line := range strings.Lines(string(data)) {
		f := strings.Fields(line)
		if len(f) != 3 || (f[1] != "t" && f[1] != "T") {
			continue
		}
		a, err := strconv.ParseUint(f[0], 16, 64)
		if err != nil {
			continue
		}
		syms = append(syms, symbol{a, f[2]})
	}
	sort.Slice(syms, func(i, j int) bool { return syms[i].addr < syms[j].addr })
	return syms, nil
}
