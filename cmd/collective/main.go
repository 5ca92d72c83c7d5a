// Command collective runs virtual appliances on Linux KVM.
//
// Usage:
//
//	collective run --kernel FILE [--initrd FILE] [--append CMDLINE] [--mem 512M] [--cpus N] [--serial stdio|file:PATH|none]
//	collective bench boot|exits|memory ...
//	collective nested [--share DIR] [--appliance] [--] [CMD...]
//
// The exit status of run is the guest's debug-exit code (port 0xf4), 0 when
// the guest powers off or resets, 1 when the VMM fails, 2 for bad flags or
// a kernel file that cannot be booted.
//
// The package builds two binaries. collective (the default) has every
// command. collective-vmm (go build -tags vmm) has only the commands that
// run a guest, run and restore, and links nothing else: the process that
// runs a guest keeps only its own code resident (bench memory). collective
// run and restore exec the collective-vmm found next to collective
// (internal/vmmexec), and run in-process when there is none.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	switch os.Args[1] {
	case "-h", "--help", "help":
		fmt.Print(usage)
		os.Exit(0)
	}
	cmd := command(os.Args[1])
	if cmd == nil {
		fmt.Fprintf(os.Stderr, "%s: unknown command %q\n%s", progName, os.Args[1], usage)
		os.Exit(2)
	}
	os.Exit(cmd(os.Args[2:]))
}
