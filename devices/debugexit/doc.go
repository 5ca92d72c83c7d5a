// Package debugexit models a debug exit port compatible with QEMU's
// isa-debug-exit device (QEMU hw/misc/debugexit.c, documented in QEMU's
// "isa-debug-exit" device properties: iobase 0xf4, iosize 4): the guest
// ends the VM by writing its exit status to a port.
//
// The device is a 4-byte window, at port 0xF4 on our machines. A write of
// 1 to 4 bytes anywhere in the window, value v read little-endian, calls
// the Exit callback with code v. QEMU itself exits with status (v<<1)|1;
// our VMM exits with v, so a guest's exit code means the same thing to the
// user that it meant to the guest. Callers that want QEMU's status compute
// it from v. Reads return 0. Wider accesses and accesses outside the
// window are ignored (reads return 0xff).
//
// # Concurrency
//
// DebugExit is safe for concurrent use. It holds no lock: Exit is called
// on the vCPU thread that wrote the port and may be called concurrently by
// several vCPUs.
package debugexit
