package fuzz

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
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
// control API's real server (api.Server.ServeConn, over a net.Pipe)
// serving a real machine: a bare KVM VM of 16 MiB with one vCPU and no
// kernel (machine.NewBare; the API's Server takes a *machine.Machine, so
// there is no fake). The answer is read with net/http's own parser
// (http.ReadResponse), an independent check that it is well-formed HTTP.
// A method or path with a CR or LF is skipped: it would smuggle a second
// request past the fence below (FuzzAPIWire covers such bytes).
//
// Invariants: no panic; the status is one the API documents (200, 400,
// 404, 405, 409, 413, 431, 502, and 501 or 505 from the wire); the answer
// is JSON, an error answer is {"error": "..."} with a non-empty message, a
// 405 names the allowed method; the body is small; afterwards GET /state
// still answers with a sane state.
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
		{"GET", "/vcpus", ""},
		{"POST", "/vcpus", ""},
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
		if strings.ContainsAny(method+path, "\r\n") {
			return
		}
		srv := api.NewServer(m, snapshot.NewSession(m))
		if m.Paused() {
			m.Resume()
		}
		body = fence(body, dir, target)
		raw := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
			method, path, len(body), body)
		what := method + " " + strconv.Quote(path)
		resp, data := roundTrip(t, srv, raw, what)
		checkAnswer(t, what, resp, data)

		// The API still answers, with a sane state.
		resp, data = roundTrip(t, srv, "GET /state HTTP/1.1\r\nHost: fuzz\r\n\r\n", "GET /state")
		var st api.State
		if resp.StatusCode != http.StatusOK || json.Unmarshal(data, &st) != nil {
			t.Fatalf("GET /state after %s: %d %s", what, resp.StatusCode, data)
		}
		if st.State != api.StateRunning && st.State != api.StatePaused || st.MemSize != 16<<20 || st.CPUs != 1 {
			t.Fatalf("GET /state after %s: %+v", what, st)
		}
		if (st.State == api.StatePaused) != m.Paused() {
			t.Fatalf("GET /state says %s, machine paused %v", st.State, m.Paused())
		}
	})
}

// roundTrip sends raw to srv on a fresh connection, reads the answer with
// net/http's parser, and hangs up.
func roundTrip(t *testing.T, srv *api.Server, raw, what string) (*http.Response, []byte) {
	t.Helper()
	client, server := net.Pipe()
	defer client.Close()
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.ServeConn(server)
	}()
	// The server may answer (and hang up) before it read everything.
	go client.Write([]byte(raw))
	client.SetDeadline(time.Now().Add(20 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(client), nil)
	var data []byte
	if err == nil {
		data, err = io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	}
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			buf := make([]byte, 1<<20)
			t.Fatalf("%s hangs; goroutines:\n%s", what, buf[:runtime.Stack(buf, true)])
		}
		t.Fatalf("%s: reading the answer: %v", what, err)
	}
	client.Close()
	<-served
	return resp, data
}

// checkAnswer checks one answer of the API (see FuzzAPIRequest).
func checkAnswer(t *testing.T, what string, resp *http.Response, body []byte) {
	t.Helper()
	switch resp.StatusCode {
	case http.StatusOK, http.StatusBadRequest, http.StatusNotFound, http.StatusMethodNotAllowed,
		http.StatusConflict, http.StatusRequestEntityTooLarge, http.StatusRequestHeaderFieldsTooLarge,
		http.StatusBadGateway, http.StatusNotImplemented, http.StatusHTTPVersionNotSupported:
	default:
		t.Fatalf("%s: status %d: %s", what, resp.StatusCode, body)
	}
	if len(body) > 64<<10 {
		t.Fatalf("%s: answer of %d bytes", what, len(body))
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("%s: Content-Type %q (status %d: %s)", what, ct, resp.StatusCode, body)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if resp.StatusCode != http.StatusOK {
		dec.DisallowUnknownFields()
		var e api.Error
		if err := dec.Decode(&e); err != nil || e.Error == "" {
			t.Fatalf("%s: status %d with body %q (%v): want {\"error\": ...}", what, resp.StatusCode, body, err)
		}
		if resp.StatusCode == http.StatusMethodNotAllowed && resp.Header.Get("Allow") == "" {
			t.Fatalf("%s: 405 without Allow", what)
		}
		return
	}
	var v any // an object, or an array (GET /vcpus)
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("%s: 200 with body %q: %v", what, body, err)
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

// FuzzAPIWire feeds arbitrary bytes to the API server's HTTP/1.1 request
// parser (api.ReadRequest, what ServeConn reads requests with).
//
// Invariants: no panic; a refusal is one of the wire's statuses (400, 413,
// 431, 501, 505) or a plain error for input that ends early; an accepted
// request has a token method, a target without spaces or control bytes and
// a body within api.MaxBodyBytes, and reads back the same once written out
// again.
func FuzzAPIWire(f *testing.F) {
	for _, s := range []string{
		"GET /state HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST /snapshot HTTP/1.1\r\nContent-Length: 15\r\n\r\n{\"path\":\"x\"}",
		"POST /pause HTTP/1.0\nContent-Length: 0\n\n",
		"POST /pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		"POST /pause HTTP/1.1\r\nContent-Length: 2, 2\r\nExpect: 100-continue\r\n\r\n{}",
		"POST /pause HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}",
		"POST /pause HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
		"GET /state HTTP/2.0\r\n\r\n",
		"GET /state HTTP/1.1\r\n folded\r\n\r\n",
		"GET  /state HTTP/1.1\r\n\r\n",
		"GET /state HTTP/1.1\r\nHost: x",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		method, target, body, status, err := api.ReadRequest(bufio.NewReader(bytes.NewReader(raw)))
		switch status {
		case 0, 400, 413, 431, 501, 505:
			if err == nil {
				t.Fatalf("status %d without an error", status)
			}
			return
		case 200:
		default:
			t.Fatalf("status %d (%v)", status, err)
		}
		if err != nil {
			t.Fatalf("accepted with an error: %v", err)
		}
		if method == "" || strings.ContainsAny(method, " \t\r\n:/") || target == "" ||
			strings.IndexFunc(target, func(r rune) bool { return r <= ' ' || r == 0x7f }) >= 0 {
			t.Fatalf("accepted method %q target %q", method, target)
		}
		if len(body) > api.MaxBodyBytes {
			t.Fatalf("accepted a body of %d bytes", len(body))
		}
		again := fmt.Sprintf("%s %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s", method, target, len(body), body)
		m2, t2, b2, s2, err := api.ReadRequest(bufio.NewReader(strings.NewReader(again)))
		if s2 != 200 || m2 != method || t2 != target || !bytes.Equal(b2, body) {
			t.Fatalf("%q reads back as %q %q %q status %d (%v)", again, m2, t2, b2, s2, err)
		}
	})
}
