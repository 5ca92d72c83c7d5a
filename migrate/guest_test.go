package migrate_test

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"collective/api"
	"collective/internal/testenv"
	"collective/migrate"
)

// World 2: the workload guest migrates between two collective processes
// over loopback.

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// collectiveBin builds, once per test run and as make build does, the
// collective binary (-tags vmm: run and restore) and collective-tools
// next to it, which collective execs for migrate and ctl.
func collectiveBin(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "collective-migrate-test")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "collective")
		for _, args := range [][]string{
			{"build", "-tags", "vmm", "-o", binPath, "collective/cmd/collective"},
			{"build", "-o", filepath.Join(dir, "collective-tools"), "collective/cmd/collective"},
		} {
			out, err := exec.Command("go", args...).CombinedOutput()
			if err != nil {
				binErr = fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
				return
			}
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// proc is a collective process.
type proc struct {
	cmd    *exec.Cmd
	out    *testenv.Buffer // stdout (the serial console) and stderr
	done   chan struct{}
	code   int
	serial string
}

func start(t *testing.T, args ...string) *proc {
	t.Helper()
	return startCmd(t, collectiveBin(t), args...)
}

// startCmd starts a program (a collective process behind a wrapper such
// as ip netns exec) as a proc.
func startCmd(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(name, args...), out: &testenv.Buffer{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.cmd.Wait()
		p.code = p.cmd.ProcessState.ExitCode()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
	})
	return p
}

func (p *proc) wait(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.code
	case <-time.After(d):
		t.Fatalf("process %v still running after %v; output:\n%s", p.cmd.Args, d, p.out.String())
		return -1
	}
}

func (p *proc) waitFor(t *testing.T, s string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !strings.Contains(p.out.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q within %v; output:\n%s", s, d, p.out.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// pair starts a source running the workload guest with cmdline, and a
// target waiting on an address (behind a proxy when proxy is set: it is
// given the target's address and returns its own).
func startPair(t *testing.T, cmdline, mem string, srcArgs ...string) (src, tgt *proc, sock, addr string) {
	t.Helper()
	return startPairTarget(t, cmdline, mem, nil, srcArgs...)
}

// startPairTarget is startPair with extra arguments for the target and
// the source.
func startPairTarget(t *testing.T, cmdline, mem string, tgtArgs []string, srcArgs ...string) (src, tgt *proc, sock, addr string) {
	t.Helper()
	elf := testenv.WorkloadGuest(t)
	dir := t.TempDir()
	sock = filepath.Join(dir, "src.sock")
	addr = freeAddr(t)
	tgt = start(t, append([]string{"run", "--incoming", addr}, tgtArgs...)...)
	tgt.waitFor(t, "waiting for a migration", 10*time.Second)
	src = start(t, append([]string{"run", "--kernel", elf, "--append", cmdline, "--mem", mem, "--api", sock}, srcArgs...)...)
	if strings.HasPrefix(cmdline, "dirty") {
		src.waitFor(t, "pass 1 verified", 20*time.Second)
	} else {
		src.waitFor(t, "spin: looping", 10*time.Second)
	}
	return src, tgt, sock, addr
}

func TestMigrateWorkloadGuest(t *testing.T) {
	for _, tc := range []struct {
		name, cmdline string
		downtime      float64
		streams       int
	}{
		{"idle", "spin", 10, 0},
		{"10MBps", "dirty 16M 10 4", 50, 0},
		{"100MBps", "dirty 64M 100 4", 50, 0},
		{"100MBps-4-streams", "dirty 64M 100 4", 50, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, tgt, sock, addr := startPair(t, tc.cmdline, "256M")
			rep, err := api.NewClient(sock).Migrate(api.MigrateRequest{To: addr, Streams: tc.streams})
			if err != nil {
				t.Fatalf("migrate: %v\nsource:\n%s\ntarget:\n%s", err, src.out.String(), tgt.out.String())
			}
			if code := src.wait(t, 10*time.Second); code != 0 {
				t.Errorf("source exit %d", code)
			}
			gap := -1.0
			if rep.GuestGapMS != nil {
				gap = *rep.GuestGapMS
			}
			t.Logf("total %.1f ms, downtime %.2f ms (est %.2f), guest gap %.2f ms, rounds %d, wire %d B, non-zero %d B, pages %+v, %s",
				rep.TotalMS, rep.DowntimeMS, rep.DowntimeEstMS, gap, rep.Rounds, rep.BytesWire, rep.NonZeroBytes, rep.Pages, rep.Compression)
			if !rep.OK || rep.DowntimeMS > tc.downtime*4 || rep.Streams != max(tc.streams, 1) {
				t.Errorf("report: ok %v downtime %.2f ms, %d streams", rep.OK, rep.DowntimeMS, rep.Streams)
			}
			if tc.cmdline == "spin" {
				// The guest runs on at the target: its heartbeat gap was seen.
				if rep.GuestGapMS == nil {
					t.Errorf("no guest-observed gap")
				}
				tgt.cmd.Process.Kill()
				return
			}
			if code := tgt.wait(t, 30*time.Second); code != 0 || !strings.Contains(tgt.out.String(), "final verified") {
				t.Fatalf("target exit %d; output:\n%s", code, tgt.out.String())
			}
		})
	}
}

// proxy forwards one connection from its own address to addr; fault is
// applied to the source-to-target bytes: after n bytes it cuts (flip
// false) or flips one bit (flip true).
func proxy(t *testing.T, addr string, n int64, flip bool) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		a, err := l.Accept()
		if err != nil {
			return
		}
		b, err := net.Dial("tcp", addr)
		if err != nil {
			a.Close()
			return
		}
		go func() {
			buf := make([]byte, 32<<10)
			for {
				k, err := b.Read(buf)
				if k > 0 {
					a.Write(buf[:k])
				}
				if err != nil {
					a.Close()
					return
				}
			}
		}()
		var done int64
		buf := make([]byte, 32<<10)
		for {
			k, err := a.Read(buf)
			if k > 0 {
				c := buf[:k]
				if done <= n && n < done+int64(k) {
					if !flip {
						b.Write(c[:n-done])
						a.Close()
						b.Close()
						return
					}
					c[n-done] ^= 0x08
				}
				done += int64(k)
				if _, err := b.Write(c); err != nil {
					a.Close()
					return
				}
			}
			if err != nil {
				b.Close()
				return
			}
		}
	}()
	return l.Addr().String()
}

