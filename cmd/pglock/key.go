package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"text/tabwriter"

	"github.com/pglockkit/kit/pglock"
)

const keyUsage = `usage: pglock key [--json] STRING...

Key prints, for each STRING, the advisory key it maps to: the same number
as pglock.KeyOf(STRING) in Go and postgresql-lock in Python (SHA-1 of the
UTF-8 text, first 8 bytes as a big-endian signed integer). It needs no
database.

	INT64   the key, as pg_advisory_lock(INT64) takes it
	HIGH    its upper 32 bits as a signed integer: pg_locks.classid
	LOW     its lower 32 bits as a signed integer: pg_locks.objid
	NAME    the STRING

pg_locks shows the two halves as unsigned oids, with objsubid 1: add
4294967296 to a negative half. The halves are not a key of the (integer,
integer) space: pg_advisory_lock(HIGH, LOW) is a different lock.

	--json   print a JSON array instead of a table
`

// keyEntry is one line of "pglock key"; its JSON form is the output of
// "pglock key --json".
type keyEntry struct {
	Name     string `json:"name"`
	Int64    int64  `json:"int64"`
	High     int32  `json:"high"`
	Low      int32  `json:"low"`
	ClassID  uint32 `json:"classid"` // as pg_locks shows it
	ObjID    uint32 `json:"objid"`
	ObjSubID int16  `json:"objsubid"`
}

func newKeyEntry(name string) keyEntry {
	k, _ := pglock.KeyOf(name) // a string is always a valid key
	classid, objid, objsubid := k.LockTag()
	v := k.Int64()
	return keyEntry{Name: name, Int64: v, High: int32(v >> 32), Low: int32(v),
		ClassID: classid, ObjID: objid, ObjSubID: objsubid}
}

func (c *cli) keyCommand(args []string) int {
	fset := flag.NewFlagSet("key", flag.ContinueOnError)
	asJSON := fset.Bool("json", false, "print JSON")
	if code, done := c.parse(fset, args, keyUsage); done {
		return code
	}
	if fset.NArg() == 0 {
		return c.usageError("key", "missing STRING")
	}
	entries := make([]keyEntry, fset.NArg())
	for i, s := range fset.Args() {
		entries[i] = newKeyEntry(s)
	}
	if *asJSON {
		enc := json.NewEncoder(c.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(entries); err != nil {
			return c.fail(exitUsage, "key", "%v", err)
		}
		return exitOK
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "INT64\tHIGH\tLOW\t  NAME")
	for _, e := range entries {
		fmt.Fprintf(tw, "%d\t%d\t%d\t  %s\n", e.Int64, e.High, e.Low, printable(e.Name))
	}
	if err := tw.Flush(); err != nil {
		return c.fail(exitUsage, "key", "%v", err)
	}
	return exitOK
}
