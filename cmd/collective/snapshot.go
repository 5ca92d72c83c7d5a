package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"collective/api"
	"collective/machine"
	"collective/snapshot"
)

// processStart is when this process started, for restore timings.
var processStart = time.Now()

func snapshotCmd(args []string) int {
	if len(args) < 1 {
		fmt.Fprint(os.Stderr, "usage: collective snapshot merge [--raw] OUT IN...\n       collective snapshot info FILE\n")
		return 2
	}
	switch args[0] {
	case "merge":
		fs := flag.NewFlagSet("snapshot merge", flag.ContinueOnError)
		raw := fs.Bool("raw", false, "write a raw memory image (lazy restore)")
		if err := fs.Parse(args[1:]); err != nil {
			return 2
		}
		if fs.NArg() < 2 {
			fmt.Fprintln(os.Stderr, "usage: collective snapshot merge [--raw] OUT IN... (IN: the last snapshot of a chain, or the whole chain oldest first)")
			return 2
		}
		chain, err := openChain(fs.Args()[1:])
		if err != nil {
			fmt.Fprintf(os.Stderr, "collective snapshot merge: %v\n", err)
			return 1
		}
		defer closeChain(chain)
		st, err := snapshot.Merge(fs.Arg(0), chain, *raw, snapshot.TerminalProgress(os.Stderr, "merge"))
		if err != nil {
			fmt.Fprintf(os.Stderr, "collective snapshot merge: %v\n", err)
			return 1
		}
		fmt.Fprintf(os.Stderr, "merged %d snapshots into %s: %v\n", len(chain), fs.Arg(0), st)
		return 0
	case "info":
		if len(args) != 2 {
			fmt.Fprintln(os.Stderr, "usage: collective snapshot info FILE")
			return 2
		}
		s, err := snapshot.Open(args[1])
		if err != nil {
			fmt.Fprintf(os.Stderr, "collective snapshot info: %v\n", err)
			return 1
		}
		defer s.Close()
		kind := "full"
		if s.Kind == snapshot.KindIncremental {
			kind = "incremental, parent " + s.Parent.String()
			if s.ParentHint != "" {
				kind += " (" + s.ParentHint + ")"
			}
		}
		if s.RawImage() {
			kind += ", raw memory image"
		}
		fmt.Printf("%s: format %s, machine state %s, %s\nid %s\ncreated %s, %d MiB RAM, %d vCPUs\n%d pages stored, %d zero pages recorded, %d bytes\n",
			args[1], s.Version, s.State.Version, kind, s.ID, s.Created.Format(time.RFC3339), s.MemSize()>>20, s.State.CPUs, s.Pages(), s.ZeroPages(), s.Size)
		for _, d := range s.Disks() {
			id := "origin " + d.Origin
			if d.Kind == snapshot.DiskCOW {
				id = "base " + d.Base
			} else if d.Origin == "" {
				id = "blocks written since the parent"
			}
			fmt.Printf("disk %s: %s, %d bytes, %d blocks of %d KiB stored, %s\n", d.Name, d.Kind, d.Size, d.TableLen/48, d.BlockSize>>10, id)
		}
		return 0
	}
	fmt.Fprintf(os.Stderr, "collective snapshot: unknown command %q (merge, info)\n", args[0])
	return 2
}

func openChain(paths []string) ([]*snapshot.Snapshot, error) {
	if len(paths) == 1 {
		return snapshot.OpenChain(paths[0])
	}
	return snapshot.OpenFiles(paths)
}

func closeChain(c []*snapshot.Snapshot) {
	for _, s := range c {
		s.Close()
	}
}

func restoreCmd(args []string) int {
	fs := flag.NewFlagSet("restore", flag.ContinueOnError)
	apiPath := fs.String("api", "", "serve the control API on this Unix socket")
	serialTo := fs.String("serial", "stdio", "serial console: stdio, file:PATH or none")
	lazy := fs.Bool("lazy", true, "map a raw memory image instead of reading it")
	trust := fs.Bool("trust", false, "skip the raw image's checksums (files this host wrote)")
	verify := fs.Bool("verify-hashes", false, "check every page against its content hash")
	paused := fs.Bool("paused", false, "stay paused after the restore (resume through the API)")
	verbose := fs.Bool("v", false, "log VMM events to stderr")
	var disks stringList
	fs.Var(&disks, "disk", "the machine's disks, as it was run: PATH[,ro][,serial=ID][,base=BASE] (repeatable); a raw disk must be a copy of the one the machine started with, an overlay new or the snapshot's own; the snapshot's blocks are written into it")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: collective restore [flags] SNAPSHOT | FULL INCREMENTAL...\n\nAn incremental snapshot's parents are found by the paths recorded in it.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() < 1 {
		fs.Usage()
		return 2
	}
	log := newLogger(*verbose)
	console, input, closeConsole, err := openConsole(*serialTo)
	if err != nil {
		fmt.Fprintf(os.Stderr, "collective restore: %v\n", err)
		return 2
	}
	defer closeConsole()
	// The machine is built while the chain is opened and checked.
	cfg := machine.Config{Console: console, Log: log, Disks: disks}
	prep := snapshot.Prepare(fs.Arg(fs.NArg()-1), cfg)
	chain, err := openChain(fs.Args())
	if err != nil {
		prep.Close()
		fmt.Fprintf(os.Stderr, "collective restore: %v\n", err)
		return 1
	}
	defer closeChain(chain)
	m, stats, err := snapshot.Restore(chain, cfg,
		snapshot.RestoreOptions{Lazy: *lazy, Trust: *trust, VerifyHashes: *verify, Prepared: prep, Progress: snapshot.TerminalProgress(os.Stderr, "restore")})
	if err != nil {
		fmt.Fprintf(os.Stderr, "collective restore: %v\n", err)
		return 1
	}
	defer m.Close()
	ss := snapshot.NewSession(m)
	if err := ss.SetParent(chain[len(chain)-1]); err != nil {
		fmt.Fprintf(os.Stderr, "collective restore: %v\n", err)
		return 1
	}
	if *paused {
		m.Pause()
	}
	var srv *api.Server
	if *apiPath != "" {
		var stop func()
		var err error
		srv, stop, err = startAPI(m, ss, *apiPath, log)
		if err != nil {
			fmt.Fprintf(os.Stderr, "collective restore: %v\n", err)
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
	fmt.Fprintf(os.Stderr, "collective restore: %d snapshot(s), %v; ready to run %.3f ms after process start\n",
		len(chain), stats, float64(time.Since(processStart).Microseconds())/1000)
	exit := m.Run(ctx)
	return exitStatus("collective restore", exit)
}
