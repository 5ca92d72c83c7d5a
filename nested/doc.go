// Package nested is the nested test host: the third test world of
// ../shared/DESIGN.md, where real Linux runs although this machine's KVM
// (kvm-pvm) cannot boot it.
//
// QEMU in software emulation (TCG, -cpu max with SVM and nested paging)
// boots Debian's kernel as L1 from an initramfs built here; L1 loads
// kvm_amd and has a real, hardware-style /dev/kvm, in which our collective
// binary (or QEMU, for benchmarks) boots the default appliance as L2.
// L1 costs 5-15 s to boot, so a test binary boots one (Shared) and runs
// many scripts in it.
//
// # L1's initramfs
//
// An uncompressed newc archive (image/cpio): L1's kernel copies it into
// its rootfs faster than it would inflate it under TCG.
//
//	/init                     init.sh: mounts, insmod, /dev/kvm check, the control loop
//	/bin/busybox              busybox-static (applets installed at boot)
//	/bin/collective           CollectivePath: our command (the VMM build), statically linked
//	/bin/collective-tools     CollectiveToolsPath: the full build, which collective execs for bench...
//	/lib/modules/kernel/...   kvm_amd, virtio_pci, virtio_console, 9pnet_virtio, 9p and their
//	                          dependencies; /etc/nested/modules lists the insmod order
//	/appliance/               ApplianceDir: vmlinux, bzImage, initrd.img, cmdline
//	/usr/bin/qemu-system-x86_64, its libraries, /usr/share/qemu/...   with WithQEMU
//
// Options.Share, a host folder, is mounted read-write at SharePath (/host)
// through virtio-9p, and scripts start there: a disk image on the host
// reaches L2 as a relative path.
//
// # Control channel
//
// QEMU connects three character devices to Unix sockets of the Host:
// ttyS0 (L1's kernel messages), a virtio console hvc0 (RunConsole jobs)
// and a virtio-serial port named nested.ctl, the control channel. The
// channels are virtio rather than 16550 UARTs because under TCG and load
// the emulated UARTs lost bytes (at times a whole 16-byte FIFO), while
// virtqueues are flow-controlled. The host sends a header line and the
// script:
//
//	RUN|CON <id> <length> <timeout-s> <tty|raw|->\n<script bytes>
//
// L1 runs the script with sh in a session of its own (stdin /dev/null and
// output on the control port for RUN; hvc0 as its controlling terminal for
// CON), kills the whole session after the timeout, and answers on the
// control port with
//
//	\n@@NESTED-EXIT <id> <status> ok|timeout@@
//
// so a script's output is every byte before that marker. A CON job is
// announced with \n@@NESTED-STARTED <id>@@ (stdin is typed into hvc0 only
// after it) and ends on hvc0 with @@NESTED-END <id>@@, after the script's
// last byte. At boot L1 says \n@@NESTED-READY <uptime>@@ on the control
// port, or \n@@NESTED-FAIL <reason>@@ on ttyS0 when /dev/kvm or the
// virtio ports do not appear. Ids carry a random nonce, so a script's
// output cannot fake another script's end.
//
// # Timeouts
//
// Every QEMU run is bounded: Start by Options.BootTimeout, each script by
// its context (L1 kills it a few seconds before the deadline; if L1 does
// not answer by the deadline, as when it hangs after L2 powers off, the
// Host kills QEMU). QEMU runs with PDEATHSIG, so it dies with the test
// binary. Close kills it and waits at most a few seconds.
//
// # Post-mortem
//
// L1 used to stop answering now and then with both vCPUs busy in TCG
// (about once in 8-40 L2 boots). The post-mortem below explained it: both
// vCPUs at __schedule+0x2ab, the site of the static key KVM flips when the
// first VM appears and the last one goes away; QEMU's multi-threaded TCG
// livelocked on that cross-vCPU text patching. L1's init now holds one
// idle VM for L1's life (HoldKVM), so no L2 start or end patches text: in
// stress runs of 300 workload-guest boots per L1, 4 of 7 L1s hung without
// the holder and none of 7 with it. Before killing an L1 that hangs the
// Host asks QEMU's monitor (a Unix socket, -monitor) for every vCPU's
// registers, three samples apart, and names each instruction pointer from
// L1's kallsyms (copied beside the kernel at the first boot; L1 boots with
// nokaslr so the addresses stay put). The error carries it all. An L1
// that ended by itself (QEMU exited: under -no-reboot a reset of L1 has
// status 0) is reported as such.
//
// The same class of fault remains one level down, rarer (about once in
// 25-130 L2 boots, more often when the host's cores are busy), and
// scripts/test.sh's retries (a test fails the run only if it fails three
// times) absorb it. An L2 that times out under bench linux-drive gets
// its VMM's vCPU briefs (SIGUSR1, kvm.VCPUBrief), named from the same
// kallsyms (PVH boots have no KASLR). Two kinds were caught: both L2
// vCPUs looping in asm_exc_int3 during the L2 kernel's own text patching
// at boot (the livelock above, in L2), and an L2 vCPU whose RIP and RSP
// were L1's own: the instruction after VMRUN in kvm_amd's __svm_vcpu_run
// and L1's kernel stack (0xffa0..., non-canonical in 4-level L2), with a
// #PF pending forever and the other vCPU waiting for its lock. That is
// L1's host state saved as L2's at a #VMEXIT; it happens under QEMU 10.0
// too. CI has also shown a 1-vCPU L2 triple-faulting after a few
// commands, and both of L1's vCPUs spinning in
// native_queued_spin_lock_slowpath on a lock nobody held (L1 itself
// corrupted). None involves our VMM, which writes guest registers only at
// boot and restore. Single-threaded TCG is worse (L2 vCPUs halted with a
// pending interrupt are not woken), and masking LA57 did not help.
// Options.TCGThread and Options.CPU (collective nested --tcg-thread,
// --l1-cpu) are there to chase them.
//
// # Security
//
// L1 and everything in it are ours; the bytes L1 sends are parsed only for
// markers and bounded in size (maxStream). The shared folder is writable
// by L1 as root (security_model=none).
package nested
