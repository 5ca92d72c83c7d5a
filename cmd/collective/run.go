package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"collective/api"
	"collective/internal/term"
	"collective/machine"
	"collective/snapshot"
)

// escapeKey is Ctrl-A: Ctrl-A x quits, Ctrl-A Ctrl-A sends a Ctrl-A.
const escapeKey = 0x01

func runCmd(args []string) int {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	kernel := fs.String("kernel", "", "kernel: a bzImage or a PVH ELF (detected)")
	initrd := fs.String("initrd", "", "initramfs file")
	cmdline := fs.String("append", "", "kernel command line")
	mem := fs.String("mem", "512M", "guest RAM, e.g. 512M or 2G (a plain number is MiB)")
	cpus := fs.Int("cpus", 1, "number of vCPUs")
	serialTo := fs.String("serial", "stdio", "serial console: stdio, file:PATH or none")
	verbose := fs.Bool("v", false, "log VMM events to stderr")
	var disks stringList
	fs.Var(&disks, "disk", "virtio-blk disk PATH[,ro][,serial=ID][,base=BASE] (repeatable)")
	apiPath := fs.String("api", "", "serve the control API (pause, resume, snapshot, migrate) on this Unix socket")
	incoming := fs.String("incoming", "", "receive a live migration on HOST:PORT instead of booting a kernel (migrate.go)")
	cacheDir := fs.String("cache", "", "with --incoming: snapshots whose pages the source may send by hash")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: collective run --kernel FILE [flags]\n\nOn a terminal, Ctrl-A x quits and Ctrl-A Ctrl-A sends Ctrl-A.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "collective run: "+format+"\n", a...)
		return 2
	}
	if fs.NArg() > 0 {
		return fail("unexpected argument %q", fs.Arg(0))
	}
	if *kernel == "" && *incoming == "" {
		return fail("--kernel (or --incoming) is required")
	}
	size, err := parseSize(*mem)
	if err != nil {
		return fail("--mem: %v", err)
	}
	log := newLogger(*verbose)
	console, input, closeConsole, err := openConsole(*serialTo)
	if err != nil {
		return fail("%v", err)
	}
	defer closeConsole()

	if *incoming != "" {
		var pre machine.Config // --mem given: build the machine before the source connects
		fs.Visit(func(f *flag.Flag) {
			if f.Name == "mem" {
				pre = machine.Config{MemSize: size, CPUs: *cpus}
			}
		})
		pre.Disks = disks
		return runIncoming(*incoming, pre, console, input, *apiPath, *cacheDir, log)
	}
	m, err := machine.New(machine.Config{
		Kernel: *kernel, Initrd: *initrd, Cmdline: *cmdline,
		MemSize: size, CPUs: *cpus, Console: console, Log: log, Disks: disks,
	})
	if err != nil {
		if errors.Is(err, machine.ErrConfig) {
			return fail("%v", err)
		}
		fmt.Fprintf(os.Stderr, "collective run: %v\n", err)
		return 1
	}
	defer m.Close()
	var srv *api.Server
	if *apiPath != "" {
		var stop func()
		srv, stop, err = startAPI(m, snapshot.NewSession(m), *apiPath, log)
		if err != nil {
			fmt.Fprintf(os.Stderr, "collective run: %v\n", err)
			return 1
		}
		defer stop()
	}

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	briefOnSignal(ctx, m, srv)
	if input {
		restore := attachInput(ctx, m, cancel)
		defer restore()
	}
	exit := m.Run(ctx)
	log.Debug("machine stopped", "reason", exit.Reason, "code", exit.Code, "exits", m.ExitCounts())
	if srv != nil && srv.Migrated() {
		fmt.Fprintln(os.Stderr, "collective run: the machine migrated away and runs on its target")
		return 0
	}
	return exitStatus("collective run", exit)
}

// attachInput feeds stdin to the serial port: in raw mode with an escape
// key on a terminal, as a plain stream otherwise (EOF leaves the guest
// running). It returns a function that restores the terminal.
func attachInput(ctx context.Context, m *machine.Machine, quit func()) func() {
	fd := int(os.Stdin.Fd())
	var in io.Reader = os.Stdin
	restore := func() {}
	if term.IsTerminal(fd) {
		if st, err := term.MakeRaw(fd); err == nil {
			restore = func() { st.Restore() }
		}
		in = &escapeReader{r: os.Stdin, quit: quit}
	}
	go m.Serial.Feed(ctx, in)
	return restore
}

// escapeReader handles Ctrl-A sequences typed on a terminal: Ctrl-A x
// calls quit, Ctrl-A followed by anything else sends that byte.
type escapeReader struct {
	r       io.Reader
	quit    func()
	escaped bool
}

func (e *escapeReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	out := p[:0]
	for _, b := range p[:n] {
		switch {
		case e.escaped && (b == 'x' || b == 'X'):
			e.quit()
			e.escaped = false
		case e.escaped:
			out = append(out, b)
			e.escaped = false
		case b == escapeKey:
			e.escaped = true
		default:
			out = append(out, b)
		}
	}
	return len(out), err
}

// parseSize parses 512M, 2G, 1048576K, 64MiB; a plain number is MiB.
func parseSize(s string) (uint64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B"), "I")
	mult := uint64(1 << 20)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult, t = 1<<10, t[:n-1]
		case 'M':
			mult, t = 1<<20, t[:n-1]
		case 'G':
			mult, t = 1<<30, t[:n-1]
		case 'T':
			mult, t = 1<<40, t[:n-1]
		}
	}
	v, err := strconv.ParseUint(t, 10, 64)
	if err != nil || v == 0 {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	if v > (1<<46)/mult {
		return 0, fmt.Errorf("size %q too large", s)
	}
	return v * mult, nil
}

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, " ") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

// exitStatus maps how a machine stopped to the command's exit status: the
// guest's debug-exit code, 1 when the VMM failed or the guest kernel
// panicked (with a line on stderr), 0 for poweroff, reset or a stop.
func exitStatus(cmd string, exit machine.Exit) int {
	switch exit.Reason {
	case machine.ExitDebug:
		return exit.Code
	case machine.ExitError:
		fmt.Fprintf(os.Stderr, "%s: %v\n", cmd, exit.Err)
		return 1
	case machine.ExitPanic:
		fmt.Fprintf(os.Stderr, "%s: the guest kernel panicked\n", cmd)
		return 1
	}
	return 0
}

// newLogger returns the VMM's logger: warnings on stderr, everything with -v.
func newLogger(verbose bool) *slog.Logger {
	level := slog.LevelWarn
	if verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

// openConsole opens the --serial destination: stdio (with input from
// stdin), file:PATH or none. The returned function closes what it opened.
func openConsole(spec string) (out io.Writer, input bool, closeFn func(), err error) {
	switch {
	case spec == "stdio":
		return os.Stdout, true, func() {}, nil
	case spec == "none":
		return nil, false, func() {}, nil
	case strings.HasPrefix(spec, "file:"):
		f, err := os.Create(strings.TrimPrefix(spec, "file:"))
		if err != nil {
			return nil, false, nil, fmt.Errorf("--serial: %w", err)
		}
		return f, false, func() { f.Close() }, nil
	}
	return nil, false, nil, fmt.Errorf("--serial %q: want stdio, file:PATH or none", spec)
}
