// Package qemumon talks to QEMU's human monitor on a Unix socket, for the
// post-mortem of a QEMU guest that stopped answering: where each vCPU is,
// named from the guest kernel's symbols. Tests and the nested test host
// use it; it is not part of the VMM.
package qemumon

import (
	"bufio"
	"bytes"
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

// Command runs one human-monitor command on the monitor listening at the
// Unix socket sock and returns its output (without the echo of cmd).
func Command(sock, cmd string) (string, error) {
	c, err := net.DialTimeout("unix", sock, 2*time.Second)
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
	// The monitor first echoes the command, redrawn key by key.
	_, rest, _ := strings.Cut(out.String(), "\n")
	return rest, nil
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

var ripRe = regexp.MustCompile(`RIP=([0-9a-f]{16})`)

// VCPUs samples every vCPU's instruction pointer three times, 200 ms
// apart, each named from syms (see LoadSymbols; nil leaves addresses
// bare), and appends one full register dump (at most 4 KiB). It never
// fails: what it could not learn, it says.
func VCPUs(sock string, syms Symbols) string {
	var b strings.Builder
	var last string
	for i := range 3 {
		out, err := Command(sock, "info registers -a")
		if err != nil {
			return b.String() + fmt.Sprintf("monitor: %v", err)
		}
		last = out
		fmt.Fprintf(&b, "sample %d:", i)
		for _, m := range ripRe.FindAllStringSubmatch(out, -1) {
			fmt.Fprintf(&b, " %s", syms.Name(m[1]))
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

// Symbols are a kernel's text symbols, sorted by address.
type Symbols []Symbol

// A Symbol is one text symbol of a kernel.
type Symbol struct {
	Addr uint64
	Name string
}

// Name returns the hexadecimal address hex followed by the function it
// falls in, as "ffffffff81000123(native_safe_halt+0x23)", or hex alone
// when no symbol precedes it.
func (s Symbols) Name(hex string) string {
	addr, err := strconv.ParseUint(hex, 16, 64)
	if err != nil || len(s) == 0 {
		return hex
	}
	i := sort.Search(len(s), func(i int) bool { return s[i].Addr > addr }) - 1
	if i < 0 {
		return hex
	}
	return fmt.Sprintf("%s(%s+%#x)", hex, s[i].Name, addr-s[i].Addr)
}

// LoadSymbols reads the text symbols of a System.map or of a copy of
// /proc/kallsyms. A path of "" gives no symbols.
func LoadSymbols(path string) (Symbols, error) {
	if path == "" {
		return nil, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var syms Symbols
	for line := range strings.Lines(string(data)) {
		f := strings.Fields(line)
		if len(f) < 3 || (f[1] != "t" && f[1] != "T") {
			continue
		}
		a, err := strconv.ParseUint(f[0], 16, 64)
		if err != nil {
			continue
		}
		syms = append(syms, Symbol{a, f[2]})
	}
	sort.Slice(syms, func(i, j int) bool { return syms[i].Addr < syms[j].Addr })
	return syms, nil
}
