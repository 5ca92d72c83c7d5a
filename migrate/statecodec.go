package migrate

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"reflect"
	"strconv"
	"strings"
	"sync"

	"collective/machine"
)

// The binary state encoding (state frame encoding encBinary, protocol
// 1.2). The machine state's JSON costs about 0.6 ms to decode and 0.1 ms
// to encode, both inside the downtime; this encoding takes tens of
// microseconds. It is a plain walk of machine.MachineState's Go type:
// exported fields (those JSON carries, in declaration order), integers as
// varints, bools as one byte 0 or 1, strings and byte slices as a uvarint
// length and their bytes, byte arrays as their bytes, other arrays element
// by element, slices and pointers behind a presence byte (0 nil, 1 set),
// slices then a uvarint length. It has no field names, so it is used only
// when both ends have the same type: the source announces the SHA-256/128
// of a description of the type tree (field names, kinds, array lengths) in
// its hello, and the target asks for the binary encoding in its welcome
// only if its own fingerprint is the same; otherwise the state goes as
// JSON.
//
// Decoding is strict: every length is bounded by the bytes left (times
// the smallest encoding of an element), integers must fit their field,
// and the input must be consumed exactly. The decoded state is then
// validated as a JSON one is.

var (
	codecOnce sync.Once
	codecFP   [hashSize]byte
	codecOK   bool
)

// Warm computes, in the background, what every migration needs first and
// builds once per process (the state type's fingerprint, 0.3 ms here; the
// CRC-32C tables, 0.2 ms): a process that may migrate calls it early, so
// that its first migration does not pay for them at its start.
func Warm() {
	go func() {
		stateFingerprint()
		castagnoli()
	}()
}

// stateFingerprint returns the fingerprint of machine.MachineState's
// layout, and false if the type has a kind the binary encoding does not
// cover (the state then always goes as JSON).
func stateFingerprint() ([hashSize]byte, bool) {
	codecOnce.Do(func() {
		var b strings.Builder
		if err := describe(&b, reflect.TypeFor[machine.MachineState](), map[reflect.Type]bool{}); err != nil {
			return
		}
		sum := sha256.Sum256([]byte(b.String()))
		copy(codecFP[:], sum[:])
		codecOK = true
	})
	return codecFP, codecOK
}

// wireFields returns the struct fields the encoding carries: the ones
// encoding/json would (exported, not tagged "-").
func wireFields(t reflect.Type) ([]int, error) {
	var out []int
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			if f.Anonymous && f.Type.Kind() == reflect.Struct && f.Name != "_" && f.Type.Name() != "HostLayout" {
				return nil, fmt.Errorf("embedded unexported struct %s", f.Type)
			}
			continue
		}
		if tag, _, _ := strings.Cut(f.Tag.Get("json"), ","); tag == "-" && !strings.HasPrefix(f.Tag.Get("json"), "-,") {
			continue
		}
		out = append(out, i)
	}
	return out, nil
}

var (
	jsonMarshaler = reflect.TypeFor[interface{ MarshalJSON() ([]byte, error) }]()
	textMarshaler = reflect.TypeFor[interface{ MarshalText() ([]byte, error) }]()
)

func describe(b *strings.Builder, t reflect.Type, open map[reflect.Type]bool) error {
	if t.Implements(jsonMarshaler) || reflect.PointerTo(t).Implements(jsonMarshaler) ||
		t.Implements(textMarshaler) || reflect.PointerTo(t).Implements(textMarshaler) {
		return fmt.Errorf("%s has its own JSON form", t)
	}
	switch t.Kind() {
	case reflect.Bool, reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr,
		reflect.Float32, reflect.Float64, reflect.String:
		b.WriteString(t.Kind().String())
	case reflect.Array:
		b.WriteString("[" + strconv.Itoa(t.Len()) + "]")
		return describe(b, t.Elem(), open)
	case reflect.Slice:
		b.WriteString("[]")
		return describe(b, t.Elem(), open)
	case reflect.Pointer:
		b.WriteString("*")
		return describe(b, t.Elem(), open)
	case reflect.Struct:
		if open[t] {
			return fmt.Errorf("recursive type %s", t)
		}
		open[t] = true
		defer delete(open, t)
		fs, err := wireFields(t)
		if err != nil {
			return err
		}
		fieldCache.Store(t, fs) // ready before the first encoding, in a downtime
		b.WriteString("{")
		for _, i := range fs {
			b.WriteString(t.Field(i).Name + " ")
			if err := describe(b, t.Field(i).Type, open); err != nil {
				return err
			}
			b.WriteString(";")
		}
		b.WriteString("}")
	default:
		return fmt.Errorf("kind %s", t.Kind())
	}
	return nil
}

