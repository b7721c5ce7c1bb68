package pglock_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// randomName returns a name of 0 to maxLen runes drawn from ASCII, Latin,
// Greek, CJK and emoji (never NUL, which text cannot hold).
func randomName(r *rand.Rand, maxLen int) string {
	ranges := [][2]rune{{0x20, 0x7e}, {0xa0, 0x24f}, {0x370, 0x3ff}, {0x4e00, 0x9fff}, {0x1f600, 0x1f64f}, {0x1, 0x1f}}
	n := r.IntN(maxLen + 1)
	var b strings.Builder
	for range n {
		rg := ranges[r.IntN(len(ranges))]
		b.WriteRune(rg[0] + r.Int32N(rg[1]-rg[0]+1))
	}
	return b.String()
}

// pglock_key, installed from KeyFunctionsSQL, equals KeyOf on the pinned
// vectors of the Python package and on 1,000 random names (unicode, empty,
// long); pglock_key_tag equals Key.LockTag, and finds a held lock in
// pg_locks; installing twice is fine.
func TestKeyFunctionsSQL(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	schema := fmt.Sprintf("pglock_keysql_%d", rand.Uint32())
	for _, q := range []string{"CREATE SCHEMA " + schema, "SET search_path = " + schema + ", public"} {
		if _, err := conn.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	defer conn.Exec(context.Background(), "DROP SCHEMA "+schema+" CASCADE")
	for range 2 {
		if _, err := conn.Exec(ctx, pglock.KeyFunctionsSQL, pgx.QueryExecModeSimpleProtocol); err != nil {
			t.Fatalf("install the key functions: %v", err)
		}
	}

	names := []string{"shared-identifier", "test", "", "héllo", "0", "42", "-1", strings.Repeat("long name ", 1000)}
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 1000 {
		maxLen := 40
		if i%100 == 0 {
			maxLen = 5000
		}
		names = append(names, randomName(r, maxLen))
	}
	rows, err := conn.Query(ctx, `SELECT n, pglock_key(n), t.classid, t.objid, t.objsubid
		FROM unnest($1::text[]) WITH ORDINALITY AS u(n, i), pglock_key_tag(n) AS t ORDER BY i`, names)
	if err != nil {
		t.Fatal(err)
	}
	got := 0
	for rows.Next() {
		var name string
		var key int64
		var classid, objid uint32
		var objsubid int16
		if err := rows.Scan(&name, &key, &classid, &objid, &objsubid); err != nil {
			t.Fatal(err)
		}
		want := mustKey(t, name)
		if key != want.Int64() {
			t.Errorf("pglock_key(%.40q) = %d, KeyOf = %d", name, key, want.Int64())
		}
		wc, wo, ws := want.LockTag()
		if classid != wc || objid != wo || objsubid != ws {
			t.Errorf("pglock_key_tag(%.40q) = (%d, %d, %d), LockTag = (%d, %d, %d)", name, classid, objid, objsubid, wc, wo, ws)
		}
		got++
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if got != len(names) {
		t.Fatalf("%d rows for %d names", got, len(names))
	}
	for _, tc := range []struct {
		name string
		want int64
	}{{"test", -6248023315878667354}, {"shared-identifier", -464685171814670893}, {"héllo", 3870257040188514168}, {"", -2721964255587120371}} {
		var key int64
		if err := conn.QueryRow(ctx, "SELECT pglock_key($1)", tc.name).Scan(&key); err != nil || key != tc.want {
			t.Errorf("pglock_key(%q) = %d, %v; want %d", tc.name, key, err, tc.want)
		}
	}

	// A lock taken in Go is found through pglock_key_tag, and one taken in
	// SQL with pglock_key is the same lock.
	pool := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	l, _ := pglock.NewLock(pool, name)
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	var found int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_locks l, pglock_key_tag($1) t
		WHERE l.locktype = 'advisory' AND l.granted AND (l.classid, l.objid, l.objsubid) = (t.classid, t.objid, t.objsubid)`, name).Scan(&found); err != nil {
		t.Fatal(err)
	}
	if found != 1 {
		t.Errorf("pg_locks rows found through pglock_key_tag = %d, want 1", found)
	}
	var ok bool
	if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock(pglock_key($1))", name).Scan(&ok); err != nil || ok {
		t.Errorf("pg_try_advisory_lock(pglock_key(name)) while Go holds the key = %v, %v; want false", ok, err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock(pglock_key($1))", name).Scan(&ok); err != nil || !ok {
		t.Errorf("pg_try_advisory_lock(pglock_key(name)) after release = %v, %v; want true", ok, err)
	}
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_unlock(pglock_key($1))", name); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, pool, l.Key())
}
