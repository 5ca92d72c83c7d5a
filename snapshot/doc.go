// Package snapshot writes and reads snapshot files: a machine's state
// (machine.MachineState) plus its guest memory, full or incremental, and
// restores a machine from one file or a chain of them.
//
// # File format (version FormatVersion, independent of the product)
//
// All integers are little-endian. A file is a header and the sections it
// locates: memory data, index, the disk sections (since 1.1.0) and the
// state, written in that order (the state last, since it names the disk
// tables); every section is checksummed and the checksums are verified
// before a byte of the section is decoded.
//
//	offset 0: header, 128 bytes
//	  0  [8]u8  magic "CLVSNAP\n"
//	  8  u16    format major, u16 minor, u16 patch
//	  14 u16    kind: 1 full, 2 incremental
//	  16 u32    flags: bit 0 = memory stored as a raw image (lazy restore)
//	  20 u32    page size (4096)
//	  24 u64    guest RAM bytes
//	  32 u64    state offset, u64 state length   (length <= MaxStateSize)
//	  48 u64    index offset, u64 index length
//	  64 u64    data offset,  u64 data length
//	  80 [32]u8 parent ID (incremental; zero for a full snapshot)
//	  112 u32   state CRC, u32 index CRC, u32 vCPUs (since 1.3.0, as in the
//	            state; before, reserved and 0)
//	  124 u32   header CRC (of bytes 0-123)
//	state: JSON of {Machine: machine.MachineState, Regions, Parent hint, Created,
//	       Disks: [DiskRecord]} (CRC-32C in the header)
//	data:  chunk payloads (compressed), or the raw memory image (flag bit 0)
//	index: one entry per chunk of 64 pages (256 KiB of guest-physical space)
//	       that holds any recorded page (a raw image: every chunk, so that
//	       its checksums cover every byte mapped), in ascending GPA order:
//	  0  u64 chunk GPA (256 KiB aligned)
//	  8  u64 data mask: bit i = page i stored in the payload
//	  16 u64 zero mask: bit i = page i is zero (incremental only: the page
//	         was dirtied and is now zero)
//	  24 u64 payload offset in the data section
//	  32 u32 payload length, u32 encoding (0 plain pages, 1 lz4 block
//	         (written up to 1.1.0), 2 image: pages at their place in the
//	         raw image, 3 lz4 groups (since 1.2.0): the stored pages in
//	         groups of 16 (the last may be shorter), each a u32 length
//	         and an lz4 block of exactly its pages)
//	  40 u32 payload CRC (over the stored bytes; for an image, over the
//	         chunk's whole span, zero pages included), u32 reserved (0)
//	  48 [16]u8 × popcount(data mask): each stored page's content hash:
//	         XXH3-128 (seed 0, high 64 bits first) since 1.3.0, SHA-256
//	         truncated to 128 bits before; a reader hashes by the file's
//	         version. A raw image has none since 1.3.0: its CRCs cover
//	         every byte, and a lazy restore reads as little as it can.
//
// A full snapshot records every non-zero page; zero pages are omitted (a
// restore starts from zeroed RAM). Pages the guest never touched
// (guestmem.Resident: not mapped in private anonymous RAM) are known zero
// and not even read. An incremental snapshot records only
// the pages dirtied since its parent (KVM's dirty log of every slot merged
// with the VMM's own write log, guestmem), and names its parent by ID:
// SHA-256(state section ‖ index section ‖ parent ID). The index holds every
// page's hash, so the ID commits to the whole memory without rehashing it.
// The page hash guards against corruption and mix-ups, not against a
// guest that crafts colliding pages of its own: XXH3 is not collision
// resistant, and that is why the migration cache, where one appliance's
// pages stand in for another's, hashes pages again with SHA-256
// (migrate.LoadCache). SHA-256 of every page took a third of the time of
// a snapshot (SHA-NI, 1.0 GB/s per core here); XXH3 runs at 8 GB/s.
// The raw image (flag bit 0, full snapshots only) places guest RAM regions
// back to back, page aligned, zero pages left as holes: a restore maps it
// privately over guest RAM and reads nothing before the guest runs.
//
// # Disks (format 1.1.0)
//
// A machine's disks are captured with its memory. Every disk backend is
// wrapped in a virtioblk.Tracker, which marks each 64 KiB block after a
// write, discard or write-zeroes completes, in two bitmaps: dirty (since
// the last snapshot) and written (since the disk was opened). Take runs
// with the machine paused and its virtio devices quiesced (no request in
// flight), flushes every backend (Sync), and stores per disk:
//
//   - a full snapshot: every block that differs from the disk's origin.
//     For a copy-on-write overlay the origin is its base, named by SHA-256
//     (DiskRecord.Base): the blocks written since open plus every block the
//     overlay holds, so the file plus the base is the whole disk. For a raw
//     disk the origin is the file as the machine opened it: the blocks
//     written since open (flag bit 0 in their entries) and Origin, a
//     SHA-256 over (block number, block hash) of every other block (read
//     once per process, then cached: unwritten blocks never change);
//   - an incremental snapshot: the blocks marked dirty since its parent.
//
// Each disk's DiskRecord (name, kind, size, block size, Base or Origin)
// names its block table by offset, length and SHA-256, so the snapshot's
// ID commits to every block. The table holds one 48-byte entry per stored
// block, in ascending order:
//
//	0  u64 block number   8 u64 payload offset in the file
//	16 u32 payload length 20 u8 encoding (0 plain, 1 lz4 block, 2 zeros: no payload)
//	21 u8 flags (bit 0: written since the origin)  22 u16 0
//	24 u32 payload CRC-32C  28 u32 0  32 [16]u8 SHA-256/128 of the block's content
//
// Restore builds the machine bare, fills memory, then checks each disk it
// was given against the chain before writing anything: the same device
// name, size and kind; for an overlay the same base hash, and no block
// held by the overlay that the chain does not overwrite (give a new
// overlay path: it is created over the base); for a raw disk the Origin
// digest over the blocks the full snapshot did not flag (a fresh copy of
// the disk the machine started with matches; any other disk is refused,
// ErrDisk). Then every stored block of the chain is read and checked
// (CRC, decoding, content hash); only then are the last versions of the
// blocks written back through the tracker (so a later full snapshot of the
// restored machine carries them), the disks synced, and the devices'
// state restored. Merge keeps each block's last version, flags OR-ed.
// A 1.0.0 file holds no disk contents: restoring one onto a machine with
// disks is refused.
//
// # Versions
//
// A reader accepts files of its major version with a minor version no newer
// than its own, and refuses others with an error that names both versions
// (ErrVersion). The state section carries machine.StateVersion, checked the
// same way.
//
// # Security
//
// Snapshot files are untrusted input. Decoding checks the header checksum,
// bounds every length by the file size and by fixed caps before allocating,
// verifies each section's checksum before decoding it, and validates every
// index entry (alignment, order, masks inside guest RAM, payload bounds). A
// restore verifies every payload's checksum before it is decompressed, and
// a restore that fails leaves no machine behind: nothing half-restored ever
// runs. The lazy path (RestoreOptions.Trust) skips the raw image's checksums
// so as not to read it: use it only for files this host wrote.
package snapshot
