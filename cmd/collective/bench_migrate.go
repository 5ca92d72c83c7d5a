//go:build !vmm

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"collective/api"
	"collective/migrate"
)

// benchMigrate migrates the workload guest between two processes over
// loopback, ours and QEMU's side by side in one run: 256 MiB and 1 GiB,
// idle (spin) and dirtying 64 MiB at 10 and 100 MB/s, runs times each,
// ours and QEMU's runs interleaved; every figure is the median of its
// runs and every ratio the median of the runs' ratios (each ours/QEMU
// pair ran back to back, so a noisy moment hits both). A second table
// migrates a freshly booted appliance to a target that holds its base
// snapshot. It prints the tables and writes JSON, CSV and an SVG plot to
// $COLLECTIVE_BENCH_OUT (default /tmp/collective-bench-migrate).
func benchMigrate(_ []peer, elf string, runs, _ int) error {
	self, err := vmmBinary() // the collective a user runs; it execs collective-tools for migrate
	if err != nil {
		return err
	}
	out := os.Getenv("COLLECTIVE_BENCH_OUT")
	if out == "" {
		out = filepath.Join(os.TempDir(), "collective-bench-migrate")
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	n := max(1, runs)
	// COLLECTIVE_BENCH_MIGRATE=SUBSTRING runs only the cases whose "MEM
	// MiB LOAD" name contains it ("fresh" for table e2 alone).
	only := os.Getenv("COLLECTIVE_BENCH_MIGRATE")
	var raw strings.Builder // every run, for migrate-runs.csv
	raw.WriteString("case,run,vmm,total_ms,downtime_ms,source_downtime_ms,guest_gap_ms,wire_bytes,rounds,to_run_ms,pause_to_run_ms,ack_downtime_ms\n")
	rawRows := func(name string, rs ...[]migResult) {
		for _, set := range rs {
			for i, r := range set {
				fmt.Fprintf(&raw, "%s,%d,%s,%.3f,%.3f,%.3f,%.3f,%d,%d,%.3f,%.3f,%.3f\n", name, i, r.VMM, r.TotalMS, r.DowntimeMS, r.SourceDowntimeMS, r.GuestGapMS, r.Bytes, r.Rounds, r.ToRunMS, r.PauseToRunMS, r.AckDowntimeMS)
			}
		}
	}
	var results []migResult
	var rows [][]string
	f2 := func(x float64) string { return fmt.Sprintf("%.2f", x) }
	f3 := func(x float64) string {
		if x == 0 {
			return "-" // no pair with both figures
		}
		return fmt.Sprintf("%.3f", x)
	}
	for _, mem := range []int{256, 1024} {
		for _, load := range []struct {
			name    string
			cmdline string
		}{{"idle", "spin gaps"}, {"10MB/s", "dirty 64M 10 0"}, {"100MB/s", "dirty 64M 100 0"}} {
			name := fmt.Sprintf("%d MiB %s", mem, load.name)
			if only != "" && !strings.Contains(name, only) {
				continue
			}
			ours, q, err := runBoth(n, name, mem, load.name,
				func() (migResult, error) { return migrateOurs(self, elf, load.cmdline, mem, nil, nil, 0) },
				func() (migResult, error) { return migrateQEMU(elf, load.cmdline, mem, nil, 0) })
			if err != nil {
				return err
			}
			rawRows(name, ours, q)
			o, qm := medianResult(ours), medianResult(q)
			results = append(results, o, qm)
			gap := func(r migResult) string {
				if r.GuestGapMS == 0 {
					return "-"
				}
				return f2(r.GuestGapMS)
			}
			toRun := func(r migResult) float64 { return r.ToRunMS }
			pauseToRun := func(r migResult) float64 { return r.PauseToRunMS }
			rows = append(rows, []string{fmt.Sprintf("%d MiB", mem), load.name,
				fmt.Sprintf("%.1f", o.TotalMS), fmt.Sprintf("%.1f", qm.ToRunMS), f3(pairRatio2(ours, q, func(r migResult) float64 { return r.TotalMS }, toRun)),
				fmt.Sprintf("%.0f", qm.TotalMS), f3(pairRatio(ours, q, func(r migResult) float64 { return r.TotalMS })),
				f2(o.DowntimeMS), f2(qm.PauseToRunMS), f3(pairRatio2(ours, q, func(r migResult) float64 { return r.DowntimeMS }, pauseToRun)), f2(o.AckDowntimeMS),
				fmt.Sprintf("%.0f", qm.DowntimeMS), f3(pairRatio(ours, q, func(r migResult) float64 { return r.DowntimeMS })),
				f2(o.SourceDowntimeMS), f3(pairRatio2(ours, q, func(r migResult) float64 { return r.SourceDowntimeMS }, func(r migResult) float64 { return r.DowntimeMS })),
				gap(o), gap(qm), f3(pairRatio(ours, q, func(r migResult) float64 { return r.GuestGapMS })),
				f2(float64(o.Bytes) / 1e6), f2(float64(qm.Bytes) / 1e6), f3(pairRatio(ours, q, func(r migResult) float64 { return float64(r.Bytes) })),
				f3(float64(o.Bytes) / float64(max(o.NonZero, 1))),
				strconv.Itoa(o.Rounds), strconv.Itoa(qm.Rounds)})
		}
	}

	if len(rows) > 0 {
		table(fmt.Sprintf("(e) live migration over loopback, workload guest, ours vs QEMU 7.2 microvm (downtime limit 50 ms, no bandwidth cap); median of %d interleaved runs, ratios the median of ours/QEMU over runs in the same position (each VMM goes first in every other round).\n"+
			"    total: from the migrate command to the guest running on the target, for both (ours to the target's resumed acknowledgement, QEMU's to the target's RESUME event).\n"+
			"    downtime: from the source's vCPUs stopped to the target's started, for both: QEMU's STOP event (sent once its vCPUs are paused) to the target's RESUME event (QMP timestamps);\n"+
			"    ours from the vCPUs parked and devices quiesced to the target's vCPUs started (wall-clock timestamps of the two processes, as QEMU's); from the pause request to the acknowledgement's arrival, ours is ack ms.\n"+
			"    qemu own: QEMU's own figures (integer ms), which stop at the last byte sent, before the target loads and starts. src-side: ours on that definition (pause to the last byte sent); its ratio is against QEMU's own downtime.\n"+
			"    guest gap: the stall the guest itself saw (spin gaps, first line on the target), both VMMs", n),
			[]string{"guest", "load", "total ms", "qemu", "ratio", "qemu own", "ratio", "downtime ms", "qemu", "ratio", "ack ms", "qemu own", "ratio", "src-side ms", "ratio", "guest gap ms", "qemu", "ratio", "wire MB", "qemu", "ratio", "wire/non-zero", "rounds", "qemu"}, rows)
	}
	// Parallel streams: ours against QEMU's multifd, the same number of
	// connections, on the dirtiest load.
	var srows [][]string
	for _, mem := range []int{256, 1024} {
		const streams = 4
		name := fmt.Sprintf("%d MiB 100MB/s %d streams", mem, streams)
		if only != "" && !strings.Contains(name, only) {
			continue
		}
		cmdline := "dirty 64M 100 0"
		ours, q, err := runBoth(n, name, mem, fmt.Sprintf("100MB/s, %d streams", streams),
			func() (migResult, error) { return migrateOurs(self, elf, cmdline, mem, nil, nil, streams) },
			func() (migResult, error) { return migrateQEMU(elf, cmdline, mem, nil, streams) })
		if err != nil {
			return err
		}
		rawRows(name, ours, q)
		o, qm := medianResult(ours), medianResult(q)
		results = append(results, o, qm)
		srows = append(srows, []string{fmt.Sprintf("%d MiB", mem), "100MB/s", strconv.Itoa(streams),
			fmt.Sprintf("%.1f", o.TotalMS), fmt.Sprintf("%.1f", qm.ToRunMS), f3(pairRatio2(ours, q, func(r migResult) float64 { return r.TotalMS }, func(r migResult) float64 { return r.ToRunMS })),
			f2(o.DowntimeMS), f2(qm.PauseToRunMS), f3(pairRatio2(ours, q, func(r migResult) float64 { return r.DowntimeMS }, func(r migResult) float64 { return r.PauseToRunMS })),
			f2(float64(o.Bytes) / 1e6), f2(float64(qm.Bytes) / 1e6), f3(pairRatio(ours, q, func(r migResult) float64 { return float64(r.Bytes) })),
			strconv.Itoa(o.Rounds), strconv.Itoa(qm.Rounds)})
	}
	if len(srows) > 0 {
		table(fmt.Sprintf("(e3) parallel streams: ours (--streams) against QEMU's multifd with as many channels, as in (e) otherwise; median of %d interleaved runs, ratios as in (e)", n),
			[]string{"guest", "load", "streams", "total ms", "qemu", "ratio", "downtime ms", "qemu", "ratio", "wire MB", "qemu", "ratio", "rounds", "qemu"}, srows)
	}
	// A freshly booted appliance, its base snapshot in the target's cache.
	if only == "" || strings.Contains("256 MiB fresh appliance", only) {
		fresh, err := benchFresh(self, elf, n, rawRows)
		if err != nil {
			return err
		}
		results = append(results, fresh...)
	}
	if err := os.WriteFile(filepath.Join(out, "migrate-runs.csv"), []byte(raw.String()), 0o644); err != nil {
		return err
	}

	jb, _ := json.MarshalIndent(results, "", "  ")
	if err := os.WriteFile(filepath.Join(out, "migrate.json"), jb, 0o644); err != nil {
		return err
	}
	var csv strings.Builder
	csv.WriteString("vmm,mem_mib,load,total_ms,downtime_ms,source_downtime_ms,guest_gap_ms,wire_bytes,nonzero_bytes,rounds,runs,to_run_ms,pause_to_run_ms,ack_downtime_ms\n")
	for _, r := range results {
		fmt.Fprintf(&csv, "%s,%d,%s,%.3f,%.3f,%.3f,%.3f,%d,%d,%d,%d,%.3f,%.3f,%.3f\n", r.VMM, r.Mem, r.Load, r.TotalMS, r.DowntimeMS, r.SourceDowntimeMS, r.GuestGapMS, r.Bytes, r.NonZero, r.Rounds, r.Runs, r.ToRunMS, r.PauseToRunMS, r.AckDowntimeMS)
	}
	if err := os.WriteFile(filepath.Join(out, "migrate.csv"), []byte(csv.String()), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(out, "migrate.svg"), []byte(migrateSVG(results[:min(12, len(results))])), 0o644); err != nil {
		return err
	}
	fmt.Printf("wrote %s/migrate.{json,csv,svg} and migrate-runs.csv (every run)\n", out)
	return nil
}

// runBoth runs n migrations with each VMM (each through retry), the two
// taking turns going first: a run can inherit the host's state (page
// reclaim, writeback) of the run before it. Each result is labelled with
// mem and load.
func runBoth(n int, name string, mem int, load string, ours, qemu func() (migResult, error)) (o, q []migResult, err error) {
	run := func(vmm string, f func() (migResult, error), out *[]migResult) func() error {
		return func() error {
			r, err := retry(vmm, f)
			if err != nil {
				return fmt.Errorf("%s %s: %w", vmm, name, err)
			}
			r.Mem, r.Load = mem, load
			*out = append(*out, r)
			return nil
		}
	}
	for i := 0; i < n; i++ {
		if err := inTurn(i, run("collective", ours, &o), run("qemu", qemu, &q)); err != nil {
			return nil, nil, err
		}
	}
	return o, q, nil
}

// freshPayload is the size of the fresh appliance's image in RAM.
const freshPayload = 32 << 20

// benchFresh measures the issue's "a freshly booted appliance migrates
// with at most 10% of its memory on the wire when the target holds its
// base snapshot". The appliance is the workload guest (spin) with a 32
// MiB initrd of fixed pseudo-random, incompressible content: its image
// (kernel and initramfs) in RAM. Its base snapshot is taken from an
// earlier boot of the same ELF, initrd and command line and put in the
// target's --cache; each run boots it afresh and migrates it, with the
// cache and, for reference, without; QEMU migrates the same boot.
func benchFresh(self, elf string, n int, rawRows func(string, ...[]migResult)) ([]migResult, error) {
	dir, err := os.MkdirTemp("", "bench-migrate-fresh")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	initrd := filepath.Join(dir, "appliance.img")
	b := make([]byte, freshPayload)
	rand.NewChaCha8([32]byte{'c', 'l', 'v', 'a', 'p', 'p'}).Read(b)
	if err := os.WriteFile(initrd, b, 0o644); err != nil {
		return nil, err
	}
	cache := filepath.Join(dir, "cache")
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, err
	}
	if err := snapshotFresh(self, elf, initrd, filepath.Join(cache, "base.snap")); err != nil {
		return nil, fmt.Errorf("base snapshot: %w", err)
	}
	const mem = 256
	src := []string{"--initrd", initrd}
	var with, without, q []migResult
	for i := 0; i < n; i++ {
		r, err := retry("collective", func() (migResult, error) {
			return migrateOurs(self, elf, "spin gaps", mem, src, []string{"--cache", cache}, 0)
		})
		if err != nil {
			return nil, fmt.Errorf("fresh appliance, cache: %w", err)
		}
		with = append(with, r)
		if r, err = retry("collective", func() (migResult, error) { return migrateOurs(self, elf, "spin gaps", mem, src, nil, 0) }); err != nil {
			return nil, fmt.Errorf("fresh appliance, no cache: %w", err)
		}
		without = append(without, r)
		qr, err := retry("qemu", func() (migResult, error) { return migrateQEMU(elf, "spin gaps", mem, []string{"-initrd", initrd}, 0) })
		if err != nil {
			return nil, fmt.Errorf("fresh appliance, qemu: %w", err)
		}
		q = append(q, qr)
	}
	rawRows("fresh appliance: cache, no cache, qemu", with, without, q)
	var rows [][]string
	var out []migResult
	for _, c := range []struct {
		name string
		rs   []migResult
	}{{"collective, base snapshot in the target's cache", with}, {"collective, no cache", without}, {"qemu", q}} {
		m := medianResult(c.rs)
		m.Mem, m.Load = mem, "fresh appliance"
		if c.name == "collective, no cache" {
			m.Load = "fresh appliance, no cache"
		}
		out = append(out, m)
		nz := float64(max(with[0].NonZero, 1)) // the guest's non-zero memory, as our round 0 found it
		total, down := m.TotalMS, m.DowntimeMS
		if m.ToRunMS > 0 { // QEMU, on our definitions
			total, down = m.ToRunMS, m.PauseToRunMS
		}
		rows = append(rows, []string{c.name, fmt.Sprintf("%.2f", nz/1e6), fmt.Sprintf("%.3f", float64(m.Bytes)/1e6),
			fmt.Sprintf("%.2f%%", 100*float64(m.Bytes)/nz), fmt.Sprintf("%.3f%%", 100*float64(m.Bytes)/float64(mem<<20)),
			fmt.Sprintf("%.1f", total), fmt.Sprintf("%.2f", down)})
	}
	table(fmt.Sprintf("(e2) a freshly booted appliance (workload guest, 256 MiB, 32 MiB incompressible initrd) migrated; median of %d interleaved runs (target: at most 10%% of its memory on the wire with the base snapshot in the target's cache); total and downtime to the guest running on the target, as in (e)", n),
		[]string{"case", "non-zero MB", "wire MB", "wire/non-zero", "wire/RAM", "total ms", "downtime ms"}, rows)
	return out, nil
}

