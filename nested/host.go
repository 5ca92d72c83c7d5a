package nested

import (
	"bytes"
	"context"
	"crypto/rand"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"collective/image"
)

var (
	// ErrTimeout is returned (wrapped) when a script outlived its context's
	// deadline and L1 killed it.
	ErrTimeout = errors.New("nested: script timed out")
	// ErrClosed is returned by a Host that was closed or whose QEMU died.
	ErrClosed = errors.New("nested: host is closed")

	errOverflow = errors.New("nested: too much output")
)

// Defaults.
const (
	defaultMemMiB      = 2048
	defaultCPUs        = 2
	defaultBootTimeout = 3 * time.Minute
	// defaultScriptTimeout bounds a script whose context has no deadline.
	defaultScriptTimeout = 10 * time.Minute
	// closeTimeout bounds how long Close waits for QEMU to die.
	closeTimeout = 10 * time.Second
	// grace is how much earlier than the host L1 kills a script, so that
	// its status still comes back before the context ends.
	grace = 3 * time.Second
)

// Options configures a nested test host. The zero value boots Debian's
// kernel from the image cache with the default appliance.
type Options struct {
	CacheDir   string           // image cache; "" means image.DefaultCacheDir()
	Kernel     *image.Kernel    // L1's kernel and modules; nil means image.DebianKernel
	Appliance  *image.Appliance // copied to ApplianceDir; nil means image.BuildDefault
	Collective string           // a statically linked collective (-tags vmm); "" builds it and collective-tools
	Busybox    string           // a static busybox; "" means /bin/busybox
	QEMU       string           // the qemu-system-x86_64 that runs L1; "" looks in PATH
	WithQEMU   bool             // also copy QEMU into L1 (QEMUPath), for benchmarks
	Share      string           // host folder mounted read-write at SharePath; "" for none
	MemoryMiB  int              // L1's RAM; 0 means 2048
	CPUs       int              // L1's vCPUs; 0 means 2
	// TCGThread is QEMU's TCG thread mode for L1: "multi" (one host
	// thread per vCPU) or "single" (one for all); "" means multi.
	TCGThread string
	// CPU is L1's -cpu model; "" means DefaultCPU.
	CPU string
	// CollectiveTools is the statically linked collective-tools (the full
	// build) that collective execs in L1 for its other commands (bench
	// linux-drive...); "" means the one next to Collective, or the one
	// built with it.
	CollectiveTools string
	// BootTimeout bounds building the initramfs and booting L1; 0 means 3 minutes.
	BootTimeout time.Duration
	// Console gets L1's kernel console (ttyS0) and its virtio console
	// (hvc0) outside RunConsole; may be nil.
	Console io.Writer
	// Logf reports progress (building, booting); may be nil.
	Logf func(format string, args ...any)
}

// Host is a running nested test host: QEMU (TCG, emulated SVM) running L1,
// a Debian kernel with /dev/kvm, waiting for scripts. One script runs at
// a time; a Host is safe for use by several goroutines.
type Host struct {
	// BootTime is the wall time from QEMU's start to L1's /init being
	// ready for scripts (modules loaded, /dev/kvm present).
	BootTime time.Duration
	// KernelUptime is L1's own uptime at that moment.
	KernelUptime time.Duration

	cmd    *exec.Cmd
	dir    string
	log    *stream  // ttyS0: kernel messages, boot failures
	con    *stream  // hvc0: RunConsole jobs
	ctl    *stream  // virtio-serial port nested.ctl
	logC   net.Conn // ttyS0
	conW   net.Conn // console input
	ctlW   net.Conn // control input
	exited chan struct{}
	// waitErr is QEMU's exit (cmd.Wait), and qemuErr its stderr; both
	// are read only once exited is closed.
	waitErr error
	qemuErr *limitedBuffer
	nonce   string
	mon     string // QEMU's monitor socket
	sysmap  string // L1 kernel's text symbols (kallsyms format; may not exist yet)

	mu   sync.Mutex // serialises jobs; guards seq and dead
	seq  int
	dead error

	closeOnce sync.Once
}

