//go:build !vmm

package main

import (
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"collective/devices/virtioblk"
)

// benchBlk measures virtio-blk from the workload guest ('blk bench': a
// polling driver at CPL3), ours against QEMU's virtio-blk-pci (-M pc, modern
// only) on the same ELF and the same backing file, interleaved, medians:
// sequential 1 MiB writes and reads at queue depth 4 (MB/s, MB = 2^20 bytes)
// and 4 KiB random reads at queue depth 32 (IOPS), with the host page cache
// and with O_DIRECT.
func benchBlk(_ []peer, elf string, runs, _ int) error {
	const (
		diskSize = 1 << 30
		secs     = 3
		memMiB   = 128
	)
	self, err := vmmBinary()
	if err != nil {
		return err
	}
	// Not tmpfs: O_DIRECT needs a real file system.
	dir, err := os.MkdirTemp("/var/tmp", "collective-bench-blk")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	disk := dir + "/disk.img"
	if err := fillFile(disk, diskSize); err != nil {
		return err
	}

	// Our VMM's O_DIRECT option, if virtioblk has one.
	_, derr := virtioblk.ParseDisk(disk + ",direct")
	oursDirect := derr == nil
	cmdline := fmt.Sprintf("blk bench %d", secs)
	type config struct {
		cache string
		ours  []string
		qemu  []string
	}
	ourArgs := func(diskArg string) []string {
		return []string{self, "run", "--kernel", elf, "--append", cmdline, "--mem", fmt.Sprintf("%dM", memMiB),
			"--serial", "stdio", "--disk", diskArg}
	}
	qemuArgs := func(drive string) []string {
		return []string{"qemu-system-x86_64", "-enable-kvm", "-M", "pc", "-cpu", "host",
			"-m", strconv.Itoa(memMiB), "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
			"-device", "isa-debug-exit,iobase=0xf4,iosize=4",
			"-kernel", elf, "-append", cmdline,
			"-drive", "file=" + disk + ",if=none,id=d0,format=raw," + drive,
			"-device", "virtio-blk-pci,drive=d0,disable-legacy=on"}
	}
	directNote := "O_DIRECT"
	directOurs := ourArgs(disk + ",direct")
	if !oursDirect {
		directNote = "O_DIRECT (ours: page cache, no direct option)"
		directOurs = ourArgs(disk)
	}
	configs := []config{
		{"page cache (qemu cache=writeback)", ourArgs(disk), qemuArgs("cache=writeback")},
		{directNote + " (qemu cache=none,aio=native)", directOurs, qemuArgs("cache=none,aio=native")},
	}
	tests := []string{"seqwrite 1M qd4", "seqread 1M qd4", "randread 4K qd32"}
	units := map[string]string{}
	// res[config][peer][test] = samples
	res := make([]map[string]map[string][]float64, len(configs))
	for c := range configs {
		res[c] = map[string]map[string][]float64{"collective": {}, "qemu-pc": {}}
	}
	rounds := max(4, runs/3)
	rounds += rounds % 2 // as many rounds with each peer first
	var failed []string
	for i := 0; i < rounds; i++ {
		for c, cf := range configs {
			peers := []struct {
				name string
				argv []string
			}{{"collective", cf.ours}, {"qemu-pc", cf.qemu}}
			// Who goes first alternates round by round: a run can
			// inherit the host's writeback of the run before it.
			if i%2 == 1 {
				peers[0], peers[1] = peers[1], peers[0]
			}
			for _, p := range peers {
				// Same host cache state for every run: the whole file
				// cached for the page-cache runs, none of it for O_DIRECT
				// (the other peer's direct writes drop cached pages).
				if err := cacheState(disk, c == 0); err != nil {
					return err
				}
				// A run that fails (e.g. the device asks for a reset)
				// is retried, and counted in the note under the table.
				var got [][]string
				for attempt := 0; ; attempt++ {
					out, err := runOutput(p.argv)
					if err != nil {
						return fmt.Errorf("%s (%s): %w\n%s", p.name, cf.cache, err, out)
					}
					if got = blkBenchRe.FindAllStringSubmatch(out, -1); len(got) == len(tests) {
						break
					}
					failed = append(failed, fmt.Sprintf("%s, %s: %s", p.name, cf.cache, failureLine(out)))
					if attempt == 2 {
						return fmt.Errorf("%s (%s): %d result lines, want %d; output:\n%s", p.name, cf.cache, len(got), len(tests), out)
					}
				}
				for _, m := range got {
					v, _ := strconv.ParseFloat(m[3], 64)
					res[c][p.name][m[1]] = append(res[c][p.name][m[1]], v)
					units[m[1]] = m[2]
				}
			}
		}
	}
	var rows [][]string
	for c, cf := range configs {
		for _, t := range tests {
			o, q := median(res[c]["collective"][t]), median(res[c]["qemu-pc"][t])
			ratio := "-"
			if q > 0 {
				ratio = fmt.Sprintf("%.3f", o/q)
			}
			rows = append(rows, []string{cf.cache, t, units[t], fmt.Sprintf("%.1f", o), fmt.Sprintf("%.1f", q), ratio})
		}
	}
	table(fmt.Sprintf("(e) virtio-blk from the workload guest ('%s': polling driver at CPL3, %d s per test), 1 GiB raw file on %s, QEMU 7.2 -M pc virtio-blk-pci; medians of %d interleaved runs; MBps = 2^20 bytes/s",
		cmdline, secs, dir, rounds),
		[]string{"cache", "test", "unit", "collective", "qemu-pc", "collective/qemu"}, rows)
	if len(failed) > 0 {
		fmt.Printf("%d failed runs, repeated:\n", len(failed))
		for _, f := range failed {
			fmt.Printf("  %s\n", f)
		}
	}
	return nil
}

// failureLine picks the line explaining a failed run.
func failureLine(out string) string {
	var last string
	for _, l := range strings.Split(out, "\n") {
		l = strings.TrimSpace(l)
		if strings.Contains(l, "needs reset") || strings.Contains(l, "timed out") {
			return l
		}
		if l != "" {
			last = l
		}
	}
	return last
}

var blkBenchRe = regexp.MustCompile(`blk-bench: (\w+ \w+ qd\d+) (MBps|IOPS) ([\d.]+)`)

// fillFile writes size bytes of random data (no holes: reads hit data).
func fillFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	buf := make([]byte, 4<<20)
	rand.Read(buf)
	for off := int64(0); off < size; off += int64(len(buf)) {
		buf[0]++ // distinct chunks
		if _, err := f.WriteAt(buf, off); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// cacheState reads the whole file into the host page cache (warm), or
// writes it back and drops it from the cache.
func cacheState(path string, warm bool) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if warm {
		_, err = io.Copy(io.Discard, f)
		return err
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return err
	}
	return unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
}
