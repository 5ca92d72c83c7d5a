package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"collective/api"
	"collective/internal/testenv"
)

// TestSnapshotRestoreAcrossProcesses: `collective run --api` runs the
// workload guest in dirty mode; `collective ctl` takes a full and an
// incremental snapshot mid-run; the first process is killed; `collective
// restore` in a new process resumes the guest, whose self-check passes;
// bad API requests get clear errors.
func TestSnapshotRestoreAcrossProcesses(t *testing.T) {
	elf, bin := guestAndBinary(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "api.sock")
	logf := filepath.Join(dir, "run.log")
	cmd := exec.Command(bin, "run", "--kernel", elf, "--append", "dirty 8M 0 4", "--mem", "128M", "--api", sock, "--serial", "file:"+logf)
	var vmmErr testenv.Buffer
	cmd.Stderr = &vmmErr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	c := api.NewClient(sock)
	deadline := time.Now().Add(20 * time.Second)
	for {
		data, _ := os.ReadFile(logf)
		if _, err := c.State(); err == nil && strings.Count(string(data), "verified") >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest did not start: %s", data)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The vCPUs in brief: through the API, and on stderr for SIGUSR1.
	if code, out, stderr := run(t, bin, "", "ctl", "--api", sock, "vcpus"); code != 0 || !strings.Contains(out, `"mp_state": "runnable"`) {
		t.Errorf("ctl vcpus: %d %s %s", code, out, stderr)
	}
	cmd.Process.Signal(syscall.SIGUSR1)
	for !strings.Contains(vmmErr.String(), "collective: vCPU 0 runnable rip=") {
		if time.Now().After(deadline) {
			t.Fatalf("no vCPU brief on stderr after SIGUSR1: %s", vmmErr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st, err := c.State(); err != nil || st.State != api.StateRunning {
		t.Errorf("after SIGUSR1: state %+v, %v; want running", st, err)
	}
	if _, err := c.Snapshot(api.SnapshotRequest{Path: filepath.Join(dir, "i"), Incremental: true}); !isStatus(err, 409) {
		t.Errorf("incremental without a parent: %v, want 409", err)
	}
	code, out, stderr := run(t, bin, "", "ctl", "--api", sock, "snapshot", filepath.Join(dir, "full.snap"))
	if code != 0 || !strings.Contains(out, `"pages"`) {
		t.Fatalf("ctl snapshot: %d %s %s", code, out, stderr)
	}
	time.Sleep(300 * time.Millisecond)
	if code, _, stderr = run(t, bin, "", "ctl", "--api", sock, "pause"); code != 0 {
		t.Fatal(stderr)
	}
	if code, _, stderr = run(t, bin, "", "ctl", "--api", sock, "pause"); code != 1 || !strings.Contains(stderr, "409") {
		t.Errorf("second pause: %d %s", code, stderr)
	}
	if code, out, stderr = run(t, bin, "", "ctl", "--api", sock, "snapshot", "--incremental", filepath.Join(dir, "inc.snap")); code != 0 {
		t.Fatal(out, stderr)
	}
	for _, tc := range []struct {
		method, path string
		body         any
		status       int
	}{
		{"POST", "/snapshot", map[string]any{"path": "x", "bogus": 1}, 400},
		{"POST", "/snapshot", "not an object", 400},
		{"POST", "/snapshot", map[string]any{}, 400},
		{"POST", "/snapshot", map[string]any{"path": strings.Repeat("x", 70000)}, 413},
		{"GET", "/snapshot", nil, 405},
		{"POST", "/vcpus", nil, 405},
		{"GET", "/nowhere", nil, 404},
		{"POST", "/snapshot", map[string]any{"path": "/nonexistent-dir/x"}, 500},
	} {
		if err := c.Do(tc.method, tc.path, tc.body, nil); !isStatus(err, tc.status) {
			t.Errorf("%s %s %v: %v, want status %d", tc.method, tc.path, tc.body, err, tc.status)
		}
	}
	cmd.Process.Kill()
	cmd.Wait()

	rlog := filepath.Join(dir, "restore.log")
	code, _, stderr = run(t, bin, "", "restore", "--serial", "file:"+rlog, filepath.Join(dir, "inc.snap"))
	data, _ := os.ReadFile(rlog)
	if code != 0 || !strings.Contains(string(data), "final verified") {
		t.Fatalf("restore: status %d\nstderr: %s\nconsole: %s", code, stderr, data)
	}
	merged := filepath.Join(dir, "merged.snap")
	if code, _, stderr = run(t, bin, "", "snapshot", "merge", "--raw", merged, filepath.Join(dir, "inc.snap")); code != 0 {
		t.Fatal(stderr)
	}
	code, _, stderr = run(t, bin, "", "restore", "--serial", "file:"+rlog, merged)
	data, _ = os.ReadFile(rlog)
	if code != 0 || !strings.Contains(string(data), "final verified") {
		t.Fatalf("restore of the merge: status %d\nstderr: %s\nconsole: %s", code, stderr, data)
	}
	// A truncated file is refused, naming the problem.
	whole, _ := os.ReadFile(merged)
	os.WriteFile(merged, whole[:len(whole)/2], 0o644)
	if code, _, stderr = run(t, bin, "", "restore", "--serial", "none", merged); code != 1 || !strings.Contains(stderr, "truncated") {
		t.Fatalf("truncated snapshot: status %d, %s", code, stderr)
	}
}

func isStatus(err error, code int) bool {
	e, ok := err.(*api.APIError)
	return ok && e.Status == code
}
