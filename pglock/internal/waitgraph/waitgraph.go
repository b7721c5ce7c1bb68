// Package waitgraph finds cycles of waits between holders of advisory locks
// that PostgreSQL's own deadlock detector cannot see: pglock's deadlock
// check (pglock/deadlock.go) reads the server's waits and holds (pg_locks,
// and the comment that names the holds a waiting statement is made on
// behalf of, in pg_stat_activity) and its process's own waits, and asks this
// package whether a cycle runs through one of them, and which wait of it is
// to end. It does not import pglock: pglock imports it.
//
// The graph's nodes are waits: a session waiting in the server (its process
// ID) or a wait of the process that no server sees (a negative ID). A wait W
// for key k waits for:
//
//   - every session that holds k in a mode that conflicts with W's and is
//     itself waiting (a holder whose own next wait is on the same session);
//   - every wait made on behalf of a hold of k in a conflicting mode (its
//     holds name k): the holder's next wait, on another session.
//
// A cycle through W is a path of such edges from W back to W.
package waitgraph

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Key is an advisory lock as pg_locks shows it (classid, objid, objsubid).
type Key struct {
	C, O uint32
	S    int16
}

// Hold is a hold that a wait is made on behalf of.
type Hold struct {
	Key       Key
	Exclusive bool
}

// Row is a row of pg_locks (an advisory lock), with the statement of its
// session when it waits (Granted false).
type Row struct {
	PID       int32
	Key       Key
	Exclusive bool
	Granted   bool
	Query     string
}

// Local is a wait of the process: PID is the server session it waits on,
// 0 while none (waiting in the process, or not yet sent). Ref identifies it.
type Local struct {
	PID       int32
	Key       Key
	Exclusive bool
	Holds     []Hold
	Ref       any
}

// Node is a wait of the graph (see the package documentation).
type Node struct {
	ID        int64
	Key       Key
	Exclusive bool
	Holds     []Hold
	Ref       any // the Local's, for a wait of the process
}

// Graph is who waits for whom.
type Graph struct {
	nodes   map[int64]*Node
	holders map[Key][]holder
}

type holder struct {
	pid       int32
	exclusive bool
}

// Mark starts the comment of a waiting statement that names the holds it is
// made on behalf of: "/*pglock-for:classid.objid.objsubid.m,...*/", m "e"
// for an exclusive hold and "s" for a shared one.
const Mark = "/*pglock-for:"

// Comment is the comment of a waiting statement made on behalf of holds
// (with a leading space, to append to the statement).
func Comment(holds []Hold) string {
	var b strings.Builder
	b.WriteString(" " + Mark)
	for i, h := range holds {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%d.%d.%d.", h.Key.C, h.Key.O, h.Key.S)
		if h.Exclusive {
			b.WriteByte('e')
		} else {
			b.WriteByte('s')
		}
	}
	b.WriteString("*/")
	return b.String()
}

// ParseComment returns the holds that a statement's text names (see
// Comment): none when it has no comment, or one cut short.
func ParseComment(q string) []Hold {
	i := strings.Index(q, Mark)
	if i < 0 {
		return nil
	}
	q = q[i+len(Mark):]
	end := strings.Index(q, "*/")
	if end < 0 {
		return nil
	}
	var holds []Hold
	for f := range strings.SplitSeq(q[:end], ",") {
		p := strings.Split(f, ".")
		if len(p) != 4 {
			continue
		}
		c, err1 := strconv.ParseUint(p[0], 10, 32)
		o, err2 := strconv.ParseUint(p[1], 10, 32)
		s, err3 := strconv.ParseInt(p[2], 10, 16)
		if err1 != nil || err2 != nil || err3 != nil || (p[3] != "e" && p[3] != "s") {
			continue
		}
		holds = append(holds, Hold{Key{uint32(c), uint32(o), int16(s)}, p[3] == "e"})
	}
	return holds
}

