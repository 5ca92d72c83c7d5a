// Package cpio writes cpio archives in the "newc" format (SVR4 without
// checksums), the format Linux unpacks as an initramfs
// (Documentation/driver-api/early-userspace/buffer-format.rst).
//
// # Format
//
// Each member is a 110-byte ASCII header, the name with its NUL, padding
// to a multiple of 4 bytes, the data, padding to a multiple of 4 bytes.
// The archive ends with a member named "TRAILER!!!".
//
//	offset len  field
//	     0   6  magic "070701"
//	     6   8  c_ino        all numbers: 8 hexadecimal digits
//	    14   8  c_mode       file type and permissions (S_IFREG|0755, ...)
//	    22   8  c_uid
//	    30   8  c_gid
//	    38   8  c_nlink
//	    46   8  c_mtime
//	    54   8  c_filesize   0 for directories and devices; the target length for symlinks
//	    62   8  c_devmajor
//	    70   8  c_devminor
//	    78   8  c_rdevmajor  device number of a device node
//	    86   8  c_rdevminor
//	    94   8  c_namesize   including the NUL
//	   102   8  c_check      0
//
// The Writer is deterministic: members get inode numbers 1, 2, ... in
// order, owner 0:0 and the modification time in Writer.ModTime (0 unless
// set), so the same calls always produce the same bytes.
package cpio

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
)

// Unix file type bits of c_mode.
const (
	TypeReg     = 0o100000
	TypeDir     = 0o040000
	TypeSymlink = 0o120000
	TypeChar    = 0o020000
	TypeBlock   = 0o060000
)

const (
	magic      = "070701"
	headerSize = 110
	trailer    = "TRAILER!!!"
	// MaxNameLen is the longest member name (Linux's PATH_MAX, with the NUL).
	MaxNameLen = 4095
	// MaxFileSize is the largest member: c_filesize has 8 hex digits.
	MaxFileSize = 1<<32 - 1
)

// ErrClosed is returned by a Writer's methods after Close.
var ErrClosed = errors.New("cpio: write after Close")

// Writer writes a newc archive member by member. The first error is kept
// and returned by every later call.
type Writer struct {
	// ModTime is the modification time (Unix seconds) of the members
	// written after it is set.
	ModTime uint32

	w      io.Writer
	ino    uint32
	err    error
	closed bool
}

// NewWriter returns a Writer writing to w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// WriteFile adds a regular file with the given permission bits (setuid,
// setgid and sticky included; other type bits are ignored).
func (w *Writer) WriteFile(name string, perm fs.FileMode, data []byte) error {
	if uint64(len(data)) > MaxFileSize {
		return w.fail(fmt.Errorf("cpio: %s: %d bytes is too large", name, len(data)))
	}
	return w.member(name, TypeReg|unixPerm(perm), 1, 0, 0, data)
}

// Mkdir adds a directory.
func (w *Writer) Mkdir(name string, perm fs.FileMode) error {
	return w.member(name, TypeDir|unixPerm(perm), 2, 0, 0, nil)
}

// Symlink adds a symbolic link name pointing at target.
func (w *Writer) Symlink(name, target string) error {
	if target == "" || strings.IndexByte(target, 0) >= 0 || len(target) > MaxNameLen {
		return w.fail(fmt.Errorf("cpio: %s: bad symlink target %q", name, target))
	}
	return w.member(name, TypeSymlink|0o777, 1, 0, 0, []byte(target))
}

// Mknod adds a device node: a character device when mode has
// fs.ModeCharDevice, else a block device when it has fs.ModeDevice.
func (w *Writer) Mknod(name string, mode fs.FileMode, major, minor uint32) error {
	var typ uint32
	switch {
	case mode&fs.ModeCharDevice != 0:
		typ = TypeChar
	case mode&fs.ModeDevice != 0:
		typ = TypeBlock
	default:
		return w.fail(fmt.Errorf("cpio: %s: Mknod of mode %v: not a device", name, mode))
	}
	return w.member(name, typ|unixPerm(mode), 1, major, minor, nil)
}

// Close writes the trailer. It does not close the underlying writer.
func (w *Writer) Close() error {
	if w.closed {
		return w.err
	}
	if w.err == nil {
		w.err = w.raw(trailer, 0, 1, 0, 0, 0, nil)
	}
	w.closed = true
	return w.err
}

// unixPerm converts fs.FileMode permission bits to Unix ones.
func unixPerm(m fs.FileMode) uint32 {
	p := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		p |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		p |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		p |= 0o1000
	}
	return p
}

func (w *Writer) fail(err error) error {
	if w.err == nil {
		w.err = err
	}
	return w.err
}

// member checks name and writes one member.
func (w *Writer) member(name string, mode, nlink, rmajor, rminor uint32, data []byte) error {
	if w.closed {
		return ErrClosed
	}
	if w.err != nil {
		return w.err
	}
	clean := strings.TrimLeft(name, "/")
	if clean == "" || clean == trailer || strings.IndexByte(clean, 0) >= 0 || len(clean) > MaxNameLen {
		return w.fail(fmt.Errorf("cpio: bad member name %q", name))
	}
	for _, el := range strings.Split(clean, "/") {
		if el == "" || el == "." || el == ".." {
			return w.fail(fmt.Errorf("cpio: bad member name %q", name))
		}
	}
	w.ino++
	return w.fail(w.raw(clean, w.ino, nlink, mode, rmajor, rminor, data))
}

var zeros [4]byte

// pad returns the padding after n bytes to the next multiple of 4.
func pad(n int) []byte { return zeros[:(4-n%4)%4] }

func (w *Writer) raw(name string, ino, nlink, mode, rmajor, rminor uint32, data []byte) error {
	// 110 + len(name)+1 <= 4206 bytes: one small buffer per member.
	hdr := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		magic, ino, mode, 0, 0, nlink, w.ModTime, uint32(len(data)), 0, 0, rmajor, rminor, len(name)+1, 0)
	buf := make([]byte, 0, len(hdr)+len(name)+4)
	buf = append(buf, hdr...)
	buf = append(buf, name...)
	buf = append(buf, 0)
	buf = append(buf, pad(len(buf))...)
	if _, err := w.w.Write(buf); err != nil {
		return fmt.Errorf("cpio: %w", err)
	}
	if len(data) > 0 {
		if _, err := w.w.Write(data); err != nil {
			return fmt.Errorf("cpio: %w", err)
		}
		if _, err := w.w.Write(pad(len(data))); err != nil {
			return fmt.Errorf("cpio: %w", err)
		}
	}
	return nil
}
