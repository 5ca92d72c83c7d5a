package e2e

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"collective/nested"
)

// TestMigrateLinuxFreshByHash measures issue 6's "a freshly booted
// appliance migrates with at most 10% of its memory on the wire when the
// target holds its base snapshot" with real Linux. In L1 the default
// appliance boots to its shell prompt and is snapshotted through the API
// into the target's cache directory (its base snapshot), then killed. The
// same appliance (kernel, initramfs, command line) boots afresh and, at
// its prompt, migrates to collective run --incoming --cache DIR, which
// announces every page of the snapshot by hash: the source sends a hash
// for each page whose content the target holds. The bytes on the wire
// over the guest's non-zero memory must be at most 10%; the migrated
// shell answers on the target.
func TestMigrateLinuxFreshByHash(t *testing.T) {
	h := nested.Shared(t)
	start := time.Now()
	const (
		dir  = "/tmp/e2e/fresh"
		addr = "127.0.0.1:4711"
	)
	base := drv{flags: fmt.Sprintf("--api %s/a.sock", dir), then: fmt.Sprintf(`%s ctl --api %s/a.sock snapshot %s/cache/base.clv; st=$?
echo "@@SNAPSHOT status $st"
kill -9 "$VMM_PID"`, nested.CollectivePath, dir, dir)}
	dst := drv{
		argv:  fmt.Sprintf("%s run -v --incoming %s --mem 256M --cache %s/cache", nested.CollectivePath, addr, dir),
		lines: []string{"echo fresh-on-the-$((6*7))-target", "poweroff"}, noBanner: true, timeout: 240 * time.Second}
	src := drv{flags: fmt.Sprintf("--api %s/b.sock", dir), then: fmt.Sprintf(`for i in $(seq 300); do netstat -ltn | grep -q ':%s ' && break; sleep 0.1; done
%s migrate --api %s/b.sock --to %s --report %s/report.json; echo "@@MIGRATE status $?"`,
		strings.Split(addr, ":")[1], nested.CollectivePath, dir, addr, dir), timeout: 240 * time.Second}
	script := fmt.Sprintf(`mkdir -p %s/cache; cd %s
%s >/tmp/e2e/fresh-base.out 2>&1
%s snapshot info cache/base.clv
%s >/tmp/e2e/fresh-dst.out 2>&1 &
pd=$!
%s >/tmp/e2e/fresh-src.out 2>&1
wait $pd
`, dir, dir, base.cmd(), nested.CollectivePath, dst.cmd(), src.cmd())
	res := runDrives(t, h, 10*time.Minute, script, "fresh-base", "fresh-src", "fresh-dst")
	b, s, d := res["fresh-base"], res["fresh-src"], res["fresh-dst"]
	if !strings.Contains(b.console, "@@SNAPSHOT status 0") {
		t.Fatalf("the base snapshot failed; console:\n%s", b.console)
	}
	if !strings.Contains(s.console, "@@MIGRATE status 0") {
		t.Fatalf("collective migrate failed; source console:\n%s\ntarget console:\n%s", s.console, d.console)
	}
	d.sentAll(t, dst)
	if !strings.Contains(d.console, "\nfresh-on-the-42-target") {
		t.Errorf("the migrated shell did not answer on the target; console:\n%s", d.console)
	}
	num := func(key string) float64 {
		m := regexp.MustCompile(`"` + key + `": ?([0-9.e+-]+)`).FindStringSubmatch(s.console)
		if m == nil {
			t.Fatalf("no %s in the migration report; source console:\n%s", key, s.console)
		}
		x, _ := strconv.ParseFloat(m[1], 64)
		return x
	}
	wire, nonZero, hits, full := num("bytes_wire"), num("nonzero_bytes"), num("hash_hit"), num("full")
	ratio := wire / nonZero
	t.Logf("fresh Linux appliance, 256 MiB: %.0f bytes on the wire for %.0f bytes of non-zero memory: %.2f%% (%.0f pages by hash, %.0f with their content); migration total %.0f ms, downtime %.2f ms; source boot to prompt %.1f s; whole test %.1f s",
		wire, nonZero, 100*ratio, hits, full, num("total_ms"), num("downtime_ms"), s.rep.PromptMS/1000, time.Since(start).Seconds())
	if ratio > 0.10 {
		t.Errorf("%.1f%% of the fresh appliance's non-zero memory went on the wire with its base snapshot in the target's cache; want at most 10%%", 100*ratio)
	}
	runL1(t, h, time.Minute, "rm -rf "+dir)
}
