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
	"syscall"
	"text/tabwriter"
	"time"

	"collective/devices/virtioblk/cow"
	"collective/image"
	"collective/internal/term"
)

const imageUsage = `usage:
  collective image build [--cache DIR] default   build the default appliance (Debian kernel + busybox initramfs)
  collective image ls [--cache DIR]              list the appliances in the cache
  collective image overlay create [--cluster-size 64K] [--size SIZE] --base BASE OVERLAY
                                                 a copy-on-write overlay over a base disk
  collective image overlay commit [--base BASE] OVERLAY NEWBASE|DIR
                                                 flatten base + overlay into a new base (in DIR:
                                                 named SHA256.img); prints its content hash
  collective image overlay info [--base BASE] [--verify] OVERLAY
                                                 sizes, clusters, base hash and whether the base
                                                 is present and matches (--verify: rehash it)

A VM uses an overlay with --disk OVERLAY,base=BASE (created if missing).

The cache is $XDG_CACHE_HOME/collective or ~/.cache/collective.
`

// imageCmd implements "collective image".
func imageCmd(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, imageUsage)
		return 2
	}
	switch args[0] {
	case "build":
		return imageBuildCmd(args[1:])
	case "ls", "list":
		return imageLsCmd(args[1:])
	case "overlay":
		return imageOverlayCmd(args[1:])
	case "-h", "--help", "help":
		fmt.Print(imageUsage)
		return 0
	}
	fmt.Fprintf(os.Stderr, "collective image: unknown command %q\n%s", args[0], imageUsage)
	return 2
}

// imageFlags parses the flags common to the image commands.
func imageFlags(name string, args []string) (cache string, rest []string, code int) {
	fs := flag.NewFlagSet("image "+name, flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	dir := fs.String("cache", "", "cache folder (default $XDG_CACHE_HOME/collective or ~/.cache/collective)")
	fs.Usage = func() {
		fmt.Fprint(os.Stderr, imageUsage+"\nflags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return "", nil, 0
		}
		return "", nil, 2
	}
	cache = *dir
	if cache == "" {
		d, err := image.DefaultCacheDir()
		if err != nil {
			fmt.Fprintf(os.Stderr, "collective image %s: %v\n", name, err)
			return "", nil, 1
		}
		cache = d
	}
	return cache, fs.Args(), -1
}

func imageBuildCmd(args []string) int {
	cache, rest, code := imageFlags("build", args)
	if code >= 0 {
		return code
	}
	if len(rest) != 1 || rest[0] != "default" {
		if len(rest) == 0 {
			fmt.Fprint(os.Stderr, "collective image build: which appliance? (default)\n"+imageUsage)
		} else {
			fmt.Fprintf(os.Stderr, "collective image build: unknown appliance %q (known: default)\n%s", rest[0], imageUsage)
		}
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	start := time.Now()
	ctx = image.WithProgress(ctx, func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "image: "+format+"\n", a...)
	})
	a, err := image.BuildDefault(ctx, cache)
	if err != nil {
		fmt.Fprintf(os.Stderr, "collective image build: %v\n", err)
		return 1
	}
	printAppliance(os.Stdout, a)
	fmt.Printf("took     %s\n", time.Since(start).Round(time.Millisecond))
	return 0
}

func printAppliance(w io.Writer, a *image.Appliance) {
	fmt.Fprintf(w, "id       %s\n", a.ID)
	fmt.Fprintf(w, "kernel   %s (Linux %s, PVH)\n", a.Kernel, a.KernelVersion)
	fmt.Fprintf(w, "bzImage  %s\n", a.BzImage)
	fmt.Fprintf(w, "initrd   %s\n", a.Initrd)
	fmt.Fprintf(w, "cmdline  %s\n", a.Cmdline)
	fmt.Fprintf(w, "run      collective run --kernel %s --initrd %s --append '%s' --mem 512M\n", a.Kernel, a.Initrd, a.Cmdline)
}

func imageLsCmd(args []string) int {
	cache, rest, code := imageFlags("ls", args)
	if code >= 0 {
		return code
	}
	if len(rest) > 0 {
		fmt.Fprintf(os.Stderr, "collective image ls: unexpected argument %q\n", rest[0])
		return 2
	}
	list, err := image.List(cache)
	if err != nil {
		fmt.Fprintf(os.Stderr, "collective image ls: %v\n", err)
		return 1
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tKERNEL\tSIZE\tCREATED")
	for _, a := range list {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", a.ID[:12], a.KernelVersion, imageSizeString(a.Size), a.Created.Local().Format("2006-01-02 15:04:05"))
	}
	tw.Flush()
	return 0
}

// imageSizeString formats a byte count in binary units.
func imageSizeString(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1fG", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fM", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fK", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%dB", n)
}

