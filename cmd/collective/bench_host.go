package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// pageReportingDir holds the free page reporting knobs of a Linux guest
// kernel (mm/page_reporting.c) when a virtio-balloon with reporting is
// bound.
const pageReportingDir = "/sys/module/page_reporting/parameters/"

// maxPageOrder is MAX_PAGE_ORDER on x86-64: an order above it is never
// reported.
const maxPageOrder = 10

// hostNote describes what on this host makes benchmark figures swing,
// or returns "" when nothing is known to. The one cause found so far:
// the host is itself a VM whose kernel hands free memory back to its
// hypervisor (free page reporting). Memory a process then touches for the
// first time costs a hypervisor fault per 4 KiB, and whether a run gets
// such memory depends on what ran before it: a migration's target, a
// restore, a page cache filling up all run 2-3 times slower in those runs.
func hostNote() string {
	b, err := os.ReadFile(pageReportingDir + "page_reporting_order")
	if err != nil {
		return ""
	}
	order, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || order > maxPageOrder {
		return ""
	}
	var reported string
	if b, err := os.ReadFile(pageReportingDir + "reported_kib"); err == nil {
		if kib, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && kib > 0 {
			reported = fmt.Sprintf(", %.0f GiB so far", float64(kib)/(1<<20))
		}
	}
	return fmt.Sprintf("note: this host hands free memory back to its hypervisor (free page reporting, order %d and up%s).\n"+
		"    Here fresh memory is first touched at %s, memory touched before at 5-10 GB/s. Which runs get\n"+
		"    fresh memory varies: migration, snapshot and disk figures move 2-3x between runs. For steadier figures,\n"+
		"    as root: echo %d > %spage_reporting_order, then touch the free memory once (README, Benchmarks).\n",
		order, reported, firstTouchRate(), maxPageOrder+1, pageReportingDir)
}

// firstTouchRate measures how fast this process faults in 64 MiB of
// fresh anonymous memory, as text.
func firstTouchRate() string {
	const n = 64 << 20
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return "an unmeasured rate"
	}
	defer unix.Munmap(b)
	t0 := time.Now()
	for i := 0; i < n; i += 4096 {
		b[i] = 1
	}
	return fmt.Sprintf("%.2f GB/s", n/time.Since(t0).Seconds()/1e9)
}
