// Package kvm is Collective's only door to /dev/kvm: ioctl numbers and
// structs of our own (x/sys has none), capability probes, VMs with guest
// RAM and memory slots, and vCPUs with their run loop.
//
// The API follows Documentation/virt/kvm/api.rst. A System is an open
// /dev/kvm whose API version and required capabilities have been checked;
// a VM owns its guest RAM (anonymous mappings, transparent huge pages where
// the host has them), the in-kernel irqchip and PIT; each VCPU is created
// and run on its own locked OS thread, and dispatches port-I/O and MMIO
// exits to an ExitHandler (the machine's buses).
//
// Pause stops every vCPU at an instruction boundary outside KVM_RUN (kicked
// with immediate_exit and a signal), which snapshots and migration need;
// Resume lets them go on.
//
// # Lock order
//
//	VM.throttle.mu (SetThrottle), before VM.mu (pause/resume, vCPU list)
//	  VCPU.busy: held by the vCPU's thread in Run (outside park) and
//	  around each request it serves, or by a caller around a state ioctl
//	  run on its own thread; never call VCPU.Do or a state method from
//	  the vCPU's thread (an ExitHandler, a Do function).
//
// Only this package (and its sub-packages that need it) imports
// golang.org/x/sys/unix for KVM; the device models never see a VM.
package kvm
