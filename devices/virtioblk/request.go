package virtioblk

import (
	"encoding/binary"

	"collective/devices/virtio"
)

// header is struct virtio_blk_req's header, copied out of guest memory.
type header struct {
	typ    uint32
	sector uint64
}

// segment is struct virtio_blk_discard_write_zeroes.
type segment struct {
	sector     uint64
	numSectors uint32
	flags      uint32
}

// span walks a list of descriptors as one byte stream.
type span struct {
	descs []virtio.Desc
	skip  uint64 // bytes to skip at the start
	limit uint64 // bytes to visit after the skip
}

// each calls fn for every piece of the stream, in order, until fn fails.
func (s span) each(fn func(addr, n uint64) bool) bool {
	skip, left := s.skip, s.limit
	for _, d := range s.descs {
		if left == 0 {
			break
		}
		l := uint64(d.Len)
		if skip >= l {
			skip -= l
			continue
		}
		n := min(l-skip, left)
		if !fn(d.Addr+skip, n) {
			return false
		}
		skip, left = 0, left-n
	}
	return true
}

// pieces returns how many buffers each visits.
func (s span) pieces() int {
	n := 0
	s.each(func(uint64, uint64) bool {
		n++
		return true
	})
	return n
}

// read copies the first len(p) bytes of s into p.
func (b *Block) read(r *runState, s span, p []byte) bool {
	s.limit = uint64(len(p))
	done := uint64(0)
	return s.each(func(addr, n uint64) bool {
		_, err := r.mem.ReadAt(p[done:done+n], addr)
		done += n
		return err == nil
	})
}

// parsed is a request's header and buffers.
type parsed struct {
	h          header
	readable   span // after the header
	writable   span // before the status byte
	statusAddr uint64
}

// parse reads a request's header and locates its buffers. It reports false
// for a malformed request.
func (b *Block) parse(r *runState, c *virtio.Chain) (parsed, bool) {
	w := c.Writable()
	// A request needs a 16-byte header and a status byte that is the
	// last byte of the device-writable part.
	if c.ReadLen < headerSize || c.WriteLen < 1 || w[len(w)-1].Len == 0 {
		return parsed{}, false
	}
	last := w[len(w)-1]
	p := parsed{
		statusAddr: last.Addr + uint64(last.Len) - 1,
		readable:   span{descs: c.Readable(), skip: headerSize, limit: c.ReadLen - headerSize},
		writable:   span{descs: w, limit: c.WriteLen - 1},
	}
	var raw [headerSize]byte
	if !b.read(r, span{descs: c.Readable()}, raw[:]) {
		return parsed{}, false
	}
	p.h = header{typ: binary.LittleEndian.Uint32(raw[0:]), sector: binary.LittleEndian.Uint64(raw[8:])}
	return p, true
}

// handle serves one request, as hand parsed it, and returns the number of
// bytes written into the chain's device-writable buffers (the used
// length).
func (b *Block) handle(r *runState, req *request) uint32 {
	if !req.parsed {
		b.Metrics.Malformed.Add(1)
		return 0
	}
	p := &req.p
	status, written := b.serve(r, req, p.h, p.readable, p.writable)
	return b.finish(r, p.statusAddr, status, written)
}

// finish writes a request's status byte and returns the used length.
func (b *Block) finish(r *runState, statusAddr uint64, status uint8, written uint64) uint32 {
	if _, err := r.mem.WriteAt([]byte{status}, statusAddr); err != nil {
		b.Metrics.Malformed.Add(1)
		return 0
	}
	return uint32(written + 1)
}

