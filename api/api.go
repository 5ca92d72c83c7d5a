// Package api is the control API of a running machine: HTTP/JSON on a
// Unix socket (collective run --api PATH), and its client.
//
//	GET  /state     the machine's state
//	POST /pause     pause the vCPUs              (409 when paused)
//	POST /resume    resume them                  (409 when running)
//	POST /snapshot  {"path": FILE, "incremental": bool, "raw": bool}
//	POST /migrate   {"to": ADDR, "downtime_ms", "max_rounds", "bandwidth_mbps", "compress"}
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
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"collective/machine"
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
}

// NewServer returns a server for m, whose snapshots ss takes.
func NewServer(m *machine.Machine, ss *snapshot.Session) *Server {
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

// Handler returns the API's HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	route := func(path, method string, f func(*http.Request) (any, error)) {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			if r.Method != method {
				w.Header().Set("Allow", method)
				writeJSON(w, http.StatusMethodNotAllowed, Error{fmt.Sprintf("%s %s: use %s", r.Method, path, method)})
				return
			}
			v, err := f(r)
			if err != nil {
				code := http.StatusInternalServerError
				var he *httpError
				if errors.As(err, &he) {
					code = he.code
				}
				writeJSON(w, code, Error{err.Error()})
				return
			}
			writeJSON(w, http.StatusOK, v)
		})
	}
	route("/state", http.MethodGet, func(*http.Request) (any, error) { return s.state(), nil })
	route("/pause", http.MethodPost, s.pause)
	route("/resume", http.MethodPost, s.resume)
	route("/snapshot", http.MethodPost, s.snapshot)
	mux.HandleFunc("/migrate", s.migrateHandler)
	route("/migrate/status", http.MethodGet, s.migrateStatus)
	route("/migrate/cancel", http.MethodPost, s.migrateCancel)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, Error{fmt.Sprintf("no endpoint %s (try GET /state, POST /pause, /resume, /snapshot, /migrate)", r.URL.Path)})
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/") {
			// ServeMux answers a "*" (or any non-path) target itself with
			// an empty 400; every error of the API is JSON.
			writeJSON(w, http.StatusBadRequest, Error{fmt.Sprintf("request target %q: want a path such as /state", r.RequestURI)})
			return
		}
		mux.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
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
// the request has no parameters (v == nil).
func readBody(r *http.Request, v any) error {
	body := http.MaxBytesReader(nil, r.Body, MaxBodyBytes)
	data, err := io.ReadAll(body)
	if err != nil {
		var mb *http.MaxBytesError
		if errors.As(err, &mb) {
			return fail(http.StatusRequestEntityTooLarge, "request body larger than %d bytes", MaxBodyBytes)
		}
		return fail(http.StatusBadRequest, "reading the request body: %v", err)
	}
	if v == nil {
		if len(strings.TrimSpace(string(data))) > 0 && strings.TrimSpace(string(data)) != "{}" {
			return fail(http.StatusBadRequest, "this request takes no body")
		}
		return nil
	}
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fail(http.StatusBadRequest, "malformed JSON body: %v", err)
	}
	if dec.More() {
		return fail(http.StatusBadRequest, "malformed JSON body: data after the object")
	}
	return nil
}

func (s *Server) pause(r *http.Request) (any, error) {
	if err := readBody(r, nil); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.stateLocked(); st.State != StateRunning {
		return nil, fail(http.StatusConflict, "the machine is %s", st.State)
	}
	s.m.Pause()
	return s.stateLocked(), nil
}

func (s *Server) resume(r *http.Request) (any, error) {
	if err := readBody(r, nil); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.stateLocked(); st.State != StatePaused {
		return nil, fail(http.StatusConflict, "the machine is %s", st.State)
	}
	s.m.Resume()
	return s.stateLocked(), nil
}

// snapshot takes a snapshot; a running machine is paused for it and
// resumed after.
func (s *Server) snapshot(r *http.Request) (any, error) {
	var req SnapshotRequest
	if err := readBody(r, &req); err != nil {
		return nil, err
	}
	if req.Path == "" {
		return nil, fail(http.StatusBadRequest, `"path" is required`)
	}
	if req.Incremental && req.Raw {
		return nil, fail(http.StatusBadRequest, "an incremental snapshot cannot be a raw image")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stateLocked()
	if st.State == StateStopped || st.State == StateMigrating || st.State == StateMigrated {
		return nil, fail(http.StatusConflict, "the machine is %s", st.State)
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
			return nil, fail(http.StatusConflict, "%v", err)
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

// Serve serves h on l until ctx is done, then closes l and removes the
// socket file.
func Serve(ctx context.Context, l net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	err := srv.Serve(l)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}
