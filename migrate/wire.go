package migrate

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"
	"time"
)

// Protocol version of the stream (independent of the product version). A
// target accepts the same major version with a minor no newer than its own.
const (
	ProtoMajor = 1
	ProtoMinor = 3
)

// Hello and welcome flags (protocol 1.2).
const (
	// helloStateFP: the hello ends with the fingerprint of the source's
	// machine-state type (statecodec.go).
	helloStateFP = 1 << 0
	// helloStreams (1.3): the hello ends with a u32 stream count (2 to
	// MaxStreams) and the 16-byte token the extra streams present.
	helloStreams = 1 << 1
	// welcomeBinaryState: the target has the same fingerprint and wants
	// the state in the binary encoding.
	welcomeBinaryState = 1 << 0
	// welcomeStreams (1.3): the target takes parallel streams; the
	// flags' bits 16-23 say how many in all (2 to the count asked for).
	welcomeStreams = 1 << 1
)

// MaxStreams bounds the parallel streams of one migration.
const MaxStreams = 16

// Frame types.
const (
	frameHello    = 1  // S->T: version, memory layout
	frameWelcome  = 2  // T->S: version, flags, number of announced hashes
	frameHashes   = 3  // T->S: page hashes the target holds
	framePages    = 4  // S->T: full pages of one chunk, plain or lz4
	frameZero     = 5  // S->T: pages of one chunk that are now zero
	frameHashRef  = 6  // S->T: pages of one chunk sent by hash
	frameRound    = 7  // S->T: end of a round
	frameState    = 8  // S->T: machine state (JSON), vCPUs paused
	frameEnd      = 9  // S->T: everything is sent; restore
	frameReady    = 10 // T->S: restored, waiting for commit
	frameCommit   = 11 // S->T: resume now (the source will never resume)
	frameResumed  = 12 // T->S: the machine runs on the target
	frameInfo     = 13 // T->S: JSON figures (guest-observed gap)
	frameError    = 14 // either way: a message, then the sender closes
	frameRoundAck = 15 // T->S: a round is applied
	frameStream   = 20 // S->T: first frame of an extra stream: token, index (1.3)
)

var frameNames = map[byte]string{
	frameHello: "hello", frameWelcome: "welcome", frameHashes: "hashes", framePages: "pages",
	frameZero: "zero", frameHashRef: "hashref", frameRound: "round", frameState: "state",
	frameEnd: "end", frameReady: "ready", frameCommit: "commit", frameResumed: "resumed",
	frameInfo: "info", frameError: "error", frameRoundAck: "round-ack", frameStream: "stream",
	frameDisks: "disks", frameBase: "base", frameBaseEnd: "base-end", frameDiskBlock: "disk-block",
}

func frameName(t byte) string {
	if n, ok := frameNames[t]; ok {
		return n
	}
	return fmt.Sprintf("type %d", t)
}

// Limits of the stream. Every length read from the wire is checked
// against one of them before anything is allocated.
const (
	headerSize = 8
	trailSize  = 4
	pageSize   = 4096
	chunkPages = 64
	chunkBytes = chunkPages * pageSize
	hashSize   = 16
	// MaxPayload bounds a frame's payload: a chunk of plain pages plus its
	// header, or a batch of hashes.
	MaxPayload = chunkBytes + 64
	// MaxStateSize bounds the JSON machine state.
	MaxStateSize = MaxPayload
	// MaxMemSize bounds the guest RAM a hello may announce (64 TiB).
	MaxMemSize = 1 << 46
	// MaxRegions bounds the memory regions of a hello.
	MaxRegions = 16
	// MaxErrorText bounds an error frame's message.
	MaxErrorText = 4096
	// maxHashesPerFrame is how many hashes one hashes frame carries.
	maxHashesPerFrame = (MaxPayload - 64) / hashSize
)

var helloMagic = [8]byte{'C', 'L', 'V', 'M', 'I', 'G', 'R', '\n'}

// Page encodings in a pages frame.
const (
	encPlain = 0
	encLZ4   = 1
	// encBinary: a state frame in the binary encoding (statecodec.go).
	encBinary = 2
)

