//go:build !vmm

package main

import (
	"os"
	"path/filepath"
)

// vmmBinary returns the binary that a user's collective run is, for the
// commands that start guests as a user would (bench): the collective (VMM
// build) next to this collective-tools, or, when this binary is not
// collective-tools or has none next to it (go run), this binary, which
// runs them in-process.
func vmmBinary() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	if filepath.Base(exe) == toolsName {
		vmm := filepath.Join(filepath.Dir(exe), "collective")
		if _, err := os.Stat(vmm); err == nil {
			return vmm, nil
		}
	}
	return exe, nil
}
