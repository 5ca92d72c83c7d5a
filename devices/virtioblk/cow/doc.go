// Package cow is the copy-on-write overlay under an appliance disk: a
// per-VM file holding only the clusters that VM wrote, over a base image
// that any number of VMs share read-only and that is named by the SHA-256
// of its content. An *Overlay implements virtioblk.Backend.
//
// # File format (version 1)
//
// All integers are little-endian. CRC-32C is Castagnoli.
//
//	offset 0, 4096 bytes: header, written once at creation, never rewritten
//	  0   8  magic "COLLCOW\x00"
//	  8   2  major version (1): a different major is refused
//	 10   2  minor version (0): a newer minor is refused
//	 12   4  log2 of the cluster size (12..21: 4 KiB..2 MiB; default 16)
//	 16   8  virtual size in bytes (a multiple of 512)
//	 24   8  number of clusters n = ceil(virtual size / cluster size), <= MaxClusters
//	 32   8  table offset (4096)
//	 40   8  data offset: the table's end rounded up to a cluster
//	 48   8  base size in bytes (<= virtual size; the rest reads as zeros)
//	 56  32  base identity: SHA-256 of the base file's bytes
//	 88   2  length of the base path hint (<= 1024)
//	 90 ...  base path hint (absolute path at creation; the caller may name another)
//	     ... zero
//	4092  4  CRC-32C of bytes [0, 4092)
//
//	offset 4096, n × 32 bytes: the table, one pair of 16-byte slots per virtual cluster
//	  slot:  0 8 seq (>= 1; an all-zero slot is empty)
//	         8 4 value: 0 = not allocated (read the base), 0xffffffff = zeros,
//	                    else the physical cluster (data at value × cluster size)
//	        12 4 CRC-32C of seq, value and the virtual cluster number (uint64)
//	  The slot with the valid checksum and the higher seq is the entry.
//
//	offset data offset: data clusters, each a whole cluster, in allocation order
//
// # Crash safety
//
// The base is opened O_RDONLY and never written. The header never changes
// after the file is linked into place (written to a temporary file, synced,
// then linked). Data and table follow one rule: no table slot that can
// become durable points to a data cluster that is not durable.
//
//   - A write to an allocated cluster goes in place. A write to a cluster
//     that reads from the base or as zeros allocates a physical cluster (a
//     free one, or a new one at the end) and writes it whole: the base's
//     bytes (or zeros) around the guest's data. The new mapping lives in
//     memory only and is marked dirty.
//   - Sync (virtio FLUSH) takes the dirty entries, fdatasyncs the file
//     (every completed data write, the file size included, is durable),
//     writes each dirty entry into the slot of its pair that does not hold
//     the current entry, with a new seq, and fdatasyncs again. A crash
//     while a slot is written leaves the other slot, the previous entry,
//     intact: a torn slot fails its checksum and the other one is used.
//   - A physical cluster released by a discard, a write-zeroes or a
//     reallocation is punched at once but is reused only after the Sync
//     that makes its new entry durable, if a durable slot may still point
//     to it; one allocated and released between two Syncs is reused at
//     once. So a stale slot never points to another cluster's data.
//
// So after kill -9 or a power loss (sector writes atomic), every write
// acknowledged before the last completed Sync reads back, and each sector
// written later reads either its old or one of its new contents.
//
// # Refusals at open
//
// Bad magic, an unknown version, a bad header checksum, fields out of range
// or inconsistent (cluster size, n against the virtual size and
// MaxClusters, offsets), a file shorter than the data offset, a pair whose
// two slots both fail their checksum (or share a seq), an entry pointing
// before the data area, past 3n clusters into it, or past the end of the
// file, two entries mapping the same physical cluster, a base of another
// size or hash: each is a *FormatError (errors.Is ErrCorrupt) or
// ErrBaseMismatch naming the problem and the byte where it lies.
//
// # Concurrency
//
// virtio-blk serves requests from a pool of workers. Reads and in-place
// writes hold mu for reading across their I/O, so a cluster they map
// cannot be released under them; allocation, discard and write-zeroes hold
// mu for writing across theirs. Sync holds syncMu throughout and mu only to
// take the dirty entries and to publish the result: reads and writes go on
// during its fdatasyncs.
//
// Lock order: syncMu, then mu.
//
// # Security
//
// The overlay file is untrusted (it may come from another host, or be a
// guest's raw disk that starts with our magic: virtioblk therefore opens
// an overlay only when given base= and never follows the header's base
// path hint, which only the operator's commands use). Memory
// allocated at open is bounded by the table size, itself bounded by the
// virtual size, MaxClusters and the file's length (4 bytes and 3 bits per
// cluster: at most about 70 MiB). The base hash cache (an xattr or a
// sidecar file, keyed by size, mtime and inode) trusts the base's mtime: a
// base rewritten with its mtime restored is not noticed; `collective image
// overlay info --verify` rehashes.
package cow
