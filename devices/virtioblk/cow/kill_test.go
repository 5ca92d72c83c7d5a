package cow

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The kill -9 test re-executes the test binary as a child that runs a
// workload on a real overlay and prints "ack N" after each Sync that
// returned (ops [0, N) are then durable). The parent kills it with
// SIGKILL at a random moment, reopens the overlay and checks it against
// the model, then starts the next round on the same file.
const (
	killEnv     = "COW_KILL_CHILD"
	killOps     = 4000
	killCluster = 16 << 10
	killSize    = 2 << 20
)

func TestKillChild(t *testing.T) {
	args := os.Getenv(killEnv)
	if args == "" {
		t.Skip("the child of TestKill9")
	}
	var ov, base string
	var seed uint64
	var round int64
	if _, err := fmt.Sscan(args, &ov, &base, &seed, &round); err != nil {
		t.Fatal(err)
	}
	o, err := Open(ov, base, false)
	if err != nil {
		fmt.Printf("error %v\n", err)
		os.Exit(1)
	}
	fmt.Println("ready")
	buf := make([]byte, 4*killCluster)
	for i, op := range genOps(seed, round*1_000_000, killOps, killSize/sector, killCluster) {
		if err := do(o, op, buf); err != nil {
			fmt.Printf("error op %d: %v\n", i, err)
			os.Exit(1)
		}
		if op.kind == 's' {
			fmt.Printf("ack %d\n", i+1)
		}
	}
	fmt.Println("done")
	time.Sleep(time.Hour) // wait for the kill
}

func TestKill9(t *testing.T) {
	if os.Getenv(killEnv) != "" {
		t.Skip("in the child")
	}
	d := newTestDisk(t, killSize-3*killCluster+1536, killSize, killCluster)
	m := newModel(killSize/sector, d.base)
	rounds := 10
	if testing.Short() {
		rounds = 3
	}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 9))
	var totalAcks, finished int
	for round := range rounds {
		seed := rng.Uint64()
		cmd := exec.Command(os.Args[0], "-test.run=^TestKillChild$", "-test.v=false")
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %s %d %d", killEnv, d.ovPath, d.basePath, seed, round+1))
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		var lines []string
		ready := make(chan struct{})
		readDone := make(chan struct{})
		go func() {
			defer close(readDone)
			sc := bufio.NewScanner(out)
			once := sync.OnceFunc(func() { close(ready) })
			for sc.Scan() {
				mu.Lock()
				lines = append(lines, sc.Text())
				mu.Unlock()
				once()
			}
			once()
		}()
		<-ready
		time.Sleep(time.Duration(2+rng.IntN(150)) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		<-readDone
		cmd.Wait()

		acked := 0
		for _, l := range lines {
			switch {
			case strings.HasPrefix(l, "ack "):
				n, _ := strconv.Atoi(l[4:])
				acked = max(acked, n)
			case strings.HasPrefix(l, "error"):
				t.Fatalf("round %d: child: %s", round, l)
			case l == "done":
				finished++
			}
		}
		totalAcks += acked
		ops := genOps(seed, int64(round+1)*1_000_000, killOps, killSize/sector, killCluster)
		for _, op := range ops[:acked] {
			if op.kind != 's' {
				m.apply(op)
			}
		}
		m.ack()
		for _, op := range ops[acked:] {
			if op.kind != 's' {
				m.apply(op)
			}
		}
		o, err := Open(d.ovPath, d.basePath, false)
		if err != nil {
			t.Fatalf("round %d: reopening after kill -9 (%d ops acknowledged): %v", round, acked, err)
		}
		m.verify(t, o, true)
		st := o.Stats()
		if err := o.Close(); err != nil {
			t.Fatal(err)
		}
		t.Logf("round %d: killed after %d acknowledged ops; %d clusters mapped, %d zero, %d torn slots", round, acked, st.Allocated, st.Zero, st.TornRepaired)
	}
	if fileHash(t, d.basePath) != d.baseHash {
		t.Fatal("the base changed")
	}
	if totalAcks == 0 {
		t.Fatal("no round acknowledged a Sync before the kill")
	}
	t.Logf("%d rounds, %d acknowledged ops in all, %d rounds finished before the kill", rounds, totalAcks, finished)
}
