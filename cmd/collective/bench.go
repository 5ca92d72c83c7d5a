//go:build !vmm

package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// The bench command runs the workload guest under Collective and under
// QEMU side by side in one run, and prints medians and ratios.

type peer struct {
	name string
	cmd  func(guest, cmdline string, memMiB int) []string
}

func peers(self string) []peer {
	qemu := func(machine string) func(string, string, int) []string {
		return func(guest, cmdline string, memMiB int) []string {
			return []string{"qemu-system-x86_64", "-enable-kvm", "-M", machine, "-cpu", "host",
				"-m", strconv.Itoa(memMiB), "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
				"-device", "isa-debug-exit,iobase=0xf4,iosize=4",
				"-kernel", guest, "-append", cmdline}
		}
	}
	return []peer{
		{"collective", func(guest, cmdline string, memMiB int) []string {
			return []string{self, "run", "--kernel", guest, "--append", cmdline, "--mem", fmt.Sprintf("%dM", memMiB)}
		}},
		{"qemu-microvm", qemu("microvm")},
		{"qemu-pc", qemu("pc")},
	}
}

func benchCmd(args []string) int {
	// Linux in the nested test host (bench_linux.go): its own flags, no
	// workload guest.
	if len(args) > 0 && args[0] == "linux" {
		return benchLinux(args[1:])
	}
	if len(args) > 0 && args[0] == "linux-drive" {
		return benchLinuxDrive(args[1:])
	}
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	guest := fs.String("guest", "guest/build/guest.elf", "workload guest ELF")
	runs := fs.Int("runs", 10, "runs per peer (the median is reported)")
	exits := fs.Int("exits", 200000, "exits per run for the exit benchmark")
	skipPC := fs.Bool("skip-pc", false, "skip QEMU -M pc (its firmware is slow under kvm-pvm)")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: collective bench [flags] boot|exits|memory|snapshot|blk|migrate|all\n       collective bench linux [flags]   (Linux boot in the nested host, ours vs QEMU)\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	self, err := vmmBinary()
	if err != nil {
		fmt.Fprintln(os.Stderr, "collective bench:", err)
		return 1
	}
	if _, err := os.Stat(*guest); err != nil {
		fmt.Fprintf(os.Stderr, "collective bench: %v (build it with make guest)\n", err)
		return 2
	}
	ps := peers(self)
	if *skipPC {
		ps = ps[:2]
	}
	which := fs.Arg(0)
	switch which {
	case "all", "boot", "exits", "memory", "snapshot", "blk", "migrate":
	default:
		fs.Usage()
		return 2
	}
	if note := hostNote(); note != "" {
		fmt.Fprint(os.Stderr, note)
	}
	ok := true
	for _, b := range []struct {
		name string
		f    func([]peer, string, int, int) error
	}{{"boot", benchBoot}, {"exits", benchExits}, {"memory", benchMemory}, {"snapshot", benchSnapshot}, {"blk", benchBlk}, {"migrate", benchMigrate}} {
		if which != "all" && which != b.name {
			continue
		}
		if err := b.f(ps, *guest, *runs, *exits); err != nil {
			fmt.Fprintf(os.Stderr, "collective bench %s: %v\n", b.name, err)
			ok = false
		}
	}
	if !ok {
		return 1
	}
	return 0
}

// inTurn runs a then b in even rounds and b then a in odd ones, so that
// neither peer of a benchmark always runs right after the other: a run
// can inherit the host's state (page reclaim, writeback, a warm cache) of
// the run before it. It stops at the first error.
func inTurn(round int, a, b func() error) error {
	if round%2 == 1 {
		a, b = b, a
	}
	if err := a(); err != nil {
		return err
	}
	return b()
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

// firstByte starts argv and returns the time from start to the first byte
// on its stdout, then lets it finish (bounded by a timeout).
func firstByte(argv []string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, err
	}
	cmd.Stdin = nil
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	var b [1]byte
	_, rerr := out.Read(b[:])
	d := time.Since(start)
	io.Copy(io.Discard, out)
	cmd.Wait()
	if rerr != nil {
		return 0, fmt.Errorf("%s: no serial output: %w", filepath.Base(argv[0]), rerr)
	}
	return d, nil
}

func table(title string, header []string, rows [][]string) {
	fmt.Printf("\n%s\n", title)
	w := tabwriter.NewWriter(os.Stdout, 2, 8, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, strings.Join(header, "\t")+"\t")
	for _, r := range rows {
		fmt.Fprintln(w, strings.Join(r, "\t")+"\t")
	}
	w.Flush()
}

func benchBoot(ps []peer, guest string, runs, _ int) error {
	res := map[string][]float64{}
	// Interleave peers so that machine noise hits all of them alike.
	for i := 0; i < runs; i++ {
		for _, p := range ps {
			d, err := firstByte(p.cmd(guest, "hello", 128))
			if err != nil {
				return fmt.Errorf("%s: %w", p.name, err)
			}
			res[p.name] = append(res[p.name], float64(d.Microseconds())/1000)
		}
	}
	base := median(res["collective"])
	var rows [][]string
	exe := "?"
	for _, p := range ps {
		if p.name == "collective" {
			exe = p.cmd(guest, "hello", 128)[0]
		}
		m := median(res[p.name])
		rows = append(rows, []string{p.name, fmt.Sprintf("%.1f", m), fmt.Sprintf("%.1f", slices.Min(res[p.name])), fmt.Sprintf("%.3f", base/m)})
	}
	table(fmt.Sprintf("(a) process start to first serial byte, workload guest 'hello', 128 MiB, %d runs (collective: %s run)", runs, filepath.Base(exe)),
		[]string{"peer", "median ms", "min ms", "collective/peer"}, rows)
	return nil
}

