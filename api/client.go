package api

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"collective/migrate"
)

// Client calls a machine's API over its Unix socket.
type Client struct {
	hc *http.Client
}

// NewClient returns a client of the API served at socket path.
func NewClient(path string) *Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}
	return &Client{hc: &http.Client{Transport: tr, Timeout: 10 * time.Minute}}
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
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://collective"+path, body)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("api: %w", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("api: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		var e Error
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			e.Error = string(data)
		}
		return &APIError{resp.StatusCode, e.Error}
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("api: bad answer: %w", err)
		}
	}
	return nil
}

// State calls GET /state.
func (c *Client) State() (State, error) {
	var s State
	return s, c.Do(http.MethodGet, "/state", nil, &s)
}

// Pause calls POST /pause.
func (c *Client) Pause() (State, error) {
	var s State
	return s, c.Do(http.MethodPost, "/pause", nil, &s)
}

// Resume calls POST /resume.
func (c *Client) Resume() (State, error) {
	var s State
	return s, c.Do(http.MethodPost, "/resume", nil, &s)
}

// Snapshot calls POST /snapshot.
func (c *Client) Snapshot(req SnapshotRequest) (SnapshotResult, error) {
	var r SnapshotResult
	return r, c.Do(http.MethodPost, "/snapshot", req, &r)
}

// Migrate calls POST /migrate, which returns when the migration ends.
func (c *Client) Migrate(req MigrateRequest) (migrate.Report, error) {
	var r migrate.Report
	return r, c.Do(http.MethodPost, "/migrate", req, &r)
}

// MigrateStatus calls GET /migrate/status.
func (c *Client) MigrateStatus() (MigrateStatus, error) {
	var s MigrateStatus
	return s, c.Do(http.MethodGet, "/migrate/status", nil, &s)
}

// MigrateCancel calls POST /migrate/cancel.
func (c *Client) MigrateCancel() (MigrateStatus, error) {
	var s MigrateStatus
	return s, c.Do(http.MethodPost, "/migrate/cancel", nil, &s)
}
