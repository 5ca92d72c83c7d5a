package api

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The wire is a small HTTP/1.1 server and client, just enough for this API
// (Firecracker's micro_http plays the same part). net/http is not used: it
// links HTTP/2, TLS, X.509 and MIME into the VMM binary, and their package
// initialisation alone made every VMM process 2 MiB larger in resident
// memory, API or not.
//
// What the server accepts: a request line "METHOD TARGET HTTP/1.x", header
// lines (no obsolete line folding), and a body given by Content-Length; a
// chunked body gets 501. Connections persist (HTTP/1.1) until the client
// asks to close, an error answer, or idleTimeout.

const (
	// maxHeaderBytes caps a request's (or an answer's) line and headers.
	maxHeaderBytes = 16 << 10
	// headerTimeout bounds reading a request once its first byte came.
	headerTimeout = 10 * time.Second
	// idleTimeout bounds the wait for a connection's next request.
	idleTimeout = 2 * time.Minute
	// maxDiscard is how much of a refused body the server reads (and
	// drops) so that the client sees the answer rather than a reset.
	maxDiscard = 256 << 10
)

// request is one parsed HTTP request.
type request struct {
	method, target string
	body           []byte
	close          bool // the connection ends after the answer
}

// wireError is a request the server cannot read: it answers with code and
// closes the connection.
type wireError struct {
	code int
	msg  string
}

func (e *wireError) Error() string { return e.msg }

func badRequest(format string, a ...any) error {
	return &wireError{400, fmt.Sprintf(format, a...)}
}

// errHeaderTooLarge is static: package initialisation runs in every VMM.
var errHeaderTooLarge = &wireError{431, "request line and headers larger than 16 KiB"}

// readHead reads a message's start line and header lines up to the empty
// line, at most maxHeaderBytes in all. Header names are lower-cased; a
// header that comes more than once keeps its values joined by ", ".
func readHead(br *bufio.Reader) (start string, hdr map[string]string, err error) {
	budget := maxHeaderBytes
	line := func() (string, error) {
		var b []byte
		for {
			frag, err := br.ReadSlice('\n')
			if budget -= len(frag); budget < 0 {
				return "", errHeaderTooLarge
			}
			b = append(b, frag...)
			if err == nil {
				break
			}
			if err != bufio.ErrBufferFull {
				if err == io.EOF && len(b) > 0 {
					err = io.ErrUnexpectedEOF
				}
				return "", err
			}
		}
		b = bytes.TrimSuffix(b[:len(b)-1], []byte("\r"))
		return string(b), nil
	}
	if start, err = line(); err != nil {
		return "", nil, err
	}
	hdr = map[string]string{}
	for {
		l, err := line()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return "", nil, err
		}
		if l == "" {
			return start, hdr, nil
		}
		name, value, ok := strings.Cut(l, ":")
		if !ok || !isToken(name) {
			return "", nil, badRequest("malformed header line %q", l)
		}
		name, value = strings.ToLower(name), strings.Trim(value, " \t")
		if old, dup := hdr[name]; dup {
			value = old + ", " + value
		}
		hdr[name] = value
	}
}

// isToken reports whether s is an HTTP token (RFC 9110 5.6.2).
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}

// hasToken reports whether the comma-separated header value v lists tok.
func hasToken(v, tok string) bool {
	for f := range strings.SplitSeq(v, ",") {
		if strings.EqualFold(strings.TrimSpace(f), tok) {
			return true
		}
	}
	return false
}

// contentLength parses a Content-Length value (repeats must agree).
func contentLength(v string) (int64, error) {
	var n int64 = -1
	for f := range strings.SplitSeq(v, ",") {
		f = strings.TrimSpace(f)
		m, err := strconv.ParseInt(f, 10, 64)
		if err != nil || m < 0 || f[0] == '+' || (n >= 0 && m != n) {
			return 0, badRequest("bad Content-Length %q", v)
		}
		n = m
	}
	return n, nil
}

// readRequest reads one request from br; w receives a 100 Continue when
// the client asks for one. A *wireError says what to answer.
func readRequest(br *bufio.Reader, w io.Writer) (*request, error) {
	start, hdr, err := readHead(br)
	if err != nil {
		return nil, err
	}
	parts := strings.Split(start, " ")
	if len(parts) != 3 || !isToken(parts[0]) || parts[1] == "" {
		return nil, badRequest("malformed request line %q", start)
	}
	r := &request{method: parts[0], target: parts[1]}
	for i := 0; i < len(r.target); i++ {
		if c := r.target[i]; c <= ' ' || c == 0x7f {
			return nil, badRequest("malformed request target %q", r.target)
		}
	}
	switch parts[2] {
	case "HTTP/1.1":
		r.close = hasToken(hdr["connection"], "close")
	case "HTTP/1.0":
		r.close = !hasToken(hdr["connection"], "keep-alive")
	default:
		if strings.HasPrefix(parts[2], "HTTP/") {
			return nil, &wireError{505, fmt.Sprintf("%s is not supported: use HTTP/1.1", parts[2])}
		}
		return nil, badRequest("malformed request line %q", start)
	}
	if _, ok := hdr["transfer-encoding"]; ok {
		return nil, &wireError{501, "Transfer-Encoding is not supported: send the body with a Content-Length"}
	}
	var n int64
	if v, ok := hdr["content-length"]; ok {
		if n, err = contentLength(v); err != nil {
			return nil, err
		}
	}
	if n > MaxBodyBytes {
		if n <= maxDiscard && !hasToken(hdr["expect"], "100-continue") {
			io.CopyN(io.Discard, br, n)
		}
		return nil, &wireError{413, fmt.Sprintf("request body larger than %d bytes", MaxBodyBytes)}
	}
	if n > 0 && hasToken(hdr["expect"], "100-continue") {
		if _, err := io.WriteString(w, "HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
			return nil, err
		}
	}
	r.body = make([]byte, n)
	if _, err := io.ReadFull(br, r.body); err != nil {
		return nil, badRequest("reading the request body: %v", err)
	}
	return r, nil
}

