package migrate

import (
	"crypto/rand"
	"fmt"
	"net"
	"sync"
	"time"
)

// Parallel streams (protocol 1.3, Options.Streams): the source opens extra
// TCP connections to the target, each introduced by a stream frame that
// carries the migration's token. A round's chunks are dealt to the
// streams in turn (disk blocks, the state and every control frame stay on
// the first connection); each stream ends the round with its own round
// frame. The target applies every stream's frames in parallel, and waits
// at each round frame until every stream has reached it before it
// acknowledges the round: a page is sent at most once per round, so only
// a page resent in a later round could race, and no stream starts on a
// round before all of them finished the one before.

// outStream is one extra stream of the source.
type outStream struct {
	fw   *frameWriter
	ch   chan streamItem
	done chan error // one answer per round or end item
}

// streamItem is an encoded chunk to write, or the end of a round (a
// round frame) or of the migration (an end frame).
type streamItem struct {
	e      encoded
	marker byte // 0: e; frameRound or frameEnd
	round  [16]byte
}

// openStreams dials the n-1 extra streams the target granted and starts
// their writers.
func (s *sender) openStreams(n int, token [hashSize]byte) error {
	addr := s.conn.RemoteAddr().String()
	// Dialled at once: each connect waits on the target's host.
	conns := make([]net.Conn, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := 1; i < n; i++ {
		wg.Go(func() {
			d := net.Dialer{Timeout: s.opts.DialTimeout}
			conns[i], errs[i] = d.Dial("tcp", addr)
		})
	}
	wg.Wait()
	s.streamMu.Lock()
	s.conns = append(s.conns, conns[1:]...)
	cut := s.cut
	s.streamMu.Unlock()
	if cut {
		s.cutStreams()
	}
	for i := 1; i < n; i++ {
		if errs[i] != nil { // the others are closed with s.conns
			return fmt.Errorf("migrate: opening stream %d of %d to %s: %w", i+1, n, addr, errs[i])
		}
	}
	for i := 1; i < n; i++ {
		c := conns[i]
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
			tc.SetWriteBuffer(4 << 20)
		}
		o := &outStream{fw: newFrameWriter(c, s.opts.Bandwidth/float64(n)), ch: make(chan streamItem, 8), done: make(chan error, 1)}
		s.streams = append(s.streams, o) // its connection is in s.conns
	}
	for i, o := range s.streams {
		// Its writer starts once the stream frame is out.
		if err := o.fw.send(frameStream, marshalStreamHello(token, uint32(i+1))); err != nil {
			return s.wireErr(fmt.Sprintf("opening stream %d", i+2), err)
		}
		if err := o.fw.flush(); err != nil {
			return s.wireErr(fmt.Sprintf("opening stream %d", i+2), err)
		}
		s.streamWG.Add(1)
		go s.writeStream(o)
	}
	s.fw.limit = s.opts.Bandwidth / float64(n)
	return nil
}

// writeStream writes what the round's writer deals to o until its channel
// is closed. After an error it only hands buffers back and answers
// markers with the error.
func (s *sender) writeStream(o *outStream) {
	defer s.streamWG.Done()
	var err error
	for it := range o.ch {
		switch {
		case it.marker != 0:
			if err == nil {
				var payload []byte
				if it.marker == frameRound {
					payload = it.round[:]
				}
				if err = o.fw.send(it.marker, payload); err == nil {
					err = o.fw.flush()
				}
			}
			o.done <- err
		case err == nil:
			n0 := o.fw.bytes
			err = o.fw.write(it.e.buf)
			s.streamBytes.Add(o.fw.bytes - n0)
		}
		s.putBuf(it.e.buf)
	}
}

// endStreams sends each extra stream a marker (a round frame for round rb,
// or the end) and waits until all have written it.
func (s *sender) endStreams(marker byte, rb [16]byte) error {
	for _, o := range s.streams {
		o.ch <- streamItem{marker: marker, round: rb}
	}
	var first error
	for i, o := range s.streams {
		if err := <-o.done; err != nil && first == nil {
			first = s.wireErr(fmt.Sprintf("stream %d", i+2), err)
		}
	}
	return first
}

// cutStreams closes every extra stream's connection (a cancel): a writer
// blocked on a target that stopped reading returns, and so does the round
// dealing to it.
func (s *sender) cutStreams() {
	s.streamMu.Lock()
	defer s.streamMu.Unlock()
	s.cut = true
	for _, c := range s.conns {
		if c != nil {
			c.Close()
		}
	}
}

// closeStreams closes the extra streams and waits for their writers.
func (s *sender) closeStreams() {
	s.cutStreams()
	for _, o := range s.streams {
		close(o.ch)
	}
	s.streamWG.Wait()
}

// newToken returns a random stream token.
func newToken() [hashSize]byte {
	var t [hashSize]byte
	rand.Read(t[:])
	return t
}

// inStream is one extra stream of the target: a receiver of its own over
// the shared machine.
type inStream struct {
	r       *receiver
	conn    net.Conn
	at      chan int      // the round frame each round reached
	release chan struct{} // go on past the round frame
	err     chan error    // the loop's end: nil after the end frame
}

