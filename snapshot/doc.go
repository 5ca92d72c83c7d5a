// Package snapshot writes and reads snapshot files: a machine's state
// (machine.MachineState) plus its guest memory, full or incremental, and
// restores a machine from one file or a chain of them.
//
// # File format (version FormatVersion, independent of the product)
//
// All integers are little-endian. A file is four sections; the header
// gives the others' offsets and lengths, and every section is checksummed
// (CRC-32C) and the checksums are verified before a byte of the section is
// decoded.
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
//	  112 u32   state CRC, u32 index CRC, u32 reserved (0)
//	  124 u32   header CRC (of bytes 0-123)
//	state: JSON of {Machine: machine.MachineState, Regions, Parent hint, Created}
//	data:  chunk payloads (compressed), or the raw memory image (flag bit 0)
//	index: one entry per chunk of 64 pages (256 KiB of guest-physical space)
//	       that holds any recorded page (a raw image: every chunk, so that
//	       its checksums cover every byte mapped), in ascending GPA order:
//	  0  u64 chunk GPA (256 KiB aligned)
//	  8  u64 data mask: bit i = page i stored in the payload
//	  16 u64 zero mask: bit i = page i is zero (incremental only: the page
//	         was dirtied and is now zero)
//	  24 u64 payload offset in the data section
//	  32 u32 payload length, u32 encoding (0 plain pages, 1 lz4 block,
//	         2 image: pages at their place in the raw image)
//	  40 u32 payload CRC (over the stored bytes; for an image, over the
//	         chunk's whole span, zero pages included), u32 reserved (0)
//	  48 [16]u8 × popcount(data mask): each stored page's content hash,
//	         SHA-256 truncated to 128 bits
//
// A full snapshot records every non-zero page; zero pages are omitted (a
// restore starts from zeroed RAM). An incremental snapshot records only
// the pages dirtied since its parent (KVM's dirty log of every slot merged
// with the VMM's own write log, guestmem), and names its parent by ID:
// SHA-256(state section ‖ index section ‖ parent ID). The index holds every
// page's hash, so the ID commits to the whole memory without rehashing it.
// The raw image (flag bit 0, full snapshots only) places guest RAM regions
// back to back, page aligned, zero pages left as holes: a restore maps it
// privately over guest RAM and reads nothing before the guest runs.
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
