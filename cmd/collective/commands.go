//go:build !vmm

package main

// command returns the function that runs the named command, or nil. This
// is collective-tools, the full build: every command runs in this process,
// run and restore included (go run ./cmd/collective gives this build).
func command(name string) func([]string) int {
	switch name {
	case "run":
		return runCmd
	case "restore":
		return restoreCmd
	case "bench":
		return benchCmd
	case "nested":
		return nestedCmd
	case "ctl":
		return ctlCmd
	case "migrate":
		return migrateCmd
	case "snapshot":
		return snapshotCmd
	case "image":
		return imageCmd
	}
	return nil
}
