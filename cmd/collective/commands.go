//go:build !vmm

package main

// Imported for its package initialisation, which execs collective-vmm for
// run and restore when it sits next to this binary.
import _ "collective/cmd/collective/internal/vmmexec"

// progName names this binary in messages.
const progName = "collective"

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

// command returns the function that runs the named command, or nil.
// run and restore get here only when there is no collective-vmm next to
// this binary (internal/vmmexec): they then run in this process.
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
