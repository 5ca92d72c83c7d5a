package cow

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// storage is the overlay file as the overlay uses it. The crash tests put
// a recording fake under it.
type storage interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Datasync makes every completed write and punch durable, the file
	// size included (fdatasync).
	Datasync() error
	// Punch makes [off, off+n) read as zeros and releases its space where
	// it can; the size does not change.
	Punch(off, n int64) error
	Size() (int64, error)
	Close() error
}

// fallocate(2) modes (linux/falloc.h).
const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
)

// osFile is storage on a host file.
type osFile struct {
	f *os.File
}

func (o osFile) ReadAt(p []byte, off int64) (int, error)  { return o.f.ReadAt(p, off) }
func (o osFile) WriteAt(p []byte, off int64) (int, error) { return o.f.WriteAt(p, off) }
func (o osFile) Close() error                             { return o.f.Close() }

func (o osFile) Size() (int64, error) {
	st, err := o.f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

func (o osFile) Datasync() error {
	return control(o.f, func(fd int) error { return syscall.Fdatasync(fd) })
}

func (o osFile) Punch(off, n int64) error {
	err := control(o.f, func(fd int) error { return syscall.Fallocate(fd, fallocPunchHole|fallocKeepSize, off, n) })
	if errors.Is(err, syscall.EOPNOTSUPP) {
		for n > 0 {
			k := min(n, int64(len(zeros)))
			if _, err := o.f.WriteAt(zeros[:k], off); err != nil {
				return err
			}
			off, n = off+k, n-k
		}
		return nil
	}
	return err
}

// lock takes an advisory flock: exclusive for a writer, shared for a
// reader, failing at once if another process conflicts.
func (o osFile) lock(exclusive bool) error {
	how := syscall.LOCK_SH | syscall.LOCK_NB
	if exclusive {
		how = syscall.LOCK_EX | syscall.LOCK_NB
	}
	err := control(o.f, func(fd int) error { return syscall.Flock(fd, how) })
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return fmt.Errorf("%w: %s", ErrInUse, o.f.Name())
	}
	return err
}

var zeros [256 << 10]byte

func control(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var opErr error
	if err := rc.Control(func(fd uintptr) { opErr = fn(int(fd)) }); err != nil {
		return err
	}
	return opErr
}

// syncDir fsyncs a directory, making a rename or link in it durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
