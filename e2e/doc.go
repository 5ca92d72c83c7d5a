// Package e2e holds the end-to-end tests of real Linux under Collective in
// the nested test world (world 3 of ../shared/DESIGN.md): one nested test
// host (package nested) boots per test binary, and each test boots the
// default appliance in it as L2 with /bin/collective, typing commands on
// its serial console through "collective bench linux-drive" (which notes
// when the banner and the prompts appear and reports in JSON).
//
// The tests skip under -short, and skip (fail under CI=true) when QEMU,
// busybox-static or the kernel package are missing.
package e2e
