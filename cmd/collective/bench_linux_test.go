//go:build !vmm

package main

import "testing"

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
