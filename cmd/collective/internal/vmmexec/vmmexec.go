// Package vmmexec turns collective run and collective restore into the
// collective-vmm process (cmd/collective built with -tags vmm), which links
// only what runs a guest: bench, image and nested stay out of the process
// that holds the guest, and so do their pages (bench memory).
//
// It does so in its package initialisation, which runs once the runtime
// and package os are ready and before the packages that only the full
// binary needs (snapshot, image, nested...): the exec costs the least
// startup time there (bench boot). It imports only os and syscall so that
// the init order puts it that early.
package vmmexec

import (
	"os"
	"syscall"
)

// Name is the file name of the VMM-only binary, found next to collective.
const Name = "collective-vmm"

func init() {
	if len(os.Args) >= 2 && (os.Args[1] == "run" || os.Args[1] == "restore") {
		Exec()
	}
}

// Exec replaces this process with the collective-vmm next to this
// executable, with the same arguments. Paths in them stay valid: the
// working directory, environment, open files (stdin, stdout and stderr
// among them, with a terminal's mode untouched), ignored signals and the
// process ID carry over, so a signal or a wait meant for collective
// reaches the VMM and its exit status is the command's. Exec returns only
// when there is no collective-vmm there (go run, or a build of collective
// alone), it is older than collective (a stale build: collective-vmm runs
// code that collective also holds) or it cannot be executed; the command
// then runs in this process, with a line on stderr in the last two cases.
func Exec() {
	exe, err := os.Executable()
	if err != nil {
		return
	}
	vmm := exe[:lastSlash(exe)+1] + Name
	vi, err := os.Stat(vmm)
	if err != nil {
		return
	}
	if ei, err := os.Stat(exe); err == nil && vi.ModTime().Before(ei.ModTime()) {
		os.Stderr.WriteString("collective: running in this process: " + vmm + " is older than " + exe +
			" (build both: make build)\n")
		return
	}
	argv := append([]string{vmm}, os.Args[1:]...)
	err = syscall.Exec(vmm, argv, os.Environ())
	if err != syscall.ENOENT {
		os.Stderr.WriteString("collective: running in this process: exec " + vmm + ": " + err.Error() + "\n")
	}
}

// lastSlash is strings.LastIndexByte(s, '/'), without importing strings
// (see the package doc).
func lastSlash(s string) int {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '/' {
			return i
		}
	}
	return -1
}
