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

	"collective/image"
)

const imageUsage = `usage:
  collective image build [--cache DIR] default   build the default appliance (Debian kernel + busybox initramfs)
  collective image ls [--cache DIR]              list the appliances in the cache

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
