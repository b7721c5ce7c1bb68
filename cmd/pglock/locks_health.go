package main

import (
	"context"
	"fmt"
	"io"
	"strconv"

	"github.com/jackc/pgx/v5/pgxpool"
)

// lockHealth is how full the server's shared lock table is with advisory
// locks; its JSON form is the "health" of a "pglock locks --watch --json"
// snapshot.
type lockHealth struct {
	// AdvisoryLocks counts the rows of pg_locks of type advisory in every
	// database of the server, held or waited for: each takes an entry of
	// the lock table (advisory locks never use the fast path).
	AdvisoryLocks int64 `json:"advisory_locks"`
	// Capacity is MaxLocksPerTransaction * (MaxConnections +
	// MaxPreparedTransactions), the lock table's size as PostgreSQL
	// documents it.
	Capacity                int64   `json:"capacity"`
	MaxLocksPerTransaction  int64   `json:"max_locks_per_transaction"`
	MaxConnections          int64   `json:"max_connections"`
	MaxPreparedTransactions int64   `json:"max_prepared_transactions"`
	Percent                 float64 `json:"percent"`           // 100 * AdvisoryLocks / Capacity
	Warning                 string  `json:"warning,omitempty"` // set when more than half full
}

// lockHealthQuery counts the advisory locks of the whole server (pg_locks
// shows every database's) and reads the settings that size the lock table.
const lockHealthQuery = `
SELECT (SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory'),
       pg_catalog.current_setting('max_locks_per_transaction')::int8,
       pg_catalog.current_setting('max_connections')::int8,
       pg_catalog.current_setting('max_prepared_transactions')::int8`

// fullLockTableWarning is printed when advisory locks take more than half
// of the lock table.
const fullLockTableWarning = "warning: the lock table is more than half full: " +
	"a full table fails every session of the server with 'out of shared memory'; " +
	"raise max_locks_per_transaction or hold fewer locks"

func readLockHealth(ctx context.Context, pool *pgxpool.Pool) (*lockHealth, error) {
	var n, perTx, conns, prepared int64
	if err := pool.QueryRow(ctx, lockHealthQuery).Scan(&n, &perTx, &conns, &prepared); err != nil {
		return nil, err
	}
	return newLockHealth(n, perTx, conns, prepared), nil
}

func newLockHealth(advisory, perTx, conns, prepared int64) *lockHealth {
	h := &lockHealth{
		AdvisoryLocks:           advisory,
		Capacity:                perTx * (conns + prepared),
		MaxLocksPerTransaction:  perTx,
		MaxConnections:          conns,
		MaxPreparedTransactions: prepared,
	}
	if h.Capacity > 0 {
		h.Percent = float64(h.AdvisoryLocks) * 100 / float64(h.Capacity)
	}
	if 2*h.AdvisoryLocks > h.Capacity {
		h.Warning = fullLockTableWarning
	}
	return h
}

// lines are the footer of the table: the count, and the warning if any.
func (h *lockHealth) lines() []string {
	l := []string{fmt.Sprintf("advisory locks, all databases: %s of %s lock-table slots (%.1f%%)",
		groupDigits(h.AdvisoryLocks), groupDigits(h.Capacity), h.Percent)}
	if h.Warning != "" {
		l = append(l, h.Warning)
	}
	return l
}

// writeLockHealth writes h's lines after a blank line.
func writeLockHealth(w io.Writer, h *lockHealth) error {
	if h == nil {
		return nil
	}
	if _, err := fmt.Fprintln(w); err != nil {
		return err
	}
	for _, l := range h.lines() {
		if _, err := fmt.Fprintln(w, l); err != nil {
			return err
		}
	}
	return nil
}

// groupDigits writes n with a comma between groups of three digits.
func groupDigits(n int64) string {
	s := strconv.FormatInt(n, 10)
	sign := ""
	if s[0] == '-' {
		sign, s = "-", s[1:]
	}
	var b []byte
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			b = append(b, ',')
		}
		b = append(b, s[i])
	}
	return sign + string(b)
}
