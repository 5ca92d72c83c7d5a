package virtioblk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"collective/devices/virtioblk/cow"
)

// Backend is the storage under a block device. Offsets and lengths are in
// bytes. A copy-on-write overlay implements it over a shared base.
type Backend interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed write durable (fdatasync).
	Sync() error
	// Punch deallocates [off, off+n): it reads as zeros afterwards.
	Punch(off, n int64) error
	// Zero makes [off, off+n) read as zeros, keeping it allocated.
	Zero(off, n int64) error
	// Size returns the size in bytes.
	Size() int64
	Close() error
}

// fallocate(2) modes (linux/falloc.h).
const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10
)

// Raw is a Backend on a raw image file.
type Raw struct {
	f    *os.File
	dio  *os.File    // the same file opened O_DIRECT (OpenRawDirect), or nil
	aio  *aioContext // native AIO on dio, or nil
	size int64
}

// OpenRaw opens a raw image, read-only or read-write.
func OpenRaw(path string, readOnly bool) (*Raw, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("virtioblk: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("virtioblk: %w", err)
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("virtioblk: %s is not a regular file", path)
	}
	return &Raw{f: f, size: st.Size()}, nil
}

// OpenRawDirect opens a raw image like OpenRaw, plus a second descriptor
// with O_DIRECT: reads and writes whose buffer, offset and length are
// aligned to 512 bytes bypass the host page cache; others (and any the
// file system refuses with EINVAL) go through the page cache, which the
// kernel keeps coherent with direct I/O on the same file.
func OpenRawDirect(path string, readOnly bool) (*Raw, error) {
	r, err := OpenRaw(path, readOnly)
	if err != nil {
		return nil, err
	}
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	if r.dio, err = os.OpenFile(path, flag|syscall.O_DIRECT, 0); err != nil {
		r.f.Close()
		return nil, fmt.Errorf("virtioblk: O_DIRECT: %w", err)
	}
	if r.aio, err = newAIO(int(r.dio.Fd()), r.f, DefaultMaxInFlight); err != nil {
		// Without native AIO, direct I/O still works from the workers.
		r.aio = nil
	}
	return r, nil
}

// Async returns the Submitter of a raw image opened with OpenRawDirect, or
// nil: aligned reads and writes then go through native AIO.
func (r *Raw) Async() Submitter {
	if r.aio == nil {
		return nil
	}
	return r.aio
}

const dioAlign = 512

func (r *Raw) direct(p []byte, off int64) bool {
	return r.dio != nil && len(p) > 0 && len(p)%dioAlign == 0 && off%dioAlign == 0 &&
		uintptr(unsafe.Pointer(unsafe.SliceData(p)))%dioAlign == 0
}

// ReadAt implements io.ReaderAt.
func (r *Raw) ReadAt(p []byte, off int64) (int, error) {
	if r.direct(p, off) {
		if n, err := r.dio.ReadAt(p, off); !errors.Is(err, syscall.EINVAL) {
			return n, err
		}
	}
	return r.f.ReadAt(p, off)
}

// WriteAt implements io.WriterAt.
func (r *Raw) WriteAt(p []byte, off int64) (int, error) {
	if r.direct(p, off) {
		if n, err := r.dio.WriteAt(p, off); !errors.Is(err, syscall.EINVAL) {
			return n, err
		}
	}
	return r.f.WriteAt(p, off)
}

// VectorWriter is implemented by backends that write several buffers at
// one offset with one system call. The device serves a run of adjacent
// writes the guest queued together with one call (request merging, as
// QEMU's virtio-blk does): one pass through the file system instead of one
// per request.
type VectorWriter interface {
	// WritevAt writes bufs, in order, at off.
	WritevAt(bufs [][]byte, off int64) (int64, error)
}

// iovMax is IOV_MAX: the most buffers one pwritev takes.
const iovMax = 1024

// VectorWriter returns r: a raw image writes vectors.
func (r *Raw) VectorWriter() VectorWriter { return r }

// WritevAt implements VectorWriter. It goes through the O_DIRECT
// descriptor when every buffer allows it, as WriteAt does.
func (r *Raw) WritevAt(bufs [][]byte, off int64) (int64, error) {
	if r.dio != nil && r.allDirect(bufs, off) {
		if n, err := writev(int(r.dio.Fd()), bufs, off); !errors.Is(err, syscall.EINVAL) {
			return n, err
		}
	}
	return writev(int(r.f.Fd()), bufs, off)
}

func (r *Raw) allDirect(bufs [][]byte, off int64) bool {
	for _, p := range bufs {
		if !r.direct(p, off) {
			return false
		}
		off += int64(len(p))
	}
	return true
}

// writev writes bufs at off with pwritev, IOV_MAX buffers a call, until
// all is written. A short count continues where it stopped; the caller's
// slices are not changed.
func writev(fd int, bufs [][]byte, off int64) (int64, error) {
	var done int64
	var cur []byte // the rest of a buffer a short count split
	for len(bufs) > 0 || len(cur) > 0 {
		var n int
		var err error
		if len(cur) > 0 {
			n, err = unix.Pwrite(fd, cur, off)
		} else {
			n, err = unix.Pwritev(fd, bufs[:min(len(bufs), iovMax)], off)
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("virtioblk: pwritev at %d: %w", off, err)
		}
		if n == 0 {
			return done, io.ErrShortWrite
		}
		done, off = done+int64(n), off+int64(n)
		if len(cur) > 0 {
			cur = cur[n:]
			continue
		}
		for n > 0 {
			if n < len(bufs[0]) {
				cur, n = bufs[0][n:], 0
			} else {
				n -= len(bufs[0])
			}
			bufs = bufs[1:]
		}
	}
	return done, nil
}