// snapshotFresh boots the appliance once and snapshots it to path.
func snapshotFresh(self, elf, initrd, path string) error {
	dir, err := os.MkdirTemp("", "bench-migrate-base")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	sock, serial := filepath.Join(dir, "api.sock"), filepath.Join(dir, "out")
	src, err := startProc([]string{self, "run", "--kernel", elf, "--initrd", initrd, "--append", "spin gaps", "--mem", "256M", "--api", sock, "--serial", "file:" + serial})
	if err != nil {
		return err
	}
	defer stopProc(src)
	if err := waitFile(serial, "spin: looping", 30*time.Second); err != nil {
		return err
	}
	_, err = api.NewClient(sock).Snapshot(api.SnapshotRequest{Path: path})
	return err
}

type migResult struct {
	VMM     string  `json:"vmm"`
	Mem     int     `json:"mem_mib"`
	Load    string  `json:"load"`
	Runs    int     `json:"runs"`
	TotalMS float64 `json:"total_ms"`
	// DowntimeMS runs from the source's vCPUs stopped to the target's
	// started: QEMU's own figure (query-migrate, to the last byte sent);
	// ours on the definition of PauseToRunMS, from the two processes'
	// wall-clock timestamps (report: stopped_unix_ns to
	// target_resumed_unix_ns), or without them the resumed
	// acknowledgement less its estimated one-way delay.
	DowntimeMS float64 `json:"downtime_ms"`
	// AckDowntimeMS is ours from the pause request to the resumed
	// acknowledgement's arrival: the pause's own cost and the ack's trip
	// included (the figure the report calls downtime_ms).
	AckDowntimeMS float64 `json:"ack_downtime_ms,omitempty"`
	// ToRunMS and PauseToRunMS are QEMU's total time and downtime on our
	// definitions, to the guest running on the target: from the migrate
	// command (and from the source's STOP event) to the target's RESUME
	// event, on QEMU's event timestamps. Ours are TotalMS and DowntimeMS.
	ToRunMS      float64 `json:"to_run_ms,omitempty"`
	PauseToRunMS float64 `json:"pause_to_run_ms,omitempty"`
	// SourceDowntimeMS is ours on QEMU's definition: from the pause to
	// the last byte sent.
	SourceDowntimeMS float64 `json:"source_downtime_ms,omitempty"`
	// GuestGapMS is the stall the guest saw (spin gaps: the target's
	// first gap line); 0 when not measured.
	GuestGapMS float64 `json:"guest_gap_ms,omitempty"`
	Bytes      int64   `json:"wire_bytes"`
	NonZero    int64   `json:"nonzero_bytes,omitempty"`
	Rounds     int     `json:"rounds"`
	// Stop is the stop phase's steps (ours; the median run's).
	Stop *migrate.StopTimes `json:"stop,omitempty"`
	// DirtyPerRound is the pages dirtied during each round (ours).
	DirtyPerRound []int64          `json:"dirty_per_round,omitempty"`
	Timeline      []migrate.Sample `json:"timeline"`
}