// Start builds L1's initramfs and boots it under QEMU, returning once L1
// is ready for scripts. ctx bounds the whole start (and Options.BootTimeout
// too); the Host outlives ctx until Close.
func Start(ctx context.Context, opts Options) (h *Host, err error) {
	if opts.BootTimeout <= 0 {
		opts.BootTimeout = defaultBootTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, opts.BootTimeout)
	defer cancel()
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	qemu, err := resolveTools(&opts)
	if err != nil {
		return nil, err
	}
	if opts.CacheDir == "" {
		if opts.CacheDir, err = image.DefaultCacheDir(); err != nil {
			return nil, err
		}
	}
	if opts.Kernel == nil {
		if opts.Kernel, err = image.DebianKernel(ctx, opts.CacheDir); err != nil {
			return nil, fmt.Errorf("nested: L1 kernel: %w", err)
		}
	}
	if opts.Appliance == nil {
		if opts.Appliance, err = image.BuildDefault(ctx, opts.CacheDir); err != nil {
			return nil, fmt.Errorf("nested: appliance: %w", err)
		}
	}

	dir, err := os.MkdirTemp("", "collective-nested-")
	if err != nil {
		return nil, fmt.Errorf("nested: %w", err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
		}
	}()

	if opts.Collective == "" {
		start := time.Now()
		opts.Collective = filepath.Join(dir, "collective")
		opts.CollectiveTools = filepath.Join(dir, ToolsName)
		if err := buildCollective(ctx, opts.Collective, opts.CollectiveTools); err != nil {
			return nil, err
		}
		logf("built a static collective and collective-tools in %s", time.Since(start).Round(time.Millisecond))
	} else if opts.CollectiveTools == "" {
		opts.CollectiveTools = filepath.Join(filepath.Dir(opts.Collective), ToolsName)
	}
	for _, p := range []string{opts.Collective, opts.CollectiveTools} {
		if err := checkStatic(p); err != nil {
			return nil, err
		}
	}

	start := time.Now()
	initrd := filepath.Join(dir, "l1-initrd.img")
	l := layout{
		modulesDir: opts.Kernel.ModulesDir,
		collective: opts.Collective,
		tools:      opts.CollectiveTools,
		busybox:    opts.Busybox,
		appliance:  opts.Appliance,
		share:      opts.Share != "",
	}
	if opts.WithQEMU {
		l.qemu = qemu
	}
	if err := writeInitrdFile(ctx, initrd, l); err != nil {
		return nil, err
	}
	logf("built L1's initramfs in %s", time.Since(start).Round(time.Millisecond))

	h, err = boot(ctx, qemu, dir, initrd, opts)
	if err != nil {
		return nil, err
	}
	logf("L1 ready in %s (L1 uptime %s)", h.BootTime.Round(time.Millisecond), h.KernelUptime)
	if err := h.saveKallsyms(ctx); err != nil {
		logf("%v (a post-mortem will show addresses without names)", err)
	}
	return h, nil
}

// resolveTools fills in the busybox and QEMU paths and returns the QEMU
// path.
func resolveTools(opts *Options) (string, error) {
	if opts.Busybox == "" {
		opts.Busybox = "/bin/busybox"
	}
	if err := checkStatic(opts.Busybox); err != nil {
		return "", fmt.Errorf("%w (apt-get install busybox-static)", err)
	}
	qemu := opts.QEMU
	if qemu == "" {
		p, err := exec.LookPath("qemu-system-x86_64")
		if err != nil {
			return "", fmt.Errorf("nested: qemu-system-x86_64: %w (apt-get install qemu-system-x86)", err)
		}
		qemu = p
	}
	return qemu, nil
}

// checkStatic reports an error unless path is an ELF executable without
// an interpreter, which L1 (no libc) can run.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("nested: %w", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("nested: %s is dynamically linked; L1 needs a static binary", path)
		}
	}
	return nil
}

// ToolsName is the file name of collective-tools, the full build of
// cmd/collective, which collective (the VMM build) execs from its own
// folder for every command but run and restore.
const ToolsName = "collective-tools"

