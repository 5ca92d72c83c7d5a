//go:build !vmm

package main

import (
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestBannerUptime reads the guest's uptime off the appliance's banner
// line, as bench linux does, and nothing off other lines.
func TestBannerUptime(t *testing.T) {
	for _, c := range []struct {
		console string
		want    float64
	}{
		{"x\r\nCollective appliance: Linux 6.1.0-57-amd64, 2 CPUs, up 2.48 s\r\n# ", 2480},
		{"Collective appliance: Linux 6.1.0, 1 CPUs, up 13 s\n", 13000},
		{"Collective appliance: Linux 6.1.0, 1 CPUs\nup 2.00 s\n", -1}, // an older banner
		{"up 2.00 s\n", -1},
	} {
		if got := bannerUptime([]byte(c.console)); got != c.want {
			t.Errorf("bannerUptime(%q) = %v, want %v", c.console, got, c.want)
		}
	}
}

// TestDriveTimeoutAsksForVCPUs: a VMM that times out gets SIGUSR1 twice
// (its vCPUs in brief, briefOnSignal) before it is killed.
func TestDriveTimeoutAsksForVCPUs(t *testing.T) {
	var out strings.Builder
	rep := drive([]string{"/bin/sh", "-c", `trap 'echo brief >&2' USR1; while :; do sleep 0.05; done`},
		driveOptions{prompt: regexp.MustCompile(defaultPrompt), timeout: 500 * time.Millisecond}, &out)
	if !rep.TimedOut || rep.Status != -1 {
		t.Errorf("report %+v: want timed out, killed", rep)
	}
	if n := strings.Count(out.String(), "brief\n"); n != 2 {
		t.Errorf("output %q: want 2 briefs", out.String())
	}
}
