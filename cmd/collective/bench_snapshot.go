//go:build !vmm

package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"collective/guest"
	"collective/machine"
	"collective/snapshot"
)

// benchSnapshot measures snapshot create and restore, ours against QEMU's
// migrate-to-file, on the workload guest: 256 MiB and 1 GiB, idle (spin)
// and with 25% of RAM dirtied (dirty mode, flat out). Each cell runs ours
// then QEMU's, and every cell once per round, so that the noise of a busy
// host falls on both; the table shows each figure's median over the rounds.
func benchSnapshot(_ []peer, elf string, runs, _ int) error {
	// Files go to tmpfs when there is one, for us and QEMU alike: the
	// figures are the VMMs', not the disk's writeback throttling.
	base := ""
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		base = "/dev/shm"
	}
	dir, err := os.MkdirTemp(base, "collective-bench-snapshot")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	self, err := vmmBinary()
	if err != nil {
		return err
	}
	type cell struct {
		memMiB int
		load   string
		ours   []*oursResult
		qemu   []*qemuResult
	}
	var cells []*cell
	for _, memMiB := range []int{256, 1024} {
		for _, load := range []string{"idle", "25%"} {
			cells = append(cells, &cell{memMiB: memMiB, load: load})
		}
	}
	rounds := max(4, runs/3)
	rounds += rounds % 2 // as many rounds with each VMM first
	for i := 0; i < rounds; i++ {
		for _, c := range cells {
			cmdline := "spin"
			if c.load == "25%" {
				cmdline = fmt.Sprintf("dirty %dM 0 0", c.memMiB/4)
			}
			// The VMMs take turns going first (see inTurn).
			err := inTurn(i, func() error {
				ours, err := benchOurs(self, elf, cmdline, c.memMiB, dir)
				if err != nil {
					return fmt.Errorf("collective %d MiB %s: %w", c.memMiB, c.load, err)
				}
				c.ours = append(c.ours, ours)
				return nil
			}, func() error {
				q, err := benchQEMU(elf, cmdline, c.memMiB, dir)
				if err != nil {
					return fmt.Errorf("qemu %d MiB %s: %w", c.memMiB, c.load, err)
				}
				c.qemu = append(c.qemu, q)
				return nil
			})
			if err != nil {
				return err
			}
		}
	}
	ms := func(d float64) string { return fmt.Sprintf("%.1f", d*1000) }
	mib := func(n float64) string { return fmt.Sprintf("%.1f", n/(1<<20)) }
	ratio := func(a, b float64) string {
		if b == 0 {
			return "-"
		}
		return fmt.Sprintf("%.3f", a/b)
	}
	var rows [][]string
	for _, c := range cells {
		o := func(f func(*oursResult) float64) float64 {
			xs := make([]float64, len(c.ours))
			for i, r := range c.ours {
				xs[i] = f(r)
			}
			return median(xs)
		}
		q := func(f func(*qemuResult) float64) float64 {
			xs := make([]float64, len(c.qemu))
			for i, r := range c.qemu {
				xs[i] = f(r)
			}
			return median(xs)
		}
		qSave, qSize, qRestore := q(func(r *qemuResult) float64 { return r.save.Seconds() }), q(func(r *qemuResult) float64 { return float64(r.size) }), q(func(r *qemuResult) float64 { return r.restore.Seconds() })
		create := func(op string, f func(*oursResult) (time.Duration, int64)) []string {
			t := o(func(r *oursResult) float64 { d, _ := f(r); return d.Seconds() })
			n := o(func(r *oursResult) float64 { _, n := f(r); return float64(n) })
			return []string{op, ms(t), mib(n), ms(qSave), mib(qSize), ratio(t, qSave), ratio(n, qSize)}
		}
		restore := func(op string, f func(*oursResult) time.Duration, vsQEMU bool) []string {
			t := o(func(r *oursResult) float64 { return f(r).Seconds() })
			if !vsQEMU {
				return []string{op, ms(t), "", "", "", "", ""}
			}
			return []string{op, ms(t), "", ms(qRestore), "", ratio(t, qRestore), ""}
		}
		rs := [][]string{
			create("create full, lz4", func(r *oursResult) (time.Duration, int64) { return r.full, r.fullSize }),
			create("create full, raw image", func(r *oursResult) (time.Duration, int64) { return r.raw, r.rawSize }),
			create("create incremental (qemu: full)", func(r *oursResult) (time.Duration, int64) { return r.inc, r.incSize }),
			restore("restore lz4, process start to run", func(r *oursResult) time.Duration { return r.restoreLZ4Proc }, true),
			restore("restore raw lazy, process start to run", func(r *oursResult) time.Duration { return r.restoreProc }, true),
			restore("restore lz4, in process", func(r *oursResult) time.Duration { return r.restoreLZ4 }, false),
			restore("restore raw lazy, in process", func(r *oursResult) time.Duration { return r.restoreLazy }, false),
		}
		for i, r := range rs {
			lead := []string{"", ""}
			if i == 0 {
				lead = []string{fmt.Sprintf("%d MiB", c.memMiB), c.load}
			}
			rows = append(rows, append(lead, r...))
		}
	}
	table(fmt.Sprintf("(d) snapshots, median of %d rounds: workload guest 'spin' (idle) or 'dirty SIZE/4' (25%%); create: time paused and file size; restore: to the guest's next instruction. QEMU 7.2 microvm, after the same guest progress: stop + migrate -d \"exec:cat > FILE\" polled until completed (it has no incremental: its full save is the comparison), restore -incoming \"exec:cat FILE\" from process start until running. Ratios below 1: collective ahead", rounds),
		[]string{"guest", "load", "operation", "collective ms", "collective MiB", "qemu ms", "qemu MiB", "time c/q", "size c/q"}, rows)
	return nil
}

