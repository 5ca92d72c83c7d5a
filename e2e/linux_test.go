package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"collective/image"
	"collective/nested"
)

func TestMain(m *testing.M) {
	code := m.Run()
	nested.CloseShared()
	os.Exit(code)
}

// report is collective bench linux-drive's JSON report (times in ms since
// the VMM started, Unix times in L1's clock).
type report struct {
	StartUnix float64 `json:"start_unix"`
	BannerMS  float64 `json:"banner_ms"`
	PromptMS  float64 `json:"prompt_ms"`
	EndMS     float64 `json:"end_ms"`
	EndUnix   float64 `json:"end_unix"`
	Status    int     `json:"status"`
	TimedOut  bool    `json:"timed_out"`
	Sent      []struct {
		Line string  `json:"line"`
		MS   float64 `json:"ms"`
		Unix float64 `json:"unix"`
	} `json:"sent"`
	Exits map[string]uint64 `json:"exits"`
	Error string            `json:"error"`
}

const (
	vmlinux = nested.ApplianceDir + "/vmlinux"
	bzImage = nested.ApplianceDir + "/bzImage"
)

// boot runs collective run in L1 on the appliance with kernel and extra
// flags, types lines (one per shell prompt, or all at once right after
// the banner with typeahead) and returns the report and the console
// (the VMM's stdout and stderr).
func boot(t *testing.T, kernel, flags string, typeahead bool, lines ...string) (*report, string) {
	t.Helper()
	h := nested.Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var script strings.Builder
	script.WriteString(nested.CollectivePath + " bench linux-drive --timeout 150s")
	if typeahead {
		script.WriteString(" --typeahead")
	}
	for _, l := range lines {
		script.WriteString(" --send " + shellQuote(l))
	}
	fmt.Fprintf(&script, " -- %s run -v --mem 256M --kernel %s --initrd %s/initrd.img --append \"$(cat %s/cmdline)\" %s",
		nested.CollectivePath, kernel, nested.ApplianceDir, nested.ApplianceDir, flags)
	out, status, err := h.Run(ctx, script.String())
	if err != nil || status != 0 {
		t.Fatalf("L1 script: status %d, err %v; output:\n%s", status, err, out)
	}
	i := strings.LastIndex(out, "@@DRIVE ")
	if i < 0 {
		t.Fatalf("no report from linux-drive; output:\n%s", out)
	}
	console := out[:i]
	var rep report
	if err := json.Unmarshal([]byte(strings.TrimSpace(out[i+len("@@DRIVE "):])), &rep); err != nil {
		t.Fatalf("bad report: %v; output:\n%s", err, out)
	}
	if rep.Error != "" || rep.TimedOut {
		t.Fatalf("linux-drive: error %q, timed out %v; console:\n%s", rep.Error, rep.TimedOut, named(h, console))
	}
	if rep.BannerMS < 0 {
		t.Fatalf("no banner (%q) on the console:\n%s", image.BannerPrefix, console)
	}
	t.Logf("%s %s: banner after %.2f s, first prompt %.2f s, VMM exited after %.2f s with status %d; exits %v",
		kernel, flags, rep.BannerMS/1000, rep.PromptMS/1000, rep.EndMS/1000, rep.Status, rep.Exits)
	t.Logf("console:\n%s", strings.ReplaceAll(console, "\r", ""))
	return &rep, console
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// TestPVHTwoCPUs boots the unpacked vmlinux through PVH with --cpus 2 and
// checks the banner, nproc, commands typed on the serial console, the
// guest's clock against L1's, and poweroff's status 0.
func TestPVHTwoCPUs(t *testing.T) {
	rep, console := boot(t, vmlinux, "--cpus 2", false,
		"nproc", "echo DATE=$(date +%s)", "echo SUM=$((6*7)) $(uname -r)", "poweroff")
	if !strings.Contains(console, image.BannerPrefix) || !strings.Contains(console, ", 2 CPUs") {
		t.Errorf("banner lacks \", 2 CPUs\":\n%s", console)
	}
	if !regexp.MustCompile(`(?m)^nproc\r?\n2\r?$`).MatchString(strings.ReplaceAll(console, "\r", "")) &&
		!regexp.MustCompile(`nproc\r*\n2\r*\n`).MatchString(console) {
		t.Errorf("nproc did not print 2:\n%s", console)
	}
	if !regexp.MustCompile(`SUM=42 6\.1\.`).MatchString(console) {
		t.Errorf("echo SUM=$((6*7)) $(uname -r) did not come back as SUM=42 6.1...:\n%s", console)
	}
	m := regexp.MustCompile(`DATE=(\d+)`).FindStringSubmatch(console)
	if m == nil || len(rep.Sent) < 2 {
		t.Errorf("no DATE= line:\n%s", console)
	} else {
		guest, _ := strconv.ParseFloat(m[1], 64)
		sent := rep.Sent[1].Unix
		t.Logf("guest date +%%s = %.0f; L1's clock: %.2f when typed, %.2f at the VMM's exit", guest, sent, rep.EndUnix)
		if guest < sent-3 || guest > rep.EndUnix+3 {
			t.Errorf("guest's date %.0f is not within 3 s of L1's [%.2f, %.2f]", guest, sent, rep.EndUnix)
		}
	}
	if rep.Status != 0 {
		t.Errorf("poweroff: VMM status %d, want 0; console:\n%s", rep.Status, console)
	}
}

// TestBzImageTypeahead boots the bzImage (64-bit boot protocol) and types
// a whole script as soon as the banner appears, before the shell is up,
// as a script piped into make run does: every byte must arrive.
func TestBzImageTypeahead(t *testing.T) {
	rep, console := boot(t, bzImage, "", true,
		"uname -r", "echo TYPED-$((40+2))-abcdefghijklmnopqrstuvwxyz", "echo AFTER", "poweroff")
	for _, want := range []string{"TYPED-42-abcdefghijklmnopqrstuvwxyz", "\nAFTER", ", 1 CPUs"} {
		if !strings.Contains(strings.ReplaceAll(console, "\r", ""), want) {
			t.Errorf("console lacks %q:\n%s", want, console)
		}
	}
	if rep.Status != 0 {
		t.Errorf("poweroff: VMM status %d, want 0; console:\n%s", rep.Status, console)
	}
}

// TestKernelPanic crashes the guest kernel through sysrq: the VMM must
// exit non-zero (1: the pvpanic device reported the panic) with the
// panic on the console.
func TestKernelPanic(t *testing.T) {
	rep, console := boot(t, vmlinux, "", false, "echo c > /proc/sysrq-trigger")
	if !strings.Contains(console, "Kernel panic") {
		t.Errorf("no \"Kernel panic\" on the console:\n%s", console)
	}
	if rep.Status != 1 || !strings.Contains(console, "the guest kernel panicked") {
		t.Errorf("VMM status %d, want 1 and \"collective run: the guest kernel panicked\"; console:\n%s", rep.Status, console)
	}
}