// fieldCache holds wireFields per struct type (the type was checked by
// stateFingerprint).
var fieldCache sync.Map

func cachedFields(t reflect.Type) []int {
	if f, ok := fieldCache.Load(t); ok {
		return f.([]int)
	}
	f, _ := wireFields(t)
	fieldCache.Store(t, f)
	return f
}

// encodeStateBinary appends st's binary encoding to dst.
func encodeStateBinary(dst []byte, st *machine.MachineState) []byte {
	return appendValue(dst, reflect.ValueOf(st).Elem())
}

func appendValue(b []byte, v reflect.Value) []byte {
	switch v.Kind() {
	case reflect.Bool:
		if v.Bool() {
			return append(b, 1)
		}
		return append(b, 0)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return binary.AppendVarint(b, v.Int())
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return binary.AppendUvarint(b, v.Uint())
	case reflect.Float32, reflect.Float64:
		return binary.LittleEndian.AppendUint64(b, math.Float64bits(v.Float()))
	case reflect.String:
		b = binary.AppendUvarint(b, uint64(v.Len()))
		return append(b, v.String()...)
	case reflect.Array:
		if v.Type().Elem().Kind() == reflect.Uint8 && v.CanAddr() {
			return append(b, v.Bytes()...)
		}
		for i := 0; i < v.Len(); i++ {
			b = appendValue(b, v.Index(i))
		}
		return b
	case reflect.Slice:
		if v.IsNil() {
			return append(b, 0)
		}
		b = append(b, 1)
		b = binary.AppendUvarint(b, uint64(v.Len()))
		if v.Type().Elem().Kind() == reflect.Uint8 {
			return append(b, v.Bytes()...)
		}
		for i := 0; i < v.Len(); i++ {
			b = appendValue(b, v.Index(i))
		}
		return b
	case reflect.Pointer:
		if v.IsNil() {
			return append(b, 0)
		}
		return appendValue(append(b, 1), v.Elem())
	case reflect.Struct:
		for _, i := range cachedFields(v.Type()) {
			b = appendValue(b, v.Field(i))
		}
		return b
	}
	panic("migrate: binary state: unexpected kind " + v.Kind().String()) // excluded by stateFingerprint
}

var errStateBinary = errors.New("binary state: malformed")

// decodeStateBinary decodes a binary state; the input must be consumed
// exactly.
func decodeStateBinary(p []byte) (*machine.MachineState, error) {
	st := new(machine.MachineState)
	d := stateDecoder{p: p}
	if err := d.value(reflect.ValueOf(st).Elem()); err != nil {
		return nil, err
	}
	if len(d.p) != 0 {
		return nil, fmt.Errorf("%w: %d bytes after the state", errStateBinary, len(d.p))
	}
	return st, nil
}

type stateDecoder struct{ p []byte }

func (d *stateDecoder) uvarint() (uint64, error) {
	x, n := binary.Uvarint(d.p)
	if n <= 0 {
		return 0, fmt.Errorf("%w: bad varint", errStateBinary)
	}
	d.p = d.p[n:]
	return x, nil
}

func (d *stateDecoder) byte1() (byte, error) {
	if len(d.p) < 1 {
		return 0, fmt.Errorf("%w: short", errStateBinary)
	}
	c := d.p[0]
	d.p = d.p[1:]
	return c, nil
}

func (d *stateDecoder) bytes(n uint64) ([]byte, error) {
	if n > uint64(len(d.p)) {
		return nil, fmt.Errorf("%w: %d bytes wanted, %d left", errStateBinary, n, len(d.p))
	}
	b := d.p[:n]
	d.p = d.p[n:]
	return b, nil
}

