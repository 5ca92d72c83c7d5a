package migrate

import (
	"bytes"
	"errors"
	"io"
	"math/bits"
	"testing"
)

// plainPagesFrame returns a pages frame holding the pages of mask in
// plain encoding, page i filled with byte i+1.
func plainPagesFrame(gpa, mask uint64) []byte {
	f := append(appendChunkHeader(beginFrame(nil, framePages), gpa, mask), encPlain)
	for m := mask; m != 0; m &= m - 1 {
		i := bits.TrailingZeros64(m)
		f = append(f, bytes.Repeat([]byte{byte(i + 1)}, pageSize)...)
	}
	return finishFrame(f)
}

func TestPageRuns(t *testing.T) {
	for _, tc := range []struct {
		mask uint64
		want [][2]int
	}{
		{1, [][2]int{{0, 1}}},
		{^uint64(0), [][2]int{{0, 64}}},
		{0xffff_ffff_ffff_fc00, [][2]int{{10, 54}}},
		{1<<63 | 0b1101, [][2]int{{0, 1}, {2, 2}, {63, 1}}},
		{0x00ff00ff00ff00ff, [][2]int{{0, 8}, {16, 8}, {32, 8}, {48, 8}}},
	} {
		var got [][2]int
		pageRuns(tc.mask, func(first, n int) bool { got = append(got, [2]int{first, n}); return true })
		if len(got) != len(tc.want) {
			t.Fatalf("mask %#x: runs %v, want %v", tc.mask, got, tc.want)
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Fatalf("mask %#x: runs %v, want %v", tc.mask, got, tc.want)
			}
		}
	}
}

// readDirect reads one frame of stream the way the target does: straight
// into dst (the chunk's 64 pages) when it is plain pages.
func readDirect(fr *frameReader, dst []byte) (bool, error) {
	c, ok, err := fr.peekPlainPages()
	if err != nil || !ok {
		return false, err
	}
	var dsts [][]byte
	pageRuns(c.mask, func(first, n int) bool {
		dsts = append(dsts, dst[first*pageSize:(first+n)*pageSize])
		return true
	})
	return true, fr.readPlainPages(c, dsts)
}

func TestReadPlainPagesDirect(t *testing.T) {
	const mask uint64 = 1<<63 | 0b1101
	frame := plainPagesFrame(3*chunkBytes, mask)
	end := finishFrame(beginFrame(nil, frameEnd))

	t.Run("pages then a short frame", func(t *testing.T) {
		// The end frame is shorter than a pages frame's head: peeking
		// at it must not wait for bytes that never come.
		fr := newFrameReader(io.MultiReader(bytes.NewReader(frame), bytes.NewReader(end)))
		dst := make([]byte, chunkBytes)
		ok, err := readDirect(fr, dst)
		if !ok || err != nil {
			t.Fatalf("direct read: %v %v", ok, err)
		}
		for i := 0; i < chunkPages; i++ {
			want := byte(0)
			if mask>>i&1 == 1 {
				want = byte(i + 1)
			}
			if p := dst[i*pageSize : (i+1)*pageSize]; !bytes.Equal(p, bytes.Repeat([]byte{want}, pageSize)) {
				t.Fatalf("page %d holds %d..., want %d", i, p[0], want)
			}
		}
		if fr.off != int64(len(frame)) {
			t.Errorf("offset %d after the frame, want %d", fr.off, len(frame))
		}
		if ok, err := readDirect(fr, dst); ok || err != nil {
			t.Fatalf("end frame taken as pages: %v %v", ok, err)
		}
		f, err := fr.next()
		if err != nil || f.typ != frameEnd {
			t.Fatalf("next after the pages: %v %v", f.typ, err)
		}
	})
	t.Run("corrupted page", func(t *testing.T) {
		bad := bytes.Clone(frame)
		bad[plainPagesHead+pageSize+7] ^= 1
		_, err := readDirect(newFrameReader(bytes.NewReader(bad)), make([]byte, chunkBytes))
		var pe *ProtocolError
		if !errors.As(err, &pe) || pe.Offset != 0 {
			t.Fatalf("corrupted page: %v, want a protocol error at offset 0", err)
		}
	})
	t.Run("cut inside", func(t *testing.T) {
		for _, n := range []int{headerSize + 3, plainPagesHead + 100, len(frame) - 2} {
			_, err := readDirect(newFrameReader(bytes.NewReader(frame[:n])), make([]byte, chunkBytes))
			if !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("stream cut at %d: %v, want ErrUnexpectedEOF", n, err)
			}
		}
	})
	t.Run("not plain pages", func(t *testing.T) {
		// A length that disagrees with the mask, and lz4 pages, go to next.
		short := append(appendChunkHeader(beginFrame(nil, framePages), 0, 0b11), encPlain)
		short = finishFrame(append(short, make([]byte, pageSize)...))
		lz := append(appendChunkHeader(beginFrame(nil, framePages), 0, 1), encLZ4)
		lz = finishFrame(append(lz, make([]byte, pageSize)...))
		for _, f := range [][]byte{short, lz, end} {
			fr := newFrameReader(bytes.NewReader(f))
			if ok, err := readDirect(fr, make([]byte, chunkBytes)); ok || err != nil {
				t.Fatalf("frame %x...: direct %v %v", f[:8], ok, err)
			}
			if _, err := fr.next(); err != nil {
				t.Fatalf("next: %v", err)
			}
		}
	})
}
