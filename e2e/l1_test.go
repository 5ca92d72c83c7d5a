package e2e

// Helpers for the disk, snapshot and migration tests: files copied into
// and out of L1 through the control channel (the shared nested host has
// no shared folder; disk images are mostly zeros and travel gzipped),
// linux-drive command lines, and scripts that run several VMMs at once
// and return each one's console and report.

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"collective/internal/testenv"
	"collective/nested"
)

// runL1 runs script in the shared L1 with a timeout and fails t unless
// it exits 0.
func runL1(t *testing.T, h *nested.Host, timeout time.Duration, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, status, err := h.Run(ctx, script)
	if err != nil || status != 0 {
		t.Fatalf("L1 script: status %d, err %v; script:\n%s\noutput:\n%s", status, err, script, out)
	}
	return out
}

// putFile copies the host file local to path in L1 (gzipped, base64 in
// the script).
func putFile(t *testing.T, h *nested.Host, local, path string) {
	t.Helper()
	start := time.Now()
	b, err := os.ReadFile(local)
	if err != nil {
		t.Fatal(err)
	}
	var z bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&z, gzip.BestCompression)
	zw.Write(b)
	zw.Close()
	enc := base64.StdEncoding.EncodeToString(z.Bytes())
	var s strings.Builder
	fmt.Fprintf(&s, "set -e\nmkdir -p \"$(dirname %s)\"\nbase64 -d <<'@@EOF' | gunzip > %s\n", path, path)
	for len(enc) > 0 {
		n := min(len(enc), 76)
		s.WriteString(enc[:n] + "\n")
		enc = enc[n:]
	}
	fmt.Fprintf(&s, "@@EOF\nsha256sum %s\n", path)
	out := runL1(t, h, 2*time.Minute, s.String())
	sum := sha256.Sum256(b)
	if !strings.Contains(out, hex.EncodeToString(sum[:])) {
		t.Fatalf("putFile %s: L1's sha256 %q, want %x", path, strings.TrimSpace(out), sum)
	}
	t.Logf("copied %s (%d bytes, %d gzipped) to L1:%s in %.2f s", local, len(b), z.Len(), path, time.Since(start).Seconds())
}

