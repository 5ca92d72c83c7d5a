package virtioblk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Submitter is implemented by backends that start reads and writes without
// holding a thread per request. A device offers it every request whose
// buffers allow it and serves the others synchronously.
type Submitter interface {
	// Submit starts reading into (write false) or writing from the
	// buffers iov at byte offset off. It reports false, having started
	// nothing, when this request cannot go asynchronously (alignment, no
	// free slot); otherwise done is called exactly once, from another
	// goroutine, with the bytes moved or an error. The buffers must stay
	// valid until then.
	Submit(write bool, iov [][]byte, off int64, done func(n int64, err error)) bool
}

// Linux native AIO (include/uapi/linux/aio_abi.h).
const (
	iocbCmdPreadv  = 7
	iocbCmdPwritev = 8
	iocbFlagResfd  = 1 << 0
)

// iocb is struct iocb on a little-endian 64-bit machine.
type iocb struct {
	data     uint64
	key      uint32
	rwFlags  uint32
	opcode   uint16
	reqprio  int16
	fd       uint32
	buf      uint64
	nbytes   uint64
	offset   int64
	reserved uint64
	flags    uint32
	resfd    uint32
}

// ioEvent is struct io_event.
type ioEvent struct {
	data uint64
	obj  uint64
	res  int64
	res2 int64
}

// aioMaxIovecs bounds the buffers of one asynchronous request; longer
// chains are served synchronously.
const aioMaxIovecs = 64

// aioContext runs vectored O_DIRECT reads and writes on one file through
// Linux native AIO: the dispatcher submits each request with one
// io_submit, and one goroutine woken by an eventfd (through the runtime's
// poller, so no thread waits) reaps completions. With O_DIRECT the kernel
// queues every request at once, as QEMU's aio=native does.
type aioContext struct {
	ctx      uintptr  // aio_context_t
	fd       int      // the O_DIRECT file
	fallback *os.File // for requests the file system refuses (EINVAL)
	efd      *os.File // completion eventfd
	efdNum   uint32   // its descriptor

	mu   sync.Mutex
	free []int      // +checklocks:mu; free slot indexes
	slot []aioSlot  // indexed by iocb.data
	cond *sync.Cond // signalled when a slot frees, for close
	busy int        // +checklocks:mu
	done chan struct{}
}

type aioSlot struct {
	cb  iocb
	iov [aioMaxIovecs]unix.Iovec
	aioReq
	fn func(int64, error)
}

// aioReq is what a completion needs of its request.
type aioReq struct {
	bufs  [][]byte // the caller's buffers, for the EINVAL fallback
	write bool
	off   int64
	want  int64 // bytes
}

// newAIO sets up a context for n requests in flight on fd.
func newAIO(fd int, fallback *os.File, n int) (*aioContext, error) {
	a := &aioContext{fd: fd, fallback: fallback, slot: make([]aioSlot, n), done: make(chan struct{})}
	a.cond = sync.NewCond(&a.mu)
	if _, _, e := unix.Syscall(unix.SYS_IO_SETUP, uintptr(n), uintptr(unsafe.Pointer(&a.ctx)), 0); e != 0 {
		return nil, fmt.Errorf("virtioblk: io_setup: %w", e)
	}
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Syscall(unix.SYS_IO_DESTROY, a.ctx, 0, 0)
		return nil, fmt.Errorf("virtioblk: eventfd: %w", err)
	}
	a.efd, a.efdNum = os.NewFile(uintptr(efd), "virtioblk-aio"), uint32(efd)
	for i := n - 1; i >= 0; i-- {
		a.free = append(a.free, i)
	}
	go a.reap()
	return a, nil
}