// statusText is the reason phrase of the codes this API answers with.
func statusText(code int) string {
	switch code {
	case 100:
		return "Continue"
	case 200:
		return "OK"
	case 400:
		return "Bad Request"
	case 404:
		return "Not Found"
	case 405:
		return "Method Not Allowed"
	case 409:
		return "Conflict"
	case 413:
		return "Content Too Large"
	case 431:
		return "Request Header Fields Too Large"
	case 500:
		return "Internal Server Error"
	case 501:
		return "Not Implemented"
	case 502:
		return "Bad Gateway"
	case 505:
		return "HTTP Version Not Supported"
	}
	return "Status " + strconv.Itoa(code)
}

// answer is a response: a status, an Allow header for 405, a JSON body,
// and what to do once it is written (or nil).
type answer struct {
	code  int
	allow string
	body  []byte
	after func()
}

// writeAnswer writes a as an HTTP/1.1 response.
func writeAnswer(w *bufio.Writer, a answer, close bool) error {
	fmt.Fprintf(w, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n", a.code, statusText(a.code), len(a.body))
	if a.allow != "" {
		fmt.Fprintf(w, "Allow: %s\r\n", a.allow)
	}
	if close {
		w.WriteString("Connection: close\r\n")
	}
	w.WriteString("\r\n")
	w.Write(a.body)
	return w.Flush()
}

// conns is the set of a server's open connections.
type conns struct {
	mu     sync.Mutex
	set    map[net.Conn]struct{} // +checklocks:mu
	closed bool                  // +checklocks:mu
}

// add records c; it reports false once the server is closed.
func (cs *conns) add(c net.Conn) bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.closed {
		return false
	}
	if cs.set == nil {
		cs.set = map[net.Conn]struct{}{}
	}
	cs.set[c] = struct{}{}
	return true
}

func (cs *conns) remove(c net.Conn) {
	cs.mu.Lock()
	delete(cs.set, c)
	cs.mu.Unlock()
}

// closeAll closes every connection, and those added later.
func (cs *conns) closeAll() {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	cs.closed = true
	for c := range cs.set {
		c.Close()
	}
}

// Serve answers requests on l until ctx is done, then closes l and every
// connection (requests under way run to their end) and returns nil.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	stop := context.AfterFunc(ctx, func() {
		l.Close()
		s.conns.closeAll()
	})
	defer stop()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return err
		}
		go s.ServeConn(c)
	}
}

// ServeConn answers the requests that come on c, then closes it.
func (s *Server) ServeConn(c net.Conn) {
	defer c.Close()
	if !s.conns.add(c) {
		return
	}
	defer s.conns.remove(c)
	br := bufio.NewReader(c)
	bw := bufio.NewWriter(c)
	for {
		// Wait for the next request, then give it headerTimeout.
		c.SetReadDeadline(time.Now().Add(idleTimeout))
		if _, err := br.Peek(1); err != nil {
			return
		}
		c.SetReadDeadline(time.Now().Add(headerTimeout))
		r, err := readRequest(br, c)
		c.SetReadDeadline(time.Time{})
		if err != nil {
			var we *wireError
			if errors.As(err, &we) {
				writeAnswer(bw, jsonAnswer(we.code, Error{we.msg}), true)
			}
			return
		}
		a := s.handle(r)
		if err := writeAnswer(bw, a, r.close); err != nil {
			return
		}
		if a.after != nil {
			a.after()
		}
		if r.close {
			return
		}
	}
}

// ReadRequest reads one request from br as the server does, for tests and
// fuzzing: its method, target and body, or the status the server answers
// a bad request with and why (status 0: the input ended or failed, and
// the server answers nothing).
func ReadRequest(br *bufio.Reader) (method, target string, body []byte, status int, err error) {
	r, err := readRequest(br, io.Discard)
	if err != nil {
		var we *wireError
		if errors.As(err, &we) {
			return "", "", nil, we.code, err
		}
		return "", "", nil, 0, err
	}
	return r.method, r.target, r.body, 200, nil
}
