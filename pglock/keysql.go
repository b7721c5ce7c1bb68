package pglock

// KeyFunctionsSQL creates SQL functions that compute [KeyOf]'s rule in the
// database, so that psql, PL/pgSQL, pg_cron jobs and programs in other
// languages can take the same locks as this package, and find them in
// pg_locks:
//
//	SELECT pg_advisory_lock(pglock_key('invoice:42'));  -- KeyOf("invoice:42")
//	SELECT * FROM pg_locks l, pglock_key_tag('invoice:42') t
//	 WHERE l.locktype = 'advisory' AND (l.classid, l.objid, l.objsubid) = (t.classid, t.objid, t.objsubid);
//
// pglock_key(text) returns the bigint key of a name: the first 8 bytes of
// the SHA-1 digest of its UTF-8 form, big-endian and signed (the Python
// package postgresql-lock's rule). An integer key is hashed as its decimal
// text, as KeyOf does: pglock_key(42::text). A Locker's namespace is a prefix
// of the name: pglock_key('http:' || 'orders:7'). pglock_key_tag(text)
// returns the key's columns in pg_locks (see [Key.LockTag]).
//
// The statements create pgcrypto (for digest; PostgreSQL ships it in its
// contrib package, and it is a trusted extension from PostgreSQL 13, which a
// database owner may create) if it is missing, then the functions in the
// first schema of search_path; run them again to replace them. The functions
// keep the search_path they were created with (pgcrypto may live in a schema
// of its own, such as extensions: have it on the path when you run them).
// `pglock sql` prints them.
const KeyFunctionsSQL = `CREATE EXTENSION IF NOT EXISTS pgcrypto;

-- pglock_key(name): the advisory lock key of a name, as pglock.KeyOf (Go) and
-- postgresql-lock (Python) compute it: the first 8 bytes of the SHA-1 digest
-- of the name's UTF-8 form, as a big-endian signed bigint.
CREATE OR REPLACE FUNCTION pglock_key(name text) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path FROM CURRENT -- where pgcrypto's digest was found, whatever the caller's
AS $$
  SELECT ('x' || encode(substr(digest(convert_to(name, 'UTF8'), 'sha1'), 1, 8), 'hex'))::bit(64)::bigint
$$;

-- pglock_key_tag(name): where the key of a name shows in pg_locks
-- (locktype = 'advisory'): its high and low 32 bits, and objsubid 1 for a
-- bigint key.
CREATE OR REPLACE FUNCTION pglock_key_tag(name text, OUT classid oid, OUT objid oid, OUT objsubid smallint)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path FROM CURRENT
AS $$
  SELECT ((k >> 32) & 4294967295)::oid, (k & 4294967295)::oid, 1::smallint
  FROM (SELECT pglock_key(name) AS k) AS key
$$;
`
