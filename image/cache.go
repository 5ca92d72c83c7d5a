package image

import (
	"fmt"
	"os"
	"path/filepath"
)

// DefaultCacheDir returns $XDG_CACHE_HOME/collective, or
// ~/.cache/collective when XDG_CACHE_HOME is unset or not absolute (as the
// XDG base directory specification says to ignore relative paths).
func DefaultCacheDir() (string, error) {
	if d := os.Getenv("XDG_CACHE_HOME"); filepath.IsAbs(d) {
		return filepath.Join(d, "collective"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("image: no cache folder: %w", err)
	}
	return filepath.Join(home, ".cache", "collective"), nil
}

// writeFileAtomic writes data to path through a temporary file in the same
// folder and a rename, so that readers see the old file or the whole new
// one.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	return nil
}

// fileExists reports whether path names an existing regular file.
func fileExists(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular()
}
