//go:build !vmm

package main

// collective bench linux: the default appliance's boot time to its banner,
// ours against QEMU, both as the L2 VMM inside one nested test host (L1),
// with the same kernel, initramfs and command line.
//
// collective bench linux-drive (hidden; runs inside L1): starts a VMM with
// its console on a pipe, notes when the banner and each shell prompt
// appear, types lines at the prompts, and prints a JSON report after the
// console bytes. The e2e tests (e2e/) use it too.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"collective/image"
	"collective/nested"
)

// driveMarker starts the JSON report line of linux-drive.
const driveMarker = "@@DRIVE "

// defaultPrompt matches the appliance's shell prompt (PS1 '\h:\w\$ ').
const defaultPrompt = `collective:[^ \r\n]*# `

// driveReport is linux-drive's report. Times are milliseconds since the
// VMM started; Unix times are seconds (L1's clock).
type driveReport struct {
	StartUnix float64 `json:"start_unix"`
	BannerMS  float64 `json:"banner_ms"` // -1: no banner
	// UptimeMS is the guest's own uptime the banner states (the kernel's
	// clock from its timekeeping start); -1 when absent.
	UptimeMS float64           `json:"uptime_ms"`
	PromptMS float64           `json:"prompt_ms"` // -1: no prompt
	EndMS    float64           `json:"end_ms"`
	EndUnix  float64           `json:"end_unix"`
	Status   int               `json:"status"` // the VMM's exit status; -1 if killed
	TimedOut bool              `json:"timed_out"`
	Sent     []driveSent       `json:"sent"`
	Exits    map[string]uint64 `json:"exits,omitempty"` // from collective run -v
	Error    string            `json:"error,omitempty"`
	// With --then: when the command started (-1: never) and its exit
	// status (-1: did not run or was killed).
	ThenMS     float64 `json:"then_ms"`
	ThenStatus int     `json:"then_status"`
}

// driveOptions are linux-drive's flags.
type driveOptions struct {
	send      []string
	prompt    *regexp.Regexp
	typeahead bool
	// noBanner: the guest already runs (collective restore, run
	// --incoming): prompts count from the VMM's start and the first line
	// is typed at once.
	noBanner bool
	// then is a shell command run (environment VMM_PID) once the prompt
	// after the last line has appeared; the VMM runs on meanwhile.
	then    string
	timeout time.Duration
}

type driveSent struct {
	Line string  `json:"line"`
	MS   float64 `json:"ms"`
	Unix float64 `json:"unix"`
}

type stringsFlag []string

func (l *stringsFlag) String() string     { return strings.Join(*l, "\n") }
func (l *stringsFlag) Set(v string) error { *l = append(*l, v); return nil }

// benchLinuxDrive implements "collective bench linux-drive".
func benchLinuxDrive(args []string) int {
	fs := flag.NewFlagSet("bench linux-drive", flag.ContinueOnError)
	timeout := fs.Duration("timeout", 3*time.Minute, "kill the VMM after this long")
	prompt := fs.String("prompt", defaultPrompt, "regular expression of the shell prompt")
	typeahead := fs.Bool("typeahead", false, "type every line as soon as the banner appears instead of one per prompt")
	noBanner := fs.Bool("nobanner", false, "the guest already runs (restore, run --incoming): type the first line at once, then one per prompt")
	then := fs.String("then", "", "once the prompt after the last line appears, run this shell command (environment: VMM_PID) while the VMM runs on")
	var send stringsFlag
	fs.Var(&send, "send", "a line to type at the next prompt (repeatable)")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: collective bench linux-drive [flags] -- VMM-ARGV...\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	re, err := regexp.Compile(*prompt)
	if err != nil || fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	rep := drive(fs.Args(), driveOptions{send: send, prompt: re, typeahead: *typeahead, noBanner: *noBanner,
		then: *then, timeout: *timeout}, os.Stdout)
	b, _ := json.Marshal(rep)
	fmt.Printf("\n%s%s\n", driveMarker, b)
	return 0
}

