package pglock

// HealthChecks returns how many health checks lk has run (see healthProbe).
func HealthChecks(lk *Locker) int {
	p := lk.health()
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.checks
}

// SetTermPID makes the current term of ld believe that its key is held by
// the server session pid (a split brain, for CheckHealth's tests); false
// when ld does not lead.
func SetTermPID(ld *Leader, pid int64) bool {
	st := ld.cur.Load()
	if st == nil {
		return false
	}
	ld.cur.Store(&leaderTerm{n: st.n, pid: pid, lost: st.lost})
	return true
}