// imageOverlayCmd implements "collective image overlay".
func imageOverlayCmd(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, imageUsage)
		return 2
	}
	name := "image overlay " + args[0]
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	fs.Usage = func() {
		fmt.Fprint(os.Stderr, imageUsage+"\nflags:\n")
		fs.PrintDefaults()
	}
	base := fs.String("base", "", "base disk (default for commit and info: the path recorded in the overlay)")
	var clusterSize, size *string
	var verify *bool
	var want int
	switch args[0] {
	case "create":
		clusterSize = fs.String("cluster-size", "64K", "cluster size, a power of two from 4K to 2M")
		size = fs.String("size", "", "virtual size (default: the base's), e.g. 20G")
		want = 1
	case "commit":
		want = 2
	case "info":
		verify = fs.Bool("verify", false, "rehash the base instead of trusting its cached hash")
		want = 1
	case "-h", "--help", "help":
		fmt.Print(imageUsage)
		return 0
	default:
		fmt.Fprintf(os.Stderr, "collective image overlay: unknown command %q\n%s", args[0], imageUsage)
		return 2
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() != want {
		fmt.Fprintf(os.Stderr, "collective %s: want %d argument(s), got %d\n%s", name, want, fs.NArg(), imageUsage)
		return 2
	}
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "collective %s: %v\n", name, err)
		return 1
	}
	start := time.Now()
	switch args[0] {
	case "create":
		if *base == "" {
			fmt.Fprintf(os.Stderr, "collective %s: --base is required\n", name)
			return 2
		}
		cs, err := parseSize(*clusterSize)
		if err != nil {
			return fail(err)
		}
		opt := cow.CreateOptions{ClusterSize: int64(cs), Progress: overlayProgress("hashing base")}
		if *size != "" {
			v, err := parseSize(*size)
			if err != nil {
				return fail(err)
			}
			opt.Size = int64(v)
		}
		if err := cow.Create(fs.Arg(0), *base, opt); err != nil {
			return fail(err)
		}
		inf, err := cow.Inspect(fs.Arg(0), *base, false, nil)
		if err != nil {
			return fail(err)
		}
		printOverlayInfo(os.Stdout, fs.Arg(0), inf)
		fmt.Printf("run      collective run ... --disk %s,base=%s\n", fs.Arg(0), *base)
	case "commit":
		res, err := cow.Commit(fs.Arg(0), *base, fs.Arg(1), overlayProgress("commit"))
		if err != nil {
			return fail(err)
		}
		took := time.Since(start)
		fmt.Printf("base     %s\n", res.Path)
		fmt.Printf("sha256   %x\n", res.Hash)
		fmt.Printf("size     %s (%d bytes), %s of data, the rest holes\n", imageSizeString(res.Size), res.Size, imageSizeString(res.Written))
		if res.Existed {
			fmt.Println("note     a base with this content was already there; left unchanged")
		}
		fmt.Printf("took     %s (%.0f MB/s)\n", took.Round(time.Millisecond), float64(res.Size)/1e6/max(took.Seconds(), 1e-9))
	case "info":
		inf, err := cow.Inspect(fs.Arg(0), *base, *verify, overlayProgress("hashing base"))
		if err != nil {
			return fail(err)
		}
		printOverlayInfo(os.Stdout, fs.Arg(0), inf)
		if !inf.BaseMatches {
			return 1
		}
	}
	return 0
}

func printOverlayInfo(w io.Writer, path string, inf *cow.Info) {
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	pct := func(n int64) float64 { return 100 * float64(n) / float64(max(inf.Clusters, 1)) }
	fmt.Fprintf(tw, "overlay\t%s (format %s)\n", path, inf.FormatVersion)
	fmt.Fprintf(tw, "virtual\t%s (%d bytes), %d clusters of %s\n", imageSizeString(inf.VirtualSize), inf.VirtualSize, inf.Clusters, imageSizeString(inf.ClusterSize))
	fmt.Fprintf(tw, "written\t%d clusters (%.1f%%, %s)\n", inf.Allocated, pct(inf.Allocated), imageSizeString(inf.Allocated*inf.ClusterSize))
	fmt.Fprintf(tw, "zeroed\t%d clusters (%.1f%%)\n", inf.Zero, pct(inf.Zero))
	fmt.Fprintf(tw, "file\t%s long, %s on disk, %d data clusters (%d free)\n", imageSizeString(inf.FileSize), imageSizeString(inf.DiskBytes), inf.PhysClusters, inf.FreeClusters)
	if inf.TornRepaired > 0 {
		fmt.Fprintf(tw, "torn\t%d table slots torn by a crash (the previous entries are in force)\n", inf.TornRepaired)
	}
	fmt.Fprintf(tw, "base\t%s\n", inf.BasePath)
	fmt.Fprintf(tw, "sha256\t%x\n", inf.BaseHash)
	fmt.Fprintf(tw, "basesize\t%s (%d bytes)\n", imageSizeString(inf.BaseSize), inf.BaseSize)
	fmt.Fprintf(tw, "status\t%s\n", inf.BaseStatus)
	tw.Flush()
}

// overlayProgress draws "label: done/total MiB (p%)" on a terminal
// stderr, at most ten times a second; nil when stderr is not a terminal.
func overlayProgress(label string) cow.Progress {
	if !term.IsTerminal(int(os.Stderr.Fd())) {
		return nil
	}
	var last time.Time
	return func(done, total int64) {
		if now := time.Now(); done < total && now.Sub(last) < 100*time.Millisecond {
			return
		} else {
			last = now
		}
		fmt.Fprintf(os.Stderr, "\r%s: %.0f/%.0f MiB (%.0f%%)", label, float64(done)/(1<<20), float64(total)/(1<<20), 100*float64(done)/float64(max(total, 1)))
		if done >= total {
			fmt.Fprint(os.Stderr, "\r\033[K")
		}
	}
}
