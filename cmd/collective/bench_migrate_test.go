//go:build !vmm

package main

import "testing"

// TestPairRatio: runs are compared with the other VMM's run in the same
// position (the VMMs take turns going first), so a host that favours
// whoever goes first shows no difference between equal VMMs.
func TestPairRatio(t *testing.T) {
	total := func(r migResult) float64 { return r.TotalMS }
	// Round 0: ours first (fast), QEMU second (slow); round 1 the other
	// way round. Equal VMMs.
	ours := []migResult{{TotalMS: 100}, {TotalMS: 300}}
	q := []migResult{{TotalMS: 300}, {TotalMS: 100}}
	if got := pairRatio(ours, q, total); got != 1 {
		t.Errorf("equal VMMs: ratio %v, want 1", got)
	}
	// Ours twice as fast in both positions.
	ours = []migResult{{TotalMS: 50}, {TotalMS: 150}, {TotalMS: 50}}
	q = []migResult{{TotalMS: 300}, {TotalMS: 100}, {TotalMS: 300}}
	if got := pairRatio(ours, q, total); got != 0.5 {
		t.Errorf("ours twice as fast: ratio %v, want 0.5", got)
	}
	if got := pairRatio(ours[:1], q[:1], total); got != 0 {
		t.Errorf("no pair: ratio %v, want 0", got)
	}
}
