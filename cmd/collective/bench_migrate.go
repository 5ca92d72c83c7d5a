//go:build !vmm

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
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
// idle (spin) and dirtying 64 MiB at 10 and 100 MB/s. It prints a table,
// writes JSON, CSV and an SVG plot to $COLLECTIVE_BENCH_OUT (default
// /tmp/collective-bench-migrate).
func benchMigrate(_ []peer, elf string, runs, _ int) error {
	self, err := os.Executable()
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
	n := max(1, runs/5)
	var results []migResult
	for _, mem := range []int{256, 1024} {
		for _, load := range []struct {
			name    string
			cmdline string
		}{{"idle", "spin"}, {"10MB/s", "dirty 64M 10 0"}, {"100MB/s", "dirty 64M 100 0"}} {
			var ours, q []migResult
			for i := 0; i < n; i++ {
				r, err := migrateOurs(self, elf, load.cmdline, mem)
				if err != nil {
					return fmt.Errorf("collective %d MiB %s: %w", mem, load.name, err)
				}
				r.Mem, r.Load = mem, load.name
				ours = append(ours, r)
				qr, err := migrateQEMU(elf, load.cmdline, mem)
				if err != nil {
					return fmt.Errorf("qemu %d MiB %s: %w", mem, load.name, err)
				}
				qr.Mem, qr.Load = mem, load.name
				q = append(q, qr)
			}
			results = append(results, medianResult(ours), medianResult(q))
		}
	}
	var rows [][]string
	ratio := func(a, b float64) string {
		if b == 0 {
			return "-"
		}
		return fmt.Sprintf("%.3f", a/b)
	}
	for i := 0; i < len(results); i += 2 {
		o, q := results[i], results[i+1]
		gap := "-"
		if o.GuestGapMS > 0 {
			gap = fmt.Sprintf("%.2f", o.GuestGapMS)
		}
		rows = append(rows, []string{fmt.Sprintf("%d MiB", o.Mem), o.Load,
			fmt.Sprintf("%.1f", o.TotalMS), fmt.Sprintf("%.1f", q.TotalMS), ratio(o.TotalMS, q.TotalMS),
			fmt.Sprintf("%.2f", o.DowntimeMS), fmt.Sprintf("%.2f", q.DowntimeMS), ratio(o.DowntimeMS, q.DowntimeMS), gap,
			fmt.Sprintf("%.2f", float64(o.Bytes)/1e6), fmt.Sprintf("%.2f", float64(q.Bytes)/1e6), ratio(float64(o.Bytes), float64(q.Bytes)),
			fmt.Sprintf("%.3f", float64(o.Bytes)/float64(max(o.NonZero, 1))),
			strconv.Itoa(o.Rounds), strconv.Itoa(q.Rounds)})
	}
	table(fmt.Sprintf("(e) live migration over loopback, workload guest, ours vs QEMU 7.2 microvm (downtime limit 50 ms, no bandwidth cap), median of %d", n),
		[]string{"guest", "load", "total ms", "qemu", "ratio", "downtime ms", "qemu", "ratio", "guest gap ms", "wire MB", "qemu", "ratio", "wire/non-zero", "rounds", "qemu"}, rows)
	jb, _ := json.MarshalIndent(results, "", "  ")
	if err := os.WriteFile(filepath.Join(out, "migrate.json"), jb, 0o644); err != nil {
		return err
	}
	var csv strings.Builder
	csv.WriteString("vmm,mem_mib,load,total_ms,downtime_ms,guest_gap_ms,wire_bytes,nonzero_bytes,rounds\n")
	for _, r := range results {
		fmt.Fprintf(&csv, "%s,%d,%s,%.3f,%.3f,%.3f,%d,%d,%d\n", r.VMM, r.Mem, r.Load, r.TotalMS, r.DowntimeMS, r.GuestGapMS, r.Bytes, r.NonZero, r.Rounds)
	}
	if err := os.WriteFile(filepath.Join(out, "migrate.csv"), []byte(csv.String()), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(out, "migrate.svg"), []byte(migrateSVG(results)), 0o644); err != nil {
		return err
	}
	fmt.Printf("wrote %s/migrate.{json,csv,svg}\n", out)
	return nil
}

