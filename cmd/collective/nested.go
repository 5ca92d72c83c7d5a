//go:build !vmm

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"collective/internal/term"
	"collective/nested"
)

// nestedEscape is Ctrl-]: typed on a terminal it ends the nested host at
// once (Ctrl-A x stays for the VMM inside).
const nestedEscape = 0x1d

// nestedFailed is the exit status when the nested host itself fails.
const nestedFailed = 125

func nestedCmd(args []string) int {
	fs := flag.NewFlagSet("nested", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	share := fs.String("share", ".", "host folder mounted at "+nested.SharePath+" in L1, where CMD starts (\"\" for none)")
	withQEMU := fs.Bool("qemu", false, "also put qemu-system-x86_64 into L1 at "+nested.QEMUPath)
	timeout := fs.Duration("timeout", 2*time.Hour, "kill the nested host after this long")
	mem := fs.Int("l1-mem", 2048, "L1's RAM in MiB")
	cpus := fs.Int("l1-cpus", 2, "L1's vCPUs")
	cpuModel := fs.String("l1-cpu", nested.DefaultCPU, "L1's QEMU -cpu model")
	tcgThread := fs.String("tcg-thread", "multi", "QEMU's TCG thread mode for L1: multi or single")
	appliance := fs.Bool("appliance", false, "run the default appliance: CMD is extra flags for collective run")
	verbose := fs.Bool("v", false, "show progress and L1's boot console on stderr")
	hold := fs.Bool(nested.HoldFlag[2:], false, "inside L1 only: keep one idle VM open until killed (L1's init runs it; see nested.HoldKVM)")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, `usage: collective nested [flags] [--] [CMD...]
       collective nested --appliance [flags] [-- RUN-FLAGS...]

Boots the nested test host (L1: Debian's kernel under QEMU TCG with
emulated AMD SVM, so /dev/kvm works even where this host's KVM cannot
boot Linux) and runs CMD there with the console on this terminal
(default: a shell). As with ssh, CMD's words are joined with spaces and
run by L1's shell, so quote what L1 must expand:

  collective nested -- 'collective run --kernel /appliance/vmlinux --initrd /appliance/initrd.img --append "$(cat /appliance/cmdline)"'
  collective nested --appliance -- --cpus 2 --disk d.img    # the same, with more flags

L1 has %s, the default appliance in %s (vmlinux, bzImage,
initrd.img, cmdline) and the --share folder (default: this one) at %s,
where CMD starts, so relative paths such as d.img work. On a terminal
Ctrl-] ends the nested host at once; Ctrl-A x quits a collective run
inside. Piped stdin is typed into the console as it is. Exit status:
CMD's, 2 for bad flags, %d when the nested host fails.

`, nested.CollectivePath, nested.ApplianceDir, nested.SharePath, nestedFailed)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *hold {
		ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer cancel()
		if err := nested.HoldKVM(ctx); err != nil {
			fmt.Fprintf(os.Stderr, "collective nested: %v\n", err)
			return 1
		}
		return 0
	}
	script := "exec sh -l"
	switch {
	case *appliance:
		script = nested.ApplianceRun + " " + strings.Join(fs.Args(), " ")
	case fs.NArg() > 0:
		script = strings.Join(fs.Args(), " ")
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "collective nested: "+format+"\n", a...)
		return nestedFailed
	}

	opts := nested.Options{WithQEMU: *withQEMU, MemoryMiB: *mem, CPUs: *cpus, CPU: *cpuModel, TCGThread: *tcgThread}
	if *share != "" {
		dir, err := absDir(*share)
		if err != nil {
			return fail("--share: %v", err)
		}
		opts.Share = dir
	}
	nestedBinaries(&opts)
	if *verbose {
		opts.Console = os.Stderr
		opts.Logf = func(format string, a ...any) {
			fmt.Fprintf(os.Stderr, "collective nested: "+format+"\n", a...)
		}
	}

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	ctx, cancelTimeout := context.WithTimeout(ctx, *timeout)
	defer cancelTimeout()

	fmt.Fprintf(os.Stderr, "collective nested: booting the nested test host (QEMU TCG; about 10-20 s)...\n")
	h, err := nested.Start(ctx, opts)
	if err != nil {
		return fail("%v", err)
	}
	defer h.Close()
	fmt.Fprintf(os.Stderr, "collective nested: L1 ready in %.1f s\n", h.BootTime.Seconds())

	var in io.Reader = os.Stdin
	raw := true
	if fd := int(os.Stdin.Fd()); term.IsTerminal(fd) {
		st, err := term.MakeRaw(fd)
		if err == nil {
			defer st.Restore()
		}
		raw = false
		in = &nestedEscapeReader{r: os.Stdin, quit: func() { h.Close() }}
	}
	status, err := h.RunConsole(ctx, script, in, os.Stdout, raw)
	if err != nil {
		if errors.Is(err, nested.ErrTimeout) {
			return fail("CMD timed out after --timeout %s", *timeout)
		}
		return fail("%v", err)
	}
	return status
}

// nestedEscapeReader calls quit when Ctrl-] is typed.
type nestedEscapeReader struct {
	r    io.Reader
	quit func()
}

func (e *nestedEscapeReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	for i := 0; i < n; i++ {
		if p[i] == nestedEscape {
			go e.quit()
			return i, io.EOF
		}
	}
	return n, err
}

// absDir returns dir as an absolute path, checking that it is a folder.
func absDir(dir string) (string, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return "", err
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("%s is not a folder", dir)
	}
	if strings.HasPrefix(dir, "/") {
		return dir, nil
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(wd+"/"+dir, "/."), nil
}

// nestedBinaries puts this collective-tools and the collective next to it
// into L1 when both are static (make build: CGO_ENABLED=0); otherwise
// (go run, a dynamic build) nested.Start builds both.
func nestedBinaries(opts *nested.Options) {
	exe, err := os.Executable()
	if err != nil || filepath.Base(exe) != toolsName || !nested.IsStatic(exe) {
		return
	}
	if vmm := filepath.Join(filepath.Dir(exe), "collective"); nested.IsStatic(vmm) {
		opts.Collective, opts.CollectiveTools = vmm, exe
	}
}
