package virtioblk

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestWritevManyBuffers writes more buffers than one pwritev takes, of
// uneven sizes, and finds them in order in the file.
func TestWritevManyBuffers(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var bufs [][]byte
	var want []byte
	for i := range iovMax*2 + 7 {
		b := bytes.Repeat([]byte{byte(i)}, 1+i%5)
		bufs = append(bufs, b)
		want = append(want, b...)
	}
	n, err := writev(int(f.Fd()), bufs, 100)
	if err != nil || n != int64(len(want)) {
		t.Fatalf("writev: %d, %v; want %d bytes", n, err, len(want))
	}
	got, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:100], make([]byte, 100)) || !bytes.Equal(got[100:], want) {
		t.Error("the file does not hold the buffers in order at the offset")
	}
}