// medianResult takes each figure's median over the runs; the curves and
// the stop steps are the run of median total time's.
func medianResult(rs []migResult) migResult {
	med := func(f func(migResult) float64) float64 {
		xs := make([]float64, len(rs))
		for i, r := range rs {
			xs[i] = f(r)
		}
		return median(xs)
	}
	best := rs[0]
	m := med(func(r migResult) float64 { return r.TotalMS })
	for _, r := range rs {
		if r.TotalMS == m {
			best = r
		}
	}
	best.Runs = len(rs)
	best.TotalMS = m
	best.DowntimeMS = med(func(r migResult) float64 { return r.DowntimeMS })
	best.AckDowntimeMS = med(func(r migResult) float64 { return r.AckDowntimeMS })
	best.ToRunMS = med(func(r migResult) float64 { return r.ToRunMS })
	best.PauseToRunMS = med(func(r migResult) float64 { return r.PauseToRunMS })
	best.SourceDowntimeMS = med(func(r migResult) float64 { return r.SourceDowntimeMS })
	best.GuestGapMS = med(func(r migResult) float64 { return r.GuestGapMS })
	best.Bytes = int64(med(func(r migResult) float64 { return float64(r.Bytes) }))
	best.NonZero = int64(med(func(r migResult) float64 { return float64(r.NonZero) }))
	best.Rounds = int(med(func(r migResult) float64 { return float64(r.Rounds) }))
	return best
}