type oursResult struct {
	full, raw, inc                                       time.Duration
	fullSize, rawSize, incSize                           int64
	restoreLZ4, restoreLazy, restoreProc, restoreLZ4Proc time.Duration
}

func benchOurs(self, elf, cmdline string, memMiB int, dir string) (*oursResult, error) {
	m, err := machine.New(machine.Config{Kernel: elf, Cmdline: cmdline, MemSize: uint64(memMiB) << 20, CPUs: 1})
	if err != nil {
		return nil, err
	}
	done := make(chan machine.Exit, 1)
	go func() { done <- m.Run(context.Background()) }()
	// closeSource stops and closes the source machine, once.
	closed := false
	closeSource := func() {
		if !closed {
			closed = true
			m.Stop()
			<-done
			m.Close()
		}
	}
	defer closeSource()
	pass := func() uint64 { n, _ := m.Memory().Uint64(guest.HeartbeatAddr + 0x18); return n }
	beat := func() uint64 { n, _ := m.Memory().Uint64(guest.HeartbeatAddr + 8); return n }
	wait := func(f func() uint64, n uint64) error {
		start := f()
		deadline := time.Now().Add(60 * time.Second)
		for f() < start+n {
			if time.Now().After(deadline) {
				return fmt.Errorf("the guest made no progress")
			}
			time.Sleep(time.Millisecond)
		}
		return nil
	}
	progress := beat
	if strings.HasPrefix(cmdline, "dirty") {
		progress = pass
	}
	if err := wait(progress, 1); err != nil {
		return nil, err
	}
	ss := snapshot.NewSession(m)
	r := &oursResult{}
	take := func(path string, opts snapshot.TakeOptions) (time.Duration, int64, error) {
		m.Pause()
		t0 := time.Now()
		st, err := ss.Take(path, opts)
		d := time.Since(t0)
		m.Resume()
		if err != nil {
			return 0, 0, err
		}
		// A raw image is sparse (zero pages are holes): its size is what
		// it occupies.
		n := st.Bytes
		if fi, err := os.Stat(path); err == nil {
			if sys, ok := fi.Sys().(*syscall.Stat_t); ok && sys.Blocks*512 < n {
				n = sys.Blocks * 512
			}
		}
		return d, n, nil
	}
	full, raw, inc := filepath.Join(dir, "ours.snap"), filepath.Join(dir, "ours.raw"), filepath.Join(dir, "ours.inc")
	if r.raw, r.rawSize, err = take(raw, snapshot.TakeOptions{Raw: true}); err != nil {
		return nil, err
	}
	if r.full, r.fullSize, err = take(full, snapshot.TakeOptions{}); err != nil {
		return nil, err
	}
	if err := wait(progress, 1); err != nil {
		return nil, err
	}
	if r.inc, r.incSize, err = take(inc, snapshot.TakeOptions{Incremental: true}); err != nil {
		return nil, err
	}
	// Restores run with the source gone, as QEMU's do (its source
	// process has quit): the source VM's teardown, and its memory, must
	// not land in the restores' figures.
	closeSource()
	restore := func(path string, opts snapshot.RestoreOptions) (time.Duration, error) {
		// Each without the previous restore's garbage, as a restore
		// process starts: collected now, not during the restore.
		runtime.GC()
		// As collective restore does it: the machine is built while
		// the file is opened.
		t0 := time.Now()
		opts.Prepared = snapshot.Prepare(path, machine.Config{})
		s, err := snapshot.Open(path)
		if err != nil {
			opts.Prepared.Close()
			return 0, err
		}
		defer s.Close()
		rm, _, err := snapshot.Restore([]*snapshot.Snapshot{s}, machine.Config{}, opts)
		d := time.Since(t0)
		if err != nil {
			return 0, err
		}
		rm.Close()
		return d, nil
	}
	if r.restoreLZ4, err = restore(full, snapshot.RestoreOptions{}); err != nil {
		return nil, err
	}
	if r.restoreLazy, err = restore(raw, snapshot.RestoreOptions{Lazy: true, Trust: true}); err != nil {
		return nil, err
	}
	// Another process: from its start to the vCPUs about to run.
	if r.restoreProc, err = restoreProcess(self, "--trust", raw); err != nil {
		return nil, err
	}
	if r.restoreLZ4Proc, err = restoreProcess(self, "--verify-hashes=false", full); err != nil {
		return nil, err
	}
	return r, nil
}

