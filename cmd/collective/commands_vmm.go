//go:build vmm

package main

// progName names this binary in messages.
const progName = "collective-vmm"

const usage = `collective-vmm: the process that runs a guest (collective run and
collective restore exec it; it links nothing else)

Commands:
  run      boot a kernel with its serial console (collective-vmm run -h)
  restore  resume a machine from a snapshot (collective-vmm restore -h)
`

// command returns the function that runs the named command, or nil.
func command(name string) func([]string) int {
	switch name {
	case "run":
		return runCmd
	case "restore":
		return restoreCmd
	}
	return nil
}