// submit starts a read or write through the backend's Submitter when its
// buffers allow; it reports false when a worker should serve req instead
// (other types, malformed or unaligned requests, no free slot).
func (b *Block) submit(r *runState, req *request) bool {
	p := &req.p
	var s span
	switch {
	case p.h.typ == TypeIn:
		s, req.write = p.writable, false
	case p.h.typ == TypeOut && !b.ro:
		s, req.write = p.readable, true
	default:
		return false
	}
	if s.limit == 0 || !b.inRange(p.h.sector, s.limit) {
		return false
	}
	req.bufs = req.bufs[:0]
	ok := s.each(func(addr, k uint64) bool {
		if len(req.bufs) == aioMaxIovecs {
			return false
		}
		var buf []byte
		var err error
		if req.write {
			buf, err = r.mem.Slice(addr, k)
		} else {
			buf, err = r.mem.WriteSlice(addr, k)
		}
		req.bufs = append(req.bufs, buf)
		return err == nil
	})
	if !ok {
		return false
	}
	req.n, req.statusAddr, req.span = s.limit, p.statusAddr, s
	// Count before submitting: the completion may reach the guest, and
	// a reader of the metrics, before Submit returns.
	counter := &b.Metrics.Reads
	if req.write {
		counter = &b.Metrics.Writes
	}
	b.Metrics.Submitted.Add(1)
	counter.Add(1)
	r.wg.Add(1)
	if !b.sub.Submit(req.write, req.bufs, int64(p.h.sector*SectorSize), req.done) {
		r.wg.Done()
		b.Metrics.Submitted.Add(^uint64(0))
		counter.Add(^uint64(0))
		return false
	}
	return true
}

// submitted completes a request started by submit.
func (b *Block) submitted(r *runState, req *request, err error) {
	status, written := uint8(StatusOK), uint64(0)
	switch {
	case err != nil:
		b.Metrics.IOErrors.Add(1)
		status = StatusIOErr
	case req.write:
		b.Metrics.BytesWritten.Add(req.n)
	default:
		b.Metrics.BytesRead.Add(req.n)
		written = req.n
	}
	if !req.write {
		// WriteSlice marked the buffers before the data landed: mark
		// them again, so that a migration round that took the log in
		// between sends them once more.
		req.span.each(func(addr, k uint64) bool {
			r.mem.MarkDirty(addr, k)
			return true
		})
	}
	b.complete(r, req.chain.Head, b.finish(r, req.statusAddr, status, written))
	r.free <- req
	r.wg.Done()
}

// serveBatch serves a batch of adjacent writes (join) with one vectored
// call, then completes each request. When the call or a buffer fails, each
// request is served on its own, so that an error is only that request's.
func (b *Block) serveBatch(r *runState, h *request) {
	h.bufs = h.bufs[:0]
	ok := true
	for q := h; q != nil && ok; q = q.next {
		ok = q.p.readable.each(func(addr, k uint64) bool {
			buf, err := r.mem.Slice(addr, k)
			h.bufs = append(h.bufs, buf)
			return err == nil
		})
	}
	if ok {
		// TOCTOU as in serve: the disk holds what the guest left.
		_, err := b.vec.WritevAt(h.bufs, int64(h.p.h.sector*SectorSize))
		ok = err == nil
	}
	clear(h.bufs) // no guest memory held past the request
	if ok {
		b.Metrics.Merged.Add(uint64(h.nbatch - 1))
	}
	h.used = h.used[:0]
	for q := h; q != nil; q = q.next {
		var n uint32
		if ok {
			b.Metrics.Writes.Add(1)
			b.Metrics.BytesWritten.Add(q.p.readable.limit)
			n = b.finish(r, q.p.statusAddr, StatusOK, 0)
		} else {
			n = b.handle(r, q)
		}
		h.used = append(h.used, virtio.Used{Head: q.chain.Head, Len: n})
	}
	// All at once: a polling driver sees them together and queues the
	// next ones together, which keeps the batches whole.
	signal, err := r.q.PushUsedBatch(h.used)
	if err != nil {
		r.irq.NeedsReset(err)
	} else if signal {
		r.irq.SignalQueue(0)
	}
	for q := h; q != nil; {
		next := q.next // q may be reused once freed
		r.free <- q
		q = next
	}
}

// inRange reports whether n bytes at sector lie within the capacity.
func (b *Block) inRange(sector, n uint64) bool {
	return sector <= b.capacity && n/SectorSize <= b.capacity-sector && n%SectorSize == 0
}

