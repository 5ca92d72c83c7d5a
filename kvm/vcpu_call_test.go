package kvm

import (
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"collective/kvm/guestmem"
)

// TestStateIoctlThread checks where a vCPU's state ioctls run (call): on
// the caller's thread while the vCPU cannot enter KVM_RUN, else on the
// vCPU's thread once it lets go (parks); Do always on the vCPU's thread.
func TestStateIoctlThread(t *testing.T) {
	s := openKVM(t)
	vm, err := s.NewVM([]guestmem.Range{{GPA: 0, Size: 16 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	v, err := vm.NewVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	self := unix.Gettid()
	where := func(do func(func() error) error) int {
		tid := 0
		if err := do(func() error {
			tid = unix.Gettid()
			_, err := ioctl(v.fd, kvmGetTSCKHz, 0)
			return err
		}); err != nil && tid == 0 {
			t.Fatal(err)
		}
		return tid
	}
	if got := where(v.call); got != self {
		t.Errorf("an idle vCPU's state ioctl ran on thread %d, want the caller's %d", got, self)
	}
	if got, want := where(v.Do), int(v.tid.Load()); got != want {
		t.Errorf("Do ran on thread %d, want the vCPU's %d", got, want)
	}
	if _, err := v.Regs(); err != nil {
		t.Fatal(err)
	}

	// As in Run outside park: the ioctl waits, then runs on the vCPU's
	// thread.
	v.busy.Lock()
	got := make(chan int, 1)
	go func() { got <- where(v.call) }()
	select {
	case tid := <-got:
		t.Fatalf("a state ioctl ran (thread %d) while the vCPU could enter KVM_RUN", tid)
	case <-time.After(50 * time.Millisecond):
	}
	v.busy.Unlock()
	if tid := <-got; tid != int(v.tid.Load()) {
		t.Errorf("a waiting state ioctl ran on thread %d, want the vCPU's %d", tid, v.tid.Load())
	}

	if err := v.close(); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Regs(); err == nil {
		t.Error("a closed vCPU's state ioctl succeeded")
	}
}