// castagnoli returns the CRC-32C table, which hash/crc32 makes at the
// first call (not at package initialisation, which every VMM start runs).
func castagnoli() *crc32.Table { return crc32.MakeTable(crc32.Castagnoli) }

// ErrProtocol is matched by every error about a malformed or unexpected
// frame, a checksum mismatch included.
var ErrProtocol = errors.New("migrate: protocol error")

// ProtocolError reports a bad frame: its position in the stream (bytes
// from the start of the connection) and what is wrong.
type ProtocolError struct {
	Offset int64
	Msg    string
}

func (e *ProtocolError) Error() string {
	return fmt.Sprintf("migrate: protocol error at byte %d of the stream: %s", e.Offset, e.Msg)
}

// Is reports whether target is ErrProtocol.
func (e *ProtocolError) Is(target error) bool { return target == ErrProtocol }

// RemoteError is an error frame received from the peer.
type RemoteError struct{ Msg string }

func (e *RemoteError) Error() string { return "migrate: the peer reports: " + e.Msg }

// frame is one decoded frame. payload aliases the reader's buffer until
// the next read.
type frame struct {
	typ     byte
	payload []byte
	off     int64     // stream offset of the frame's first byte
	at      time.Time // when the source's reader got it (replies only)
}

// frameReader reads frames, verifying each one's CRC before its payload
// is looked at. It allocates one buffer of MaxPayload+trailSize.
type frameReader struct {
	r   *bufio.Reader
	buf []byte
	off int64
}

func newFrameReader(r io.Reader) *frameReader {
	// A small buffer: the bulk of a large frame is then read straight
	// into buf (bufio reads directly when the buffer is empty and the
	// read is larger), not copied through it.
	return &frameReader{r: bufio.NewReaderSize(r, 64<<10), buf: make([]byte, headerSize+MaxPayload+trailSize)}
}

// next reads one frame. io.EOF is returned only at a frame boundary; a
// stream cut inside a frame is io.ErrUnexpectedEOF.
func (fr *frameReader) next() (frame, error) {
	h := fr.buf[:headerSize]
	if _, err := io.ReadFull(fr.r, h); err != nil {
		return frame{}, err
	}
	off := fr.off
	typ := h[0]
	if h[1] != 0 || h[2] != 0 || h[3] != 0 {
		return frame{}, &ProtocolError{off, fmt.Sprintf("frame header reserved bytes %x", h[1:4])}
	}
	n := binary.LittleEndian.Uint32(h[4:8])
	if n > MaxPayload {
		return frame{}, &ProtocolError{off, fmt.Sprintf("%s frame of %d bytes exceeds the limit of %d", frameName(typ), n, MaxPayload)}
	}
	rest := fr.buf[headerSize : headerSize+int(n)+trailSize]
	if _, err := io.ReadFull(fr.r, rest); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return frame{}, err
	}
	fr.off += int64(headerSize + int(n) + trailSize)
	want := binary.LittleEndian.Uint32(rest[n:])
	if got := crc32.Checksum(fr.buf[:headerSize+int(n)], castagnoli()); got != want {
		return frame{}, &ProtocolError{off, fmt.Sprintf("%s frame: CRC-32C %#08x, the frame says %#08x (corrupted)", frameName(typ), got, want)}
	}
	return frame{typ: typ, payload: rest[:n], off: off}, nil
}

// pagesPrefix is a pages frame's payload before its pages: the chunk
// header and the encoding byte. plainPagesHead adds the frame header.
const (
	pagesPrefix    = 16 + 1
	plainPagesHead = headerSize + pagesPrefix
)