func (b *Block) serve(r *runState, req *request, h header, readable, writable span) (status uint8, written uint64) {
	switch h.typ {
	case TypeIn:
		b.Metrics.Reads.Add(1)
		n := writable.limit
		if !b.inRange(h.sector, n) {
			b.Metrics.BadRequests.Add(1)
			return StatusIOErr, 0
		}
		off := int64(h.sector * SectorSize)
		ok := writable.each(func(addr, k uint64) bool {
			dst, err := r.mem.WriteSlice(addr, k)
			if err != nil {
				return false
			}
			if _, err := b.be.ReadAt(dst, off); err != nil {
				return false
			}
			// Again now that the data is there: a migration round
			// that took the log in between sent the page before it.
			r.mem.MarkDirty(addr, k)
			off += int64(k)
			return true
		})
		if !ok {
			b.Metrics.IOErrors.Add(1)
			return StatusIOErr, 0
		}
		b.Metrics.BytesRead.Add(n)
		return StatusOK, n

	case TypeOut:
		b.Metrics.Writes.Add(1)
		n := readable.limit
		if b.ro || !b.inRange(h.sector, n) {
			b.Metrics.BadRequests.Add(1)
			return StatusIOErr, 0
		}
		off := int64(h.sector * SectorSize)
		// TOCTOU: the guest may change the buffer during the write;
		// the disk then holds what it left there.
		ok := readable.each(func(addr, k uint64) bool {
			src, err := r.mem.Slice(addr, k)
			if err != nil {
				return false
			}
			if _, err := b.be.WriteAt(src, off); err != nil {
				return false
			}
			off += int64(k)
			return true
		})
		if !ok {
			b.Metrics.IOErrors.Add(1)
			return StatusIOErr, 0
		}
		b.Metrics.BytesWritten.Add(n)
		return StatusOK, 0

	case TypeFlush:
		b.Metrics.Flushes.Add(1)
		if err := b.be.Sync(); err != nil {
			b.Metrics.IOErrors.Add(1)
			return StatusIOErr, 0
		}
		return StatusOK, 0

	case TypeGetID:
		b.Metrics.GetIDs.Add(1)
		n := min(writable.limit, SerialLen)
		done := uint64(0)
		writable.limit = n
		ok := writable.each(func(addr, k uint64) bool {
			_, err := r.mem.WriteAt(b.serial[done:done+k], addr)
			done += k
			return err == nil
		})
		if !ok {
			return StatusIOErr, 0
		}
		return StatusOK, n

	case TypeDiscard, TypeWriteZeroes:
		if h.typ == TypeDiscard {
			b.Metrics.Discards.Add(1)
		} else {
			b.Metrics.WriteZeroes.Add(1)
		}
		feature := uint64(FDiscard)
		if h.typ == TypeWriteZeroes {
			feature = FWriteZeroes
		}
		if b.ro {
			b.Metrics.BadRequests.Add(1)
			return StatusIOErr, 0
		}
		if r.features&feature == 0 {
			b.Metrics.Unsupported.Add(1)
			return StatusUnsupp, 0
		}
		return b.discard(r, req, h.typ, readable), 0
	}
	b.Metrics.Unsupported.Add(1)
	return StatusUnsupp, 0
}

// discard serves DISCARD and WRITE_ZEROES: all segments are copied and
// checked before any is executed.
func (b *Block) discard(r *runState, req *request, typ uint32, readable span) uint8 {
	n := readable.limit
	if n == 0 || n%segmentSize != 0 || n/segmentSize > MaxSegments {
		b.Metrics.BadRequests.Add(1)
		return StatusIOErr
	}
	count := int(n / segmentSize)
	var segs [MaxSegments]segment
	for i := range count {
		sp := readable
		sp.skip += uint64(i) * segmentSize
		if !b.read(r, sp, req.segs[i][:]) {
			b.Metrics.BadRequests.Add(1)
			return StatusIOErr
		}
		raw := req.segs[i][:]
		segs[i] = segment{binary.LittleEndian.Uint64(raw[0:]), binary.LittleEndian.Uint32(raw[8:]), binary.LittleEndian.Uint32(raw[12:])}
		s := segs[i]
		if s.flags&^flagUnmap != 0 || (typ == TypeDiscard && s.flags != 0) {
			b.Metrics.Unsupported.Add(1)
			return StatusUnsupp
		}
		if s.numSectors > MaxDiscardSectors || !b.inRange(s.sector, uint64(s.numSectors)*SectorSize) {
			b.Metrics.BadRequests.Add(1)
			return StatusIOErr
		}
	}
	for _, s := range segs[:count] {
		off, l := int64(s.sector*SectorSize), int64(s.numSectors)*SectorSize
		if l == 0 {
			continue
		}
		var err error
		if typ == TypeDiscard || s.flags&flagUnmap != 0 {
			err = b.be.Punch(off, l)
		} else {
			err = b.be.Zero(off, l)
		}
		if err != nil {
			b.Metrics.IOErrors.Add(1)
			return StatusIOErr
		}
	}
	return StatusOK
}