func runOutput(argv []string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return out.String(), err
	}
	return out.String(), nil
}

func benchExits(ps []peer, guest string, runs, n int) error {
	// Compiled here, not at package level: package initialisation runs in
	// every VMM process (collective run), which has no use for it.
	exitsRe := regexp.MustCompile(`exits: (\d+) (\w+) writes in (\d+) ns, (\d+) ns/exit`)
	var rows [][]string
	for _, kind := range []string{"port", "mmio"} {
		res := map[string][]float64{}
		for i := 0; i < max(3, runs/3); i++ {
			for _, p := range ps {
				out, err := runOutput(p.cmd(guest, fmt.Sprintf("exits %d %s", n, kind), 128))
				if err != nil {
					return fmt.Errorf("%s: %w", p.name, err)
				}
				m := exitsRe.FindStringSubmatch(out)
				if m == nil {
					return fmt.Errorf("%s: no exits line in output:\n%s", p.name, out)
				}
				total, _ := strconv.ParseFloat(m[3], 64)
				cnt, _ := strconv.ParseFloat(m[1], 64)
				res[p.name] = append(res[p.name], total/cnt)
			}
		}
		base := median(res["collective"])
		for _, p := range ps {
			m := median(res[p.name])
			rows = append(rows, []string{kind, p.name, fmt.Sprintf("%.0f", m), fmt.Sprintf("%.3f", base/m)})
		}
	}
	table(fmt.Sprintf("(b) exit round trip, %d writes per run from CPL3 (port 0xf0 / MMIO 0xd0000000)", n),
		[]string{"kind", "peer", "median ns/exit", "collective/peer"}, rows)
	return nil
}

// benchMemory runs the guest in spin mode and reads the process's memory
// from /proc/PID/smaps: the RSS and the anonymous memory, each minus the
// guest-RAM mapping's share. RSS counts the pages of the binary and its
// libraries, which every VM on a host shares; anonymous memory is what each
// further VM costs. The process is collective run as a user runs it: the
// collective (VMM build) next to this collective-tools (vmmBinary), and
// the table says which binary ran the guest.
func benchMemory(ps []peer, guest string, runs, _ int) error {
	const memMiB = 256
	var rows [][]string
	rss, anon := map[string][]float64{}, map[string][]float64{}
	var exe string
	for i := 0; i < max(3, runs/3); i++ {
		for _, p := range ps {
			u, err := overhead(p.cmd(guest, "spin", memMiB), memMiB<<20)
			if err != nil {
				return fmt.Errorf("%s: %w", p.name, err)
			}
			rss[p.name] = append(rss[p.name], u.rss)
			anon[p.name] = append(anon[p.name], u.anon)
			if p.name == "collective" {
				exe = u.exe
			}
		}
	}
	br, ba := median(rss["collective"]), median(anon["collective"])
	for _, p := range ps {
		r, a := median(rss[p.name]), median(anon[p.name])
		rows = append(rows, []string{p.name, fmt.Sprintf("%.2f", r), fmt.Sprintf("%.3f", br/r), fmt.Sprintf("%.2f", a), fmt.Sprintf("%.3f", ba/a)})
	}
	table(fmt.Sprintf("(c) VMM memory overhead in MiB, guest 'spin', %d MiB of RAM: RSS and anonymous memory, each minus the guest RAM's (collective: %s run)", memMiB, filepath.Base(exe)),
		[]string{"peer", "RSS-guest", "collective/peer", "anon-guest", "collective/peer"}, rows)
	return nil
}

// memUsage is a VMM process's overhead in MiB, and its executable.
type memUsage struct {
	rss, anon float64
	exe       string
}

func overhead(argv []string, ramBytes int) (memUsage, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return memUsage{}, err
	}
	if err := cmd.Start(); err != nil {
		return memUsage{}, err
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	// Wait for the guest's first line: it is then spinning at CPL3.
	if _, err := bufio.NewReader(out).ReadString('\n'); err != nil {
		return memUsage{}, fmt.Errorf("no serial output: %w", err)
	}
	go io.Copy(io.Discard, out)
	time.Sleep(300 * time.Millisecond)
	m, err := smaps(cmd.Process.Pid, ramBytes)
	if err != nil {
		return memUsage{}, err
	}
	exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", cmd.Process.Pid))
	return memUsage{
		rss:  float64(m.rss-m.guestRSS) / (1 << 20),
		anon: float64(m.anon-m.guestAnon) / (1 << 20),
		exe:  exe,
	}, nil
}

type smapsTotals struct{ rss, anon, guestRSS, guestAnon int64 }

// smaps sums a process's RSS and anonymous memory, and those of its
// largest-resident mapping of at least ramBytes (guest RAM), in bytes.
func smaps(pid, ramBytes int) (smapsTotals, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return smapsTotals{}, err
	}
	var t smapsTotals
	var size, rss int64
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		v <<= 10
		switch f[0] {
		case "Size:":
			size, rss = v, 0
		case "Rss:":
			t.rss += v
			rss = v
		case "Anonymous:":
			t.anon += v
			if size >= int64(ramBytes) && rss > t.guestRSS {
				t.guestRSS, t.guestAnon = rss, v
			}
		}
	}
	return t, nil
}
