package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"collective/api"
	"collective/devices/virtioblk"
	"collective/devices/virtioblk/cow"
	"collective/internal/term"
	"collective/kvm/guestmem"
	"collective/machine"
	"collective/migrate"
	"collective/snapshot"
)

// migrateCmd is the source side of a live migration: it asks the machine
// behind --api to migrate to --to, draws progress on a terminal, and
// prints (and writes) the JSON report. Ctrl-C cancels the migration.
func migrateCmd(args []string) int {
	fs := flag.NewFlagSet("migrate", flag.ContinueOnError)
	sock := fs.String("api", "", "the source machine's API socket (collective run --api)")
	to := fs.String("to", "", "the target's address, HOST:PORT (collective run --incoming HOST:PORT)")
	downtime := fs.Duration("downtime", 50*time.Millisecond, "downtime limit: stop and copy when the rest fits in it")
	rounds := fs.Int("max-rounds", 30, "stop and copy after this many pre-copy rounds at the latest")
	bw := fs.Float64("bandwidth", 0, "bandwidth cap in MB/s (10^6 bytes; 0: none)")
	compress := fs.String("compress", "auto", "lz4: auto (when the measured link and ratio say it pays), always or never")
	report := fs.String("report", "", "also write the JSON report to this file")
	streams := fs.Int("streams", 1, fmt.Sprintf("TCP connections carrying the pages in parallel (1 to %d)", migrate.MaxStreams))
	converge := fs.Bool("auto-converge", false, "throttle the vCPUs (20%, then 10% more, up to 99%) while the guest dirties memory faster than the rounds carry it")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: collective migrate --api SOCKET --to HOST:PORT [flags]\n\n"+
			"Moves the running machine to a target started with collective run --incoming HOST:PORT.\n"+
			"Exit status: 0 migrated, 1 failed (the machine runs on at the source), 3 in doubt (the source stays paused).\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *sock == "" || *to == "" || fs.NArg() > 0 {
		fs.Usage()
		return 2
	}
	c := api.NewClient(*sock)
	req := api.MigrateRequest{To: *to, DowntimeMS: float64(downtime.Microseconds()) / 1000, MaxRounds: *rounds,
		BandwidthMBps: *bw, Compress: *compress, AutoConverge: *converge, Streams: *streams}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	type result struct {
		rep migrate.Report
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := c.Migrate(req)
		done <- result{rep, err}
	}()
	tty := term.IsTerminal(int(os.Stderr.Fd()))
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var res result
	canceled := false
wait:
	for {
		select {
		case res = <-done:
			break wait
		case <-ctx.Done():
			if !canceled {
				canceled = true
				fmt.Fprintln(os.Stderr, "\ncollective migrate: cancelling")
				c.MigrateCancel()
			}
		case <-tick.C:
			if tty {
				if st, err := c.MigrateStatus(); err == nil && st.Active {
					fmt.Fprintf(os.Stderr, "\r\033[K%s", st.Progress)
				}
			}
		}
	}
	if tty {
		fmt.Fprint(os.Stderr, "\r\033[K")
	}
	rep := res.rep
	if res.err != nil {
		// The server keeps the failed migration's report.
		if st, err := c.MigrateStatus(); err == nil && st.Report != nil {
			rep = *st.Report
		}
		if rep.Error == "" {
			rep.Error = res.err.Error()
		}
	}
	b, _ := json.MarshalIndent(rep, "", "  ")
	fmt.Println(string(b))
	if *report != "" {
		if err := os.WriteFile(*report, append(b, '\n'), 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "collective migrate: %v\n", err)
		}
	}
	if res.err != nil {
		fmt.Fprintf(os.Stderr, "collective migrate: %v\n", res.err)
		if rep.InDoubt {
			return 3
		}
		return 1
	}
	gap := "guest saw n/a"
	if rep.GuestGapMS != nil {
		gap = fmt.Sprintf("guest saw %.2f ms", *rep.GuestGapMS)
		if rep.GuestMode == "dirty" {
			// Its heartbeat moves once per verified pass: the gap is
			// mostly the pass, not the stall.
			gap = fmt.Sprintf("guest heartbeat gap %.2f ms, up to a dirty pass", *rep.GuestGapMS)
		}
	}
	extra := ""
	if rep.Streams > 1 {
		extra += fmt.Sprintf(" over %d streams", rep.Streams)
	}
	if rep.ThrottlePct > 0 {
		extra += fmt.Sprintf(", vCPUs throttled up to %d%%", rep.ThrottlePct)
	}
	fmt.Fprintf(os.Stderr, "collective migrate: migrated to %s in %.1f ms, downtime %.2f ms (%s), %d rounds, %.1f MB on the wire%s\n",
		*to, rep.TotalMS, rep.DowntimeMS, gap, rep.Rounds, float64(rep.BytesWire)/1e6, extra)
	return 0
}