// acceptStreams takes the n-1 extra streams of a migration from accept,
// each checked by its stream frame.
func (r *receiver) acceptStreams(n uint32, token [hashSize]byte) error {
	seen := make([]bool, n)
	for range n - 1 {
		c, err := r.opts.Accept()
		if err != nil {
			return fmt.Errorf("migrate: waiting for the source's extra streams: %w", err)
		}
		sr := &receiver{conn: c, opts: r.opts, fr: newFrameReader(c), plain: make([]byte, chunkBytes)}
		sr.dl = c
		st := &inStream{r: sr, conn: c, at: make(chan int), release: make(chan struct{}), err: make(chan error, 1)}
		r.streams = append(r.streams, st)
		c.SetReadDeadline(time.Now().Add(r.opts.IdleTimeout))
		f, err := sr.fr.next()
		if err != nil {
			return fmt.Errorf("migrate: reading an extra stream's first frame: %w", err)
		}
		i, err := parseStreamHello(f, token, n)
		if err != nil {
			return err
		}
		if seen[i] {
			return &ProtocolError{f.off, fmt.Sprintf("stream frame: stream %d opened twice", i)}
		}
		seen[i] = true
	}
	return nil
}

// startStreams starts every extra stream's loop over the built machine.
func (r *receiver) startStreams() {
	quit := make(chan struct{})
	r.quit = quit // stopStreams clears the field: the loops keep their copy
	for i, st := range r.streams {
		st.r.t, st.r.mem = r.t, r.mem
		r.streamWG.Add(1)
		go func() {
			defer r.streamWG.Done()
			err := st.r.streamLoop(st, quit)
			if err != nil && err != errStreamQuit {
				r.streamFailed(fmt.Errorf("migrate: stream %d: %w", i+2, err))
			}
			st.err <- err
		}()
	}
}

// streamFailed records the first extra stream's failure and wakes the
// first stream's reader, which then returns it (next): the target fails
// at once, with the cause, not when the source notices.
func (r *receiver) streamFailed(err error) {
	r.streamMu.Lock()
	first := r.streamErr == nil
	if first {
		r.streamErr = err
	}
	r.streamMu.Unlock()
	if first && r.dl != nil {
		r.dl.SetReadDeadline(time.Now())
	}
}

// streamFailure returns an extra stream's failure, if one failed. It is
// called per frame: without extra streams it costs no lock.
func (r *receiver) streamFailure() error {
	if len(r.streams) == 0 {
		return nil
	}
	r.streamMu.Lock()
	defer r.streamMu.Unlock()
	return r.streamErr
}

// streamLoop applies an extra stream's frames until its end frame.
func (r *receiver) streamLoop(st *inStream, quit <-chan struct{}) error {
	round := 0
	for {
		f, err := r.nextOther()
		if err != nil {
			return err
		}
		switch f.typ {
		case frameRound:
			if err := checkRound(f, round, " on an extra stream"); err != nil {
				return err
			}
			select {
			case st.at <- round:
			case <-quit:
				return errStreamQuit
			}
			select {
			case <-st.release:
			case <-quit:
				return errStreamQuit
			}
			round++
		case frameEnd:
			return nil
		default:
			return &ProtocolError{f.off, "unexpected " + frameName(f.typ) + " frame on an extra stream"}
		}
	}
}

var errStreamQuit = fmt.Errorf("migrate: stream stopped")

// roundBarrier waits until every extra stream has applied round, then
// lets them go on once the caller has acknowledged it (release).
func (r *receiver) roundBarrier(round int) error {
	for i, st := range r.streams {
		select {
		case got := <-st.at:
			if got != round {
				return fmt.Errorf("migrate: stream %d at round %d, want %d", i+2, got, round)
			}
		case err := <-st.err:
			if err == nil {
				return fmt.Errorf("migrate: stream %d ended before round %d", i+2, round)
			}
			return fmt.Errorf("migrate: stream %d: %w", i+2, err)
		}
	}
	return nil
}

// releaseStreams lets every extra stream past its round frame.
func (r *receiver) releaseStreams() {
	for _, st := range r.streams {
		st.release <- struct{}{}
	}
}

// endStreams waits for every extra stream's end frame and adds its
// figures to the receiver's.
func (r *receiver) endStreams() error {
	for i, st := range r.streams {
		select {
		case err := <-st.err:
			if err != nil {
				return fmt.Errorf("migrate: stream %d: %w", i+2, err)
			}
		case got := <-st.at:
			// A round the first stream never ended: the loop waits at
			// it until stopStreams.
			return fmt.Errorf("migrate: stream %d: round %d after the end of the migration", i+2, got)
		}
		r.stats.Pages += st.r.stats.Pages
		r.stats.ZeroPages += st.r.stats.ZeroPages
		r.stats.HashPages += st.r.stats.HashPages
		r.stats.Bytes += st.r.fr.off
	}
	return nil
}

// stopStreams ends every extra stream's loop (closing its connection) and
// waits for it: nothing writes guest memory once it returns.
func (r *receiver) stopStreams() {
	if r.quit != nil {
		close(r.quit)
		r.quit = nil
	}
	for _, st := range r.streams {
		st.conn.Close()
	}
	r.streamWG.Wait()
}
