package migrate_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"collective/api"
	"collective/guest"
	"collective/internal/testenv"
)

// netnsPair makes two network namespaces joined by a veth pair, the
// source's side 10.201.N.1/24 and the target's 10.201.N.2/24, and
// deletes them (and so the pair) when t ends. It returns the names.
func netnsPair(t *testing.T, ip string) (src, tgt string) {
	t.Helper()
	id := os.Getpid() % 100000
	src, tgt = fmt.Sprintf("clvsrc%d", id), fmt.Sprintf("clvtgt%d", id)
	a, b := fmt.Sprintf("clvs%d", id), fmt.Sprintf("clvt%d", id)
	sub := fmt.Sprintf("10.201.%d", id%250+1)
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(ip, args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	// Leftovers of a killed run with the same pid.
	exec.Command(ip, "netns", "del", src).Run()
	exec.Command(ip, "netns", "del", tgt).Run()
	run("netns", "add", src)
	t.Cleanup(func() { exec.Command(ip, "netns", "del", src).Run() })
	run("netns", "add", tgt)
	t.Cleanup(func() { exec.Command(ip, "netns", "del", tgt).Run() })
	run("link", "add", a, "netns", src, "type", "veth", "peer", "name", b, "netns", tgt)
	run("-n", src, "addr", "add", sub+".1/24", "dev", a)
	run("-n", tgt, "addr", "add", sub+".2/24", "dev", b)
	for _, ns := range []struct{ ns, dev string }{{src, a}, {tgt, b}} {
		run("-n", ns.ns, "link", "set", "lo", "up")
		run("-n", ns.ns, "link", "set", ns.dev, "up")
	}
	return src, tgt
}

// TestMigrateNetNS: the workload guest in dirty mode (64 MiB at 100 MB/s)
// migrates from a collective process in one network namespace to one in
// another, over a veth pair (a real, if virtual, link: no loopback
// shortcut), keeps running on the target and passes its final self-check.
func TestMigrateNetNS(t *testing.T) {
	testenv.RequireKVM(t)
	testenv.RequireCommand(t, "gcc")
	ip := testenv.RequireNetNS(t)
	elf, err := guest.Build()
	if err != nil {
		t.Fatal(err)
	}
	bin := collectiveBin(t)
	srcNS, tgtNS := netnsPair(t, ip)
	id := os.Getpid() % 100000
	addr := fmt.Sprintf("10.201.%d.2:7410", id%250+1)
	sock := filepath.Join(t.TempDir(), "src.sock")

	tgt := startCmd(t, ip, "netns", "exec", tgtNS, bin, "run", "--incoming", addr, "--mem", "256M")
	tgt.waitFor(t, "waiting for a migration", 10*time.Second)
	src := startCmd(t, ip, "netns", "exec", srcNS, bin, "run", "--kernel", elf, "--append", "dirty 64M 100 5",
		"--mem", "256M", "--api", sock)
	src.waitFor(t, "pass 1 verified", 20*time.Second)
	// The API socket is a path: reachable from any namespace. The
	// source dials the target from its own namespace.
	rep, err := api.NewClient(sock).Migrate(api.MigrateRequest{To: addr})
	if err != nil {
		t.Fatalf("migrate: %v\nsource:\n%s\ntarget:\n%s", err, src.out.String(), tgt.out.String())
	}
	t.Logf("total %.1f ms, downtime %.2f ms (est %.2f), rounds %d, wire %d B, non-zero %d B, pages %+v, %s",
		rep.TotalMS, rep.DowntimeMS, rep.DowntimeEstMS, rep.Rounds, rep.BytesWire, rep.NonZeroBytes, rep.Pages, rep.Compression)
	if !rep.OK || rep.Rounds < 2 {
		t.Errorf("report: ok %v, %d rounds", rep.OK, rep.Rounds)
	}
	if code := src.wait(t, 10*time.Second); code != 0 {
		t.Errorf("source exit %d; output:\n%s", code, src.out.String())
	}
	if strings.Contains(src.out.String(), "final verified") {
		t.Errorf("the source finished the guest's run: it never left; output:\n%s", src.out.String())
	}
	// The guest keeps running on the target and its final self-check
	// (every page of every pass, and the checksum) passes there.
	if code := tgt.wait(t, 30*time.Second); code != 0 || !strings.Contains(tgt.out.String(), "final verified") {
		t.Fatalf("target exit %d; output:\n%s", code, tgt.out.String())
	}
	if !strings.Contains(tgt.out.String(), "migrated in from "+strings.Split(addr, ".2:")[0]+".1:") {
		t.Errorf("the target's peer was not the source's namespace address; output:\n%s", tgt.out.String())
	}
}
