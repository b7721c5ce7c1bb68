package lockconn

// This file holds the Locker's waiting connections: the places among
// WithWaitConns (Config.WaitConns) that counted waits take, the idle
// connections kept for the next wait, and those in use (busy), which a
// goroutine waits or holds on.

// Places returns the places among the waiting connections: a send on it
// takes one (it blocks while none is free; see TakePlace for a try), which
// is given back by GivePlace, or kept by the waiting connection it goes to
// (WaitConn(true)) until that one is given back (PutWaitConn). Its length
// is the number of places taken, its capacity Config.WaitConns.
func (g *Group) Places() chan<- struct{} { return g.places }

// TakePlace takes a place among the waiting connections if one is free now.
func (g *Group) TakePlace() bool {
	select {
	case g.places <- struct{}{}:
		return true
	default:
		return false
	}
}

// GivePlace gives back a place taken (see Places) that no waiting
// connection keeps.
func (g *Group) GivePlace() { <-g.places }

// WaitConn takes an idle waiting connection or makes one; placed: the
// caller holds a place (see Places), which the connection keeps until it is
// given back (see PutWaitConn). It returns nil once the Locker is closed
// (see Shut).
func (g *Group) WaitConn(placed bool) *Conn {
	g.setsMu.Lock()
	defer g.setsMu.Unlock()
	if g.shut {
		return nil
	}
	var c *Conn
	for len(g.waitIdle) > 0 && c == nil {
		c = g.waitIdle[len(g.waitIdle)-1]
		g.waitIdle = g.waitIdle[:len(g.waitIdle)-1]
		if c.IsDead() {
			c = nil
		}
	}
	if c == nil {
		c = g.New(-1)
	}
	c.placed = placed
	if placed {
		g.placedConns++
	}
	g.waitBusy[c] = struct{}{}
	return c
}

// PutWaitConn gives back a waiting connection that holds nothing, after a
// wait that failed or after the release of what it waited for, with its
// place (see Places) if it has one. One in doubt (not healthy) is closed,
// and so is one that would make more idle and placed connections than
// WithWaitConns, and a Leader's campaign connection.
func (g *Group) PutWaitConn(c *Conn, healthy bool) {
	g.setsMu.Lock()
	delete(g.waitBusy, c)
	placed := c.placed
	if placed {
		c.placed = false
		g.placedConns--
	}
	// Idle and placed connections together stay within WithWaitConns: a
	// wait that takes a place takes an idle connection, or opens one
	// only when none is idle. A Leader's campaign connection (not placed)
	// is not kept: it carries the Leader's identity (issue 25, see
	// pglock's nameCampaign).
	keep := healthy && placed && !g.shut && !c.IsDead() && len(g.waitIdle)+g.placedConns < g.cfg.WaitConns
	if keep {
		g.waitIdle = append(g.waitIdle, c)
	}
	g.setsMu.Unlock()
	if !keep {
		c.Close(ErrGone)
	}
	if placed {
		<-g.places
	}
}

// ReplaceWaitConn closes c, a waiting connection whose session ended, and
// returns another waiting connection in its stead, with its place (placed)
// kept; nil once the Locker is closed (the place given back).
func (g *Group) ReplaceWaitConn(c *Conn, placed bool) *Conn {
	g.setsMu.Lock()
	delete(g.waitBusy, c)
	if c.placed {
		c.placed = false
		g.placedConns--
	}
	g.setsMu.Unlock()
	c.Close(ErrGone)
	next := g.WaitConn(placed)
	if next == nil && placed {
		<-g.places
	}
	return next
}

// Placed reports whether c, a waiting connection, holds a place among
// WithWaitConns (see WaitConn); false for a Leader's campaign connection
// and for a lock connection.
func (c *Conn) Placed() bool {
	c.g.setsMu.Lock()
	defer c.g.setsMu.Unlock()
	return c.placed
}
