package pglock

import (
	"errors"
	"fmt"
	"testing"
)

// join names a sentinel once: one that another error of the join carries is
// dropped, the first of two equal ones kept; errors.Is still sees it.
func TestJoinNamesSentinelOnce(t *testing.T) {
	wrapped := fmt.Errorf("pglock: release key 1: %w", join(ErrLockLost, errors.New("FATAL")))
	for _, c := range []struct {
		got  error
		want string
	}{
		{join(ErrLockLost, wrapped), "pglock: release key 1: pglock: lock lost: FATAL"},
		{join(ErrLockLost, ErrLockLost), "pglock: lock lost"},
		{join(ErrLockLost, nil, ErrNotHeld), "pglock: lock lost: pglock: lock not held"},
		{join(uncomparable{"a"}, uncomparable{"a"}), "a: a"},
	} {
		if c.got.Error() != c.want {
			t.Errorf("join = %q, want %q", c.got, c.want)
		}
	}
	if err := join(ErrLockLost, wrapped); !errors.Is(err, ErrLockLost) {
		t.Errorf("join(ErrLockLost, %v) does not match ErrLockLost", wrapped)
	}
}

// uncomparable is an error whose type == would panic on.
type uncomparable []string

func (u uncomparable) Error() string { return u[0] }

// A server that reports crdb_version (CockroachDB) is refused: its
// pg_try_advisory_lock always returns true. PostgreSQL and YugabyteDB pass.
func TestCheckEngine(t *testing.T) {
	for _, c := range []struct {
		params map[string]string
		refuse bool
	}{
		{map[string]string{"server_version": "15.14 (Debian 15.14-0+deb12u1)"}, false},
		{map[string]string{"server_version": "11.2-YB-2025.1.0.0-b0"}, false},
		{map[string]string{"server_version": "13.0.0", "crdb_version": "CockroachDB CCL v24.1.0 (x86_64-pc-linux-gnu)"}, true},
	} {
		err := checkEngine(func(k string) string { return c.params[k] })
		if c.refuse != (err != nil) || (err != nil && !errors.Is(err, ErrUnsupportedConn)) {
			t.Errorf("checkEngine(%v) = %v, want refused: %v (ErrUnsupportedConn)", c.params, err, c.refuse)
		}
	}
}

// The exclusion self-test's verdict: refused only when a second session got
// the key the first held; nothing told when the first did not get it.
func TestExcludeVerdict(t *testing.T) {
	for _, c := range []struct {
		first, second, conclusive, refuse bool
	}{
		{true, false, true, false},
		{true, true, true, true},
		{false, false, false, false},
		{false, true, false, false},
	} {
		conclusive, err := excludeVerdict(c.first, c.second)
		if conclusive != c.conclusive || (err != nil) != c.refuse || (err != nil && !errors.Is(err, ErrUnsupportedConn)) {
			t.Errorf("excludeVerdict(%v, %v) = %v, %v; want %v, refused %v", c.first, c.second, conclusive, err, c.conclusive, c.refuse)
		}
	}
}