// peekPlainPages reports whether the next frame is a pages frame of plain
// pages whose length agrees with its mask, and returns its chunk header.
// It peeks only into bytes the frame itself holds (a peek past the
// stream's last frame would wait for bytes that never come). An error is
// the stream's: a frame that is something else is left to next.
func (fr *frameReader) peekPlainPages() (chunkHeader, bool, error) {
	h, err := fr.r.Peek(headerSize) // every frame holds at least its header
	if err != nil {
		return chunkHeader{}, false, err
	}
	n := binary.LittleEndian.Uint32(h[4:8])
	if h[0] != framePages || h[1]|h[2]|h[3] != 0 || n < pagesPrefix+pageSize || n > MaxPayload {
		return chunkHeader{}, false, nil
	}
	if h, err = fr.r.Peek(plainPagesHead); err != nil {
		return chunkHeader{}, false, unexpected(err)
	}
	c := chunkHeader{binary.LittleEndian.Uint64(h[headerSize:]), binary.LittleEndian.Uint64(h[headerSize+8:])}
	if h[plainPagesHead-1] != encPlain || c.gpa%chunkBytes != 0 || c.mask == 0 || uint64(n) != pagesPrefix+uint64(bits.OnesCount64(c.mask))*pageSize {
		return chunkHeader{}, false, nil
	}
	return c, true, nil
}

// pageRuns calls f with the first page and the length of each run of
// contiguous pages in mask, in order, until f returns false.
func pageRuns(mask uint64, f func(first, n int) bool) {
	for m := mask; m != 0; {
		i := bits.TrailingZeros64(m)
		n := bits.TrailingZeros64(^(m >> i)) // 64 when every page from i is set
		if i+n >= 64 {
			m = 0
		} else {
			m &^= (1<<n - 1) << i
		}
		if !f(i, n) {
			return
		}
	}
}

// readPlainPages reads the plain pages frame peekPlainPages found straight
// into dsts, the destinations of its runs of pages (pageRuns) in order,
// with no copy through a buffer. The frame's CRC is checked once the pages
// are in place; on a mismatch the caller must treat everything written as
// garbage (the target then discards its machine, as for any protocol
// error).
func (fr *frameReader) readPlainPages(c chunkHeader, dsts [][]byte) error {
	off := fr.off
	h := fr.buf[:plainPagesHead]
	if _, err := io.ReadFull(fr.r, h); err != nil {
		return err
	}
	crc := crc32.Update(0, castagnoli(), h)
	for _, dst := range dsts {
		if _, err := io.ReadFull(fr.r, dst); err != nil {
			return unexpected(err)
		}
		crc = crc32.Update(crc, castagnoli(), dst)
	}
	t := fr.buf[:trailSize]
	if _, err := io.ReadFull(fr.r, t); err != nil {
		return unexpected(err)
	}
	fr.off += int64(plainPagesHead + bits.OnesCount64(c.mask)*pageSize + trailSize)
	if want := binary.LittleEndian.Uint32(t); crc != want {
		return &ProtocolError{off, fmt.Sprintf("pages frame: CRC-32C %#08x, the frame says %#08x (corrupted)", crc, want)}
	}
	return nil
}

// unexpected turns io.EOF into io.ErrUnexpectedEOF: the stream ended
// inside a frame.
func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// frameWriter writes frames through a buffer, counting bytes and pacing
// them to a bandwidth limit.
type frameWriter struct {
	w     *bufio.Writer
	dst   io.Writer // under w
	bytes int64
	// limit is the bandwidth cap in bytes per second (0: none); paced
	// against start.
	limit float64
	start time.Time
	// corrupt, when > 0, flips a payload bit of the frame with this
	// sequence number (fault injection in tests).
	corrupt int
	seq     int
}

func newFrameWriter(w io.Writer, limit float64) *frameWriter {
	return &frameWriter{w: bufio.NewWriterSize(w, 1<<20), dst: w, limit: limit, start: time.Now()}
}

// directWrite: frames this large skip the writer's buffer.
const directWrite = 64 << 10

// begin returns a buffer holding a frame header for type t, to which the
// caller appends the payload and then calls finish.
func beginFrame(buf []byte, t byte) []byte {
	buf = append(buf[:0], t, 0, 0, 0, 0, 0, 0, 0)
	return buf
}

// finishFrame sets the payload length and appends the CRC.
func finishFrame(buf []byte) []byte {
	binary.LittleEndian.PutUint32(buf[4:8], uint32(len(buf)-headerSize))
	return binary.LittleEndian.AppendUint32(buf, crc32.Checksum(buf, castagnoli()))
}

