package cow

import (
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
)

// crashFile is storage in memory that knows what is durable. Reads see
// every write (the page cache). At the crash point, the op under way and
// all later ones fail, and the image a reboot would find is computed:
//
//   - killMode (kill -9): every completed op survives (the page cache is
//     intact) and the interrupted one is torn: a data write at a sector
//     boundary, a table slot write at any byte;
//   - powerMode (power loss, sector writes atomic): each sector touched
//     since the last Datasync independently holds its content after a
//     random prefix of the ops that touched it, the interrupted one
//     included.
type crashFile struct {
	mu         sync.Mutex
	durable    []byte
	cur        []byte
	ops        []fop // since the last Datasync
	count      int   // mutating ops so far
	crashAfter int   // crash on this op (0: never)
	mode       crashMode
	rng        *rand.Rand
	image      []byte // set at the crash
	writes     int
	syncs      int
}

type crashMode int

const (
	killMode crashMode = iota
	powerMode
)

type fop struct {
	off  int64
	data []byte
}

var errCrashed = errors.New("crashed")

func newCrashFile(img []byte, crashAfter int, mode crashMode, rng *rand.Rand) *crashFile {
	return &crashFile{durable: clone(img), cur: clone(img), crashAfter: crashAfter, mode: mode, rng: rng}
}

func clone(b []byte) []byte { return append([]byte(nil), b...) }

func (c *crashFile) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.image != nil {
		return 0, errCrashed
	}
	if off >= int64(len(c.cur)) {
		return 0, io.EOF
	}
	n := copy(p, c.cur[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// step counts a mutating op and crashes if it is the chosen one; torn is
// the op itself, part of which may land.
func (c *crashFile) step(torn *fop) bool {
	if c.image != nil {
		return true
	}
	c.count++
	if c.count != c.crashAfter {
		return false
	}
	c.crash(torn)
	return true
}

// crash computes the image a reboot would find.
func (c *crashFile) crash(torn *fop) {
	ops := c.ops
	if torn != nil {
		ops = append(ops[:len(ops):len(ops)], *torn)
	}
	img := clone(c.durable)
	put := func(off int64, b []byte) {
		if end := off + int64(len(b)); end > int64(len(img)) {
			img = append(img, make([]byte, end-int64(len(img)))...)
		}
		copy(img[off:], b)
	}
	switch c.mode {
	case killMode:
		for i, o := range ops {
			if torn != nil && i == len(ops)-1 {
				// A killed pwrite stops between pages; tear data at a
				// sector boundary, a table slot at any byte.
				k := c.rng.IntN(len(o.data) + 1)
				if len(o.data) >= sector {
					k = int(max(0, (o.off+int64(k))/sector*sector-o.off))
				}
				o.data = o.data[:k]
			}
			put(o.off, o.data)
		}
	case powerMode:
		// Per sector, the ops touching it in order; apply a random prefix.
		touch := map[int64][]int{}
		var order []int64
		for i, o := range ops {
			for s := o.off / sector; s*sector < o.off+int64(len(o.data)); s++ {
				if touch[s] == nil {
					order = append(order, s)
				}
				touch[s] = append(touch[s], i)
			}
		}
		for _, s := range order {
			k := c.rng.IntN(len(touch[s]) + 1)
			for _, i := range touch[s][:k] {
				o := ops[i]
				lo, hi := max(o.off, s*sector), min(o.off+int64(len(o.data)), (s+1)*sector)
				put(lo, o.data[lo-o.off:hi-o.off])
			}
		}
	}
	c.image = img
}

func (c *crashFile) apply(o fop) {
	if end := o.off + int64(len(o.data)); end > int64(len(c.cur)) {
		c.cur = append(c.cur, make([]byte, end-int64(len(c.cur)))...)
	}
	copy(c.cur[o.off:], o.data)
	c.ops = append(c.ops, o)
}

func (c *crashFile) WriteAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	o := fop{off, clone(p)}
	if c.step(&o) {
		return 0, errCrashed
	}
	c.writes++
	c.apply(o)
	return len(p), nil
}

func (c *crashFile) Punch(off, n int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	n = max(0, min(n, int64(len(c.cur))-off))
	o := fop{off, make([]byte, n)}
	if c.step(&o) {
		return errCrashed
	}
	c.apply(o)
	return nil
}

func (c *crashFile) Datasync() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.step(nil) {
		return errCrashed
	}
	c.syncs++
	c.durable = clone(c.cur)
	c.ops = c.ops[:0]
	return nil
}

func (c *crashFile) Size() (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return int64(len(c.cur)), nil
}

func (c *crashFile) Close() error { return nil }

// crashImage crashes now if the crash point was not reached.
func (c *crashFile) crashImage() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.image == nil {
		c.crash(nil)
	}
	return c.image
}

// TestCrashSimulation runs random writes, discards and syncs against an
// overlay on a crashFile, crashes at a random op (inside Sync included),
// reopens the image, and checks: everything acknowledged by a completed
// Sync reads back; every other sector reads its acknowledged value or one
// written after; the base is unchanged. Then it goes on from the
// recovered image for a second crash.
func TestCrashSimulation(t *testing.T) {
	const cs = 4096
	d := newTestDisk(t, 200*1024+3*512, 256*1024, cs)
	nsec := int64(256 * 1024 / sector)
	img0, err := os.ReadFile(d.ovPath)
	if err != nil {
		t.Fatal(err)
	}
	seeds := 300
	if testing.Short() {
		seeds = 40
	}
	for _, mode := range []crashMode{killMode, powerMode} {
		for seed := range seeds {
			rng := rand.New(rand.NewPCG(uint64(seed), uint64(mode)))
			m := newModel(nsec, d.base)
			img := img0
			buf := make([]byte, 3*cs+sector)
			for round := range 2 {
				// Each op is about 1 to 4 storage ops; crash somewhere in
				// the workload or at its end.
				ops := genOps(uint64(seed*10+round), int64(round)*1_000_000, 120, nsec, cs)
				cf := newCrashFile(img, 1+rng.IntN(400), mode, rng)
				ov, err := openStorage(d.ovPath, cf, d.basePath, false)
				if err != nil {
					t.Fatalf("mode %d seed %d round %d: open: %v", mode, seed, round, err)
				}
				for _, o := range ops {
					err := do(ov, o, buf)
					if err != nil {
						if !errors.Is(err, errCrashed) {
							t.Fatalf("mode %d seed %d: op %+v: %v", mode, seed, o, err)
						}
						// The op may have partly happened.
						if o.kind != 's' {
							m.apply(o)
						}
						break
					}
					if o.kind == 's' {
						m.ack()
					} else {
						m.apply(o)
						if rng.IntN(4) == 0 {
							m.checkCur(t, ov, o.first, o.count)
						}
					}
				}
				img = cf.crashImage()
				ov.baseFile.Close()
				rf := newCrashFile(img, 0, mode, rng)
				re, err := openStorage(d.ovPath, rf, d.basePath, false)
				if err != nil {
					t.Fatalf("mode %d seed %d round %d: reopening after the crash: %v", mode, seed, round, err)
				}
				m.verify(t, re, true)
				re.baseFile.Close()
				if t.Failed() {
					t.Fatalf("mode %d seed %d round %d", mode, seed, round)
				}
			}
		}
	}
	if fileHash(t, d.basePath) != d.baseHash {
		t.Fatal("the base changed")
	}
}
