package migrate

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"collective/kvm/guestmem"
	"collective/snapshot"
)

// Cache is the content a target already holds, by page hash: the pages of
// the snapshots in a local directory (the Collective's hash-based
// transfer). The target announces the hashes; the source sends a hash
// instead of a page the target has.
type Cache struct {
	pages map[[hashSize]byte]cachePage
	// Files is how many snapshot files were loaded.
	Files int
}

type cachePage struct {
	mem *guestmem.Memory
	gpa uint64
}

// LoadCache reads every snapshot (chain) in dir into memory and indexes
// its pages by hash. Files that are not snapshots are skipped; a snapshot
// that fails its checksums is refused.
func LoadCache(dir string) (*Cache, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("migrate: cache: %w", err)
	}
	c := &Cache{pages: map[[hashSize]byte]cachePage{}}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		chain, err := snapshot.OpenChain(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // not a snapshot, or an incomplete chain
		}
		mem, err := snapshot.ImageOf(chain)
		if err != nil {
			for _, s := range chain {
				s.Close()
			}
			return nil, fmt.Errorf("migrate: cache: %s: %w", e.Name(), err)
		}
		// Each page the chain stores is hashed once, as the image holds
		// it (the last snapshot's version), with this package's
		// SHA-256/128: the files' own page hashes guard against
		// corruption only, and a hostile guest could make its pages
		// collide under them with another appliance's.
		var h [hashSize]byte
		seen := make([]uint64, (chain[0].MemSize()/pageSize+63)/64)
		for _, s := range chain {
			s.PageHashes(func(gpa uint64, _ []byte) {
				pfn := gpa / pageSize
				if pfn/64 >= uint64(len(seen)) || seen[pfn/64]&(1<<(pfn%64)) != 0 {
					return
				}
				seen[pfn/64] |= 1 << (pfn % 64)
				p, err := mem.Slice(gpa, pageSize)
				if err != nil {
					return
				}
				pageHash(h[:], p)
				if _, ok := c.pages[h]; !ok {
					c.pages[h] = cachePage{mem, gpa}
				}
			})
			s.Close()
		}
		c.Files++
	}
	return c, nil
}

// Len returns the number of distinct pages held.
func (c *Cache) Len() int { return len(c.pages) }

func (c *Cache) hashList() [][hashSize]byte {
	out := make([][hashSize]byte, 0, len(c.pages))
	for h := range c.pages {
		out = append(out, h)
	}
	slices.SortFunc(out, func(a, b [hashSize]byte) int { return slices.Compare(a[:], b[:]) })
	return out
}

// copyPage copies the page with hash h into dst.
func (c *Cache) copyPage(dst []byte, h [hashSize]byte) bool {
	p, ok := c.pages[h]
	if !ok {
		return false
	}
	src, err := p.mem.Slice(p.gpa, pageSize)
	if err != nil {
		return false
	}
	copy(dst, src)
	return true
}