// write writes a finished frame.
func (fw *frameWriter) write(f []byte) error {
	fw.seq++
	if fw.corrupt > 0 && fw.seq == fw.corrupt && len(f) > headerSize+trailSize {
		f[headerSize] ^= 0x40
	}
	if len(f) >= directWrite {
		// A chunk's frames: past the buffer, without a copy.
		if err := fw.w.Flush(); err != nil {
			return err
		}
		if _, err := fw.dst.Write(f); err != nil {
			return err
		}
	} else if _, err := fw.w.Write(f); err != nil {
		return err
	}
	fw.bytes += int64(len(f))
	if fw.limit > 0 {
		due := fw.start.Add(time.Duration(float64(fw.bytes) / fw.limit * float64(time.Second)))
		if d := time.Until(due); d > 0 {
			if err := fw.w.Flush(); err != nil {
				return err
			}
			time.Sleep(d)
		}
	}
	return nil
}

// send builds and writes a frame of type t with the given payload.
func (fw *frameWriter) send(t byte, payload []byte) error {
	f := beginFrame(make([]byte, 0, headerSize+len(payload)+trailSize), t)
	f = append(f, payload...)
	return fw.write(finishFrame(f))
}

func (fw *frameWriter) flush() error { return fw.w.Flush() }

// hello is the first frame: the source's version and memory layout.
type hello struct {
	major, minor uint16
	memSize      uint64
	cpus         uint32
	flags        uint32
	regions      []region
	stateFP      [hashSize]byte // with helloStateFP
	streams      uint32         // with helloStreams
	token        [hashSize]byte // with helloStreams
}

type region struct{ gpa, size uint64 }

func (h *hello) marshal() []byte {
	b := append([]byte(nil), helloMagic[:]...)
	b = binary.LittleEndian.AppendUint16(b, h.major)
	b = binary.LittleEndian.AppendUint16(b, h.minor)
	b = binary.LittleEndian.AppendUint32(b, pageSize)
	b = binary.LittleEndian.AppendUint64(b, h.memSize)
	b = binary.LittleEndian.AppendUint32(b, h.cpus)
	b = binary.LittleEndian.AppendUint32(b, h.flags)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(h.regions)))
	for _, r := range h.regions {
		b = binary.LittleEndian.AppendUint64(b, r.gpa)
		b = binary.LittleEndian.AppendUint64(b, r.size)
	}
	if h.flags&helloStateFP != 0 {
		b = append(b, h.stateFP[:]...)
	}
	if h.flags&helloStreams != 0 {
		b = binary.LittleEndian.AppendUint32(b, h.streams)
		b = append(b, h.token[:]...)
	}
	return b
}

