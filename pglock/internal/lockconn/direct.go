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

// This file runs the statements of a lock connection's requests straight
// through pgconn: a request sent alone (a lock, an unlock, a check, a probe,
// a retake) or a batch of them. Each statement's prepared description is
// kept per connection, its arguments written in binary into a buffer of the
// connection, its value (a batch's rows) read as it comes. pgx's QueryRow
// and Query do the same work with their statement cache, type map and scan
// plans, which on a lock connection (two round trips a hold, the statements
// always the same) cost 5-15% of a grant's time with a few goroutines on
// distinct keys (bench's BenchmarkCeiling, its pgconn side).
//
// A connection whose config has a pgx tracer, or another query mode than
// the default (QueryExecModeCacheStatement), keeps pgx's QueryRow and
// Query, so that the tracer sees every statement and the mode is kept.
// Through a pooler (proof) every statement is the proven batch statement,
// through Query.

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
	// arrays holds a batch's four arrays (see batch).
	arrays []byte
}

// binaryFormat: arguments and the result in binary.
var binaryFormat = []int16{1}

// direct reports whether conn's statements go through pgconn (see the
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
	sd, err := c.prepared(ctx, conn, sql, 1)
	if err != nil {
		return 0, err
	}
	d := &c.d
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

// batch runs batch in one statement of batchSQL, its four arrays written in
// binary into a buffer of the connection (see execBatch, which does the same
// through pgx's Query).
func (c *Conn) batch(ctx context.Context, conn *pgx.Conn, batch []*Op) error {
	sd, err := c.prepared(ctx, conn, batchSQL, 2)
	if err != nil {
		return err
	}
	d := &c.d
	n := len(batch)
	b := d.arrays[:0]
	var starts [5]int
	for col, oid := range [4]uint32{pgtype.Int2OID, pgtype.Int8OID, pgtype.Int4OID, pgtype.Int4OID} {
		starts[col] = len(b)
		b = binary.BigEndian.AppendUint32(b, 1) // dimensions
		b = binary.BigEndian.AppendUint32(b, 0) // no NULL
		b = binary.BigEndian.AppendUint32(b, oid)
		b = binary.BigEndian.AppendUint32(b, uint32(n))
		b = binary.BigEndian.AppendUint32(b, 1) // lower bound
		for _, o := range batch {
			var hi, lo int32
			if o.Pair {
				hi, lo = o.halves()
			}
			switch col {
			case 0:
				b = binary.BigEndian.AppendUint32(b, 2)
				b = binary.BigEndian.AppendUint16(b, uint16(o.batchOp()))
			case 1:
				var k int64
				if !o.Pair {
					k = o.Key
				}
				b = binary.BigEndian.AppendUint32(b, 8)
				b = binary.BigEndian.AppendUint64(b, uint64(k))
			case 2:
				b = binary.BigEndian.AppendUint32(b, 4)
				b = binary.BigEndian.AppendUint32(b, uint32(hi))
			case 3:
				b = binary.BigEndian.AppendUint32(b, 4)
				b = binary.BigEndian.AppendUint32(b, uint32(lo))
			}
		}
	}
	starts[4] = len(b)
	d.arrays = b
	var vals [4][]byte
	for col := range vals {
		vals[col] = b[starts[col]:starts[col+1]]
	}
	rr := conn.PgConn().ExecStatement(ctx, sd, vals[:], binaryFormat, binaryFormat)
	rows := 0
	var verr error
	for rr.NextRow() {
		row := rr.Values()
		if verr != nil {
			continue
		}
		if len(row) != 2 || len(row[0]) != 8 || len(row[1]) != 4 {
			verr = fmt.Errorf("pglock: batch answered a row of %d columns, not an ordinal and a result", len(row))
			continue
		}
		i := int64(binary.BigEndian.Uint64(row[0]))
		if i < 1 || i > int64(n) {
			verr = fmt.Errorf("pglock: batch answered row %d of %d", i, n)
			continue
		}
		batch[i-1].answer(int32(binary.BigEndian.Uint32(row[1])))
		rows++
	}
	if _, err := rr.Close(); err != nil {
		return err
	}
	if verr == nil && rows != n {
		verr = fmt.Errorf("pglock: batch answered %d rows of %d", rows, n)
	}
	return verr
}

// prepared returns the prepared description of sql on conn, of a statement
// that answers columns columns, preparing it on first use.
func (c *Conn) prepared(ctx context.Context, conn *pgx.Conn, sql string, columns int) (*pgconn.StatementDescription, error) {
	d := &c.d
	if sd := d.sds[sql]; sd != nil {
		return sd, nil
	}
	sd, err := conn.Prepare(ctx, sql, sql)
	if err != nil {
		return nil, err
	}
	if len(sd.Fields) != columns {
		return nil, fmt.Errorf("pglock: lock statement answers %d columns, not %d", len(sd.Fields), columns)
	}
	if d.sds == nil {
		d.sds = make(map[string]*pgconn.StatementDescription, 8)
	}
	d.sds[sql] = sd
	return sd, nil
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