// pairRatio is the median over position-matched pairs of runs of
// f(ours) / f(qemu) (0 when no pair has both figures). The VMMs take
// turns going first (inTurn), and on this host the position alone moves
// a figure up to 3x (the run that goes second starts on memory the first
// one just freed): so ours[i] is paired with qemu[i^1], the run of the
// other round in which QEMU held the same position.
func pairRatio(ours, q []migResult, f func(migResult) float64) float64 {
	return pairRatio2(ours, q, f, f)
}

// pairRatio2 is pairRatio of f(ours) / g(qemu).
func pairRatio2(ours, q []migResult, f, g func(migResult) float64) float64 {
	var xs []float64
	for i := range ours {
		j := i ^ 1
		if j < len(q) && g(q[j]) != 0 && f(ours[i]) != 0 {
			xs = append(xs, f(ours[i])/g(q[j]))
		}
	}
	return median(xs)
}

// waitListen waits until a socket listens on addr's port
// (/proc/net/tcp, state 0A).
func waitListen(addr string, d time.Duration) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return err
	}
	want := fmt.Sprintf(":%04X ", p)
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
			b, _ := os.ReadFile(f)
			for _, line := range strings.Split(string(b), "\n") {
				fs := strings.Fields(line)
				if len(fs) > 3 && strings.HasSuffix(fs[1]+" ", want) && fs[3] == "0A" {
					return nil
				}
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	return fmt.Errorf("nothing listens on %s after %v", addr, d)
}

