package migrate

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"

	"collective/machine"
)

// fill sets every exported field reachable from v to pseudo-random
// values (slices of 0-3 elements, pointers set or nil).
func fill(v reflect.Value, r *rand.Rand) {
	switch v.Kind() {
	case reflect.Bool:
		v.SetBool(r.IntN(2) == 1)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		v.SetInt(int64(r.Uint64()) >> (64 - v.Type().Bits()))
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		v.SetUint(r.Uint64() >> (64 - v.Type().Bits()))
	case reflect.Float32, reflect.Float64:
		v.SetFloat(float64(r.IntN(1000)) / 8)
	case reflect.String:
		v.SetString([]string{"", "a", "virtio-blk", "1.1.0"}[r.IntN(4)])
	case reflect.Array:
		for i := 0; i < v.Len(); i++ {
			fill(v.Index(i), r)
		}
	case reflect.Slice:
		if r.IntN(4) == 0 {
			return // nil
		}
		n := r.IntN(4)
		s := reflect.MakeSlice(v.Type(), n, n)
		for i := 0; i < n; i++ {
			fill(s.Index(i), r)
		}
		v.Set(s)
	case reflect.Pointer:
		if r.IntN(4) == 0 {
			return
		}
		e := reflect.New(v.Type().Elem())
		fill(e.Elem(), r)
		v.Set(e)
	case reflect.Struct:
		for _, i := range cachedFields(v.Type()) {
			fill(v.Field(i), r)
		}
	}
}

func TestStateBinaryRoundTrip(t *testing.T) {
	if _, ok := stateFingerprint(); !ok {
		t.Fatal("machine.MachineState has a kind the binary encoding does not cover")
	}
	for seed := uint64(0); seed < 200; seed++ {
		st := new(machine.MachineState)
		fill(reflect.ValueOf(st).Elem(), rand.New(rand.NewPCG(seed, 1)))
		b := encodeStateBinary(nil, st)
		got, err := decodeStateBinary(b)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		if !reflect.DeepEqual(got, st) {
			t.Fatalf("seed %d: the decoded state differs", seed)
		}
		// The same state as JSON, field for field.
		j1, _ := json.Marshal(st)
		j2, _ := json.Marshal(got)
		if !bytes.Equal(j1, j2) {
			t.Fatalf("seed %d: JSON of the decoded state differs", seed)
		}
		// Every truncation and a trailing byte are refused, without a panic.
		for n := 0; n < len(b); n += 1 + n/16 {
			if _, err := decodeStateBinary(b[:n]); err == nil {
				t.Fatalf("seed %d: truncated to %d of %d bytes: no error", seed, n, len(b))
			}
		}
		if _, err := decodeStateBinary(append(b, 0)); err == nil {
			t.Fatalf("seed %d: a trailing byte: no error", seed)
		}
	}
}

// The binary encoding is what takes the state out of the downtime: log
// its cost next to JSON's.
func TestStateBinaryCost(t *testing.T) {
	st := new(machine.MachineState)
	fill(reflect.ValueOf(st).Elem(), rand.New(rand.NewPCG(7, 7)))
	const n = 50
	t0 := time.Now()
	var b []byte
	for i := 0; i < n; i++ {
		b = encodeStateBinary(b[:0], st)
	}
	t1 := time.Now()
	for i := 0; i < n; i++ {
		decodeStateBinary(b)
	}
	t2 := time.Now()
	var j []byte
	for i := 0; i < n; i++ {
		j, _ = json.Marshal(st)
	}
	t3 := time.Now()
	for i := 0; i < n; i++ {
		var m machine.MachineState
		json.Unmarshal(j, &m)
	}
	t4 := time.Now()
	t.Logf("binary %d B: encode %v, decode %v; JSON %d B: encode %v, decode %v",
		len(b), t1.Sub(t0)/n, t2.Sub(t1)/n, len(j), t3.Sub(t2)/n, t4.Sub(t3)/n)
}
