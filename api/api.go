// Package api is the control API of a running machine: HTTP/JSON on a
// Unix socket (collective run --api PATH), and its client. It speaks
// HTTP/1.1 itself (http.go), without net/http.
//
//	GET  /state     the machine's state
//	POST /pause     pause the vCPUs              (409 when paused)
//	POST /resume    resume them                  (409 when running)
//	POST /snapshot  {"path": FILE, "incremental": bool, "raw": bool}
//	POST /migrate   {"to": ADDR, "downtime_ms", "max_rounds", "bandwidth_mbps", "compress", "auto_converge", "streams"}
//	                live migration; answers with the report when it ends (migrate.go)
//	GET  /migrate/status   progress of the migration under way, or the last report
//	POST /migrate/cancel   cancel it (before its commit)
//
// Errors come back as {"error": "..."} with 400 (malformed request), 404
// (no such endpoint), 405 (wrong method), 409 (the machine's state does not
// allow it), or 500 (the VMM failed). openapi.yaml in this directory is the
// reference.
//
// # Security
//
// Requests are untrusted: bodies are capped (MaxBodyBytes), decoded
// strictly (unknown fields and trailing data refused), and never panic the
// VMM. The socket's file permissions are the access control.
package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"collective/kvm"
	"collective/machine"
	"collective/migrate"
	"collective/snapshot"
)

// MaxBodyBytes caps a request body.
const MaxBodyBytes = 64 << 10

// Machine states reported by GET /state.
const (
	StateRunning = "running"
	StatePaused  = "paused"
	StateStopped = "stopped"
	// StateMigrating: a live migration is under way; pause, resume and
	// snapshot are refused.
	StateMigrating = "migrating"
	// StateMigrated: the machine runs on a migration's target; this copy
	// stays paused for good.
	StateMigrated = "migrated"
)

// State is the body of GET /state and of pause and resume's answers.
type State struct {
	State   string `json:"state"`
	MemSize uint64 `json:"mem_size"`
	CPUs    int    `json:"cpus"`
}

// SnapshotRequest is the body of POST /snapshot.
type SnapshotRequest struct {
	Path        string `json:"path"`
	Incremental bool   `json:"incremental,omitempty"`
	Raw         bool   `json:"raw,omitempty"`
}

// SnapshotResult is the answer of POST /snapshot.
type SnapshotResult struct {
	Path       string  `json:"path"`
	ID         string  `json:"id"`
	Bytes      int64   `json:"bytes"`
	Pages      int     `json:"pages"`
	ZeroPages  int     `json:"zero_pages"`
	DurationMS float64 `json:"duration_ms"`
	// PausedMS is how long the vCPUs were paused for the snapshot (0 when
	// the machine was already paused).
	PausedMS float64 `json:"paused_ms"`
}

// Error is the body of every error answer.
type Error struct {
	Error string `json:"error"`
}

// Server serves the API of one machine.
type Server struct {
	m  *machine.Machine
	ss *snapshot.Session

	mu      sync.Mutex // serialises state changes
	stopped bool       // +checklocks:mu

	mig migration // live migration (migrate.go); lock order: mu, then mig.mu

	conns conns // open connections (http.go)
}

// NewServer returns a server for m, whose snapshots ss takes.
func NewServer(m *machine.Machine, ss *snapshot.Session) *Server {
	migrate.Warm() // the machine may migrate: its first migration starts faster
	return &Server{m: m, ss: ss}
}

// SetStopped records that the machine has ended: state changes get 409.
func (s *Server) SetStopped() {
	s.cancelMigration()
	s.mu.Lock()
	s.stopped = true
	s.mu.Unlock()
}

type httpError struct {
	code int
	msg  string
}

func (e *httpError) Error() string { return e.msg }

func fail(code int, format string, a ...any) error {
	return &httpError{code, fmt.Sprintf(format, a...)}
}

// handle answers one request.
func (s *Server) handle(r *request) answer {
	path, _, _ := strings.Cut(r.target, "?")
	if !strings.HasPrefix(path, "/") {
		return jsonAnswer(400, Error{fmt.Sprintf("request target %q: want a path such as /state", r.target)})
	}
	var (
		method string
		f      func(*request) (any, error)
	)
	switch path {
	case "/state":
		method, f = "GET", func(*request) (any, error) { return s.state(), nil }
	case "/pause":
		method, f = "POST", s.pause
	case "/resume":
		method, f = "POST", s.resume
	case "/snapshot":
		method, f = "POST", s.snapshot
	case "/vcpus":
		method, f = "GET", func(*request) (any, error) { return s.VCPUs() }
	case "/migrate":
		return s.migrateHandler(r)
	case "/migrate/status":
		method, f = "GET", s.migrateStatus
	case "/migrate/cancel":
		method, f = "POST", s.migrateCancel
	default:
		return jsonAnswer(404, Error{fmt.Sprintf("no endpoint %s (try GET /state, POST /pause, /resume, /snapshot, /migrate)", path)})
	}
	if r.method != method {
		a := jsonAnswer(405, Error{fmt.Sprintf("%s %s: use %s", r.method, path, method)})
		a.allow = method
		return a
	}
	v, err := f(r)
	if err != nil {
		return errorAnswer(err)
	}
	return jsonAnswer(200, v)
}