// restoreProcess runs collective restore on file and returns the time
// from the process's start to its vCPUs about to run, as it reports it.
func restoreProcess(self, flag, file string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, self, "restore", flag, "--serial", "none", file)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return 0, err
	}
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	sc := bufio.NewScanner(stderr)
	re := regexp.MustCompile(`ready to run ([0-9.]+) ms after process start`)
	var lines []string
	for sc.Scan() {
		if mm := re.FindStringSubmatch(sc.Text()); mm != nil {
			v, _ := strconv.ParseFloat(mm[1], 64)
			return time.Duration(v * float64(time.Millisecond)), nil
		}
		lines = append(lines, sc.Text())
	}
	return 0, fmt.Errorf("collective restore %s printed no timing: %s", file, strings.Join(lines, "; "))
}

type qemuResult struct {
	save, restore time.Duration
	size          int64
}

// hmp is a QEMU human monitor connection. A migrate command is issued
// detached (-d): HMP's attached migrate checks for completion once a
// second, so it returns a second after even a 50 ms migration.
type hmp struct {
	c net.Conn
	r *bufio.Reader
}

func dialHMP(path string) (*hmp, error) {
	var c net.Conn
	var err error
	for i := 0; i < 500; i++ {
		if c, err = net.Dial("unix", path); err == nil {
			h := &hmp{c: c, r: bufio.NewReader(c)}
			_, err = h.until()
			return h, err
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil, err
}

// until reads up to the next "(qemu) " prompt.
func (h *hmp) until() (string, error) {
	var b strings.Builder
	h.c.SetReadDeadline(time.Now().Add(120 * time.Second))
	for {
		c, err := h.r.ReadByte()
		if err != nil {
			return b.String(), err
		}
		b.WriteByte(c)
		if strings.HasSuffix(b.String(), "(qemu) ") {
			return b.String(), nil
		}
	}
}

var xpRe = regexp.MustCompile(`: (0x[0-9a-f]+)`)

// readU64 reads a guest-physical word through the monitor.
func (h *hmp) readU64(gpa uint64) (uint64, error) {
	out, err := h.cmd(fmt.Sprintf("xp /1gx %#x", gpa))
	if err != nil {
		return 0, err
	}
	m := xpRe.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("qemu: xp printed %q", out)
	}
	return strconv.ParseUint(m[1], 0, 64)
}

func (h *hmp) cmd(s string) (string, error) {
	if _, err := fmt.Fprintf(h.c, "%s\n", s); err != nil {
		return "", err
	}
	return h.until()
}

func qemuArgs(elf, cmdline string, memMiB int, mon string) []string {
	return []string{"-enable-kvm", "-M", "microvm", "-cpu", "host", "-m", strconv.Itoa(memMiB),
		"-nodefaults", "-no-user-config", "-display", "none", "-serial", "none", "-no-reboot",
		"-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-monitor", "unix:" + mon + ",server,nowait",
		"-kernel", elf, "-append", cmdline}
}

func benchQEMU(elf, cmdline string, memMiB int, dir string) (*qemuResult, error) {
	mon := filepath.Join(dir, "qemu.mon")
	os.Remove(mon)
	cmd := exec.Command("qemu-system-x86_64", qemuArgs(elf, cmdline, memMiB, mon)...)
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	h, err := dialHMP(mon)
	if err != nil {
		return nil, err
	}
	defer h.c.Close()
	// Wait, as for ours, until the guest has run: a heartbeat (spin) or a
	// whole verified pass over its area (dirty), read from guest memory.
	off := uint64(8)
	if strings.HasPrefix(cmdline, "dirty") {
		off = 0x18
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		n, err := h.readU64(guest.HeartbeatAddr + off)
		if err != nil {
			return nil, err
		}
		if n >= 1 {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("qemu: the guest made no progress")
		}
		time.Sleep(time.Millisecond)
	}
	file := filepath.Join(dir, "qemu.mig")
	if _, err := h.cmd("migrate_set_parameter max-bandwidth 100G"); err != nil {
		return nil, err
	}
	t0 := time.Now()
	if _, err := h.cmd("stop"); err != nil {
		return nil, err
	}
	if _, err := h.cmd(fmt.Sprintf(`migrate -d "exec:cat > %s"`, file)); err != nil {
		return nil, err
	}
	for {
		out, err := h.cmd("info migrate")
		if err != nil {
			return nil, err
		}
		if strings.Contains(out, "Migration status: completed") {
			break
		}
		if strings.Contains(out, "failed") {
			return nil, fmt.Errorf("qemu migrate failed: %s", out)
		}
		time.Sleep(time.Millisecond)
	}
	r := &qemuResult{save: time.Since(t0)}
	st, err := os.Stat(file)
	if err != nil {
		return nil, err
	}
	r.size = st.Size()
	h.cmd("quit")
	cmd.Wait()

	mon2 := filepath.Join(dir, "qemu2.mon")
	os.Remove(mon2)
	t1 := time.Now()
	c2 := exec.Command("qemu-system-x86_64", append(qemuArgs(elf, cmdline, memMiB, mon2), "-incoming", "exec:cat "+file)...)
	if err := c2.Start(); err != nil {
		return nil, err
	}
	defer func() { c2.Process.Kill(); c2.Wait() }()
	h2, err := dialHMP(mon2)
	if err != nil {
		return nil, err
	}
	defer h2.c.Close()
	for {
		out, err := h2.cmd("info status")
		if err != nil {
			return nil, err
		}
		if strings.Contains(out, "VM status: running") {
			break
		}
		// The source was stopped, so the incoming VM stays paused once
		// the stream is read: continue it, as our restore does.
		if strings.Contains(out, "VM status: paused") && !strings.Contains(out, "inmigrate") {
			if _, err := h2.cmd("cont"); err != nil {
				return nil, err
			}
			continue
		}
		if time.Since(t1) > 60*time.Second {
			return nil, fmt.Errorf("qemu restore: %s", out)
		}
		time.Sleep(200 * time.Microsecond)
	}
	r.restore = time.Since(t1)
	return r, nil
}