func parseHello(f frame) (*hello, error) {
	p := f.payload
	bad := func(format string, a ...any) error {
		return &ProtocolError{f.off, "hello: " + fmt.Sprintf(format, a...)}
	}
	if f.typ != frameHello {
		return nil, bad("expected a hello frame, got %s", frameName(f.typ))
	}
	if len(p) < 36 || [8]byte(p[:8]) != helloMagic {
		return nil, bad("not a Collective migration stream (bad magic or short hello)")
	}
	h := &hello{
		major: binary.LittleEndian.Uint16(p[8:]), minor: binary.LittleEndian.Uint16(p[10:]),
		memSize: binary.LittleEndian.Uint64(p[16:]), cpus: binary.LittleEndian.Uint32(p[24:]),
		flags: binary.LittleEndian.Uint32(p[28:]),
	}
	if h.major != ProtoMajor || h.minor > ProtoMinor {
		return nil, fmt.Errorf("migrate: the source speaks protocol %d.%d, this target %d.%d: %w", h.major, h.minor, ProtoMajor, ProtoMinor, ErrVersion)
	}
	if ps := binary.LittleEndian.Uint32(p[12:]); ps != pageSize {
		return nil, bad("page size %d, want %d", ps, pageSize)
	}
	if h.memSize == 0 || h.memSize > MaxMemSize || h.memSize%pageSize != 0 {
		return nil, bad("memory size %d", h.memSize)
	}
	if h.cpus < 1 || h.cpus > 256 {
		return nil, bad("%d vCPUs", h.cpus)
	}
	n := binary.LittleEndian.Uint32(p[32:])
	var extra uint64
	if h.flags&^(helloStateFP|helloStreams) != 0 || (h.flags&helloStateFP != 0 && h.minor < 2) || (h.flags&helloStreams != 0 && h.minor < 3) {
		return nil, bad("flags %#x", h.flags)
	}
	if h.flags&helloStateFP != 0 {
		extra += hashSize
	}
	if h.flags&helloStreams != 0 {
		extra += 4 + hashSize
	}
	if n < 1 || n > MaxRegions || uint64(len(p)) != 36+uint64(n)*16+extra {
		return nil, bad("%d regions in %d bytes", n, len(p))
	}
	var total uint64
	for i := uint32(0); i < n; i++ {
		r := region{binary.LittleEndian.Uint64(p[36+16*i:]), binary.LittleEndian.Uint64(p[44+16*i:])}
		end, c := bits.Add64(r.gpa, r.size, 0)
		if r.gpa%chunkBytes != 0 || r.size == 0 || r.size%pageSize != 0 || c != 0 || end > MaxMemSize*2 {
			return nil, bad("region %d at %#x size %#x", i, r.gpa, r.size)
		}
		if i > 0 && r.gpa < h.regions[i-1].gpa+h.regions[i-1].size {
			return nil, bad("regions out of order or overlapping")
		}
		total += r.size
		h.regions = append(h.regions, r)
	}
	if total != h.memSize {
		return nil, bad("regions hold %d bytes, memory size %d", total, h.memSize)
	}
	q := p[36+16*uint64(n):]
	if h.flags&helloStateFP != 0 {
		h.stateFP, q = [hashSize]byte(q), q[hashSize:]
	}
	if h.flags&helloStreams != 0 {
		h.streams, h.token = binary.LittleEndian.Uint32(q), [hashSize]byte(q[4:])
		if h.streams < 2 || h.streams > MaxStreams {
			return nil, bad("%d streams", h.streams)
		}
	}
	return h, nil
}

// marshalStreamHello is the payload of an extra stream's first frame:
// the migration's token and the stream's index (1 to streams-1).
func marshalStreamHello(token [hashSize]byte, index uint32) []byte {
	return binary.LittleEndian.AppendUint32(token[:], index)
}

// parseStreamHello checks an extra stream's first frame against the
// migration's token and stream count and returns its index.
func parseStreamHello(f frame, token [hashSize]byte, streams uint32) (uint32, error) {
	if f.typ != frameStream || len(f.payload) != hashSize+4 {
		return 0, &ProtocolError{f.off, fmt.Sprintf("expected a stream frame, got %s of %d bytes", frameName(f.typ), len(f.payload))}
	}
	if [hashSize]byte(f.payload) != token {
		return 0, &ProtocolError{f.off, "stream frame: the token is not this migration's"}
	}
	i := binary.LittleEndian.Uint32(f.payload[hashSize:])
	if i < 1 || i >= streams {
		return 0, &ProtocolError{f.off, fmt.Sprintf("stream frame: index %d of %d streams", i, streams)}
	}
	return i, nil
}

// chunkHeader is the start of pages, zero and hashref frames.
type chunkHeader struct {
	gpa  uint64
	mask uint64
}

func appendChunkHeader(b []byte, gpa, mask uint64) []byte {
	b = binary.LittleEndian.AppendUint64(b, gpa)
	return binary.LittleEndian.AppendUint64(b, mask)
}

func parseChunkHeader(f frame) (chunkHeader, []byte, error) {
	if len(f.payload) < 16 {
		return chunkHeader{}, nil, &ProtocolError{f.off, fmt.Sprintf("%s frame of %d bytes", frameName(f.typ), len(f.payload))}
	}
	c := chunkHeader{binary.LittleEndian.Uint64(f.payload), binary.LittleEndian.Uint64(f.payload[8:])}
	if c.gpa%chunkBytes != 0 || c.mask == 0 {
		return c, nil, &ProtocolError{f.off, fmt.Sprintf("%s frame: chunk %#x mask %#x", frameName(f.typ), c.gpa, c.mask)}
	}
	return c, f.payload[16:], nil
}