// drive runs argv with its stdin and stdout on pipes, copying its output
// (stdout and stderr) to out and typing o.send as the prompts come.
func drive(argv []string, o driveOptions, out io.Writer) *driveReport {
	send, prompt, typeahead := o.send, o.prompt, o.typeahead
	rep := &driveReport{BannerMS: -1, PromptMS: -1, Status: -1, ThenMS: -1, ThenStatus: -1}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	// A VMM that timed out is asked for its vCPUs (briefOnSignal) twice,
	// a second apart, before it is killed: the post-mortem of a guest
	// that stopped making progress.
	cmd.Cancel = func() error {
		for range 2 {
			if err := cmd.Process.Signal(syscall.SIGUSR1); err != nil {
				break
			}
			time.Sleep(time.Second)
		}
		return cmd.Process.Kill()
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		rep.Error = err.Error()
		return rep
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		rep.Error = err.Error()
		return rep
	}
	var stderr bytes.Buffer
	// out is written by the loop below, by the VMM's stderr copier and by
	// the --then command.
	out = &lockedWriter{mu: new(sync.Mutex), w: out}
	cmd.Stderr = io.MultiWriter(&stderr, out)
	start := time.Now()
	rep.StartUnix = unixSeconds(start)
	if err := cmd.Start(); err != nil {
		rep.Error = err.Error()
		return rep
	}
	ms := func() float64 { return float64(time.Since(start).Microseconds()) / 1000 }
	var (
		console []byte
		next    int // next line of send
		thenCmd *exec.Cmd
		thenErr = make(chan error, 1)
	)
	if o.noBanner {
		rep.BannerMS = 0
	}
	startThen := func() {
		rep.ThenMS = ms()
		thenCmd = exec.CommandContext(ctx, "/bin/sh", "-c", o.then)
		thenCmd.Env = append(os.Environ(), fmt.Sprintf("VMM_PID=%d", cmd.Process.Pid))
		thenCmd.Stdout, thenCmd.Stderr = out, out
		if err := thenCmd.Start(); err != nil {
			thenErr <- err
			return
		}
		go func() { thenErr <- thenCmd.Wait() }()
	}
	if o.noBanner && len(send) == 0 && o.then != "" {
		startThen()
	}
	typeLine := func(l string) {
		now := time.Now()
		rep.Sent = append(rep.Sent, driveSent{Line: l, MS: float64(now.Sub(start).Microseconds()) / 1000, Unix: unixSeconds(now)})
		io.WriteString(stdin, l+"\n")
	}
	if o.noBanner && len(send) > 0 {
		typeLine(send[0])
		next = 1
	}
	p := make([]byte, 4096)
	for {
		n, rerr := stdout.Read(p)
		if n > 0 {
			out.Write(p[:n])
			console = append(console, p[:n]...)
			if rep.BannerMS < 0 && bytes.Contains(console, []byte(image.BannerPrefix)) {
				rep.BannerMS = ms()
				if typeahead {
					for _, l := range send {
						typeLine(l)
					}
					next = len(send)
				}
			}
			if rep.BannerMS >= 0 {
				at := max(bytes.Index(console, []byte(image.BannerPrefix)), 0)
				prompts := len(prompt.FindAllIndex(console[at:], -1))
				if prompts > 0 && rep.PromptMS < 0 {
					rep.PromptMS = ms()
				}
				if o.noBanner {
					prompts++ // the first line went at once
				}
				for next < len(send) && next < prompts {
					typeLine(send[next])
					next++
				}
				if o.then != "" && rep.ThenMS < 0 && next == len(send) && prompts > len(send) {
					startThen()
				}
			}
		}
		if rerr != nil {
			break
		}
	}
	werr := cmd.Wait()
	if rep.ThenMS >= 0 {
		// The command may outlive the VMM (a migration's source exits
		// before the migrate command returns); the timeout bounds it.
		err := <-thenErr
		var te *exec.ExitError
		switch {
		case err == nil:
			rep.ThenStatus = 0
		case errors.As(err, &te):
			rep.ThenStatus = te.ExitCode()
		}
	}
	rep.EndMS = ms()
	rep.EndUnix = unixSeconds(time.Now())
	rep.TimedOut = ctx.Err() != nil
	var ee *exec.ExitError
	switch {
	case werr == nil:
		rep.Status = 0
	case errors.As(werr, &ee):
		rep.Status = ee.ExitCode()
	default:
		rep.Error = werr.Error()
	}
	rep.Exits = parseExits(stderr.String())
	rep.UptimeMS = bannerUptime(console)
	return rep
}

// lockedWriter serialises writes to w.
type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// bannerUptime returns the uptime in ms that the console's first banner
// line states (image.Banner: "..., up 2.48 s"), or -1.
func bannerUptime(console []byte) float64 {
	i := bytes.Index(console, []byte(image.BannerPrefix))
	if i < 0 {
		return -1
	}
	line, _, _ := bytes.Cut(console[i:], []byte("\n"))
	m := regexp.MustCompile(`, up ([0-9]+(\.[0-9]+)?) s`).FindSubmatch(line)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		return -1
	}
	return v * 1000
}