// buildCollective builds cmd/collective statically: the VMM build (-tags
// vmm) into out and the full build into tools. It needs the go tool and a
// working directory inside the module.
func buildCollective(ctx context.Context, out, tools string) error {
	for _, b := range []struct{ out, tags string }{{out, "vmm"}, {tools, ""}} {
		cmd := exec.CommandContext(ctx, "go", "build", "-tags="+b.tags, "-o", b.out, "collective/cmd/collective")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if o, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("nested: building %s: %w\n%s", filepath.Base(b.out), err, o)
		}
	}
	return nil
}

func writeInitrdFile(ctx context.Context, name string, l layout) error {
	f, err := os.Create(name)
	if err != nil {
		return fmt.Errorf("nested: %w", err)
	}
	if err := writeInitramfs(ctx, f, l); err != nil {
		f.Close()
		return fmt.Errorf("nested: L1 initramfs: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("nested: L1 initramfs: %w", err)
	}
	return nil
}

// DefaultCPU is L1's -cpu model: TCG's max has SVM with nested paging;
// erms is masked because TCG runs rep stosb/movsb a byte at a time.
const DefaultCPU = "max,-erms"

// qemuArgs returns the command line that boots L1.
func qemuArgs(opts Options, initrd, logSock, conSock, ctlSock, monSock string) []string {
	mem, cpus := opts.MemoryMiB, opts.CPUs
	if mem <= 0 {
		mem = defaultMemMiB
	}
	if cpus <= 0 {
		cpus = defaultCPUs
	}
	thread, cpu := opts.TCGThread, opts.CPU
	if thread == "" {
		thread = "multi"
	}
	if cpu == "" {
		cpu = DefaultCPU
	}
	args := []string{
		"-accel", "tcg,thread=" + thread, "-cpu", cpu,
		"-m", strconv.Itoa(mem), "-smp", strconv.Itoa(cpus),
		"-display", "none", "-vga", "none", "-nic", "none",
		// The human monitor, for a post-mortem of an L1 that stopped
		// answering (diagnose).
		"-monitor", "unix:" + monSock + ",server=on,wait=off",
		"-no-reboot", "-no-user-config", "-nodefaults",
		"-kernel", opts.Kernel.BzImage, "-initrd", initrd,
		"-append", "console=ttyS0 quiet panic=-1 tsc=reliable " + l1NoKASLR,
		"-chardev", "socket,id=log,path=" + logSock, "-serial", "chardev:log",
		"-device", "virtio-serial-pci,id=vs",
		"-chardev", "socket,id=con,path=" + conSock, "-device", "virtconsole,bus=vs.0,chardev=con,name=nested.con",
		"-chardev", "socket,id=ctl,path=" + ctlSock, "-device", "virtserialport,bus=vs.0,chardev=ctl,name=nested.ctl",
	}
	if opts.Share != "" {
		args = append(args, "-virtfs", "local,path="+opts.Share+",mount_tag=host,security_model=none,id=host")
	}
	return args
}

// boot starts QEMU and waits for L1's READY marker.
func boot(ctx context.Context, qemu, dir, initrd string, opts Options) (*Host, error) {
	socks := []string{filepath.Join(dir, "log.sock"), filepath.Join(dir, "con.sock"), filepath.Join(dir, "ctl.sock")}
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for _, p := range socks {
		l, err := net.Listen("unix", p)
		if err != nil {
			return nil, fmt.Errorf("nested: %w", err)
		}
		ls = append(ls, l)
	}

	nonce := make([]byte, 4)
	rand.Read(nonce)
	h := &Host{
		dir:    dir,
		log:    newStream(true, opts.Console),
		con:    newStream(false, opts.Console),
		ctl:    newStream(true, nil),
		exited: make(chan struct{}),
		nonce:  hex.EncodeToString(nonce),
	}
	var stderr bytes.Buffer
	h.mon = filepath.Join(dir, "mon.sock")
	h.sysmap = filepath.Join(filepath.Dir(opts.Kernel.BzImage), kallsymsName)
	h.cmd = exec.Command(qemu, qemuArgs(opts, initrd, socks[0], socks[1], socks[2], h.mon)...)
	h.qemuErr = &limitedBuffer{b: &stderr, max: 16 << 10}
	h.cmd.Stderr = h.qemuErr
	// QEMU dies with the process that started it, even when that one is
	// killed (a test binary past its -timeout).
	h.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	start := time.Now()
	if err := h.cmd.Start(); err != nil {
		return nil, fmt.Errorf("nested: starting QEMU: %w", err)
	}
	go func() {
		h.waitErr = h.cmd.Wait()
		close(h.exited)
	}()
	fail := func(err error) (*Host, error) {
		h.Close()
		<-h.exited
		msg := fmt.Sprintf("%v", err)
		if h.waitErr != nil {
			msg += fmt.Sprintf("; QEMU: %v", h.waitErr)
		}
		if s := strings.TrimSpace(stderr.String()); s != "" {
			msg += "; QEMU stderr: " + s
		}
		if t := strings.TrimSpace(h.log.tailString()); t != "" {
			msg += "\nL1 console (tail):\n" + t
		}
		return nil, errors.New("nested: " + msg)
	}

	// QEMU connects to the sockets while it sets up its character
	// devices, before the guest runs.
	conns := make([]net.Conn, len(ls))
	for i, l := range ls {
		c, err := accept(ctx, l, h.exited)
		if err != nil {
			return fail(fmt.Errorf("QEMU did not connect its serial ports: %w", err))
		}
		conns[i] = c
	}
	h.logC, h.conW, h.ctlW = conns[0], conns[1], conns[2]
	go h.log.pump(h.logC)
	go h.con.pump(h.conW)
	go h.ctl.pump(h.ctlW)

	// READY comes on the control port; FAIL on ttyS0, which works before
	// the virtio modules are loaded.
	var failed string
	bootCtx, bootCancel := context.WithCancel(ctx)
	defer bootCancel()
	logDone := make(chan struct{})
	go func() {
		defer close(logDone)
		h.log.take(bootCtx, func(b []byte) (int, bool) {
			if i, end, f := findMarker(b, "FAIL", ""); i >= 0 {
				failed = strings.Join(f, " ")
				bootCancel()
				return end, true
			}
			return max(len(b)-4096, 0), false
		})
	}()
	var fields []string
	err := h.ctl.take(bootCtx, func(b []byte) (int, bool) {
		if i, end, f := findMarker(b, "READY", ""); i >= 0 {
			fields = f
			return end, true
		}
		return 0, false
	})
	bootCancel()
	<-logDone
	h.log.setKeep(false)
	switch {
	case failed != "":
		return fail(fmt.Errorf("L1 failed: %s", failed))
	case err != nil:
		// The same post-mortem as for an L1 that stops answering later.
		took := time.Since(start).Round(time.Millisecond)
		return fail(fmt.Errorf("L1 did not become ready after %s: %w\nL1 console (tail):\n%s\nL1's vCPUs (QEMU monitor):\n%s",
			took, err, h.ConsoleTail(), h.diagnose()))
	}
	h.BootTime = time.Since(start)
	if len(fields) > 0 {
		if s, err := strconv.ParseFloat(fields[0], 64); err == nil {
			h.KernelUptime = time.Duration(s * float64(time.Second))
		}
	}
	// QEMU has read the initramfs: it need not stay on disk.
	os.Remove(initrd)
	return h, nil
}

// accept waits for one connection on l, giving up when ctx ends or QEMU
// exits.
func accept(ctx context.Context, l net.Listener, exited <-chan struct{}) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := l.Accept()
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		return r.c, r.err
	case <-exited:
		l.Close()
		return nil, errors.New("QEMU exited")
	case <-ctx.Done():
		l.Close()
		return nil, ctx.Err()
	}
}

