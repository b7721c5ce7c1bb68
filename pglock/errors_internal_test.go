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