// incomingMachine adapts a bare machine to migrate.Target: Resume runs
// it in the background.
type incomingMachine struct {
	m    *machine.Machine
	ctx  context.Context
	exit chan machine.Exit
}

func (t *incomingMachine) Memory() *guestmem.Memory { return t.m.Memory() }
func (t *incomingMachine) RestoreState(st *machine.MachineState) error {
	return t.m.RestoreState(st)
}
func (t *incomingMachine) Resume() error {
	go func() { t.exit <- t.m.Run(t.ctx) }()
	return nil
}
func (t *incomingMachine) Close() error { return t.m.Close() }

// Disks implements migrate.DiskTarget.
func (t *incomingMachine) Disks() []machine.Disk { return t.m.Disks() }

// formatDisk writes a DiskSpec back as a --disk argument.
func formatDisk(d virtioblk.DiskSpec) string {
	s := d.Path
	if d.ReadOnly {
		s += ",ro"
	}
	if d.Serial != "" {
		s += ",serial=" + d.Serial
	}
	if d.Base != "" {
		s += ",base=" + d.Base
	}
	if d.Direct {
		s += ",direct"
	}
	return s
}

// incomingBases finds the bases of the --disk arguments on this host (by
// hash) and names the cache directory a missing base is received into.
func incomingBases(disks []string, cacheDir string) (*migrate.Bases, bool, error) {
	b := &migrate.Bases{Known: map[[32]byte]string{}}
	if cacheDir != "" {
		b.Dir = filepath.Join(cacheDir, "bases")
	}
	all := true
	for _, a := range disks {
		spec, err := virtioblk.ParseDisk(a)
		if err != nil {
			return nil, false, err
		}
		if spec.Base == "" {
			continue
		}
		if _, err := os.Stat(spec.Base); err != nil {
			all = false
			continue
		}
		sum, _, err := cow.BaseHash(spec.Base, nil)
		if err != nil {
			return nil, false, err
		}
		b.Known[sum] = spec.Base
	}
	return b, all, nil
}

// TSCKHz implements migrate.TSCKHzer.
func (t *incomingMachine) TSCKHz() uint64 {
	k, err := t.m.VM().VCPUs()[0].TSCKHz()
	if err != nil {
		return 0
	}
	return uint64(k)
}