// parseExits reads collective run -v's last line: exits=map[IO:1196 MMIO:3].
// (The expression is compiled here, not at package level: package
// initialisation runs in every VMM process.)
func parseExits(s string) map[string]uint64 {
	m := regexp.MustCompile(`exits="?map\[([^\]]*)\]`).FindStringSubmatch(s)
	if m == nil {
		return nil
	}
	out := map[string]uint64{}
	for _, kv := range strings.Fields(m[1]) {
		k, v, ok := strings.Cut(kv, ":")
		if n, err := strconv.ParseUint(v, 10, 64); ok && err == nil {
			out[k] = n
		}
	}
	return out
}

func unixSeconds(t time.Time) float64 { return float64(t.UnixMicro()) / 1e6 }

// ParseDriveReport finds linux-drive's report in a script's output and
// returns it with the console bytes before it.
func parseDriveReport(s string) (*driveReport, string, error) {
	i := strings.LastIndex(s, driveMarker)
	if i < 0 {
		return nil, s, errors.New("no " + strings.TrimSpace(driveMarker) + " report in the output")
	}
	line, _, _ := strings.Cut(s[i+len(driveMarker):], "\n")
	var rep driveReport
	if err := json.Unmarshal([]byte(line), &rep); err != nil {
		return nil, s[:i], fmt.Errorf("bad report %q: %w", line, err)
	}
	return &rep, s[:i], nil
}

// linuxPeer is one L2 VMM of the benchmark, as a command line for L1.
type linuxPeer struct {
	name string
	argv string
}

func linuxPeers(memMiB int, withPC bool) []linuxPeer {
	cmdline := `"$(cat ` + nested.ApplianceDir + `/cmdline)"`
	kernel, initrd := nested.ApplianceDir+"/vmlinux", nested.ApplianceDir+"/initrd.img"
	qemu := func(m string) string {
		return nested.QEMUPath + " -enable-kvm -M " + m + " -cpu host -m " + strconv.Itoa(memMiB) +
			" -nodefaults -no-user-config -display none -serial stdio -no-reboot" +
			" -device isa-debug-exit,iobase=0xf4,iosize=4" +
			" -kernel " + kernel + " -initrd " + initrd + " -append " + cmdline
	}
	ps := []linuxPeer{
		{"collective", nested.CollectivePath + " run -v --mem " + strconv.Itoa(memMiB) + "M --kernel " + kernel +
			" --initrd " + initrd + " --append " + cmdline},
		{"collective-bzImage", nested.CollectivePath + " run -v --mem " + strconv.Itoa(memMiB) + "M --kernel " +
			nested.ApplianceDir + "/bzImage --initrd " + initrd + " --append " + cmdline},
		{"qemu-microvm", qemu("microvm")},
		// microvm's default RTC setting leaves Linux's rtc_cmos probe
		// waiting about 8 s in this world ("rtc_cmos: broken or not
		// accessible"); with rtc=on the RTC answers, so this is QEMU's
		// best microvm time.
		{"qemu-microvm-rtc", qemu("microvm,rtc=on")},
	}
	if withPC {
		ps = append(ps, linuxPeer{"qemu-pc", qemu("pc")})
	}
	return ps
}

// benchLinux implements "collective bench linux".
func benchLinux(args []string) int {
	fs := flag.NewFlagSet("bench linux", flag.ContinueOnError)
	runs := fs.Int("runs", 5, "boots per peer, interleaved (the median is reported)")
	mem := fs.Int("mem", 256, "L2 guest RAM in MiB")
	withPC := fs.Bool("pc", true, "also QEMU -M pc (SeaBIOS, slower)")
	warmup := fs.Int("warmup", 1, "unrecorded interleaved rounds first (L1's first touch of L2 memory and TCG's first translation of L2 code slow the first boot)")
	verbose := fs.Bool("v", false, "progress and every run's times on stderr")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, `usage: collective bench linux [flags]

Boots the default appliance (Debian's kernel, our initramfs) as L2 inside
one nested test host: collective run (PVH vmlinux, and the bzImage) and QEMU
(-M microvm, -M microvm,rtc=on, -M pc) with the same kernel, initramfs and command line,
interleaved; prints the medians of the time from the VMM's start to the
appliance's banner and to its first shell prompt, and our exits by kind.

`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if err := runBenchLinux(*runs, *warmup, *mem, *withPC, *verbose); err != nil {
		fmt.Fprintf(os.Stderr, "collective bench linux: %v\n", err)
		return 1
	}
	return 0
}

