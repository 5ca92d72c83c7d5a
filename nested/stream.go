package nested

import (
	"bytes"
	"context"
	"io"
	"strings"
	"sync"
)

// maxStream bounds what a stream holds for a reader that has not taken
// it yet: a script printing more than this fails instead of eating the
// host's memory.
const maxStream = 64 << 20

// consoleTail is how much of L1's console a Host keeps for error messages.
const consoleTail = 16 << 10

// stream collects the bytes of one serial port as they come, for readers
// that wait for a marker.
type stream struct {
	mu     sync.Mutex
	buf    []byte        // bytes not consumed yet (only while keep is set)
	keep   bool          // collect into buf; otherwise only tee and tail
	tee    io.Writer     // gets every byte while keep is off; may be nil
	tail   []byte        // the last consoleTail bytes, always
	err    error         // the reader's error (io.EOF when QEMU went away)
	notify chan struct{} // closed and replaced at every change
}

func newStream(keep bool, tee io.Writer) *stream {
	return &stream{keep: keep, tee: tee, notify: make(chan struct{})}
}

// pump copies r into s until r fails.
func (s *stream) pump(r io.Reader) {
	p := make([]byte, 32<<10)
	for {
		n, err := r.Read(p)
		s.mu.Lock()
		if n > 0 {
			s.tail = append(s.tail, p[:n]...)
			if len(s.tail) > consoleTail {
				s.tail = append(s.tail[:0], s.tail[len(s.tail)-consoleTail:]...)
			}
			switch {
			case s.keep && len(s.buf)+n <= maxStream:
				s.buf = append(s.buf, p[:n]...)
			case s.keep:
				s.err = errOverflow
			case s.tee != nil:
				s.tee.Write(p[:n])
			}
		}
		if err != nil && s.err == nil {
			s.err = err
		}
		close(s.notify)
		s.notify = make(chan struct{})
		done := s.err != nil
		s.mu.Unlock()
		if done {
			return
		}
	}
}

// setKeep switches collecting on or off and drops what was collected.
func (s *stream) setKeep(keep bool) {
	s.mu.Lock()
	s.keep = keep
	s.buf = nil
	s.mu.Unlock()
}

// pending returns a copy of the collected bytes not consumed yet.
func (s *stream) pending() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.buf...)
}

// tailString returns the last bytes the stream saw.
func (s *stream) tailString() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return string(s.tail)
}

// take calls f on the collected bytes each time they change until f
// reports done; f returns how many leading bytes it consumed. take
// returns the stream's error if it ends first, or ctx's.
func (s *stream) take(ctx context.Context, f func(b []byte) (consumed int, done bool)) error {
	for {
		s.mu.Lock()
		n, done := f(s.buf)
		s.buf = s.buf[n:]
		err, ch := s.err, s.notify
		s.mu.Unlock()
		if done {
			return nil
		}
		if err != nil {
			return err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// findMarker finds "\n@@NESTED-<kind> <id>...@@" in b and returns the
// index of its "\n", the index just past it, and its fields after the id;
// at is -1 when b holds no complete marker.
func findMarker(b []byte, kind, id string) (at, end int, fields []string) {
	head := []byte("\n@@NESTED-" + kind + " " + id)
	i := bytes.Index(b, head)
	if i < 0 {
		return -1, 0, nil
	}
	rest := b[i+len(head):]
	n := bytes.Index(rest, []byte("@@"))
	if n < 0 {
		return -1, 0, nil
	}
	return i, i + len(head) + n + 2, strings.Fields(string(rest[:n]))
}
