package api

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"collective/kvm"
	"collective/migrate"
)

// clientTimeout bounds a call, answer included (a migration answers when
// it ends).
const clientTimeout = 10 * time.Minute

// maxAnswerBytes caps an answer's body.
const maxAnswerBytes = 1 << 20

// Client calls a machine's API over its Unix socket, one connection per
// call.
type Client struct {
	path string
}

// NewClient returns a client of the API served at socket path.
func NewClient(path string) *Client {
	return &Client{path: path}
}

// APIError is an error answer of the server.
type APIError struct {
	Status int
	Msg    string
}

func (e *APIError) Error() string { return fmt.Sprintf("%s (HTTP %d)", e.Msg, e.Status) }

// Do sends a request with body in (nil for none) encoded as JSON, and
// decodes the answer into out (nil to discard it).
func (c *Client) Do(method, path string, in, out any) error {
	var body []byte
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = b
	}
	code, data, err := c.roundTrip(method, path, body, in != nil || method != "GET")
	if err != nil {
		return fmt.Errorf("api: %s %s: %w", method, path, err)
	}
	if code != 200 {
		var e Error
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			e.Error = string(data)
		}
		return &APIError{code, e.Error}
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("api: bad answer: %w", err)
		}
	}
	return nil
}

// roundTrip sends one request on a new connection and reads the answer's
// status and body.
func (c *Client) roundTrip(method, path string, body []byte, withLength bool) (int, []byte, error) {
	conn, err := net.DialTimeout("unix", c.path, 10*time.Second)
	if err != nil {
		return 0, nil, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(clientTimeout))
	var req bytes.Buffer
	fmt.Fprintf(&req, "%s %s HTTP/1.1\r\nHost: collective\r\nConnection: close\r\n", method, path)
	if withLength {
		fmt.Fprintf(&req, "Content-Type: application/json\r\nContent-Length: %d\r\n", len(body))
	}
	req.WriteString("\r\n")
	req.Write(body)
	// A server that refuses the request may answer and close before it
	// has read all of it: a failed write still leaves an answer to read.
	_, werr := conn.Write(req.Bytes())
	br := bufio.NewReader(conn)
	for {
		start, hdr, err := readHead(br)
		if err != nil {
			if werr != nil {
				return 0, nil, werr
			}
			return 0, nil, fmt.Errorf("reading the answer: %w", err)
		}
		proto, rest, _ := strings.Cut(start, " ")
		codeText, _, _ := strings.Cut(rest, " ")
		code, err := strconv.Atoi(codeText)
		if !strings.HasPrefix(proto, "HTTP/1.") || err != nil || code < 100 || code > 999 {
			return 0, nil, fmt.Errorf("malformed answer %q", start)
		}
		if code < 200 {
			continue // 100 Continue
		}
		var data []byte
		if v, ok := hdr["content-length"]; ok {
			n, err := contentLength(v)
			if err != nil || n > maxAnswerBytes {
				return 0, nil, fmt.Errorf("answer with Content-Length %q", v)
			}
			data = make([]byte, n)
			_, err = io.ReadFull(br, data)
			if err != nil {
				return 0, nil, fmt.Errorf("reading the answer: %w", err)
			}
		} else if data, err = io.ReadAll(io.LimitReader(br, maxAnswerBytes)); err != nil {
			return 0, nil, fmt.Errorf("reading the answer: %w", err)
		}
		return code, data, nil
	}
}

// State calls GET /state.
func (c *Client) State() (State, error) {
	var s State
	return s, c.Do("GET", "/state", nil, &s)
}

// Pause calls POST /pause.
func (c *Client) Pause() (State, error) {
	var s State
	return s, c.Do("POST", "/pause", nil, &s)
}

// VCPUs calls GET /vcpus.
func (c *Client) VCPUs() ([]kvm.VCPUBrief, error) {
	var b []kvm.VCPUBrief
	return b, c.Do("GET", "/vcpus", nil, &b)
}

// Resume calls POST /resume.
func (c *Client) Resume() (State, error) {
	var s State
	return s, c.Do("POST", "/resume", nil, &s)
}

// Snapshot calls POST /snapshot.
func (c *Client) Snapshot(req SnapshotRequest) (SnapshotResult, error) {
	var r SnapshotResult
	return r, c.Do("POST", "/snapshot", req, &r)
}

// Migrate calls POST /migrate, which returns when the migration ends.
func (c *Client) Migrate(req MigrateRequest) (migrate.Report, error) {
	var r migrate.Report
	return r, c.Do("POST", "/migrate", req, &r)
}

// MigrateStatus calls GET /migrate/status.
func (c *Client) MigrateStatus() (MigrateStatus, error) {
	var s MigrateStatus
	return s, c.Do("GET", "/migrate/status", nil, &s)
}

// MigrateCancel calls POST /migrate/cancel.
func (c *Client) MigrateCancel() (MigrateStatus, error) {
	var s MigrateStatus
	return s, c.Do("POST", "/migrate/cancel", nil, &s)
}