// runIncoming is collective run --incoming ADDR: wait for one migration,
// then run the machine it brings like collective run does.
//
// With pre.MemSize set (run --incoming --mem SIZE --cpus N, like QEMU's
// target, which is started with its size) the bare machine is built
// before the source connects, and used if the source's hello matches.
func runIncoming(addr string, pre machine.Config, console io.Writer, input bool, apiPath, cacheDir string, log *slog.Logger) int {
	failf := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "collective run --incoming: "+format+"\n", a...)
		return 1
	}
	var cache *migrate.Cache
	if cacheDir != "" {
		var err error
		if cache, err = migrate.LoadCache(cacheDir); err != nil {
			return failf("%v", err)
		}
		fmt.Fprintf(os.Stderr, "collective run: cache %s: %d pages from %d snapshot(s)\n", cacheDir, cache.Len(), cache.Files)
	}
	bases, allBases, err := incomingBases(pre.Disks, cacheDir)
	if err != nil {
		return failf("%v", err)
	}
	var basePaths []string
	var prebuilt *machine.Machine
	if pre.MemSize != 0 && allBases {
		pre.Console, pre.Log = console, log
		m, err := machine.NewBare(pre)
		if err != nil {
			return failf("%v", err)
		}
		prebuilt = m
	}
	migrate.Warm()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return failf("%v", err)
	}
	fmt.Fprintf(os.Stderr, "collective run: waiting for a migration on %s\n", l.Addr())
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	stopAccept := context.AfterFunc(ctx, func() { l.Close() })
	conn, err := l.Accept()
	stopAccept()
	if err != nil {
		l.Close()
		if prebuilt != nil {
			prebuilt.Close()
		}
		return failf("no migration came: %v", err)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetReadBuffer(4 << 20)
	}
	var tgt *incomingMachine
	start := time.Now()
	in, err := migrate.Receive(ctx, conn, migrate.ReceiveOptions{
		Cache:   cache,
		Bases:   bases,
		OnBases: func(p []string) { basePaths = p },
		Accept: func() (net.Conn, error) {
			if tl, ok := l.(*net.TCPListener); ok {
				tl.SetDeadline(time.Now().Add(10 * time.Second))
			}
			c, err := l.Accept()
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetReadBuffer(4 << 20)
			}
			return c, err
		},
		Build: func(size uint64, cpus int) (migrate.Target, error) {
			// Each copy-on-write disk over the base found (or received)
			// by the source's hash.
			disks := slices.Clone(pre.Disks)
			changed := false
			for i := range disks {
				if i < len(basePaths) && basePaths[i] != "" {
					spec, err := virtioblk.ParseDisk(disks[i])
					if err != nil {
						return nil, err
					}
					if spec.Base != basePaths[i] {
						spec.Base, changed = basePaths[i], true
						disks[i] = formatDisk(spec)
					}
				}
			}
			m := prebuilt
			prebuilt = nil
			if m == nil || changed || m.Config().MemSize != size || m.Config().CPUs != cpus {
				if m != nil {
					m.Close()
				}
				var err error
				if m, err = machine.NewBare(machine.Config{MemSize: size, CPUs: cpus, Console: console, Log: log, Disks: disks}); err != nil {
					return nil, err
				}
			}
			tgt = &incomingMachine{m: m, ctx: ctx, exit: make(chan machine.Exit, 1)}
			return tgt, nil
		},
	})
	// The listener stayed open for the source's extra streams
	// (--streams), taken during the handshake.
	l.Close()
	conn.Close()
	if prebuilt != nil {
		prebuilt.Close()
	}
	if err != nil {
		return failf("migration from %s failed, nothing kept: %v", conn.RemoteAddr(), err)
	}
	defer tgt.m.Close()
	st := in.Stats
	gap := ""
	if st.GuestGap > 0 {
		gap = fmt.Sprintf(", guest-observed gap %.2f ms", float64(st.GuestGap.Microseconds())/1000)
	}
	if st.DiskBlocks > 0 || st.BaseBytes > 0 {
		gap += fmt.Sprintf(", %d disk blocks, %.1f MB of bases received", st.DiskBlocks, float64(st.BaseBytes)/1e6)
	}
	fmt.Fprintf(os.Stderr, "collective run: migrated in from %s in %.1f ms: %d rounds, %.1f MB, %d pages, %d zeroed, %d from the cache, restore %.2f ms%s\n",
		conn.RemoteAddr(), float64(time.Since(start).Microseconds())/1000, st.Rounds, float64(st.Bytes)/1e6,
		st.Pages, st.ZeroPages, st.HashPages, float64(st.RestoreDur.Microseconds())/1000, gap)
	m := tgt.m
	var srv *api.Server
	if apiPath != "" {
		var stop func()
		srv, stop, err = startAPI(m, snapshot.NewSession(m), apiPath, log)
		if err != nil {
			m.Stop()
			<-tgt.exit
			return failf("%v", err)
		}
		defer stop()
	}
	briefOnSignal(ctx, m, srv)
	if input {
		restore := attachInput(ctx, m, cancel)
		defer restore()
	}
	exit := <-tgt.exit
	return exitStatus("collective run", exit)
}