func TestMigrateFaultsWorkloadGuest(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault func(t *testing.T, c *api.Client, tgt *proc, addr string) string // returns the address to migrate to
	}{
		{"kill target in round 0", func(t *testing.T, c *api.Client, tgt *proc, addr string) string {
			go func() {
				time.Sleep(300 * time.Millisecond)
				tgt.cmd.Process.Kill()
			}()
			return addr
		}},
		{"cut mid-round", func(t *testing.T, c *api.Client, tgt *proc, addr string) string {
			return proxy(t, addr, 5<<20, false)
		}},
		{"corrupt frame", func(t *testing.T, c *api.Client, tgt *proc, addr string) string {
			return proxy(t, addr, 3<<20, true)
		}},
		{"cancel", func(t *testing.T, c *api.Client, tgt *proc, addr string) string {
			go func() {
				time.Sleep(300 * time.Millisecond)
				if _, err := c.MigrateCancel(); err != nil {
					t.Errorf("cancel: %v", err)
				}
			}()
			return addr
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, tgt, sock, addr := startPair(t, "dirty 32M 50 4", "256M")
			c := api.NewClient(sock)
			to := tc.fault(t, c, tgt, addr)
			// A bandwidth cap keeps round 0 going for about a second.
			_, err := c.Migrate(api.MigrateRequest{To: to, BandwidthMBps: 30, Compress: "never"})
			if err == nil {
				t.Fatal("migration succeeded despite the fault")
			}
			t.Logf("source: %v", err)
			st, err := c.State()
			if err != nil || st.State != api.StateRunning {
				t.Fatalf("source state %+v, %v", st, err)
			}
			if code := tgt.wait(t, 15*time.Second); code == 0 {
				t.Errorf("target exit 0; output:\n%s", tgt.out.String())
			}
			if out := tgt.out.String(); !strings.Contains(out, "failed, nothing kept") && !strings.Contains(tc.name, "kill") {
				t.Errorf("target output:\n%s", out)
			}
			// The source guest finishes its self-check.
			if code := src.wait(t, 30*time.Second); code != 0 || !strings.Contains(src.out.String(), "final verified") {
				t.Fatalf("source exit %d; output:\n%s", code, src.out.String())
			}
		})
	}
}

// TestMigrateAutoConverge migrates the workload guest dirtying memory as
// fast as it can over a link capped far below that: auto-converge
// throttles its vCPU, the migration completes, the throttle is gone on
// the target (the guest finishes its run there) and the guest's
// self-check passes.
func TestMigrateAutoConverge(t *testing.T) {
	src, tgt, sock, addr := startPair(t, "dirty 16M 0 8", "256M")
	rep, err := api.NewClient(sock).Migrate(api.MigrateRequest{To: addr, BandwidthMBps: 200, Compress: "never", AutoConverge: true})
	if err != nil {
		t.Fatalf("migrate: %v\nsource:\n%s\ntarget:\n%s", err, src.out.String(), tgt.out.String())
	}
	var throttles []int
	for _, r := range rep.RoundStats {
		throttles = append(throttles, r.Throttle)
	}
	t.Logf("total %.1f ms, downtime %.2f ms, rounds %d, throttle per round %v, wire %d B",
		rep.TotalMS, rep.DowntimeMS, rep.Rounds, throttles, rep.BytesWire)
	if !rep.OK || rep.ThrottlePct < migrate.ThrottleInitial {
		t.Errorf("report: ok %v, throttle %d%%", rep.OK, rep.ThrottlePct)
	}
	if code := src.wait(t, 10*time.Second); code != 0 {
		t.Errorf("source exit %d", code)
	}
	if code := tgt.wait(t, 30*time.Second); code != 0 || !strings.Contains(tgt.out.String(), "final verified") {
		t.Fatalf("target exit %d; output:\n%s", code, tgt.out.String())
	}
}
