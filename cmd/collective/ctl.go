package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"collective/api"
	"collective/kvm"
	"collective/machine"
	"collective/snapshot"
)

// startAPI serves the control API of m on a Unix socket at path until
// the returned stop is called.
func startAPI(m *machine.Machine, ss *snapshot.Session, path string, log *slog.Logger) (*api.Server, func(), error) {
	l, err := api.Listen(path)
	if err != nil {
		return nil, nil, err
	}
	srv := api.NewServer(m, ss)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ctx, l); err != nil {
			log.Warn("control API stopped", "err", err)
		}
	}()
	return srv, func() {
		srv.SetStopped()
		cancel()
		<-done
		os.Remove(path)
	}, nil
}

// briefOnSignal writes every vCPU in brief (machine.VCPUBriefs) to
// stderr each time the process gets SIGUSR1, until ctx is done: the
// post-mortem of a guest that stopped making progress, for a harness
// without the API socket (bench linux-drive sends it before killing a VMM
// that timed out). srv, when not nil, serialises it with the API's pause,
// resume and migration.
func briefOnSignal(ctx context.Context, m *machine.Machine, srv *api.Server) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGUSR1)
	go func() {
		defer signal.Stop(ch)
		for {
			select {
			case <-ctx.Done():
				return
			case <-ch:
			}
			var b []kvm.VCPUBrief
			var err error
			if srv != nil {
				b, err = srv.VCPUs()
			} else {
				b, err = m.VCPUBriefs()
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "collective: SIGUSR1: %v\n", err)
				continue
			}
			for _, v := range b {
				fmt.Fprintf(os.Stderr, "collective: %s\n", v)
			}
		}
	}()
}

func ctlCmd(args []string) int {
	fs := flag.NewFlagSet("ctl", flag.ContinueOnError)
	sock := fs.String("api", "", "the machine's API socket")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: collective ctl --api PATH state|pause|resume|vcpus|snapshot FILE [--incremental] [--raw]\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *sock == "" || fs.NArg() < 1 {
		fs.Usage()
		return 2
	}
	c := api.NewClient(*sock)
	var out any
	var err error
	switch cmd := fs.Arg(0); cmd {
	case "state":
		out, err = c.State()
	case "pause":
		out, err = c.Pause()
	case "resume":
		out, err = c.Resume()
	case "vcpus":
		out, err = c.VCPUs()
	case "snapshot":
		sf := flag.NewFlagSet("ctl snapshot", flag.ContinueOnError)
		inc := sf.Bool("incremental", false, "only the pages dirtied since the last snapshot")
		raw := sf.Bool("raw", false, "raw memory image (lazy restore)")
		rest := fs.Args()[1:]
		// Flags may come before or after FILE.
		var file string
		for len(rest) > 0 {
			if err := sf.Parse(rest); err != nil {
				return 2
			}
			rest = sf.Args()
			if len(rest) > 0 {
				if file != "" {
					fmt.Fprintf(os.Stderr, "collective ctl snapshot: unexpected argument %q\n", rest[0])
					return 2
				}
				file, rest = rest[0], rest[1:]
			}
		}
		if file == "" {
			fmt.Fprintln(os.Stderr, "usage: collective ctl --api PATH snapshot FILE [--incremental] [--raw]")
			return 2
		}
		if abs, e := filepath.Abs(file); e == nil {
			file = abs
		}
		out, err = c.Snapshot(api.SnapshotRequest{Path: file, Incremental: *inc, Raw: *raw})
	default:
		fmt.Fprintf(os.Stderr, "collective ctl: unknown command %q\n", cmd)
		fs.Usage()
		return 2
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "collective ctl: %v\n", err)
		return 1
	}
	b, _ := json.MarshalIndent(out, "", "  ")
	fmt.Println(string(b))
	return 0
}
