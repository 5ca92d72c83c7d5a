package cow

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// The content hash of a base is cached, keyed by the file's size, mtime and
// inode, in the xattr user.collective.sha256 or, where the file system has
// no user xattrs, in a sidecar file PATH.sha256. The value is
// "v1 SIZE MTIME_NS INODE HEX". A stale or unreadable cache is ignored.
const (
	hashXattr   = "user.collective.sha256"
	hashSidecar = ".sha256"
)

// Progress is called with the bytes done and the total during a long
// operation.
type Progress func(done, total int64)

// BaseHash returns the SHA-256 of the file at path, from the cache when it
// is current, else computed (and cached where possible). cached reports
// whether the cache answered.
func BaseHash(path string, progress Progress) (sum [32]byte, cached bool, err error) {
	f, err := os.Open(path)
	if err != nil {
		return sum, false, err
	}
	defer f.Close()
	return baseHash(f, progress, false)
}

// RehashBase computes the SHA-256 of the file, ignoring and then
// refreshing the cache.
func RehashBase(path string, progress Progress) ([32]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return [32]byte{}, err
	}
	defer f.Close()
	sum, _, err := baseHash(f, progress, true)
	return sum, err
}

func baseHash(f *os.File, progress Progress, force bool) (sum [32]byte, cached bool, err error) {
	st, err := f.Stat()
	if err != nil {
		return sum, false, err
	}
	if !st.Mode().IsRegular() {
		return sum, false, fmt.Errorf("cow: base %s is not a regular file", f.Name())
	}
	key := cacheKey(st)
	if !force {
		if s, ok := readHashCache(f.Name(), key); ok {
			return s, true, nil
		}
	}
	h := sha256.New()
	total := st.Size()
	var done int64
	buf := make([]byte, 1<<20)
	for {
		n, err := f.Read(buf)
		h.Write(buf[:n])
		done += int64(n)
		if progress != nil && n > 0 {
			progress(done, total)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return sum, false, err
		}
	}
	copy(sum[:], h.Sum(nil))
	writeHashCache(f.Name(), key, sum)
	return sum, false, nil
}

func cacheKey(st os.FileInfo) string {
	var ino uint64
	var mtime int64 = st.ModTime().UnixNano()
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		ino = sys.Ino
	}
	return "v1 " + strconv.FormatInt(st.Size(), 10) + " " + strconv.FormatInt(mtime, 10) + " " + strconv.FormatUint(ino, 10)
}

func readHashCache(path, key string) (sum [32]byte, ok bool) {
	buf := make([]byte, 256)
	var val string
	if n, err := syscall.Getxattr(path, hashXattr, buf); err == nil {
		val = string(buf[:n])
	} else if b, err := os.ReadFile(path + hashSidecar); err == nil && len(b) < 256 {
		val = strings.TrimSpace(string(b))
	} else {
		return sum, false
	}
	k, hx, found := strings.Cut(val, " h=")
	if !found || k != key {
		return sum, false
	}
	b, err := hex.DecodeString(hx)
	if err != nil || len(b) != 32 {
		return sum, false
	}
	copy(sum[:], b)
	return sum, true
}

// writeHashCache stores the hash where it can; failure only costs a
// rehash next time.
func writeHashCache(path, key string, sum [32]byte) {
	val := key + " h=" + hex.EncodeToString(sum[:])
	err := syscall.Setxattr(path, hashXattr, []byte(val), 0)
	if err == nil {
		return
	}
	if errors.Is(err, syscall.ENOTSUP) || errors.Is(err, syscall.EOPNOTSUPP) {
		tmp := path + hashSidecar + ".tmp"
		if os.WriteFile(tmp, []byte(val+"\n"), 0o644) == nil {
			if os.Rename(tmp, path+hashSidecar) != nil {
				os.Remove(tmp)
			}
		}
	}
}
