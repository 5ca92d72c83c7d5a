package api

import (
	"context"
	"errors"
	"sync"
	"time"

	"collective/migrate"
)

// MigrateRequest is the body of POST /migrate.
type MigrateRequest struct {
	// To is the target's address (collective run --incoming ADDR).
	To string `json:"to"`
	// DowntimeMS is the downtime limit (default 50).
	DowntimeMS float64 `json:"downtime_ms,omitempty"`
	// MaxRounds bounds the pre-copy rounds (default 30).
	MaxRounds int `json:"max_rounds,omitempty"`
	// BandwidthMBps caps the wire rate in MB/s (10^6 bytes; 0: none).
	BandwidthMBps float64 `json:"bandwidth_mbps,omitempty"`
	// Compress is auto (default), always or never.
	Compress string `json:"compress,omitempty"`
	// AutoConverge throttles the vCPUs of a guest that dirties memory
	// faster than the migration carries it (migrate.Options.AutoConverge).
	AutoConverge bool `json:"auto_converge,omitempty"`
	// Streams is how many TCP connections carry the pages (default 1).
	Streams int `json:"streams,omitempty"`
}

// MigrateStatus is the answer of GET /migrate: the migration under way,
// or the last one's report.
type MigrateStatus struct {
	Active   bool             `json:"active"`
	Progress migrate.Progress `json:"progress"`
	Report   *migrate.Report  `json:"report,omitempty"`
}

// migration is the server's migration state.
type migration struct {
	mu       sync.Mutex
	active   bool
	cancel   context.CancelFunc
	done     chan struct{}
	progress migrate.Progress
	report   *migrate.Report
	migrated bool
}

// Migrating reports whether a migration is under way.
func (s *Server) Migrating() bool {
	s.mig.mu.Lock()
	defer s.mig.mu.Unlock()
	return s.mig.active
}

// Migrated reports whether the machine migrated away: it runs on the
// target, and this process must end without resuming it.
func (s *Server) Migrated() bool {
	s.mig.mu.Lock()
	defer s.mig.mu.Unlock()
	return s.mig.migrated
}

// cancelMigration cancels a migration under way and waits for it to end.
func (s *Server) cancelMigration() {
	s.mig.mu.Lock()
	cancel, done := s.mig.cancel, s.mig.done
	s.mig.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

func (s *Server) migrateStatus(*request) (any, error) {
	s.mig.mu.Lock()
	defer s.mig.mu.Unlock()
	return MigrateStatus{Active: s.mig.active, Progress: s.mig.progress, Report: s.mig.report}, nil
}

func (s *Server) migrateCancel(r *request) (any, error) {
	if err := readBody(r, nil); err != nil {
		return nil, err
	}
	s.mig.mu.Lock()
	cancel := s.mig.cancel
	s.mig.mu.Unlock()
	if cancel == nil {
		return nil, fail(409, "no migration under way")
	}
	cancel()
	return s.migrateStatus(r)
}

// migrateHandler runs a migration to its end and answers with the report.
// On success the machine is stopped after the answer is written.
func (s *Server) migrateHandler(r *request) answer {
	if r.method != "POST" {
		a := jsonAnswer(405, Error{"use POST /migrate"})
		a.allow = "POST"
		return a
	}
	rep, err := s.migrate(r)
	if err != nil {
		return errorAnswer(err)
	}
	a := jsonAnswer(200, rep)
	if rep.OK {
		a.after = s.m.Stop
	}
	return a
}

func (s *Server) migrate(r *request) (*migrate.Report, error) {
	var req MigrateRequest
	if err := readBody(r, &req); err != nil {
		return nil, err
	}
	if req.To == "" {
		return nil, fail(400, `"to" is required`)
	}
	if req.DowntimeMS < 0 || req.MaxRounds < 0 || req.BandwidthMBps < 0 {
		return nil, fail(400, "negative downtime, rounds or bandwidth")
	}
	if req.Streams < 0 || req.Streams > migrate.MaxStreams {
		return nil, fail(400, "streams %d: want 1 to %d", req.Streams, migrate.MaxStreams)
	}
	switch req.Compress {
	case "", "auto", "always", "never":
	default:
		return nil, fail(400, "compress %q: want auto, always or never", req.Compress)
	}
	s.mu.Lock()
	if st := s.stateLocked(); st.State != StateRunning {
		s.mu.Unlock()
		return nil, fail(409, "the machine is %s", st.State)
	}
	s.mig.mu.Lock()
	if s.mig.active {
		s.mig.mu.Unlock()
		s.mu.Unlock()
		return nil, fail(409, "a migration is already under way")
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.mig.active, s.mig.cancel, s.mig.done = true, cancel, make(chan struct{})
	s.mig.progress, s.mig.report = migrate.Progress{Phase: "connecting"}, nil
	done := s.mig.done
	s.mig.mu.Unlock()
	s.mu.Unlock()

	opts := migrate.Options{
		Downtime:     time.Duration(req.DowntimeMS * float64(time.Millisecond)),
		MaxRounds:    req.MaxRounds,
		Bandwidth:    req.BandwidthMBps * 1e6,
		Compress:     req.Compress,
		AutoConverge: req.AutoConverge,
		Streams:      req.Streams,
		Progress: func(p migrate.Progress) {
			s.mig.mu.Lock()
			s.mig.progress = p
			s.mig.mu.Unlock()
		},
	}
	rep, err := migrate.Migrate(ctx, migrate.MachineSource(s.m), req.To, opts)
	s.mig.mu.Lock()
	s.mig.active, s.mig.cancel = false, nil
	s.mig.report = rep
	s.mig.migrated = err == nil
	close(done)
	s.mig.mu.Unlock()
	cancel()
	if err != nil {
		if errors.Is(err, migrate.ErrCanceled) {
			return nil, fail(409, "%v (the machine runs on here)", err)
		}
		if errors.Is(err, migrate.ErrInDoubt) {
			return nil, err
		}
		return nil, fail(502, "%v (the machine runs on here)", err)
	}
	return rep, nil
}