// errorAnswer answers with err: its code for an *httpError, else 500.
func errorAnswer(err error) answer {
	code := 500
	var he *httpError
	if errors.As(err, &he) {
		code = he.code
	}
	return jsonAnswer(code, Error{err.Error()})
}

// jsonAnswer is an answer with v encoded as JSON.
func jsonAnswer(code int, v any) answer {
	b, err := json.Marshal(v)
	if err != nil {
		code = 500
		b, _ = json.Marshal(Error{fmt.Sprintf("encoding the answer: %v", err)})
	}
	return answer{code: code, body: append(b, '\n')}
}

func (s *Server) state() State {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stateLocked()
}

// +checklocks:s.mu
func (s *Server) stateLocked() State {
	cfg := s.m.Config()
	st := State{State: StateRunning, MemSize: cfg.MemSize, CPUs: cfg.CPUs}
	switch {
	case s.Migrated():
		st.State = StateMigrated
	case s.Migrating():
		st.State = StateMigrating
	case s.stopped:
		st.State = StateStopped
	case s.m.VM().Paused():
		st.State = StatePaused
	}
	return st
}

// readBody decodes a JSON body strictly; an empty body is allowed when
// the request has no parameters (v == nil). The wire has capped its size.
func readBody(r *request, v any) error {
	if v == nil {
		if b := bytes.TrimSpace(r.body); len(b) > 0 && string(b) != "{}" {
			return fail(400, "this request takes no body")
		}
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(r.body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fail(400, "malformed JSON body: %v", err)
	}
	if dec.More() {
		return fail(400, "malformed JSON body: data after the object")
	}
	return nil
}

func (s *Server) pause(r *request) (any, error) {
	if err := readBody(r, nil); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.stateLocked(); st.State != StateRunning {
		return nil, fail(409, "the machine is %s", st.State)
	}
	s.m.Pause()
	return s.stateLocked(), nil
}

// VCPUs summarises the vCPUs (machine.VCPUBriefs) for the post-mortem of
// a guest that stopped making progress. A running machine is paused for
// the moment it takes; during a migration it is refused (409), so that it
// never resumes a machine the migration paused.
func (s *Server) VCPUs() ([]kvm.VCPUBrief, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.stateLocked(); st.State == StateMigrating || st.State == StateMigrated {
		return nil, fail(409, "the machine is %s", st.State)
	}
	b, err := s.m.VCPUBriefs()
	if err != nil {
		return nil, fail(500, "reading the vCPUs: %v", err)
	}
	return b, nil
}

func (s *Server) resume(r *request) (any, error) {
	if err := readBody(r, nil); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.stateLocked(); st.State != StatePaused {
		return nil, fail(409, "the machine is %s", st.State)
	}
	s.m.Resume()
	return s.stateLocked(), nil
}

// snapshot takes a snapshot; a running machine is paused for it and
// resumed after.
func (s *Server) snapshot(r *request) (any, error) {
	var req SnapshotRequest
	if err := readBody(r, &req); err != nil {
		return nil, err
	}
	if req.Path == "" {
		return nil, fail(400, `"path" is required`)
	}
	if req.Incremental && req.Raw {
		return nil, fail(400, "an incremental snapshot cannot be a raw image")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stateLocked()
	if st.State == StateStopped || st.State == StateMigrating || st.State == StateMigrated {
		return nil, fail(409, "the machine is %s", st.State)
	}
	var pausedAt time.Time
	if st.State == StateRunning {
		pausedAt = time.Now()
		s.m.Pause()
		defer s.m.Resume()
	}
	stats, err := s.ss.Take(req.Path, snapshot.TakeOptions{Incremental: req.Incremental, Raw: req.Raw})
	if err != nil {
		if errors.Is(err, snapshot.ErrNoParent) {
			return nil, fail(409, "%v", err)
		}
		return nil, err
	}
	res := SnapshotResult{Path: req.Path, ID: stats.ID.String(), Bytes: stats.Bytes, Pages: stats.Pages,
		ZeroPages: stats.ZeroPages, DurationMS: float64(stats.Duration.Microseconds()) / 1000}
	if !pausedAt.IsZero() {
		res.PausedMS = float64(time.Since(pausedAt).Microseconds()) / 1000
	}
	return res, nil
}

// Listen listens on a Unix socket at path, replacing a stale socket file
// (one nothing listens on) but never another kind of file.
func Listen(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("api: %s exists and is not a socket", path)
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("api: %s: another process serves it", path)
		}
		os.Remove(path)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("api: %w", err)
	}
	os.Chmod(path, 0o600)
	return l, nil
}
