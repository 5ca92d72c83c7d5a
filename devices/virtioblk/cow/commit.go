package cow

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// Info describes an overlay file without its base.
type Info struct {
	Stats
	FileSize    int64 // the overlay's length
	DiskBytes   int64 // bytes the overlay occupies on disk (st_blocks)
	BasePath    string
	BaseStatus  string // "present, matches", "missing: ...", "different: ..."
	BaseMatches bool
}

// Inspect reads an overlay's header and durable table and looks for its
// base (base, or the header's hint if base is empty); verify rehashes the
// base instead of trusting the cache. The overlay is not locked: for one in
// use, the table is the one as of the last Sync.
func Inspect(path, base string, verify bool, progress Progress) (*Info, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("cow: %w", err)
	}
	defer f.Close()
	o, err := load(path, osFile{f}, true)
	if err != nil {
		return nil, err
	}
	inf := &Info{Stats: o.Stats()}
	if st, err := f.Stat(); err == nil {
		inf.FileSize = st.Size()
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			inf.DiskBytes = sys.Blocks * 512
		}
	}
	if base == "" {
		base = o.hdr.baseHint
		if base != "" && !filepath.IsAbs(base) {
			base = filepath.Join(filepath.Dir(path), base)
		}
	}
	inf.BasePath = base
	switch st, err := os.Stat(base); {
	case base == "":
		inf.BaseStatus = "unknown: the overlay names no base"
	case err != nil:
		inf.BaseStatus = "missing: " + err.Error()
	case st.Size() != o.hdr.baseSize:
		inf.BaseStatus = fmt.Sprintf("different: %d bytes, want %d", st.Size(), o.hdr.baseSize)
	default:
		var sum [32]byte
		if verify {
			sum, err = RehashBase(base, progress)
		} else {
			sum, _, err = BaseHash(base, progress)
		}
		switch {
		case err != nil:
			inf.BaseStatus = "unreadable: " + err.Error()
		case sum != o.hdr.baseHash:
			inf.BaseStatus = "different: SHA-256 " + hex.EncodeToString(sum[:])
		default:
			inf.BaseStatus, inf.BaseMatches = "present, matches", true
		}
	}
	return inf, nil
}

// CommitResult describes a new base made by Commit.
type CommitResult struct {
	Path    string
	Hash    [32]byte
	Size    int64
	Written int64 // bytes of data written; the rest are holes
	Existed bool  // a file of that content already had the name
}

// Commit flattens base + overlay into a new base file. If out is a folder
// the file is named by its content hash, out/SHA256.img; otherwise out is
// the path and must not exist. The file appears complete and durable, or
// not at all; its hash is cached. Zero runs become holes.
func Commit(overlay, base, out string, progress Progress) (*CommitResult, error) {
	o, err := Open(overlay, base, true)
	if err != nil {
		return nil, err
	}
	defer o.Close()
	dir, final, named := out, "", false
	if st, err := os.Stat(out); err != nil || !st.IsDir() {
		named = true
		dir, final = filepath.Dir(out), out
		if err == nil {
			return nil, fmt.Errorf("cow: %s exists", out)
		}
	}
	tmp, err := os.CreateTemp(dir, ".commit.tmp-*")
	if err != nil {
		return nil, fmt.Errorf("cow: %w", err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()

	res := &CommitResult{Size: o.Size()}
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < res.Size; off += int64(len(buf)) {
		b := buf[:min(int64(len(buf)), res.Size-off)]
		if _, err := readFull(o, b, off); err != nil {
			return nil, err
		}
		h.Write(b)
		if !allZero(b) {
			if _, err := tmp.WriteAt(b, off); err != nil {
				return nil, fmt.Errorf("cow: %w", err)
			}
			res.Written += int64(len(b))
		}
		if progress != nil {
			progress(off+int64(len(b)), res.Size)
		}
	}
	copy(res.Hash[:], h.Sum(nil))
	if err := tmp.Truncate(res.Size); err != nil {
		return nil, fmt.Errorf("cow: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return nil, fmt.Errorf("cow: %w", err)
	}
	if final == "" {
		final = filepath.Join(dir, hex.EncodeToString(res.Hash[:])+".img")
	}
	res.Path = final
	if err := os.Link(tmp.Name(), final); err != nil {
		if named || !errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("cow: %w", err)
		}
		// Named by content: a file with this name already has it.
		res.Existed = true
		return res, nil
	}
	if err := syncDir(dir); err != nil {
		return nil, fmt.Errorf("cow: %w", err)
	}
	if st, err := os.Stat(final); err == nil {
		writeHashCache(final, cacheKey(st), res.Hash)
	}
	return res, nil
}
