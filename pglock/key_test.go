package pglock_test

import (
	"crypto/sha1"
	"encoding/binary"
	"errors"
	"math"
	"strconv"
	"testing"

	"github.com/pglockkit/kit/pglock"
)

// Vectors computed with Python's postgresql-lock algorithm:
// int.from_bytes(hashlib.sha1(str(key).encode("utf-8")).digest()[:8], "big", signed=True)
func TestKeyOfPythonVectors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in   any
		want int64
	}{
		{"shared-identifier", -464685171814670893},
		{"test", -6248023315878667354},
		{"", -2721964255587120371},
		{"héllo", 3870257040188514168},
		{0, -5307316485233981396},
		{42, -7867842753158719212},
		{int8(42), -7867842753158719212},
		{uint16(42), -7867842753158719212},
		{int64(42), -7867842753158719212},
		{"42", -7867842753158719212},
		{-1, 8756317780535003834},
		{[]byte("test"), -6248023315878667354},
	} {
		k, err := pglock.KeyOf(tc.in)
		if err != nil {
			t.Fatalf("KeyOf(%#v): %v", tc.in, err)
		}
		if k.Int64() != tc.want || k.IsPair() {
			t.Errorf("KeyOf(%#v) = %d, want %d", tc.in, k.Int64(), tc.want)
		}
	}
}

// The algorithm, written out independently of the package, over the edges of
// Go's integer types.
func TestKeyOfIntegersFollowPythonStr(t *testing.T) {
	t.Parallel()
	ref := func(text string) int64 {
		sum := sha1.Sum([]byte(text))
		return int64(binary.BigEndian.Uint64(sum[:8]))
	}
	for _, v := range []any{math.MinInt64, math.MaxInt64, uint64(math.MaxUint64), int32(math.MinInt32), uint8(255), uint(7)} {
		k, err := pglock.KeyOf(v)
		if err != nil {
			t.Fatal(err)
		}
		var text string
		switch x := v.(type) {
		case int:
			text = strconv.Itoa(x)
		case uint64:
			text = strconv.FormatUint(x, 10)
		case int32:
			text = strconv.FormatInt(int64(x), 10)
		case uint8:
			text = strconv.FormatUint(uint64(x), 10)
		case uint:
			text = strconv.FormatUint(uint64(x), 10)
		}
		if got, want := k.Int64(), ref(text); got != want {
			t.Errorf("KeyOf(%v) = %d, want sha1(%q) = %d", v, got, text, want)
		}
	}
}

func TestKeyOfRejects(t *testing.T) {
	t.Parallel()
	for _, v := range []any{nil, 1.5, true, struct{}{}, []int{1}} {
		if _, err := pglock.KeyOf(v); !errors.Is(err, pglock.ErrInvalidKey) {
			t.Errorf("KeyOf(%#v) error = %v, want ErrInvalidKey", v, err)
		}
	}
	k := pglock.Int64Key(7)
	if got, err := pglock.KeyOf(k); err != nil || got != k {
		t.Errorf("KeyOf(Key) = %v, %v; want the key itself", got, err)
	}
}

func TestKeyStringAndLockTag(t *testing.T) {
	t.Parallel()
	k := pglock.Int64Key(-2)
	if k.String() != "-2" {
		t.Errorf("String = %q", k.String())
	}
	c, o, s := k.LockTag()
	if c != math.MaxUint32 || o != math.MaxUint32-1 || s != 1 {
		t.Errorf("LockTag(-2) = %d %d %d", c, o, s)
	}
	p := pglock.Int32PairKey(-1, 5)
	if p.String() != "-1,5" || !p.IsPair() {
		t.Errorf("pair String = %q", p.String())
	}
	c, o, s = p.LockTag()
	if c != math.MaxUint32 || o != 5 || s != 2 {
		t.Errorf("LockTag(-1,5) = %d %d %d", c, o, s)
	}
	if pglock.Int32PairKey(0, 1) == pglock.Int64Key(1) {
		t.Error("pair (0,1) equals bigint 1: they are different locks")
	}
}