// Size implements Backend.Size.
func (r *Raw) Size() int64 { return r.size }

// Close implements Backend.Close.
func (r *Raw) Close() error {
	if r.aio != nil {
		r.aio.close()
	}
	if r.dio != nil {
		r.dio.Close()
	}
	return r.f.Close()
}

// Sync implements Backend.Sync with fdatasync(2).
func (r *Raw) Sync() error {
	return r.control(func(fd int) error { return syscall.Fdatasync(fd) })
}

// Punch implements Backend.Punch with FALLOC_FL_PUNCH_HOLE, falling back to
// writing zeros where the file system cannot punch holes.
func (r *Raw) Punch(off, n int64) error {
	err := r.control(func(fd int) error { return syscall.Fallocate(fd, fallocPunchHole|fallocKeepSize, off, n) })
	if errors.Is(err, syscall.EOPNOTSUPP) {
		return r.writeZeros(off, n)
	}
	return err
}

// Zero implements Backend.Zero with FALLOC_FL_ZERO_RANGE, falling back to
// writing zeros.
func (r *Raw) Zero(off, n int64) error {
	err := r.control(func(fd int) error { return syscall.Fallocate(fd, fallocZeroRange|fallocKeepSize, off, n) })
	if errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.EINVAL) {
		return r.writeZeros(off, n)
	}
	return err
}

var zeros [64 << 10]byte

func (r *Raw) writeZeros(off, n int64) error {
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if _, err := r.f.WriteAt(zeros[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

func (r *Raw) control(fn func(fd int) error) error {
	rc, err := r.f.SyscallConn()
	if err != nil {
		return err
	}
	var opErr error
	if err := rc.Control(func(fd uintptr) { opErr = fn(int(fd)) }); err != nil {
		return err
	}
	return opErr
}

// DiskSpec is a parsed --disk argument.
type DiskSpec struct {
	Path     string
	ReadOnly bool
	Serial   string // GET_ID; default: the file's base name
	Base     string // copy-on-write base: Path is an overlay over it (devices/virtioblk/cow)
	Direct   bool   // raw files: aligned I/O bypasses the host page cache (O_DIRECT)
}

// ParseDisk parses PATH[,ro][,serial=ID][,base=BASE][,direct].
func ParseDisk(s string) (DiskSpec, error) {
	parts := strings.Split(s, ",")
	d := DiskSpec{Path: parts[0]}
	if d.Path == "" {
		return d, fmt.Errorf("virtioblk: --disk %q: no path", s)
	}
	for _, p := range parts[1:] {
		k, v, hasV := strings.Cut(p, "=")
		switch {
		case k == "ro" && !hasV:
			d.ReadOnly = true
		case k == "serial" && hasV:
			if len(v) > SerialLen {
				return d, fmt.Errorf("virtioblk: --disk %q: serial longer than %d bytes", s, SerialLen)
			}
			d.Serial = v
		case k == "base" && hasV && v != "":
			d.Base = v
		case k == "direct" && !hasV:
			d.Direct = true
		default:
			return d, fmt.Errorf("virtioblk: --disk %q: unknown option %q", s, p)
		}
	}
	if d.Serial == "" {
		d.Serial = filepath.Base(d.Path)
		if len(d.Serial) > SerialLen {
			d.Serial = d.Serial[:SerialLen]
		}
	}
	return d, nil
}

var _ Backend = (*cow.Overlay)(nil)

// Open opens the disk a DiskSpec names: with base=, a copy-on-write
// overlay (created over the base if Path does not exist); otherwise a raw
// file. An overlay without base= is refused rather than opened raw; the
// base path recorded in it is not followed, since a guest could have
// written that header into its own raw disk.
func Open(spec DiskSpec) (*Block, error) {
	var be Backend
	if spec.Base == "" && cow.IsOverlay(spec.Path) {
		return nil, fmt.Errorf("virtioblk: %s is a copy-on-write overlay: give base=BASE", spec.Path)
	}
	if spec.Base != "" {
		if spec.Direct {
			return nil, fmt.Errorf("virtioblk: %s: direct is only supported on raw disks", spec.Path)
		}
		o, err := cow.OpenOrCreate(spec.Path, spec.Base, spec.ReadOnly)
		if err != nil {
			return nil, err
		}
		be = o
	} else {
		open := OpenRaw
		if spec.Direct {
			open = OpenRawDirect
		}
		r, err := open(spec.Path, spec.ReadOnly)
		if err != nil {
			return nil, err
		}
		be = r
	}
	// Every opened disk records what is written to it, for snapshots and
	// migration (Tracker).
	be = NewTracker(be)
	b, err := New(Config{Backend: be, ReadOnly: spec.ReadOnly, Serial: spec.Serial})
	if err != nil {
		be.Close()
		return nil, err
	}
	return b, nil
}
