package fuzz

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"collective/api"
	"collective/internal/testenv"
	"collective/machine"
	"collective/snapshot"
)

// FuzzAPIRequest sends arbitrary requests (method, path, body) to the
// control API's real handler (api.Server.Handler) serving a real machine:
// a bare KVM VM of 16 MiB with one vCPU and no kernel (machine.NewBare;
// the API's Server takes a *machine.Machine, so there is no fake). The
// request goes through net/http's own parser (http.ReadRequest), as it
// would from the socket; inputs it refuses are skipped (the server answers
// them with 400 before any handler runs).
//
// Invariants: no panic; the status is one the API documents (200, 400,
// 404, 405, 409, 413, 502; 301/307/308 from the mux for unclean paths);
// the answer is JSON, an error answer is {"error": "..."} with a
// non-empty message, a 405 names the allowed method; the body is small;
// afterwards GET /state still answers with a sane state.
//
// Side effects are fenced: a body that would pass the API's strict decoding
// as a snapshot request has its path moved into the test's temporary
// directory, and a migration request's target becomes a local listener that
// hangs up at once
// (the mirror uses the same decoder and types, so it cannot miss one the
// API accepts). Each input gets a fresh Server and snapshot session and
// finds the machine running. A request still unanswered after 20 s fails
// the input (a hang is a finding), with every goroutine's stack.
func FuzzAPIRequest(f *testing.F) {
	testenv.RequireKVM(f)
	m, err := machine.NewBare(machine.Config{MemSize: 16 << 20, CPUs: 1})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { m.Close() })
	dir := f.TempDir()
	// Migration targets: a listener that hangs up on every connection.
	// (Not a closed port: an outgoing connection's ephemeral port can be
	// that very port, and TCP then connects the socket to itself.)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	target := l.Addr().String()

	for _, s := range []struct{ method, path, body string }{
		{"GET", "/state", ""},
		{"POST", "/pause", ""},
		{"POST", "/resume", "{}"},
		{"POST", "/snapshot", `{"path":"x.snap"}`},
		{"POST", "/snapshot", `{"path":"x.snap","incremental":true}`},
		{"POST", "/snapshot", `{"path":"x.snap","raw":true,"incremental":true}`},
		{"POST", "/snapshot", `{"path":""}`},
		{"POST", "/snapshot", `{"path":"a"}{"path":"b"}`},
		{"POST", "/snapshot", `{"path":"a","bogus":1}`},
		{"POST", "/migrate", `{"to":"127.0.0.1:1","downtime_ms":-1}`},
		{"POST", "/migrate", `{"to":"127.0.0.1:1","compress":"zstd"}`},
		{"POST", "/migrate", `{"to":"127.0.0.1:1","downtime_ms":1e308,"max_rounds":1}`},
		{"GET", "/migrate/status", ""},
		{"POST", "/migrate/cancel", ""},
		{"DELETE", "/state", ""},
		{"GET", "/migrate", ""},
		{"POST", "//pause/../resume", ""},
		{"POST", "/pause", "not json"},
		{"POST", "/snapshot", strings.Repeat(" ", api.MaxBodyBytes+1)},
		{"GET", "/%2e%2e/state", ""},
	} {
		f.Add(s.method, s.path, []byte(s.body))
	}

	f.Fuzz(func(t *testing.T, method, path string, body []byte) {
		srv := api.NewServer(m, snapshot.NewSession(m))
		h := srv.Handler()
		if m.Paused() {
			m.Resume()
		}
		body = fence(body, dir, target)
		raw := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n",
			method, path, len(body))
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw + string(body))))
		if err != nil {
			return // net/http answers 400 itself
		}
		w := httptest.NewRecorder()
		done := make(chan struct{})
		go func() {
			defer close(done)
			h.ServeHTTP(w, req)
		}()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			buf := make([]byte, 1<<20)
			t.Fatalf("%s %q hangs; goroutines:\n%s", method, path, buf[:runtime.Stack(buf, true)])
		}
		checkAnswer(t, req, w)

		// The API still answers, with a sane state.
		req, _ = http.NewRequest("GET", "/state", nil)
		w = httptest.NewRecorder()
		h.ServeHTTP(w, req)
		var st api.State
		if w.Code != http.StatusOK || json.Unmarshal(w.Body.Bytes(), &st) != nil {
			t.Fatalf("GET /state after %s %q: %d %s", method, path, w.Code, w.Body)
		}
		if st.State != api.StateRunning && st.State != api.StatePaused || st.MemSize != 16<<20 || st.CPUs != 1 {
			t.Fatalf("GET /state after %s %q: %+v", method, path, st)
		}
		if (st.State == api.StatePaused) != m.Paused() {
			t.Fatalf("GET /state says %s, machine paused %v", st.State, m.Paused())
		}
	})
}

// checkAnswer checks one answer of the API (see FuzzAPIRequest).
func checkAnswer(t *testing.T, req *http.Request, w *httptest.ResponseRecorder) {
	t.Helper()
	what := req.Method + " " + strconv.Quote(req.RequestURI)
	switch w.Code {
	case http.StatusMovedPermanently, http.StatusTemporaryRedirect, http.StatusPermanentRedirect:
		if w.Header().Get("Location") == "" {
			t.Fatalf("%s: %d without a Location", what, w.Code)
		}
		return
	case http.StatusOK, http.StatusBadRequest, http.StatusNotFound, http.StatusMethodNotAllowed,
		http.StatusConflict, http.StatusRequestEntityTooLarge, http.StatusBadGateway:
	default:
		t.Fatalf("%s: status %d: %s", what, w.Code, w.Body)
	}
	if w.Body.Len() > 64<<10 {
		t.Fatalf("%s: answer of %d bytes", what, w.Body.Len())
	}
	if ct := w.Header().Get("Content-Type"); ct != "application/json" {
		t.Fatalf("%s: Content-Type %q (status %d: %s)", what, ct, w.Code, w.Body)
	}
	dec := json.NewDecoder(bytes.NewReader(w.Body.Bytes()))
	if w.Code != http.StatusOK {
		dec.DisallowUnknownFields()
		var e api.Error
		if err := dec.Decode(&e); err != nil || e.Error == "" {
			t.Fatalf("%s: status %d with body %q (%v): want {\"error\": ...}", what, w.Code, w.Body, err)
		}
		if w.Code == http.StatusMethodNotAllowed && w.Header().Get("Allow") == "" {
			t.Fatalf("%s: 405 without Allow", what)
		}
		return
	}
	var v map[string]any
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("%s: 200 with body %q: %v", what, w.Body, err)
	}
}

// fence rewrites a body the API would accept as a snapshot or migration
// request so that its side effects stay in dir or go to target.
func fence(body []byte, dir, target string) []byte {
	strict := func(v any) bool {
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.DisallowUnknownFields()
		return dec.Decode(v) == nil && !dec.More()
	}
	var sr api.SnapshotRequest
	if strict(&sr) && sr.Path != "" {
		sr.Path = filepath.Join(dir, "snap")
		b, _ := json.Marshal(sr)
		return b
	}
	var mr api.MigrateRequest
	if strict(&mr) && mr.To != "" {
		mr.To = target
		b, _ := json.Marshal(mr)
		return b
	}
	return body
}
