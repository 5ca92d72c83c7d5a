// Package virtioblk is a virtio block device (virtio 1.2 section 5.2) on a
// Backend: a raw file now, a copy-on-write overlay later.
//
// # Requests
//
// Supported: IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES; others complete
// with VIRTIO_BLK_S_UNSUPP. Offered features: SEG_MAX, BLK_SIZE, FLUSH and,
// on a writable disk, DISCARD and WRITE_ZEROES; RO on a read-only one
// (writes, discards and write-zeroes then fail with VIRTIO_BLK_S_IOERR and
// write nothing). FLUSH completes only after the backend's Sync (fdatasync
// for a raw file) returned: data the guest saw flushed is durable.
//
// Each request is parsed from its chain with any framing (the 16-byte
// header may span descriptors): the header is copied once into a Go
// struct and then validated; the status byte is the last byte of the
// device-writable part; data lengths must be multiples of 512 for IN and
// OUT; the sector range must lie within the capacity (overflow-checked);
// discard and write-zeroes segments are copied once (at most MaxSegments)
// and checked against the limits in the configuration space. A chain too
// short for a header and a status byte completes with used length 0.
//
// Data moves between the backend and guest memory without copies: the
// backend reads into (writes from) host slices of guest RAM obtained
// through guestmem (writes recorded as dirty). TOCTOU: the guest can change
// an OUT buffer while it is being written; the disk then holds whatever
// the guest left there, which concerns only the guest.
//
// # Concurrency
//
// One dispatcher goroutine per activated device pops chains; a pool of
// workers that grows on demand up to Workers goroutines serves them (a
// blocking pread or pwrite each, so the host sees as many requests in
// flight as the guest queued), with at most MaxInFlight requests taken
// from the ring at once; completions are serialised by the queue's used
// ring lock. Reset stops the dispatcher and waits for requests in flight.
// Quiesce (used by virtio.Transport.Save) waits until none are in flight.
//
// Lock order: Block.mu (activation state), then the queue's used-ring lock
// (taken by workers alone).
//
// # Wiring
//
//	spec, err := virtioblk.ParseDisk("disk.img,ro,serial=root")  // --disk
//	blk, err := virtioblk.Open(spec)
//	t, err := virtio.NewPCI("virtio-blk0", blk, mem, vm)
//
// # Security
//
// Everything in the chain is untrusted (see virtio); the device never
// allocates in proportion to a guest-supplied length.
package virtioblk