type migResult struct {
	VMM        string  `json:"vmm"`
	Mem        int     `json:"mem_mib"`
	Load       string  `json:"load"`
	TotalMS    float64 `json:"total_ms"`
	DowntimeMS float64 `json:"downtime_ms"`
	GuestGapMS float64 `json:"guest_gap_ms,omitempty"`
	Bytes      int64   `json:"wire_bytes"`
	NonZero    int64   `json:"nonzero_bytes,omitempty"`
	Rounds     int     `json:"rounds"`
	// DirtyPerRound is the pages dirtied during each round (ours).
	DirtyPerRound []int64          `json:"dirty_per_round,omitempty"`
	Timeline      []migrate.Sample `json:"timeline"`
}

func medianResult(rs []migResult) migResult {
	best := rs[0]
	if len(rs) > 1 {
		ts := make([]float64, len(rs))
		for i, r := range rs {
			ts[i] = r.TotalMS
		}
		m := median(ts)
		for _, r := range rs {
			if r.TotalMS == m {
				best = r
			}
		}
	}
	return best
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

func stopProc(c *exec.Cmd) {
	if c != nil && c.Process != nil {
		c.Process.Kill()
		c.Wait()
	}
}

func migrateOurs(self, elf, cmdline string, memMiB int) (migResult, error) {
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
	tgt, err := startProc([]string{self, "run", "--incoming", addr, "--mem", fmt.Sprintf("%dM", memMiB), "--serial", "file:" + filepath.Join(dir, "tgt.out")})
	if err != nil {
		return migResult{}, err
	}
	defer stopProc(tgt)
	sock := filepath.Join(dir, "api.sock")
	serial := filepath.Join(dir, "src.out")
	src, err := startProc([]string{self, "run", "--kernel", elf, "--append", cmdline, "--mem", fmt.Sprintf("%dM", memMiB), "--api", sock, "--serial", "file:" + serial})
	if err != nil {
		return migResult{}, err
	}
	defer stopProc(src)
	if err := waitFile(serial, readyLine(cmdline), 30*time.Second); err != nil {
		return migResult{}, err
	}
	// Let a dirtying guest reach its rate.
	time.Sleep(300 * time.Millisecond)
	rep, err := api.NewClient(sock).Migrate(api.MigrateRequest{To: addr, DowntimeMS: 50})
	if err != nil {
		return migResult{}, err
	}
	r := migResult{VMM: "collective", TotalMS: rep.TotalMS, DowntimeMS: rep.DowntimeMS, Bytes: rep.BytesWire,
		NonZero: rep.NonZeroBytes, Rounds: rep.Rounds, Timeline: rep.Timeline}
	if rep.GuestGapMS != nil && rep.GuestMode == "spin" {
		r.GuestGapMS = *rep.GuestGapMS
	}
	for _, s := range rep.RoundStats {
		r.DirtyPerRound = append(r.DirtyPerRound, s.DirtyAfter)
	}
	return r, nil
}

// qmp is a minimal QMP client.
type qmp struct {
	c net.Conn
	r *bufio.Reader
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
		line, err := q.r.ReadString('\n')
		if err != nil {
			return nil, err
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Desc string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal([]byte(line), &resp); err != nil {
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

func migrateQEMU(elf, cmdline string, memMiB int) (migResult, error) {
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
	tgt, err := startProc(append(base(filepath.Join(dir, "tgt.out")), "-incoming", "tcp:"+addr))
	if err != nil {
		return migResult{}, err
	}
	defer stopProc(tgt)
	sock := filepath.Join(dir, "qmp.sock")
	serial := filepath.Join(dir, "src.out")
	src, err := startProc(append(base(serial), "-qmp", "unix:"+sock+",server=on,wait=off"))
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
			return r, nil
		case "failed", "cancelled":
			return r, errors.New("qemu migration " + st.Status)
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