// limitedBuffer keeps the first max bytes written to it.
type limitedBuffer struct {
	mu  sync.Mutex
	b   *bytes.Buffer
	max int
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if room := l.max - l.b.Len(); room > 0 {
		l.b.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (l *limitedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// ConsoleTail returns the last bytes of L1's consoles (ttyS0, then hvc0),
// for diagnostics.
func (h *Host) ConsoleTail() string {
	return h.log.tailString() + "\n[hvc0]\n" + h.con.tailString()
}

// Close kills QEMU and removes the Host's temporary files. It waits at most
// a few seconds and may be called more than once.
func (h *Host) Close() error {
	h.closeOnce.Do(func() {
		h.mu.Lock()
		if h.dead == nil {
			h.dead = ErrClosed
		}
		h.mu.Unlock()
		if h.cmd.Process != nil {
			// QEMU runs in its own process group: take any helper with it.
			syscall.Kill(-h.cmd.Process.Pid, syscall.SIGKILL)
			h.cmd.Process.Kill()
		}
		select {
		case <-h.exited:
		case <-time.After(closeTimeout):
		}
		for _, c := range []net.Conn{h.logC, h.conW, h.ctlW} {
			if c != nil {
				c.Close()
			}
		}
		os.RemoveAll(h.dir)
	})
	return nil
}

// send sends one script to L1 and returns its id.
// Preconditions: h.mu is held.
func (h *Host) send(ctx context.Context, verb, script, mode string) (id string, err error) {
	if h.dead != nil {
		return "", h.dead
	}
	select {
	case <-h.exited:
		h.dead = ErrClosed
		return "", fmt.Errorf("%w: QEMU exited", ErrClosed)
	default:
	}
	timeout := defaultScriptTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d) - grace
	}
	secs := max(int(timeout/time.Second), 1)
	h.seq++
	id = fmt.Sprintf("%d-%s", h.seq, h.nonce)
	h.ctl.setKeep(true)
	msg := fmt.Sprintf("%s %s %d %d %s\n%s", verb, id, len(script), secs, mode, script)
	h.ctlW.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(h.ctlW, msg); err != nil {
		return "", h.kill(fmt.Errorf("sending the script: %w", err))
	}
	return id, nil
}

// kill ends a Host whose L1 no longer answers and returns err wrapped.
// Preconditions: h.mu is held.
func (h *Host) kill(err error) error {
	h.dead = fmt.Errorf("%w: %v", ErrClosed, err)
	var diag string
	select {
	case <-h.exited:
		// Under -no-reboot a reset of L1 (a triple fault, panic=-1) ends
		// QEMU with status 0; a QEMU crash has a signal or a message.
		diag = fmt.Sprintf("none: QEMU has exited (%v; status 0 is L1 resetting itself); QEMU stderr: %q",
			h.waitErr, strings.TrimSpace(h.qemuErr.String()))
	case <-time.After(500 * time.Millisecond):
		diag = h.diagnose()
	}
	go h.Close()
	return fmt.Errorf("nested: %w\nL1 console (tail):\n%s\nL1's vCPUs (QEMU monitor):\n%s", err, h.ConsoleTail(), diag)
}

// waitExit waits for script id's EXIT marker on the control channel and
// returns what came before it.
// Preconditions: h.mu is held.
func (h *Host) waitExit(ctx context.Context, id string) (out []byte, status int, err error) {
	var fields []string
	var buf bytes.Buffer
	err = h.ctl.take(ctx, func(b []byte) (int, bool) {
		i, end, f := findMarker(b, "EXIT", id)
		if i < 0 {
			// Keep enough back to find a marker split across reads.
			n := max(len(b)-256, 0)
			buf.Write(b[:n])
			return n, false
		}
		buf.Write(b[:i])
		fields = f
		return end, true
	})
	if err != nil {
		got := buf.String() + string(h.ctl.pending())
		return buf.Bytes(), -1, h.kill(fmt.Errorf("no answer from L1 for script %s: %w; control channel's last bytes: %q",
			id, err, got[max(len(got)-300, 0):]))
	}
	if len(fields) < 2 {
		return buf.Bytes(), -1, h.kill(fmt.Errorf("bad EXIT marker for script %s: %q", id, fields))
	}
	status, err = strconv.Atoi(fields[0])
	if err != nil {
		return buf.Bytes(), -1, h.kill(fmt.Errorf("bad EXIT marker for script %s: %q", id, fields))
	}
	if fields[1] == "timeout" {
		return buf.Bytes(), status, fmt.Errorf("%w (L1 killed it)", ErrTimeout)
	}
	return buf.Bytes(), status, nil
}

// Run runs script under /bin/sh in L1, with stdin from /dev/null, and
// returns its output (stdout and stderr together) and exit status. The
// working folder is SharePath when a share is mounted, / otherwise. When
// ctx has a deadline, L1 kills the script (its whole session) a few
// seconds before it and Run returns ErrTimeout with the output so far;
// without one the limit is 10 minutes. If L1 stops answering, Run kills
// the Host and returns an error wrapping ErrClosed.
func (h *Host) Run(ctx context.Context, script string) (output string, status int, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	id, err := h.send(ctx, "RUN", script, "-")
	if err != nil {
		return "", -1, err
	}
	out, status, err := h.waitExit(ctx, id)
	return string(out), status, err
}

// RunConsole runs script in L1 on the virtio console (hvc0, its controlling
// terminal): what it prints goes to stdout, and stdin is typed into it
// once it has started. With raw set the console is in raw mode (no echo,
// bytes passed as they are: for piped input); otherwise it is a sane
// terminal for a person typing through a raw host terminal. It returns
// the script's exit status. Timeouts are as for Run. Reading stdin goes
// on in the background after RunConsole returns, until stdin ends; what
// is read then is dropped.
func (h *Host) RunConsole(ctx context.Context, script string, stdin io.Reader, stdout io.Writer, raw bool) (status int, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	mode := "tty"
	if raw {
		mode = "raw"
	}
	h.con.setKeep(true)
	defer h.con.setKeep(false)
	id, err := h.send(ctx, "CON", script, mode)
	if err != nil {
		return -1, err
	}
	// Copy the console to stdout from now on, until the END marker.
	endMark := []byte("@@NESTED-END " + id + "@@")
	conDone := make(chan error, 1)
	conCtx, conCancel := context.WithCancel(context.WithoutCancel(ctx))
	defer conCancel()
	go func() {
		conDone <- h.con.take(conCtx, func(b []byte) (int, bool) {
			if i := bytes.Index(b, endMark); i >= 0 {
				stdout.Write(b[:i])
				return len(b), true
			}
			n := max(len(b)-len(endMark), 0)
			stdout.Write(b[:n])
			return n, false
		})
	}()

	// Wait for STARTED, then type stdin into the console.
	var started bool
	err = h.ctl.take(ctx, func(b []byte) (int, bool) {
		if i, end, _ := findMarker(b, "STARTED", id); i >= 0 {
			started = true
			return end, true
		}
		if i, _, _ := findMarker(b, "EXIT", id); i >= 0 {
			return 0, true
		}
		return 0, false
	})
	if err != nil {
		return -1, h.kill(fmt.Errorf("console script %s did not start: %w", id, err))
	}
	var stop chan struct{}
	if started && stdin != nil {
		stop = make(chan struct{})
		go h.typeInto(stdin, stop)
	}
	_, status, err = h.waitExit(ctx, id)
	if stop != nil {
		close(stop)
	}
	// The console's last bytes may trail the control channel's marker.
	select {
	case <-conDone:
	case <-time.After(5 * time.Second):
		conCancel()
		<-conDone
	}
	return status, err
}

// typeInto copies r to L1's console until r ends or stop is closed.
func (h *Host) typeInto(r io.Reader, stop <-chan struct{}) {
	p := make([]byte, 4096)
	for {
		n, err := r.Read(p)
		select {
		case <-stop:
			return
		default:
		}
		if n > 0 {
			h.conW.SetWriteDeadline(time.Now().Add(time.Minute))
			if _, werr := h.conW.Write(p[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// IsStatic reports whether path is an ELF executable without an
// interpreter (a binary L1, which has no libc, can run).
func IsStatic(path string) bool { return checkStatic(path) == nil }