// retry runs f up to 3 times: a run can fail on a loaded machine (a
// process slow to start); the error is printed, not hidden.
func retry(what string, f func() (migResult, error)) (migResult, error) {
	var err error
	for i := 0; i < 3; i++ {
		var r migResult
		if r, err = f(); err == nil {
			return r, nil
		}
		fmt.Fprintf(os.Stderr, "collective bench migrate: %s: %v (run again)\n", what, err)
	}
	return migResult{}, err
}

// firstGap returns the first "spin: gap N us" of a serial log, in ms.
func firstGap(path string, d time.Duration) float64 {
	deadline := time.Now().Add(d)
	for {
		b, _ := os.ReadFile(path)
		if _, rest, ok := strings.Cut(string(b), "spin: gap "); ok {
			if num, _, ok := strings.Cut(rest, " us"); ok {
				if us, err := strconv.ParseFloat(num, 64); err == nil {
					return us / 1000
				}
			}
		}
		if time.Now().After(deadline) {
			return 0
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitFile(path, s string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if b, _ := os.ReadFile(path); strings.Contains(string(b), s) {
			return nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	b, _ := os.ReadFile(path)
	return fmt.Errorf("no %q in %s within %v:\n%s", s, path, d, b)
}

func readyLine(cmdline string) string {
	if strings.HasPrefix(cmdline, "dirty") {
		return "pass 1 verified"
	}
	return "spin: looping"
}

func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func startProc(argv []string) (*exec.Cmd, error) {
	c := exec.Command(argv[0], argv[1:]...)
	return c, c.Start()
}

// startProcErr is startProc with stderr to a file.
func startProcErr(argv []string, errPath string) (*exec.Cmd, error) {
	f, err := os.Create(errPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	c := exec.Command(argv[0], argv[1:]...)
	c.Stderr = f
	return c, c.Start()
}

func stopProc(c *exec.Cmd) {
	if c != nil && c.Process != nil {
		c.Process.Kill()
		c.Wait()
	}
}

// migrateOurs migrates the workload guest between two collective
// processes, its pages over streams TCP connections (0: the default).
func migrateOurs(self, elf, cmdline string, memMiB int, srcArgs, tgtArgs []string, streams int) (migResult, error) {
	dir, err := os.MkdirTemp("", "bench-migrate")
	if err != nil {
		return migResult{}, err
	}
	defer os.RemoveAll(dir)
	addr, err := freePort()
	if err != nil {
		return migResult{}, err
	}
	// The target knows the size, as QEMU's does (-m).
	tgtSerial := filepath.Join(dir, "tgt.out")
	tgt, err := startProcErr(append([]string{self, "run", "--incoming", addr, "--mem", fmt.Sprintf("%dM", memMiB), "--serial", "file:" + tgtSerial}, tgtArgs...), filepath.Join(dir, "tgt.err"))
	if err != nil {
		return migResult{}, err
	}
	defer stopProc(tgt)
	sock := filepath.Join(dir, "api.sock")
	serial := filepath.Join(dir, "src.out")
	src, err := startProc(append([]string{self, "run", "--kernel", elf, "--append", cmdline, "--mem", fmt.Sprintf("%dM", memMiB), "--api", sock, "--serial", "file:" + serial}, srcArgs...))
	if err != nil {
		return migResult{}, err
	}
	defer stopProc(src)
	if err := waitFile(serial, readyLine(cmdline), 30*time.Second); err != nil {
		return migResult{}, err
	}
	// Let a dirtying guest reach its rate.
	time.Sleep(300 * time.Millisecond)
	if len(tgtArgs) > 0 {
		// The target loads its cache before it listens.
		if err := waitFile(filepath.Join(dir, "tgt.err"), "waiting for a migration", 30*time.Second); err != nil {
			return migResult{}, err
		}
	}
	rep, err := api.NewClient(sock).Migrate(api.MigrateRequest{To: addr, DowntimeMS: 50, Streams: streams})
	if err != nil {
		return migResult{}, err
	}
	r := migResult{VMM: "collective", TotalMS: rep.TotalMS, DowntimeMS: rep.DowntimeMS, AckDowntimeMS: rep.DowntimeMS,
		SourceDowntimeMS: rep.PausedWorkMS, Bytes: rep.BytesWire, NonZero: rep.NonZeroBytes, Rounds: rep.Rounds, Timeline: rep.Timeline, Stop: rep.Stop}
	// Timed as QEMU's STOP and RESUME events time it: from the vCPUs
	// stopped (QEMU sends STOP once pause_all_vcpus returns) to the
	// target running (RESUME, sent as the target starts its vCPUs).
	if rep.Stop != nil && rep.DowntimeEstMS > rep.Stop.Paused {
		r.DowntimeMS = rep.DowntimeEstMS - rep.Stop.Paused
	}
	// Both processes run on this host, on one clock: the target's resume
	// timestamp, as QEMU's RESUME event gives it (the estimate above
	// splits the acknowledgement's round trip in halves, which a
	// wake-up delayed on either side skews).
	if d := rep.TargetResumedUnixNS - rep.StoppedUnixNS; rep.StoppedUnixNS > 0 && rep.TargetResumedUnixNS > 0 && d > 0 {
		r.DowntimeMS = float64(d) / 1e6
	}
	if strings.HasPrefix(cmdline, "spin gaps") {
		r.GuestGapMS = firstGap(tgtSerial, 2*time.Second)
	}
	for _, s := range rep.RoundStats {
		r.DirtyPerRound = append(r.DirtyPerRound, s.DirtyAfter)
	}
	return r, nil
}

// qmp is a minimal QMP client. It keeps the events it reads past, with
// QEMU's own timestamps (wall clock, like time.Now's).
type qmp struct {
	c      net.Conn
	r      *bufio.Reader
	events map[string]time.Time // the first of each name
}

// qmpLine is a QMP reply or event.
type qmpLine struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Desc string `json:"desc"`
	} `json:"error"`
	Event     string `json:"event"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// read reads one line, noting it when it is an event.
func (q *qmp) read() (qmpLine, error) {
	var l qmpLine
	line, err := q.r.ReadString('\n')
	if err != nil {
		return l, err
	}
	if err := json.Unmarshal([]byte(line), &l); err != nil {
		return l, err
	}
	if l.Event != "" {
		if q.events == nil {
			q.events = map[string]time.Time{}
		}
		if _, ok := q.events[l.Event]; !ok {
			q.events[l.Event] = time.Unix(l.Timestamp.Seconds, l.Timestamp.Microseconds*1000)
		}
	}
	return l, nil
}

// waitEvent returns the time of the first event called name, reading
// until it comes or d passes.
func (q *qmp) waitEvent(name string, d time.Duration) (time.Time, error) {
	q.c.SetReadDeadline(time.Now().Add(d))
	defer q.c.SetReadDeadline(time.Time{})
	for {
		if t, ok := q.events[name]; ok {
			return t, nil
		}
		if _, err := q.read(); err != nil {
			return time.Time{}, fmt.Errorf("qmp: waiting for %s: %w", name, err)
		}
	}
}

func dialQMP(path string) (*qmp, error) {
	var c net.Conn
	var err error
	for i := 0; i < 500; i++ {
		if c, err = net.Dial("unix", path); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		return nil, err
	}
	q := &qmp{c: c, r: bufio.NewReader(c)}
	if _, err := q.r.ReadString('\n'); err != nil { // greeting
		return nil, err
	}
	if _, err := q.do("qmp_capabilities", nil); err != nil {
		return nil, err
	}
	return q, nil
}

func (q *qmp) do(cmd string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	if _, err := q.c.Write(append(b, '\n')); err != nil {
		return nil, err
	}
	for {
		resp, err := q.read()
		if err != nil {
			return nil, err
		}
		if resp.Event != "" {
			continue
		}
		if resp.Error != nil {
			return nil, fmt.Errorf("qmp %s: %s", cmd, resp.Error.Desc)
		}
		return resp.Return, nil
	}
}

// migrateQEMU migrates the workload guest between two QEMU processes;
// with streams > 1 over that many multifd channels (QEMU's parallel
// streams, off by default).
func migrateQEMU(elf, cmdline string, memMiB int, extra []string, streams int) (migResult, error) {
	dir, err := os.MkdirTemp("", "bench-migrate-qemu")
	if err != nil {
		return migResult{}, err
	}
	defer os.RemoveAll(dir)
	addr, err := freePort()
	if err != nil {
		return migResult{}, err
	}
	base := func(serial string) []string {
		return []string{"qemu-system-x86_64", "-enable-kvm", "-M", "microvm", "-cpu", "host", "-m", strconv.Itoa(memMiB),
			"-nographic", "-no-reboot", "-nodefaults", "-serial", "file:" + serial,
			"-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", elf, "-append", cmdline}
	}
	tgtSerial := filepath.Join(dir, "tgt.out")
	tsock := filepath.Join(dir, "tqmp.sock")
	incoming := "tcp:" + addr
	if streams > 1 {
		// multifd is set on both sides before the target listens.
		incoming = "defer"
	}
	tgt, err := startProc(append(append(base(tgtSerial), extra...), "-incoming", incoming, "-qmp", "unix:"+tsock+",server=on,wait=off"))
	if err != nil {
		return migResult{}, err
	}
	defer stopProc(tgt)
	sock := filepath.Join(dir, "qmp.sock")
	serial := filepath.Join(dir, "src.out")
	src, err := startProc(append(append(base(serial), extra...), "-qmp", "unix:"+sock+",server=on,wait=off"))
	if err != nil {
		return migResult{}, err
	}
	defer stopProc(src)
	if err := waitFile(serial, readyLine(cmdline), 30*time.Second); err != nil {
		return migResult{}, err
	}
	time.Sleep(300 * time.Millisecond)
	q, err := dialQMP(sock)
	if err != nil {
		return migResult{}, err
	}
	defer q.c.Close()
	// The target's monitor, for its RESUME event: QEMU's own downtime
	// stops at the last byte sent; ours runs to the guest running again.
	tq, err := dialQMP(tsock)
	if err != nil {
		return migResult{}, err
	}
	defer tq.c.Close()
	if streams > 1 {
		for _, m := range []*qmp{q, tq} {
			if _, err := m.do("migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{{"capability": "multifd", "state": true}}}); err != nil {
				return migResult{}, err
			}
			if _, err := m.do("migrate-set-parameters", map[string]any{"multifd-channels": streams}); err != nil {
				return migResult{}, err
			}
		}
		if _, err := tq.do("migrate-incoming", map[string]any{"uri": "tcp:" + addr}); err != nil {
			return migResult{}, err
		}
	}
	// A probe connection would be taken for the migration: look for the
	// target's listening socket instead.
	if err := waitListen(addr, 30*time.Second); err != nil {
		return migResult{}, err
	}
	// Our migration has no bandwidth cap and a 50 ms downtime limit:
	// QEMU gets the same (its default cap is 128 MiB/s).
	if _, err := q.do("migrate-set-parameters", map[string]any{"max-bandwidth": int64(100e9), "downtime-limit": 50}); err != nil {
		return migResult{}, err
	}
	start := time.Now()
	if _, err := q.do("migrate", map[string]any{"uri": "tcp:" + addr}); err != nil {
		return migResult{}, err
	}
	var r migResult
	r.VMM = "qemu"
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	for ctx.Err() == nil {
		raw, err := q.do("query-migrate", nil)
		if err != nil {
			return r, err
		}
		var st struct {
			Status    string  `json:"status"`
			ErrorDesc string  `json:"error-desc"`
			TotalTime float64 `json:"total-time"`
			Downtime  float64 `json:"downtime"`
			RAM       struct {
				Transferred    int64 `json:"transferred"`
				DirtySyncCount int   `json:"dirty-sync-count"`
			} `json:"ram"`
		}
		if err := json.Unmarshal(raw, &st); err != nil {
			return r, err
		}
		r.Timeline = append(r.Timeline, migrate.Sample{MS: float64(time.Since(start).Microseconds()) / 1000, Bytes: st.RAM.Transferred})
		switch st.Status {
		case "completed":
			r.TotalMS, r.DowntimeMS, r.Bytes, r.Rounds = st.TotalTime, st.Downtime, st.RAM.Transferred, st.RAM.DirtySyncCount
			stop, err := q.waitEvent("STOP", 5*time.Second)
			if err != nil {
				return r, err
			}
			resume, err := tq.waitEvent("RESUME", 10*time.Second)
			if err != nil {
				return r, err
			}
			r.ToRunMS = float64(resume.Sub(start).Microseconds()) / 1000
			r.PauseToRunMS = float64(resume.Sub(stop).Microseconds()) / 1000
			if strings.HasPrefix(cmdline, "spin gaps") {
				r.GuestGapMS = firstGap(tgtSerial, 2*time.Second)
			}
			return r, nil
		case "failed", "cancelled":
			return r, errors.New("qemu migration " + st.Status + ": " + st.ErrorDesc)
		}
		time.Sleep(2 * time.Millisecond)
	}
	return r, errors.New("qemu migration did not complete in 120 s")
}

// migrateSVG draws two panels: dirty pages per round (ours) and bytes on
// the wire over time (ours solid, QEMU dashed), one colour per case.
func migrateSVG(rs []migResult) string {
	const W, H, pad = 900, 360, 50
	colors := []string{"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">`+"\n", W, 2*H)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", W, 2*H)
	panel := func(y0 int, title, xl, yl string, xmax, ymax float64, series func(func(name, color string, dash bool, pts [][2]float64))) {
		x0, pw, ph := pad, W-2*pad-150, H-2*pad
		fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="13">%s</text>`+"\n", x0, y0+20, title)
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#888"/>`+"\n", x0, y0+pad, pw, ph)
		fmt.Fprintf(&b, `<text x="%d" y="%d">%s (max %.4g)</text>`+"\n", x0+pw/2-40, y0+pad+ph+30, xl, xmax)
		fmt.Fprintf(&b, `<text x="%d" y="%d" transform="rotate(-90 %d %d)">%s (max %.4g)</text>`+"\n", 12, y0+pad+ph, 12, y0+pad+ph, yl, ymax)
		legend := 0
		series(func(name, color string, dash bool, pts [][2]float64) {
			if len(pts) == 0 {
				return
			}
			var p strings.Builder
			for _, pt := range pts {
				fmt.Fprintf(&p, "%.1f,%.1f ", float64(x0)+pt[0]/xmax*float64(pw), float64(y0+pad+ph)-pt[1]/ymax*float64(ph))
			}
			d := ""
			if dash {
				d = ` stroke-dasharray="5,3"`
			}
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="1.5"%s points="%s"/>`+"\n", color, d, p.String())
			fmt.Fprintf(&b, `<text x="%d" y="%d" fill="%s">%s</text>`+"\n", x0+pw+8, y0+pad+12+14*legend, color, name)
			legend++
		})
	}
	// Panel 1: dirty pages per round.
	var xmax, ymax float64 = 1, 1
	for _, r := range rs {
		xmax = max(xmax, float64(len(r.DirtyPerRound)))
		for _, d := range r.DirtyPerRound {
			ymax = max(ymax, float64(d))
		}
	}
	panel(0, "pages dirtied during each round (collective)", "round", "pages", xmax, ymax, func(draw func(string, string, bool, [][2]float64)) {
		k := 0
		for _, r := range rs {
			if r.VMM != "collective" {
				continue
			}
			var pts [][2]float64
			for i, d := range r.DirtyPerRound {
				pts = append(pts, [2]float64{float64(i + 1), float64(d)})
			}
			draw(fmt.Sprintf("%d MiB %s", r.Mem, r.Load), colors[k%len(colors)], false, pts)
			k++
		}
	})
	// Panel 2: bytes over time.
	xmax, ymax = 1, 1
	for _, r := range rs {
		for _, s := range r.Timeline {
			xmax, ymax = max(xmax, s.MS), max(ymax, float64(s.Bytes)/1e6)
		}
	}
	panel(H, "bytes on the wire over time (solid: collective, dashed: QEMU)", "ms", "MB", xmax, ymax, func(draw func(string, string, bool, [][2]float64)) {
		for i, r := range rs {
			var pts [][2]float64
			for _, s := range r.Timeline {
				pts = append(pts, [2]float64{s.MS, float64(s.Bytes) / 1e6})
			}
			draw(fmt.Sprintf("%s %d MiB %s", r.VMM, r.Mem, r.Load), colors[(i/2)%len(colors)], r.VMM == "qemu", pts)
		}
	})
	b.WriteString("</svg>\n")
	return b.String()
}
