package snapshot

import (
	"fmt"
	"os"
	"time"

	"collective/internal/term"
)

// TerminalProgress returns a Progress that draws "label: done/total MiB
// (p%)" on f when f is a terminal, at most ten times a second, and nil
// otherwise.
func TerminalProgress(f *os.File, label string) Progress {
	if !term.IsTerminal(int(f.Fd())) {
		return nil
	}
	var last time.Time
	return func(done, total uint64) {
		now := time.Now()
		if done < total && now.Sub(last) < 100*time.Millisecond {
			return
		}
		last = now
		pct := 100.0
		if total > 0 {
			pct = 100 * float64(done) / float64(total)
		}
		fmt.Fprintf(f, "\r%s: %.0f/%.0f MiB (%.0f%%)", label, float64(done)/(1<<20), float64(total)/(1<<20), pct)
		if done >= total {
			fmt.Fprint(f, "\r\033[K")
		}
	}
}