func runBenchLinux(runs, warmup, memMiB int, withPC, verbose bool) error {
	logf := func(format string, a ...any) {
		if verbose {
			fmt.Fprintf(os.Stderr, "bench linux: "+format+"\n", a...)
		}
	}
	opts := nested.Options{WithQEMU: true, Logf: logf}
	nestedBinaries(&opts)
	ctx := context.Background()
	fmt.Fprintf(os.Stderr, "bench linux: booting the nested test host (L1)...\n")
	h, err := nested.Start(ctx, opts)
	if err != nil {
		return err
	}
	defer h.Close()
	fmt.Fprintf(os.Stderr, "bench linux: L1 ready in %.1f s; %d runs per peer\n", h.BootTime.Seconds(), runs)
	ps := linuxPeers(memMiB, withPC)
	banner, prompt := map[string][]float64{}, map[string][]float64{}
	uptime, outside := map[string][]float64{}, map[string][]float64{} // from the banner's uptime
	exits := map[string][]uint64{}
	failed := map[string]string{}
	for i := -warmup; i < runs; i++ {
		for _, p := range ps {
			if failed[p.name] != "" {
				continue
			}
			rctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
			script := nested.CollectivePath + " bench linux-drive --timeout 200s --send poweroff -- " + p.argv
			out, status, err := h.Run(rctx, script)
			cancel()
			if err != nil {
				return fmt.Errorf("%s: %w", p.name, err)
			}
			rep, console, err := parseDriveReport(out)
			if err != nil || status != 0 || rep.BannerMS < 0 {
				tail := console[max(len(console)-2000, 0):]
				failed[p.name] = fmt.Sprintf("run %d: no banner (script status %d, %v); console tail:\n%s", i+1, status, err, tail)
				fmt.Fprintf(os.Stderr, "bench linux: %s failed: %s\n", p.name, failed[p.name])
				continue
			}
			if i < 0 {
				logf("warm-up %-18s banner %7.0f ms", p.name, rep.BannerMS)
				continue
			}
			logf("run %d %-18s banner %7.0f ms, prompt %7.0f ms, end %7.0f ms, status %d, exits %v",
				i+1, p.name, rep.BannerMS, rep.PromptMS, rep.EndMS, rep.Status, rep.Exits)
			banner[p.name] = append(banner[p.name], rep.BannerMS)
			prompt[p.name] = append(prompt[p.name], rep.PromptMS)
			if rep.UptimeMS >= 0 {
				uptime[p.name] = append(uptime[p.name], rep.UptimeMS)
				outside[p.name] = append(outside[p.name], rep.BannerMS-rep.UptimeMS)
			}
			for k, n := range rep.Exits {
				exits[p.name+"/"+k] = append(exits[p.name+"/"+k], n)
			}
		}
	}
	base := median(banner["collective"])
	baseOut := median(outside["collective"])
	var rows [][]string
	for _, p := range ps {
		if len(banner[p.name]) == 0 {
			rows = append(rows, []string{p.name, "failed", "-", "-", "-", "-", "-", "-", "-"})
			continue
		}
		m := median(banner[p.name])
		guest, out, outRatio := "-", "-", "-"
		if len(outside[p.name]) > 0 {
			o := median(outside[p.name])
			guest, out = fmt.Sprintf("%.0f", median(uptime[p.name])), fmt.Sprintf("%.0f", o)
			if len(outside["collective"]) > 0 {
				outRatio = fmt.Sprintf("%.3f", baseOut/o)
			}
		}
		rows = append(rows, []string{p.name, fmt.Sprintf("%.0f", m), fmt.Sprintf("%.0f", slices.Min(banner[p.name])),
			fmt.Sprintf("%.0f", median(prompt[p.name])), fmt.Sprintf("%.3f", base/m),
			guest, out, outRatio, strconv.Itoa(len(banner[p.name]))})
	}
	table(fmt.Sprintf("Linux boot to the appliance's banner as L2 in one nested host (L1: QEMU TCG + SVM), %d MiB, %d interleaved runs.\n"+
		"guest ms: the uptime the banner states (the guest kernel's own clock); outside ms: the rest of the time to the banner\n"+
		"(VMM start, kernel loading, firmware, decompression before the kernel's clock starts), per run, median", memMiB, runs),
		[]string{"peer", "median ms", "min ms", "prompt ms", "collective/peer", "guest ms", "outside ms", "outside c/p", "runs"}, rows)

	var erows [][]string
	keys := make([]string, 0, len(exits))
	for k := range exits {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		peer, kind, _ := strings.Cut(k, "/")
		v := exits[k]
		f := make([]float64, len(v))
		for i, n := range v {
			f[i] = float64(n)
		}
		erows = append(erows, []string{peer, kind, fmt.Sprintf("%.0f", median(f)), fmt.Sprintf("%d", slices.Min(v)), fmt.Sprintf("%d", slices.Max(v))})
	}
	table("Our VM exits per boot (banner, shell, poweroff), by kind", []string{"peer", "kind", "median", "min", "max"}, erows)
	if len(failed) > 0 {
		return fmt.Errorf("%d peer(s) failed", len(failed))
	}
	return nil
}
