package waitgraph

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// TestCommentRoundTrip: the holds a comment names are read back as they
// were, from any statement text around it; a comment cut short names none.
func TestCommentRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 1000 {
		holds := make([]Hold, rng.IntN(5))
		for i := range holds {
			holds[i] = Hold{Key{rng.Uint32(), rng.Uint32(), int16(1 + rng.IntN(2))}, rng.IntN(2) == 0}
		}
		q := "SELECT pg_advisory_lock($1)" + Comment(holds)
		got := ParseComment(q)
		if len(holds) == 0 {
			if len(got) != 0 {
				t.Fatalf("%q names %v", q, got)
			}
			continue
		}
		if !slices.Equal(got, holds) {
			t.Fatalf("ParseComment(%q) = %v, want %v", q, got, holds)
		}
		if cut := q[:len(q)-1-rng.IntN(len(Comment(holds))-len(Mark)-1)]; ParseComment(cut) != nil {
			t.Fatalf("a comment cut short (%q) names %v", cut, ParseComment(cut))
		}
	}
	if ParseComment("SELECT 1") != nil || ParseComment(Mark+"1.2*/") != nil || ParseComment(Mark+"1.2.3.x*/") != nil {
		t.Fatal("a statement without a well-formed comment names holds")
	}
}

// TestCycleThroughModel checks CycleThrough and Victim against the
// definition on random graphs: a cycle is found through a wait exactly when
// the wait can reach itself by the edges of the package documentation
// (computed here from scratch), the cycle returned is made of such edges
// and repeats no wait, and every rotation of it has the same victim.
func TestCycleThroughModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	found := 0
	for trial := range 3000 {
		nkeys := 2 + rng.IntN(4)
		key := func() Key { return Key{0, uint32(rng.IntN(nkeys)), 1} }
		var rows []Row
		var locals []Local
		npids := 1 + rng.IntN(6)
		for pid := int32(1); pid <= int32(npids); pid++ {
			for range rng.IntN(3) {
				rows = append(rows, Row{PID: pid, Key: key(), Exclusive: rng.IntN(3) > 0, Granted: true})
			}
			if rng.IntN(3) > 0 {
				w := Row{PID: pid, Key: key(), Exclusive: rng.IntN(3) > 0}
				var holds []Hold
				for range rng.IntN(3) {
					holds = append(holds, Hold{key(), rng.IntN(3) > 0})
				}
				if rng.IntN(2) == 0 {
					w.Query = "SELECT pg_advisory_lock($1)" + Comment(holds)
				} else if len(holds) > 0 {
					// A wait of the process whose statement the server
					// does not show named (a relayed wait).
					locals = append(locals, Local{PID: pid, Key: w.Key, Exclusive: w.Exclusive, Holds: holds, Ref: len(locals)})
				}
				rows = append(rows, w)
			}
		}
		for range rng.IntN(4) { // waits in the process only
			var holds []Hold
			for range 1 + rng.IntN(2) {
				holds = append(holds, Hold{key(), rng.IntN(3) > 0})
			}
			locals = append(locals, Local{Key: key(), Exclusive: rng.IntN(3) > 0, Holds: holds, Ref: len(locals)})
		}
		g := New(rows, locals, nil, true)

		// The definition, from scratch.
		edge := func(a, b *Node) bool {
			if a.ID == b.ID {
				return false
			}
			for _, r := range rows {
				if r.Granted && int64(r.PID) == b.ID && r.Key == a.Key && (a.Exclusive || r.Exclusive) {
					return true
				}
			}
			for _, h := range b.Holds {
				if h.Key == a.Key && (a.Exclusive || h.Exclusive) {
					return true
				}
			}
			return false
		}
		var nodes []*Node
		for _, n := range g.nodes {
			nodes = append(nodes, n)
		}
		reaches := func(from *Node) bool { // from reaches itself
			seen := map[int64]bool{}
			queue := []*Node{from}
			for len(queue) > 0 {
				n := queue[0]
				queue = queue[1:]
				for _, x := range nodes {
					if !edge(n, x) {
						continue
					}
					if x.ID == from.ID {
						return true
					}
					if !seen[x.ID] {
						seen[x.ID] = true
						queue = append(queue, x)
					}
				}
			}
			return false
		}
		for _, l := range locals {
			start := g.NodeOf(l.Ref)
			if start == nil {
				t.Fatalf("trial %d: the wait %v has no node", trial, l.Ref)
			}
			cycle := g.CycleThrough(l.Ref)
			if want := reaches(start); (cycle != nil) != want {
				t.Fatalf("trial %d: CycleThrough(%v) = %v, want a cycle: %v\nrows %+v\nlocals %+v", trial, l.Ref, cycle, want, rows, locals)
			}
			if cycle == nil {
				continue
			}
			found++
			if cycle[0] != start {
				t.Fatalf("trial %d: the cycle does not start at the wait", trial)
			}
			ids := map[int64]bool{}
			for i, n := range cycle {
				if ids[n.ID] {
					t.Fatalf("trial %d: wait %d twice in the cycle", trial, n.ID)
				}
				ids[n.ID] = true
				if next := cycle[(i+1)%len(cycle)]; !edge(n, next) {
					t.Fatalf("trial %d: %d does not wait for %d", trial, n.ID, next.ID)
				}
			}
			v := Victim(cycle)
			for r := range cycle {
				if rv := Victim(append(slices.Clone(cycle[r:]), cycle[:r]...)); rv != v {
					t.Fatalf("trial %d: victims %d and %d of one cycle", trial, v, rv)
				}
			}
			if v != 0 && !ids[v] {
				t.Fatalf("trial %d: victim %d not in the cycle", trial, v)
			}
		}
	}
	if found < 100 {
		t.Fatalf("only %d cycles in the trials: the model test proves little", found)
	}
	t.Logf("%d cycles found and checked", found)
}

// TestIgnoredSessions: a session in ignore (a wait the process ended) is no
// wait of the graph, so the cycle it closed is gone.
func TestIgnoredSessions(t *testing.T) {
	k1, k2 := Key{0, 1, 1}, Key{0, 2, 1}
	rows := []Row{
		{PID: 10, Key: k2, Exclusive: true, Query: "x" + Comment([]Hold{{k1, true}})},
		{PID: 20, Key: k1, Exclusive: true, Query: "x" + Comment([]Hold{{k2, true}})},
	}
	locals := []Local{{PID: 10, Key: k2, Exclusive: true, Holds: []Hold{{k1, true}}, Ref: "a"}}
	if c := New(rows, locals, nil, true).CycleThrough("a"); len(c) != 2 || Victim(c) != 20 {
		t.Fatalf("cycle %v, victim %d; want 2 waits, victim 20", c, Victim(c))
	}
	if c := New(rows, locals, map[int32]bool{20: true}, true).CycleThrough("a"); c != nil {
		t.Fatalf("a cycle through an ignored session: %v", c)
	}
	// Shared holds and a shared wait do not conflict.
	shared := []Row{{PID: 10, Key: k2, Query: "x" + Comment([]Hold{{k1, false}})}, {PID: 20, Key: k1, Query: "x" + Comment([]Hold{{k2, false}})}}
	if c := New(shared, []Local{{PID: 10, Key: k2, Ref: "a"}}, nil, true).CycleThrough("a"); c != nil {
		t.Fatalf("a cycle of shared waits: %v", c)
	}
}