// getFile copies path in L1 to the host file local.
func getFile(t *testing.T, h *nested.Host, path, local string) {
	t.Helper()
	start := time.Now()
	out := runL1(t, h, 2*time.Minute, fmt.Sprintf("set -e\nsha256sum %s\necho @@DATA\ngzip -c %s | base64", path, path))
	sumLine, data, ok := strings.Cut(out, "@@DATA\n")
	if !ok {
		t.Fatalf("getFile %s: no data:\n%s", path, out)
	}
	z, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(data), ""))
	if err != nil {
		t.Fatalf("getFile %s: %v", path, err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(z))
	if err != nil {
		t.Fatalf("getFile %s: %v", path, err)
	}
	b, err := io.ReadAll(zr)
	if err != nil {
		t.Fatalf("getFile %s: %v", path, err)
	}
	if sum := sha256.Sum256(b); !strings.Contains(sumLine, hex.EncodeToString(sum[:])) {
		t.Fatalf("getFile %s: got sha256 %x, L1 says %q", path, sum, strings.TrimSpace(sumLine))
	}
	if err := os.WriteFile(local, b, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("copied L1:%s (%d bytes, %d gzipped) to %s in %.2f s", path, len(b), len(z), local, time.Since(start).Seconds())
}

// requireE2fsprogs skips t (fails it under CI=true) without mke2fs,
// debugfs and e2fsck (Debian package e2fsprogs).
func requireE2fsprogs(t *testing.T) {
	t.Helper()
	for _, c := range []string{"mke2fs", "debugfs", "e2fsck"} {
		if _, err := exec.LookPath(c); err != nil {
			if _, err := os.Stat("/usr/sbin/" + c); err == nil {
				continue
			}
			testenv.RequireCommand(t, c) // skips, or fails under CI (apt-get install e2fsprogs)
		}
	}
}

func e2tool(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	return "/usr/sbin/" + name
}

// mkext4 makes a 64 MiB ext4 image at img holding the files of dir.
func mkext4(t *testing.T, dir, img string) {
	t.Helper()
	out, err := exec.Command(e2tool("mke2fs"), "-q", "-F", "-t", "ext4", "-d", dir, img, "64M").CombinedOutput()
	if err != nil {
		t.Fatalf("mke2fs -d %s %s: %v\n%s", dir, img, err, out)
	}
}

// debugfsCat returns the contents of path in the ext4 image img, or an
// error when it is not there.
func debugfsCat(img, path string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(e2tool("debugfs"), "-R", "cat "+path, img)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("debugfs cat %s: %v: %s", path, err, stderr.String())
	}
	// debugfs reports a missing file on stderr and exits 0.
	if strings.Contains(stderr.String(), "File not found") {
		return "", fmt.Errorf("debugfs cat %s: %s", path, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// fsck runs e2fsck -fy on img (replaying its journal) and returns its
// exit status (0 clean, 1 corrected, 2 corrected + reboot, >=4 errors
// left) and output.
func fsck(t *testing.T, img string) (int, string) {
	t.Helper()
	out, err := exec.Command(e2tool("e2fsck"), "-fy", img).CombinedOutput()
	if err == nil {
		return 0, string(out)
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), string(out)
	}
	t.Fatalf("e2fsck: %v", err)
	return -1, ""
}

// drv is one run of collective bench linux-drive in L1.
type drv struct {
	argv     string   // the VMM's command line; "" means collective run of the appliance (PVH)
	flags    string   // more flags for collective run of the appliance
	lines    []string // typed one per prompt
	then     string   // --then: a shell command run after the last line's prompt (VMM_PID)
	noBanner bool     // --nobanner (restore, run --incoming)
	timeout  time.Duration
}

// cmd returns drv as a shell command line.
func (d drv) cmd() string {
	var s strings.Builder
	timeout := d.timeout
	if timeout == 0 {
		timeout = 150 * time.Second
	}
	fmt.Fprintf(&s, "%s bench linux-drive --timeout %ds", nested.CollectivePath, int(timeout.Seconds()))
	if d.noBanner {
		s.WriteString(" --nobanner")
	}
	for _, l := range d.lines {
		s.WriteString(" --send " + shellQuote(l))
	}
	if d.then != "" {
		s.WriteString(" --then " + shellQuote(d.then))
	}
	argv := d.argv
	if argv == "" {
		argv = fmt.Sprintf("%s run -v --mem 256M --kernel %s --initrd %s/initrd.img --append \"$(cat %s/cmdline)\" %s",
			nested.CollectivePath, vmlinux, nested.ApplianceDir, nested.ApplianceDir, d.flags)
	}
	s.WriteString(" -- " + argv)
	return s.String()
}

// driveResult is one linux-drive's report and console (the VMM's output
// and the --then command's).
type driveResult struct {
	name    string
	rep     thenReport
	console string
}

// thenReport is linux-drive's report with the --then command's fields.
type thenReport struct {
	report
	ThenMS     float64 `json:"then_ms"`     // -1: not run
	ThenStatus int     `json:"then_status"` // -1: not run or killed
}

// sectionRe starts one driver's output in a script run by runDrives.
var sectionRe = regexp.MustCompile(`(?m)^@@SECTION (\S+)@@$`)

// runDrives runs script in L1: it must start the drivers, each with
// output to /tmp/e2e/NAME.out, and wait for them; runDrives then prints
// the files and parses each report. It fails t on a driver that timed
// out or reported an error.
func runDrives(t *testing.T, h *nested.Host, timeout time.Duration, script string, names ...string) map[string]*driveResult {
	t.Helper()
	var s strings.Builder
	s.WriteString("mkdir -p /tmp/e2e\n" + script + "\n")
	for _, n := range names {
		fmt.Fprintf(&s, "echo; echo '@@SECTION %s@@'; cat /tmp/e2e/%s.out\n", n, n)
	}
	out := runL1(t, h, timeout, s.String())
	res := map[string]*driveResult{}
	locs := sectionRe.FindAllStringSubmatchIndex(out, -1)
	if len(locs) > 0 && strings.TrimSpace(out[:locs[0][0]]) != "" {
		t.Logf("L1 script output:\n%s", strings.TrimSpace(out[:locs[0][0]]))
	}
	for i, loc := range locs {
		name := out[loc[2]:loc[3]]
		end := len(out)
		if i+1 < len(locs) {
			end = locs[i+1][0]
		}
		body := out[loc[1]:end]
		r := &driveResult{name: name}
		j := strings.LastIndex(body, "@@DRIVE ")
		if j < 0 {
			t.Fatalf("%s: no report from linux-drive; output:\n%s", name, body)
		}
		r.console = strings.ReplaceAll(body[:j], "\r", "")
		line, _, _ := strings.Cut(body[j+len("@@DRIVE "):], "\n")
		if err := json.Unmarshal([]byte(line), &r.rep); err != nil {
			t.Fatalf("%s: bad report %q: %v", name, line, err)
		}
		t.Logf("%s: first prompt %.2f s, %d lines typed, then-command at %.2f s (status %d), VMM exited after %.2f s with status %d; console:\n%s",
			name, r.rep.PromptMS/1000, len(r.rep.Sent), r.rep.ThenMS/1000, r.rep.ThenStatus, r.rep.EndMS/1000, r.rep.Status, r.console)
		if r.rep.Error != "" || r.rep.TimedOut {
			t.Fatalf("%s: linux-drive error %q, timed out %v; console:\n%s", name, r.rep.Error, r.rep.TimedOut, named(h, r.console))
		}
		res[name] = r
	}
	for _, n := range names {
		if res[n] == nil {
			t.Fatalf("no output of %s:\n%s", n, out)
		}
	}
	return res
}

// sentAll fails t unless the driver typed all its lines.
func (r *driveResult) sentAll(t *testing.T, d drv) {
	t.Helper()
	if len(r.rep.Sent) != len(d.lines) {
		t.Fatalf("%s: typed %d of %d lines (no prompt came); console:\n%s", r.name, len(r.rep.Sent), len(d.lines), r.console)
	}
}

var ripRe = regexp.MustCompile(`rip=0x([0-9a-f]+)`)

// named returns console with the instruction pointers of the VMM's
// vCPU briefs (printed when linux-drive timed out) named from the guest
// kernel's symbols.
func named(h *nested.Host, console string) string {
	syms, err := h.KernelSymbols()
	if err != nil || len(syms) == 0 {
		return console
	}
	return ripRe.ReplaceAllStringFunc(console, func(m string) string {
		return "rip=" + syms.Name(fmt.Sprintf("%016s", m[len("rip=0x"):]))
	})
}
