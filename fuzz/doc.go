// Package fuzz holds the Go native fuzz targets for every parser of
// guest, file or wire input: device registers, descriptor chains, kernel
// loaders, and (as they land) snapshots, the migration stream and the API.
//
// Each target drives the real code over fake guest memory and checks
// invariants, not just the absence of a panic. Run one with
//
//	go test ./fuzz -run='^$' -fuzz='^FuzzSerial$' -fuzztime=30s
//
// or all of them for a bounded time with `make fuzz FUZZTIME=30s`.
package fuzz
