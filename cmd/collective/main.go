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
// The package builds two binaries. collective (go build -tags vmm, what a
// user runs) links only the commands that run a guest, run and restore:
// the process that runs a guest starts fast (bench boot) and keeps only
// its own code resident (bench memory). Every other command is in
// collective-tools (the default build, also what go run gives), which
// collective execs from its own folder with the same arguments
// (commands_vmm.go); collective-tools runs every command itself, run and
// restore included.
package main

import (
	"fmt"
	"os"
)

// toolsName is the full build's file name, next to collective.
const toolsName = "collective-tools"

const usage = `collective: run virtual appliances on KVM

Commands:
  run      boot a kernel with its serial console (collective run -h)
  restore  resume a machine from a snapshot (collective restore -h)
  bench    benchmarks against QEMU (collective bench -h)
  nested   run a command in the nested test host, a Linux with /dev/kvm under QEMU TCG (collective nested -h)
  ctl      control a running machine through its API (collective ctl -h)
  migrate  live-migrate a running machine to collective run --incoming (collective migrate -h)
  snapshot merge OUT IN... | info FILE: snapshot files
  image    build and list appliances (collective image build default, collective image ls)

run and restore are in collective itself; the others are in collective-tools,
the full build next to it, which collective runs for them.
`

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
		fmt.Fprintf(os.Stderr, "collective: unknown command %q\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	os.Exit(cmd(os.Args[2:]))
}
