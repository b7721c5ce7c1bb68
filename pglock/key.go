package pglock

import (
	"crypto/sha1"
	"encoding/binary"
	"fmt"
	"strconv"
)

// Key names one PostgreSQL advisory lock. PostgreSQL has one 64-bit advisory
// key space per database, and a second one made of pairs of 32-bit integers;
// a Key is a value in one of them. The zero Key is Int64Key(0).
//
// Make a Key with [KeyOf] (a name, hashed like the Python package
// postgresql-lock), [Int64Key] or [Int32PairKey]. Keys are comparable values.
type Key struct {
	v    int64
	pair bool
}

// KeyOf returns the Key for v, computed exactly as the Python package
// postgresql-lock computes it, so that a Go service and a Python service that
// name the same key contend on the same lock.
//
// The key's text form is encoded as UTF-8 and hashed with SHA-1; the first 8
// bytes of the digest, read as a big-endian signed integer, are the key. The
// text form of a string is the string itself; of an integer (any of Go's
// integer types) its decimal form, as Python's str() writes it. A []byte is
// hashed as its raw bytes: Python's str(b"...") form ("b'...'") is not
// mimicked. A Key is returned unchanged.
//
// Any other type (including nil, bool and floats) is an error matching
// [ErrInvalidKey].
func KeyOf(v any) (Key, error) {
	switch k := v.(type) {
	case Key:
		return k, nil
	case string:
		return hashKey([]byte(k)), nil
	case []byte:
		return hashKey(k), nil
	case int:
		return hashKey(strconv.AppendInt(nil, int64(k), 10)), nil
	case int8:
		return hashKey(strconv.AppendInt(nil, int64(k), 10)), nil
	case int16:
		return hashKey(strconv.AppendInt(nil, int64(k), 10)), nil
	case int32:
		return hashKey(strconv.AppendInt(nil, int64(k), 10)), nil
	case int64:
		return hashKey(strconv.AppendInt(nil, k, 10)), nil
	case uint:
		return hashKey(strconv.AppendUint(nil, uint64(k), 10)), nil
	case uint8:
		return hashKey(strconv.AppendUint(nil, uint64(k), 10)), nil
	case uint16:
		return hashKey(strconv.AppendUint(nil, uint64(k), 10)), nil
	case uint32:
		return hashKey(strconv.AppendUint(nil, uint64(k), 10)), nil
	case uint64:
		return hashKey(strconv.AppendUint(nil, k, 10)), nil
	case uintptr:
		return hashKey(strconv.AppendUint(nil, uint64(k), 10)), nil
	case nil:
		return Key{}, fmt.Errorf("%w: nil key (use a string, []byte, integer or pglock.Key)", ErrInvalidKey)
	default:
		return Key{}, fmt.Errorf("%w: unsupported key type %T (use a string, []byte, integer or pglock.Key)", ErrInvalidKey, v)
	}
}

func hashKey(b []byte) Key {
	sum := sha1.Sum(b)
	return Key{v: int64(binary.BigEndian.Uint64(sum[:8]))}
}

// Int64Key returns the Key k itself, for the one-argument (bigint) SQL advisory
// lock functions. It is not hashed: Int64Key(42) is pg_advisory_lock(42).
func Int64Key(k int64) Key { return Key{v: k} }

// Int32PairKey returns the Key (a, b) of the two-argument (integer, integer)
// SQL advisory lock functions. PostgreSQL keeps this key space apart from the
// bigint one: Int32PairKey(0, 1) and Int64Key(1) are different locks.
func Int32PairKey(a, b int32) Key {
	return Key{v: int64(a)<<32 | int64(uint32(b)), pair: true}
}

// String returns the key's number as the SQL functions take it: "42" for
// Int64Key(42), "1,2" for Int32PairKey(1, 2). Use [Key.LockTag] to find it in
// pg_locks.
func (k Key) String() string {
	if k.pair {
		a, b := k.halves()
		return strconv.FormatInt(int64(a), 10) + "," + strconv.FormatInt(int64(b), 10)
	}
	return strconv.FormatInt(k.v, 10)
}

// Int64 returns the bigint key. For a pair key it is a<<32 | uint32(b), which
// is a different lock: use [Key.IsPair] to tell.
func (k Key) Int64() int64 { return k.v }

// IsPair reports whether k is a key of the (integer, integer) space.
func (k Key) IsPair() bool { return k.pair }

// LockTag returns the columns that identify this key in pg_locks (where
// locktype = 'advisory'): classid and objid are the high and low 32 bits, and
// objsubid is 1 for a bigint key and 2 for a pair key.
func (k Key) LockTag() (classid, objid uint32, objsubid int16) {
	a, b := k.halves()
	if k.pair {
		return uint32(a), uint32(b), 2
	}
	return uint32(a), uint32(b), 1
}

func (k Key) halves() (int32, int32) { return int32(k.v >> 32), int32(uint32(k.v)) }

// args returns the bind arguments of the SQL functions for k.
func (k Key) args() []any {
	if k.pair {
		a, b := k.halves()
		return []any{a, b}
	}
	return []any{k.v}
}

// literal returns the argument list as SQL text, for the simple protocol.
func (k Key) literal() string {
	if k.pair {
		a, b := k.halves()
		return "(" + strconv.FormatInt(int64(a), 10) + ", " + strconv.FormatInt(int64(b), 10) + ")"
	}
	return "(" + strconv.FormatInt(k.v, 10) + "::bigint)"
}