// minSize is the fewest bytes a value of type t encodes to (at least 1),
// so that a claimed length can be checked against the bytes left.
func minSize(t reflect.Type) uint64 {
	switch t.Kind() {
	case reflect.Float32, reflect.Float64:
		return 8
	case reflect.Array:
		return max(1, uint64(t.Len())*minSize(t.Elem()))
	case reflect.Struct:
		var n uint64
		for _, i := range cachedFields(t) {
			n += minSize(t.Field(i).Type)
		}
		return max(1, n)
	}
	return 1
}

func (d *stateDecoder) value(v reflect.Value) error {
	switch v.Kind() {
	case reflect.Bool:
		c, err := d.byte1()
		if err != nil {
			return err
		}
		if c > 1 {
			return fmt.Errorf("%w: bool %d", errStateBinary, c)
		}
		v.SetBool(c == 1)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		x, n := binary.Varint(d.p)
		if n <= 0 {
			return fmt.Errorf("%w: bad varint", errStateBinary)
		}
		d.p = d.p[n:]
		if v.OverflowInt(x) {
			return fmt.Errorf("%w: %d overflows %s", errStateBinary, x, v.Type())
		}
		v.SetInt(x)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		x, err := d.uvarint()
		if err != nil {
			return err
		}
		if v.OverflowUint(x) {
			return fmt.Errorf("%w: %d overflows %s", errStateBinary, x, v.Type())
		}
		v.SetUint(x)
	case reflect.Float32, reflect.Float64:
		b, err := d.bytes(8)
		if err != nil {
			return err
		}
		f := math.Float64frombits(binary.LittleEndian.Uint64(b))
		if v.OverflowFloat(f) {
			return fmt.Errorf("%w: %g overflows %s", errStateBinary, f, v.Type())
		}
		v.SetFloat(f)
	case reflect.String:
		n, err := d.uvarint()
		if err != nil {
			return err
		}
		b, err := d.bytes(n)
		if err != nil {
			return err
		}
		v.SetString(string(b))
	case reflect.Array:
		if v.Type().Elem().Kind() == reflect.Uint8 {
			b, err := d.bytes(uint64(v.Len()))
			if err != nil {
				return err
			}
			copy(v.Bytes(), b) // v is addressable: reached through a pointer
			return nil
		}
		for i := 0; i < v.Len(); i++ {
			if err := d.value(v.Index(i)); err != nil {
				return err
			}
		}
	case reflect.Slice:
		c, err := d.byte1()
		if err != nil || c == 0 {
			return err
		}
		if c != 1 {
			return fmt.Errorf("%w: slice presence %d", errStateBinary, c)
		}
		n, err := d.uvarint()
		if err != nil {
			return err
		}
		et := v.Type().Elem()
		if n > uint64(len(d.p))/minSize(et) {
			return fmt.Errorf("%w: %d elements in %d bytes", errStateBinary, n, len(d.p))
		}
		if et.Kind() == reflect.Uint8 {
			b, _ := d.bytes(n)
			s := reflect.MakeSlice(v.Type(), int(n), int(n))
			copy(s.Bytes(), b)
			v.Set(s)
			return nil
		}
		s := reflect.MakeSlice(v.Type(), int(n), int(n))
		for i := 0; i < int(n); i++ {
			if err := d.value(s.Index(i)); err != nil {
				return err
			}
		}
		v.Set(s)
	case reflect.Pointer:
		c, err := d.byte1()
		if err != nil || c == 0 {
			return err
		}
		if c != 1 {
			return fmt.Errorf("%w: pointer presence %d", errStateBinary, c)
		}
		e := reflect.New(v.Type().Elem())
		if err := d.value(e.Elem()); err != nil {
			return err
		}
		v.Set(e)
	case reflect.Struct:
		for _, i := range cachedFields(v.Type()) {
			if err := d.value(v.Field(i)); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("%w: kind %s", errStateBinary, v.Kind())
	}
	return nil
}