// Conflicts reports whether a request in mode exclusive (else shared) must
// wait for a hold or request in mode other.
func Conflicts(exclusive, other bool) bool { return exclusive || other }

// New builds the graph from the server's rows and the process's waits.
// Sessions in ignore (waits of the process that were ended, whose rows may
// still show) are left out. A Local whose PID has a waiting row for the
// same key is that row's node, with the Local's holds (the process's own
// record is the truth of them: a statement's comment may be cut, and names
// holds that may have ended since); any other Local is a node of its own,
// unless read (rows were read from the server) and its PID is not 0: then
// it waits on another database or server, or its wait is over or not yet
// sent, and is left out.
func New(rows []Row, locals []Local, ignore map[int32]bool, read bool) *Graph {
	g := &Graph{nodes: make(map[int64]*Node), holders: make(map[Key][]holder)}
	for _, r := range rows {
		switch {
		case r.Granted:
			g.holders[r.Key] = append(g.holders[r.Key], holder{r.PID, r.Exclusive})
		case !ignore[r.PID]:
			g.nodes[int64(r.PID)] = &Node{ID: int64(r.PID), Key: r.Key, Exclusive: r.Exclusive, Holds: ParseComment(r.Query)}
		}
	}
	next := int64(-1)
	for _, l := range locals {
		if n, ok := g.nodes[int64(l.PID)]; ok && l.PID != 0 && n.Key == l.Key && n.Ref == nil {
			n.Ref, n.Holds = l.Ref, l.Holds
			continue
		}
		if l.PID != 0 && read {
			continue
		}
		g.nodes[next] = &Node{ID: next, Key: l.Key, Exclusive: l.Exclusive, Holds: l.Holds, Ref: l.Ref}
		next--
	}
	return g
}

// Edges returns the IDs of the waits that n waits for, in order.
func (g *Graph) Edges(n *Node) []int64 {
	var out []int64
	for _, h := range g.holders[n.Key] {
		if int64(h.pid) != n.ID && Conflicts(n.Exclusive, h.exclusive) {
			if _, waits := g.nodes[int64(h.pid)]; waits {
				out = append(out, int64(h.pid))
			}
		}
	}
	for id, x := range g.nodes {
		if id == n.ID {
			continue
		}
		for _, h := range x.Holds {
			if h.Key == n.Key && Conflicts(n.Exclusive, h.Exclusive) {
				out = append(out, id)
				break
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Node returns the node of ID id, or nil.
func (g *Graph) Node(id int64) *Node { return g.nodes[id] }

// NodeOf returns the node of the process's wait ref, or nil.
func (g *Graph) NodeOf(ref any) *Node {
	for _, n := range g.nodes {
		if n.Ref == ref {
			return n
		}
	}
	return nil
}

// CycleThrough returns a cycle of waits through ref's (ref's node first;
// each waits for the next, the last for the first), or nil.
func (g *Graph) CycleThrough(ref any) []*Node {
	start := g.NodeOf(ref)
	if start == nil {
		return nil
	}
	seen := map[int64]bool{start.ID: true}
	var walk func(n *Node, path []*Node) []*Node
	walk = func(n *Node, path []*Node) []*Node {
		for _, id := range g.Edges(n) {
			if id == start.ID {
				return path
			}
			if seen[id] {
				continue
			}
			seen[id] = true
			x := g.nodes[id]
			if found := walk(x, append(path, x)); found != nil {
				return found
			}
		}
		return nil
	}
	return walk(start, []*Node{start})
}

// Victim returns the wait of cycle that is to end: 0 when the cycle has a
// wait that no server sees (only its process can see the cycle: the wait
// that checks ends itself), else the highest process ID among the waits
// made on behalf of holds (every process that sees the cycle picks the
// same one).
func Victim(cycle []*Node) int64 {
	var v int64
	for _, n := range cycle {
		if n.ID < 0 {
			return 0
		}
		if len(n.Holds) > 0 && n.ID > v {
			v = n.ID
		}
	}
	return v
}
