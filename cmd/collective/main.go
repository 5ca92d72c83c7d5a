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
package main

import (
	"fmt"
	"os"
)

const usage = `collective: run virtual appliances on KVM

Commands:
  run      boot a kernel with its serial console (collective run -h)
  bench    benchmarks against QEMU (collective bench -h)
  nested   run a command in the nested test host, a Linux with /dev/kvm under QEMU TCG (collective nested -h)
  ctl      control a running machine through its API (collective ctl -h)
  restore  resume a machine from a snapshot (collective restore -h)
  migrate  live-migrate a running machine to collective run --incoming (collective migrate -h)
  snapshot merge OUT IN... | info FILE: snapshot files
  image    build and list appliances (collective image build default, collective image ls)
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var code int
	switch os.Args[1] {
	case "run":
		code = runCmd(os.Args[2:])
	case "bench":
		code = benchCmd(os.Args[2:])
	case "nested":
		code = nestedCmd(os.Args[2:])
	case "ctl":
		code = ctlCmd(os.Args[2:])
	case "restore":
		code = restoreCmd(os.Args[2:])
	case "migrate":
		code = migrateCmd(os.Args[2:])
	case "snapshot":
		code = snapshotCmd(os.Args[2:])
	case "image":
		code = imageCmd(os.Args[2:])
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "collective: unknown command %q\n%s", os.Args[1], usage)
		code = 2
	}
	os.Exit(code)
}
