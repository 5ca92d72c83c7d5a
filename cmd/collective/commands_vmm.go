//go:build vmm

package main

import (
	"os"
	"syscall"
)

// command returns the function that runs the named command, or nil. This
// is collective, the VMM build: run and restore run in this process, and
// the commands it does not link are collective-tools's.
func command(name string) func([]string) int {
	switch name {
	case "run":
		return runCmd
	case "restore":
		return restoreCmd
	case "bench", "nested", "ctl", "migrate", "snapshot", "image":
		return execTools
	}
	return nil
}

// execTools replaces this process with the collective-tools next to this
// executable, with the same arguments (working directory, environment,
// open files and process ID carry over, so its exit status is the
// command's). It returns only when that fails, with one line on stderr.
func execTools([]string) int {
	exe, err := os.Executable()
	if err != nil {
		os.Stderr.WriteString("collective: " + os.Args[1] + ": cannot find this executable: " + err.Error() + "\n")
		return 1
	}
	tools := exe[:lastSlash(exe)+1] + toolsName
	err = syscall.Exec(tools, append([]string{tools}, os.Args[1:]...), os.Environ())
	if err == syscall.ENOENT {
		os.Stderr.WriteString("collective: " + os.Args[1] + " is in collective-tools, the full build, and there is no " + tools +
			": build it with make build, or CGO_ENABLED=0 go build -o " + tools + " ./cmd/collective\n")
	} else {
		os.Stderr.WriteString("collective: " + os.Args[1] + ": exec " + tools + ": " + err.Error() + "\n")
	}
	return 1
}

// lastSlash is strings.LastIndexByte(s, '/').
func lastSlash(s string) int {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '/' {
			return i
		}
	}
	return -1
}
