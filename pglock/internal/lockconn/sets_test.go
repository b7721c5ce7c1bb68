package lockconn

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// testOwner opens nothing: the sets are tested on connections never opened.
type testOwner struct{ lost atomic.Int32 }

func (o *testOwner) Connect(context.Context, bool) (*pgx.Conn, error) {
	return nil, errors.New("no server here")
}
func (o *testOwner) Lost(*Conn, error) { o.lost.Add(1) }
func (o *testOwner) Refuse(error)      {}

var errTestClosed = errors.New("test: closed")

func testGroup(lockConns, waitConns int) (*Group, *testOwner) {
	o := &testOwner{}
	return NewGroup(o, Config{
		LockConns:      lockConns,
		WaitConns:      waitConns,
		ReleaseTimeout: time.Second,
		StatementBound: time.Second,
		Closing:        context.Background(),
		Closed:         errTestClosed,
	}), o
}

// The waiting connections' accounting: a placed connection given back
// healthy is kept idle, and the next wait takes it; one in doubt and a
// Leader's campaign connection (no place) are closed; the place goes back
// with the connection.
func TestWaitConnsKeptByRule(t *testing.T) {
	g, _ := testGroup(1, 2)
	for i := range 3 {
		if got := g.TakePlace(); got != (i < 2) {
			t.Fatalf("TakePlace #%d = %v; want exactly 2 places", i+1, got)
		}
	}
	a, b := g.WaitConn(true), g.WaitConn(true)
	if !a.Placed() || !b.Placed() || g.placedConns != 2 {
		t.Fatalf("placed %v %v, placedConns %d; want both placed, 2", a.Placed(), b.Placed(), g.placedConns)
	}
	g.PutWaitConn(a, true)
	if len(g.waitIdle) != 1 || g.placedConns != 1 || len(g.places) != 1 || a.Placed() {
		t.Fatalf("after a healthy give-back: idle %d, placed %d, places %d; want 1, 1, 1", len(g.waitIdle), g.placedConns, len(g.places))
	}
	g.PutWaitConn(b, false)
	if !b.IsDead() || len(g.waitIdle) != 1 || len(g.places) != 0 {
		t.Fatalf("a connection in doubt: dead %v, idle %d, places %d; want closed, 1, 0", b.IsDead(), len(g.waitIdle), len(g.places))
	}
	if !g.TakePlace() {
		t.Fatal("no place free")
	}
	if c := g.WaitConn(true); c != a {
		t.Fatal("the idle waiting connection was not taken again")
	}
	camp := g.WaitConn(false)
	if camp.Placed() || g.Counts().Leader != 1 {
		t.Fatalf("a campaign's connection: placed %v, Counts().Leader %d; want false, 1", camp.Placed(), g.Counts().Leader)
	}
	g.PutWaitConn(camp, true)
	if !camp.IsDead() || len(g.waitIdle) != 0 || len(g.places) != 1 {
		t.Fatalf("a campaign's connection given back: dead %v, idle %d, places %d; want closed, 0, 1", camp.IsDead(), len(g.waitIdle), len(g.places))
	}
	n := g.ReplaceWaitConn(a, true)
	if n == nil || n == a || !a.IsDead() || !n.Placed() || g.placedConns != 1 || len(g.places) != 1 {
		t.Fatalf("replaced: %p for %p (dead %v), placedConns %d, places %d; want a new placed one, 1, 1", n, a, a.IsDead(), g.placedConns, len(g.places))
	}
}

// Once shut, the sets take no connection and keep none, and Shut gave every
// connection they had.
func TestSetsShut(t *testing.T) {
	g, _ := testGroup(2, 2)
	s0 := g.Slot(0)
	g.TakePlace()
	busy := g.WaitConn(true)
	g.TakePlace()
	idle := g.WaitConn(true)
	g.PutWaitConn(idle, true)
	cs := g.Shut()
	if len(cs) != 3 {
		t.Fatalf("Shut gave %d connections, want 3 (a slot, an idle and a busy waiting one)", len(cs))
	}
	for _, want := range []*Conn{s0, busy, idle} {
		found := false
		for _, c := range cs {
			found = found || c == want
		}
		if !found {
			t.Errorf("Shut did not give %p", want)
		}
	}
	if g.Shut() != nil {
		t.Error("a second Shut gave connections")
	}
	if g.Slot(1) != nil || g.Pick(0, 0) != nil || g.WaitConn(false) != nil {
		t.Error("a shut set gave a connection")
	}
	g.PutWaitConn(busy, true)
	if !busy.IsDead() || len(g.waitIdle) != 0 || len(g.places) != 0 {
		t.Errorf("given back after Shut: dead %v, idle %d, places %d; want closed, 0, 0", busy.IsDead(), len(g.waitIdle), len(g.places))
	}
	g.CloseAll(cs, errTestClosed)
	for _, c := range cs {
		if !c.IsDead() {
			t.Errorf("%p not closed by CloseAll", c)
		}
	}
}

// Pick: a key goes to its slot by hash until a try of its hint bucket moves
// off a busy home, to a free lock connection or to one not opened yet; then
// the bucket's home is where it went.
func TestPickRule(t *testing.T) {
	g, _ := testGroup(3, 1)
	if c := g.Pick(1, 7); c.Slot() != 1 {
		t.Fatalf("Pick of slot 1 went to %d", c.Slot())
	}
	home := g.Slot(1)
	home.active = true // running a statement
	c := g.Pick(1, 7)
	if c.Slot() != 2 || g.Peek(2) != c || g.homeOf(1, 7) != 2 {
		t.Fatalf("Pick off a busy home went to %d (home of the bucket now %d); want 2, the first slot not opened after it", c.Slot(), g.homeOf(1, 7))
	}
	if g.homeOf(1, 8) != 1 {
		t.Error("another bucket's home moved too")
	}
	home.active = false
	if c := g.Pick(1, 7); c.Slot() != 2 {
		t.Errorf("the moved bucket's next try went to %d, want 2", c.Slot())
	}
	// Every other slot made, none free (not open): the busy home.
	g.Slot(0)
	home.active = true
	if c := g.Pick(1, 8); c != home {
		t.Errorf("Pick with nothing free went to %d, want the home, 1", c.Slot())
	}
	home.active = false
	if g2, _ := testGroup(1, 1); g2.Pick(0, 3).Slot() != 0 {
		t.Error("one lock connection: not slot 0")
	}
}