// Submit implements Submitter.
func (a *aioContext) Submit(write bool, bufs [][]byte, off int64, fn func(int64, error)) bool {
	if len(bufs) == 0 || len(bufs) > aioMaxIovecs || off%dioAlign != 0 {
		return false
	}
	var want int64
	for _, p := range bufs {
		if len(p) == 0 || len(p)%dioAlign != 0 || uintptr(unsafe.Pointer(unsafe.SliceData(p)))%dioAlign != 0 {
			return false
		}
		want += int64(len(p))
	}
	op := uint16(iocbCmdPreadv)
	if write {
		op = iocbCmdPwritev
	}
	a.mu.Lock()
	if len(a.free) == 0 || a.slot == nil {
		a.mu.Unlock()
		return false
	}
	i := a.free[len(a.free)-1]
	a.free = a.free[:len(a.free)-1]
	a.busy++
	s := &a.slot[i]
	for j, p := range bufs {
		s.iov[j] = unix.Iovec{Base: unsafe.SliceData(p)}
		s.iov[j].SetLen(len(p))
	}
	s.bufs, s.write, s.off, s.want, s.fn = bufs, write, off, want, fn
	s.cb = iocb{
		data: uint64(i), opcode: op, fd: uint32(a.fd),
		buf: uint64(uintptr(unsafe.Pointer(&s.iov[0]))), nbytes: uint64(len(bufs)), offset: off,
		flags: iocbFlagResfd, resfd: a.efdNum,
	}
	a.mu.Unlock()
	cbp := &s.cb
	for {
		r, _, e := unix.Syscall(unix.SYS_IO_SUBMIT, a.ctx, 1, uintptr(unsafe.Pointer(&cbp)))
		if e == unix.EINTR {
			continue
		}
		if e != 0 || r != 1 {
			a.release(i)
			return false
		}
		return true
	}
}

// release returns slot i to the free list.
func (a *aioContext) release(i int) {
	a.mu.Lock()
	s := &a.slot[i]
	s.bufs, s.fn = nil, nil
	a.free = append(a.free, i)
	a.busy--
	a.cond.Broadcast()
	a.mu.Unlock()
}

// reap completes requests as the eventfd reports them, until it is closed.
func (a *aioContext) reap() {
	defer close(a.done)
	var cnt [8]byte
	events := make([]ioEvent, len(a.slot))
	var zero unix.Timespec
	for {
		if _, err := a.efd.Read(cnt[:]); err != nil {
			return
		}
		for {
			n, _, e := unix.Syscall6(unix.SYS_IO_GETEVENTS, a.ctx, 0, uintptr(len(events)),
				uintptr(unsafe.Pointer(&events[0])), uintptr(unsafe.Pointer(&zero)), 0)
			if e == unix.EINTR {
				continue
			}
			if e != 0 || n == 0 {
				break
			}
			for _, ev := range events[:n] {
				a.finish(int(ev.data), ev.res)
			}
		}
	}
}

// finish completes slot i whose result is res.
func (a *aioContext) finish(i int, res int64) {
	a.mu.Lock()
	if i < 0 || i >= len(a.slot) {
		a.mu.Unlock()
		return
	}
	s := &a.slot[i]
	req := aioReq{bufs: s.bufs, write: s.write, off: s.off, want: s.want}
	fn := s.fn
	a.mu.Unlock()
	var err error
	switch {
	case res == -int64(unix.EINVAL):
		// The file system refused this direct I/O: go through the page
		// cache instead, which the kernel keeps coherent.
		res, err = a.buffered(req)
	case res < 0:
		err = syscall.Errno(-res)
	case res < req.want:
		err = io.ErrUnexpectedEOF
	}
	a.release(i)
	if fn != nil {
		fn(res, err)
	}
}

func (a *aioContext) buffered(s aioReq) (int64, error) {
	off := s.off
	for _, p := range s.bufs {
		var err error
		if s.write {
			_, err = a.fallback.WriteAt(p, off)
		} else {
			_, err = a.fallback.ReadAt(p, off)
		}
		if err != nil {
			return off - s.off, err
		}
		off += int64(len(p))
	}
	return off - s.off, nil
}

// close waits for every request in flight, then destroys the context.
func (a *aioContext) close() error {
	a.mu.Lock()
	for a.busy > 0 {
		a.cond.Wait()
	}
	a.slot = nil
	a.mu.Unlock()
	a.efd.Close()
	<-a.done
	if _, _, e := unix.Syscall(unix.SYS_IO_DESTROY, a.ctx, 0, 0); e != 0 {
		return errors.New("virtioblk: io_destroy: " + e.Error())
	}
	return nil
}
