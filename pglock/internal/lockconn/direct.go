package lockconn

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
)

// This file runs a statement of one request (a lock, an unlock, a check, a
// probe, a retake) straight through pgconn: its prepared description is kept
// per connection, its argument written into a buffer of the connection, its
// one value read as it comes. pgx's QueryRow does the same work with its
// statement cache, type map and scan plans, which on a lock connection (two
// round trips a hold, the statements always the same) was a fifth of a
// grant's time with a few goroutines on distinct keys.
//
// A connection whose config has a pgx tracer, or another query mode than
// the default (QueryExecModeCacheStatement), keeps QueryRow, so that the
// tracer sees every statement and the mode is kept.

// directState is what the direct path keeps of the connection it was set
// up for (see Conn.direct); only the goroutine that owns the connection
// touches it.
type directState struct {
	conn *pgx.Conn
	on   bool
	sds  map[string]*pgconn.StatementDescription
	// buf and vals hold the bind arguments (8 bytes: a bigint or two
	// integers).
	buf  [8]byte
	vals [2][]byte
}

// binaryFormat: arguments and the result in binary.
var binaryFormat = []int16{1}

// direct reports whether conn's single requests go through pgconn (see the
// file's comment), setting up its state when conn is new.
func (c *Conn) direct(conn *pgx.Conn) bool {
	d := &c.d
	if d.conn != conn {
		cfg := conn.Config()
		d.conn, d.sds = conn, nil
		d.on = cfg.Tracer == nil && cfg.DefaultQueryExecMode == pgx.QueryExecModeCacheStatement
	}
	return d.on
}

// one runs the statement sql of o alone and returns its one value: a bool
// as 0 or 1, or an integer.
func (c *Conn) one(ctx context.Context, conn *pgx.Conn, sql string, o *Op) (int32, error) {
	var args []any
	if !o.Check {
		args = c.argsOf(o)
	}
	if !c.direct(conn) {
		var v any
		if err := conn.QueryRow(ctx, sql, args...).Scan(&v); err != nil {
			return 0, err
		}
		switch v := v.(type) {
		case bool:
			if v {
				return 1, nil
			}
			return 0, nil
		case int32:
			return v, nil
		}
		return 0, fmt.Errorf("pglock: lock statement answered %T, not a bool or an integer", v)
	}
	d := &c.d
	sd := d.sds[sql]
	if sd == nil {
		var err error
		if sd, err = conn.Prepare(ctx, sql, sql); err != nil {
			return 0, err
		}
		if len(sd.Fields) != 1 {
			return 0, fmt.Errorf("pglock: lock statement answers %d columns, not one", len(sd.Fields))
		}
		if d.sds == nil {
			d.sds = make(map[string]*pgconn.StatementDescription, 8)
		}
		d.sds[sql] = sd
	}
	var vals [][]byte
	switch {
	case o.Check:
	case o.Pair:
		a, b := o.halves()
		binary.BigEndian.PutUint32(d.buf[:4], uint32(a))
		binary.BigEndian.PutUint32(d.buf[4:], uint32(b))
		d.vals[0], d.vals[1] = d.buf[:4], d.buf[4:]
		vals = d.vals[:2]
	default:
		binary.BigEndian.PutUint64(d.buf[:], uint64(o.Key))
		d.vals[0] = d.buf[:]
		vals = d.vals[:1]
	}
	rr := conn.PgConn().ExecStatement(ctx, sd, vals, binaryFormat, binaryFormat)
	var v int32
	rows := 0
	var verr error
	for rr.NextRow() {
		rows++
		v, verr = oneValue(sd.Fields[0].DataTypeOID, rr.Values())
	}
	if _, err := rr.Close(); err != nil {
		return 0, err
	}
	if verr == nil && rows != 1 {
		verr = fmt.Errorf("pglock: lock statement answered %d rows, not one", rows)
	}
	return v, verr
}

// errNull is a lock statement that answered NULL.
var errNull = errors.New("pglock: lock statement answered NULL")

// oneValue decodes a row's one value, in binary: a bool or an integer.
func oneValue(oid uint32, row [][]byte) (int32, error) {
	if len(row) != 1 {
		return 0, fmt.Errorf("pglock: lock statement answered %d columns, not one", len(row))
	}
	b := row[0]
	switch {
	case b == nil:
		return 0, errNull
	case oid == pgtype.BoolOID && len(b) == 1:
		return int32(b[0]), nil
	case oid == pgtype.Int4OID && len(b) == 4:
		return int32(binary.BigEndian.Uint32(b)), nil
	}
	return 0, fmt.Errorf("pglock: lock statement answered type %d in %d bytes, not a bool or an integer", oid, len(b))
}
