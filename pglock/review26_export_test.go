package pglock

// CycleRecords is the number of waits inside holds that the process
// records now (see cycleRec); 0 once every such wait has returned.
func CycleRecords() int {
	cycles.mu.Lock()
	defer cycles.mu.Unlock()
	return len(cycles.recs)
}
