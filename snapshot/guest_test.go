package snapshot

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"collective/guest"
	"collective/internal/testenv"
	"collective/machine"
)

// running is a workload guest running in this process.
type running struct {
	m       *machine.Machine
	console *testenv.Buffer
	done    chan machine.Exit
}

func startGuest(t *testing.T, cmdline string, mem uint64) *running {
	t.Helper()
	elf := testenv.WorkloadGuest(t)
	r := &running{console: &testenv.Buffer{}, done: make(chan machine.Exit, 1)}
	var err error
	r.m, err = machine.New(machine.Config{Kernel: elf, Cmdline: cmdline, MemSize: mem, CPUs: 1, Console: r.console})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.m.Stop(); <-r.done; r.m.Close() })
	go func() { r.done <- r.m.Run(context.Background()) }()
	return r
}

// pass returns the guest's count of verified passes (heartbeat +0x18).
func (r *running) pass(t *testing.T) uint64 {
	n, err := r.m.Memory().Uint64(guest.HeartbeatAddr + 0x18)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// waitPasses waits until the guest has verified n more passes.
func (r *running) waitPasses(t *testing.T, n uint64) {
	t.Helper()
	start := r.pass(t)
	deadline := time.Now().Add(30 * time.Second)
	for r.pass(t) < start+n {
		if time.Now().After(deadline) {
			t.Fatalf("guest made no progress; console:\n%s", r.console.String())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// runRestored runs a restored machine to its end and checks the guest's
// self-check passed.
func runRestored(t *testing.T, m *machine.Machine, console *testenv.Buffer) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	exit := m.Run(ctx)
	if exit.Reason != machine.ExitDebug || exit.Code != 0 || !strings.Contains(console.String(), "final verified") {
		t.Fatalf("restored guest: exit %+v; console:\n%s", exit, console.String())
	}
}

// TestSnapshotRestoreDirtyGuest: `dirty 8M 0 6` is snapshotted mid-run in
// each memory encoding and restored; its self-check passes.
func TestSnapshotRestoreDirtyGuest(t *testing.T) {
	for _, tc := range []struct {
		name    string
		take    TakeOptions
		opts    RestoreOptions
		prepare bool // the machine built by Prepare while the file opens
	}{
		{"lz4", TakeOptions{}, RestoreOptions{VerifyHashes: true}, false},
		{"raw-read", TakeOptions{Raw: true}, RestoreOptions{}, false},
		{"raw-lazy", TakeOptions{Raw: true}, RestoreOptions{Lazy: true}, false},
		{"raw-lazy-trusted", TakeOptions{Raw: true}, RestoreOptions{Lazy: true, Trust: true}, false},
		{"raw-lazy-prepared", TakeOptions{Raw: true}, RestoreOptions{Lazy: true, Trust: true}, true},
		{"lz4-prepared", TakeOptions{}, RestoreOptions{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := startGuest(t, "dirty 8M 0 4", 128<<20)
			r.waitPasses(t, 3)
			r.m.VM().Pause()
			ss := NewSession(r.m)
			p := filepath.Join(t.TempDir(), "snap")
			st, err := ss.Take(p, tc.take)
			if err != nil {
				t.Fatal(err)
			}
			r.m.Stop()
			t.Logf("snapshot: %v", st)
			var console testenv.Buffer
			cfg := machine.Config{Console: &console}
			var built *machine.Machine
			if tc.prepare {
				tc.opts.Prepared = Prepare(p, cfg)
				if tc.opts.Prepared == nil {
					t.Fatal("Prepare: no shape in a new file's header")
				}
				<-tc.opts.Prepared.done
				built = tc.opts.Prepared.m
			}
			s := open(t, p)
			m, rs, err := Restore([]*Snapshot{s}, cfg, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			if tc.prepare && (built == nil || m != built) {
				t.Fatalf("restore did not use the prepared machine (%p, built %p)", m, built)
			}
			t.Logf("restore: %v", rs)
			runRestored(t, m, &console)
		})
	}
}

// incremental takes a full snapshot of `dirty SIZE` then, after the
// guest verified two more passes, an incremental one.
func incremental(t *testing.T, size string) (*Stats, *Stats) {
	r := startGuest(t, "dirty "+size+" 0 0", 128<<20)
	r.waitPasses(t, 2)
	dir := t.TempDir()
	ss := NewSession(r.m)
	r.m.VM().Pause()
	full, err := ss.Take(filepath.Join(dir, "full"), TakeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r.m.VM().Resume()
	r.waitPasses(t, 2)
	r.m.VM().Pause()
	inc, err := ss.Take(filepath.Join(dir, "inc"), TakeOptions{Incremental: true})
	if err != nil {
		t.Fatal(err)
	}
	return full, inc
}

// TestIncrementalFollowsDirtyPages: the incremental snapshot of a guest
// dirtying 4 MiB records those pages (and a few more: stack, heartbeat,
// generation array), and one of 32 MiB about 8 times as many.
func TestIncrementalFollowsDirtyPages(t *testing.T) {
	type res struct{ full, inc *Stats }
	got := map[int]res{}
	for _, mib := range []int{4, 32} {
		full, inc := incremental(t, fmt.Sprintf("%dM", mib))
		got[mib] = res{full, inc}
		pages := mib << 20 / pageSize
		t.Logf("dirty %dM: full %v; incremental %v", mib, full, inc)
		if inc.Pages < pages || inc.Pages > pages+pages/16+64 {
			t.Errorf("dirty %dM: incremental stores %d pages, want %d to %d", mib, inc.Pages, pages, pages+pages/16+64)
		}
	}
	ratio := float64(got[32].inc.Bytes) / float64(got[4].inc.Bytes)
	if ratio < 5 || ratio > 11 {
		t.Errorf("incremental sizes %d and %d bytes: ratio %.1f, want about 8", got[4].inc.Bytes, got[32].inc.Bytes, ratio)
	}
}

// TestChainRestoreEqualsMerge: full + two incrementals of a running
// guest: the chain's memory equals the guest's memory at the last one and
// the merge's; restoring the chain and the merge both run on correctly.
func TestChainRestoreEqualsMerge(t *testing.T) {
	r := startGuest(t, "dirty 16M 50 5", 128<<20)
	r.waitPasses(t, 2)
	dir := t.TempDir()
	ss := NewSession(r.m)
	paths := []string{filepath.Join(dir, "0"), filepath.Join(dir, "1"), filepath.Join(dir, "2")}
	for i, p := range paths {
		if i > 0 {
			r.m.VM().Resume()
			time.Sleep(150 * time.Millisecond)
		}
		r.m.VM().Pause()
		if _, err := ss.Take(p, TakeOptions{Incremental: i > 0}); err != nil {
			t.Fatal(err)
		}
	}
	live := fakeMem(t, 128<<20)
	for i, reg := range r.m.Memory().Regions() {
		copy(live.Regions()[i].Host, reg.Host)
	}
	r.m.Stop()
	ch, err := OpenChain(paths[2])
	if err != nil {
		t.Fatal(err)
	}
	img, err := ImageOf(ch)
	if err != nil {
		t.Fatal(err)
	}
	sameMem(t, "chain vs live", live, img)
	merged := filepath.Join(dir, "merged")
	if _, err := Merge(merged, ch, false, nil); err != nil {
		t.Fatal(err)
	}
	ms := open(t, merged)
	img2, err := ImageOf([]*Snapshot{ms})
	if err != nil {
		t.Fatal(err)
	}
	sameMem(t, "chain vs merge", img, img2)
	for name, c := range map[string][]*Snapshot{"chain": ch, "merge": {ms}} {
		t.Run(name, func(t *testing.T) {
			var console testenv.Buffer
			m, _, err := Restore(c, machine.Config{Console: &console}, RestoreOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			runRestored(t, m, &console)
		})
	}
}
