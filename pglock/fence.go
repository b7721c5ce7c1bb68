package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Fencing tokens.
//
// A lock bounds who runs, not what lands: a holder paused (by GC, a slow
// disk) after its connection died can still write after the next holder
// started. A fencing token is a number that grows with every grant of a key;
// the protected resource remembers the highest it has seen and refuses lower
// ones. With [WithToken] a Lock takes a token with each grant of its key
// (pglock.fence, see [Migrate]) on the lock's own session, right after the
// grant; [Lock.Token] returns it, and the function given to Do finds it with
// [TokenFromContext] (so the adapters' request, job and call contexts carry
// it).
//
// For work in PostgreSQL, [CheckFence] inside the work's own transaction (on
// any connection) fails with [ErrFenced] when a newer token was granted, and
// otherwise keeps the next grant from being recorded until that transaction
// ends (it share-locks the key's row, which the next grant updates): a stale
// holder's transaction cannot commit after a newer holder got its token. For
// an outside system, pass the token with each write and have it refuse a
// token lower than the highest it has seen.

// ErrFenced means a fencing check failed: a newer token was granted for the
// key than the one presented (the holder is stale), or none was ever granted.
var ErrFenced = errors.New("pglock: fenced off: a newer fencing token was granted")

// nextTokenSQL is the next fencing token: the server's timeline (from the
// name of the WAL file being written) times 2^48, plus the next value of the
// sequence pglock.fence_token. A promoted standby writes on a new, higher
// timeline, so its tokens are above every token of the old primary even when
// the last sequence values had not reached it (asynchronous replication):
// tokens never go back across a failover. Within a timeline the sequence
// orders them (2^48 tokens per timeline). The key's row has the last word:
// a token is at least one above the key's last (greatest), so a key's tokens
// increase even where the sequence does not (an engine that caches sequence
// values per connection, a server restored from an older backup); such a
// token, given by a grant that rolls back, can be given again.
//
// YugabyteDB has no timelines (it replicates by Raft, synchronously) and no
// pg_current_wal_lsn() ("not yet supported"), but caches sequence values
// per connection: there the offset is 0 and the key's row alone orders a
// key's tokens. The choice is made by the server, per statement (its
// server_version names YugabyteDB with "-YB-"): a CASE evaluates only the
// branch it takes, and the WAL functions are volatile, so they are never
// evaluated ahead of it.
const nextTokenSQL = timelineSQL + ` + nextval('pglock.fence_token')`

// timelineSQL is the token's offset (see nextTokenSQL): the timeline times
// 2^48, or 0 on YugabyteDB.
const timelineSQL = `(CASE WHEN pg_catalog.current_setting('server_version') LIKE '%-YB-%' THEN 0::bigint` +
	` ELSE ('x' || substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8))::bit(32)::bigint << 48 END)`

const (
	// tokenSQL takes the next token of a key (see nextTokenSQL; never given
	// back, even by a grant whose transaction rolls back); run on the
	// session (or in the transaction) that holds the key's lock, so that a
	// holder whose session died cannot take one after the next holder did.
	tokenSQL = `INSERT INTO pglock.fence AS f (key_space, key, token)
VALUES ($1::smallint, $2::bigint, ` + nextTokenSQL + `)
ON CONFLICT (key_space, key) DO UPDATE SET token = greatest(EXCLUDED.token, f.token + 1), granted_at = clock_timestamp()
RETURNING f.token`
	// tokenNoWaitSQL is tokenSQL that fails at once (55P03) instead of
	// waiting while a transaction that passed CheckFence keeps the key's row
	// share-locked: on a session the lock shares with others' requests, the
	// wait happens between attempts, not in a statement.
	tokenNoWaitSQL = `WITH held AS (
	SELECT 1 FROM pglock.fence WHERE key_space = $1::smallint AND key = $2::bigint FOR UPDATE NOWAIT)
INSERT INTO pglock.fence AS f (key_space, key, token)
SELECT $1::smallint, $2::bigint, ` + nextTokenSQL + ` FROM (SELECT count(*) FROM held) AS h
ON CONFLICT (key_space, key) DO UPDATE SET token = greatest(EXCLUDED.token, f.token + 1), granted_at = clock_timestamp()
RETURNING f.token`
	fenceSQL = `SELECT token FROM pglock.fence WHERE key_space = $1 AND key = $2 FOR SHARE`
)

// lockNotAvailable is the SQLSTATE of a NOWAIT row lock that was taken.
const lockNotAvailable = "55P03"

// WithToken makes the lock take a fencing token with each grant (see
// [Lock.Token]); it needs the pglock schema ([Migrate]). Only exclusive
// grants take one: a shared hold, which others hold at the same time, gets
// none (Token is 0), so that a Locker made WithToken may still lock some
// keys in Shared mode (httplock's SharedForSafeMethods).
//
// Tokens come from a sequence (pglock.fence_token), so a key's tokens
// strictly increase from one grant to the next, and a grant whose
// transaction rolls back never gives its number to the next one. They are
// offset by the server's timeline times 2^48, so that a standby promoted
// after a failover, which may lack the last values of the sequence
// (asynchronous replication), still grants tokens above every token of the
// old primary. In Session
// scope the token is taken on the lock's own session right after the grant
// (one more round trip, a durable write); in Transaction scope, in the
// lock's transaction, where the work must be too (the key's row is updated
// there, so a CheckFence from another connection would see the previous
// token until it commits). While a transaction that passed [CheckFence] on
// the key is still open, the grant waits for it (polling, without holding
// a shared connection); after the release timeout ([WithReleaseTimeout]),
// or if the token cannot be taken (the schema is missing: [ErrSchema]), the
// grant is let go and the acquire fails. On a caller's transaction (pgx.Tx,
// *sql.Tx) a failed token aborts that transaction.
func WithToken() Option {
	return func(c *config) { c.token = true }
}

// Token returns the fencing token of the current hold, taken at its grant
// (see [WithToken]); 0 when the lock is not held or takes no tokens. Tokens
// of a key strictly increase from one grant to the next, across every
// process.
func (l *Lock) Token() int64 {
	if l == nil {
		return 0
	}
	return l.tokenV.Load()
}

type tokenKey struct{}

// TokenFromContext returns the fencing token of the lock held around the
// function given to Do or TryDo (of a Lock or Locker made WithToken), and
// so of the adapters' request, job and call contexts.
func TokenFromContext(ctx context.Context) (int64, bool) {
	t, ok := ctx.Value(tokenKey{}).(int64)
	return t, ok
}

// ContextWithToken returns a copy of ctx that carries a fencing token, for
// adapters that hold a lock without Do: TokenFromContext returns it.
func ContextWithToken(ctx context.Context, token int64) context.Context {
	return context.WithValue(ctx, tokenKey{}, token)
}

// keySpace is the key's pg_locks.objsubid: 1 for a bigint key, 2 for a pair.
func (k Key) keySpace() int16 {
	if k.pair {
		return 2
	}
	return 1
}

// tokenOnce runs the token statement once on q, which runs on the session
// or in the transaction that holds the lock; nowait (on a session) fails at
// once with 55P03 when the key's row is share-locked by a fenced
// transaction, instead of waiting in the statement.
//
// With timed, the statement is bounded by a context of the release timeout
// (pgx closes the connection when it passes); without, the caller bounds it
// (a lock connection's socket deadline).
func (l *Lock) tokenOnce(ctx context.Context, q any, nowait, timed bool) (int64, error) {
	if timed {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(context.WithoutCancel(ctx), l.cfg.releaseTimeout)
		defer cancel()
	}
	query := tokenSQL
	if nowait {
		query = tokenNoWaitSQL
	}
	var token int64
	var err error
	space, key := l.key.keySpace(), l.key.v
	switch q := q.(type) {
	case interface {
		QueryRow(context.Context, string, ...any) pgx.Row
	}:
		err = q.QueryRow(ctx, query, space, key).Scan(&token)
	case interface {
		QueryRowContext(context.Context, string, ...any) *sql.Row
	}:
		err = q.QueryRowContext(ctx, query, space, key).Scan(&token)
	default:
		err = fmt.Errorf("pglock: no connection to take a token on (%T)", q)
	}
	return token, err
}

// takeToken takes the token with attempt (tokenOnce on the lock's session
// or transaction), trying again with a growing pause while a transaction
// that passed CheckFence keeps the key's row locked (the next grant waits
// for it to end), until ctx ends or the release timeout passes: then the
// grant is let go.
func (l *Lock) takeToken(ctx context.Context, attempt func() (int64, error)) (int64, error) {
	deadline := time.Now().Add(l.cfg.releaseTimeout)
	pause := minPollInterval
	for {
		token, err := attempt()
		var pgErr *pgconn.PgError
		if err == nil || !errors.As(err, &pgErr) || pgErr.Code != lockNotAvailable {
			if err != nil {
				return 0, fmt.Errorf("pglock: take a fencing token: %w", schemaErr(err))
			}
			return token, nil
		}
		if time.Now().Add(pause).After(deadline) {
			return 0, fmt.Errorf("pglock: take a fencing token: key %s: its fence row or the fence table is locked after %v"+
				" (a transaction that passed its fence check is still open, or a migration waits): %w",
				l.key, l.cfg.releaseTimeout, err)
		}
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return 0, fmt.Errorf("pglock: take a fencing token: %w", ctx.Err())
		case <-t.C:
		}
		pause = min(2*pause, maxPollInterval)
	}
}

// CheckFence checks, inside tx (the work's transaction: a pgx.Tx or a
// *sql.Tx, on any connection), that token is still the newest fencing token
// of key: it returns an error matching [ErrFenced] when a newer one was
// granted, or none was. When it returns nil, no newer token can be granted
// until tx ends (the next grant waits for it): commit the work in tx, and a
// stale holder's work can never land after a newer holder's grant. It needs
// the pglock schema ([Migrate]) and the UPDATE privilege on pglock.fence
// (for the row lock).
func CheckFence(ctx context.Context, tx any, key Key, token int64) error {
	if ctx == nil {
		ctx = context.Background()
	}
	q, err := txOf("CheckFence", tx)
	if err != nil {
		return err
	}
	var current int64
	err = q.scan(ctx, fenceSQL, &current, key.keySpace(), key.v)
	switch {
	case errors.Is(err, errNoRow):
		return fmt.Errorf("%w: key %s: no token was ever granted (token %d presented)", ErrFenced, key, token)
	case err != nil:
		return fmt.Errorf("pglock: fence check of key %s: %w", key, schemaErr(err))
	case current != token:
		return fmt.Errorf("%w: key %s: token %d presented, %d is the newest", ErrFenced, key, token, current)
	}
	return nil
}

// Fence is [CheckFence] for the lock's current hold: its key and token. It
// fails with ErrFenced too when the lock holds no token (not held, or not
// made WithToken).
func (l *Lock) Fence(ctx context.Context, tx any) error {
	if err := l.unmade(); err != nil {
		return fmt.Errorf("%w: %w", ErrFenced, err)
	}
	token := l.Token()
	if token == 0 {
		return fmt.Errorf("%w: key %s: the lock holds no token (not held, or made without WithToken)", ErrFenced, l.key)
	}
	return CheckFence(ctx, tx, l.key, token)
}

// ClaimTick records, inside tx (the job's transaction: a pgx.Tx or a
// *sql.Tx), that the run of job scheduled at tick (the schedule's time, not
// the clock's: the same on every replica) ran. It returns false when that run
// was already recorded, by any replica: roll back and skip the run. Recorded
// in the same transaction as the job's work, a run happens exactly once
// whatever the replicas' clocks say, and even after the replica that ran it
// first exited. Records older than a week (of the schedule's time) are
// pruned now and then. It needs the pglock schema ([Migrate]).
func ClaimTick(ctx context.Context, tx any, job string, tick time.Time) (bool, error) {
	if job == "" {
		return false, fmt.Errorf("%w: ClaimTick: empty job name", ErrInvalidOption)
	}
	if tick.IsZero() {
		return false, fmt.Errorf("%w: ClaimTick: zero tick time for job %q", ErrInvalidOption, job)
	}
	if ctx == nil {
		ctx = context.Background()
	}
	q, err := txOf("ClaimTick", tx)
	if err != nil {
		return false, err
	}
	const claim = `INSERT INTO pglock.tick (job, tick) VALUES ($1, $2) ON CONFLICT DO NOTHING`
	// Pruning is cheap (the primary key leads with job), but need not run on
	// every tick.
	const prune = `DELETE FROM pglock.tick WHERE job = $1 AND tick < $2`
	tick = tick.Truncate(time.Microsecond) // timestamptz's precision
	n, err := q.exec(ctx, claim, job, tick)
	if err != nil {
		return false, fmt.Errorf("pglock: claim tick %s of job %q: %w", tick.Format(time.RFC3339Nano), job, schemaErr(err))
	}
	if n == 1 && rand.IntN(16) == 0 {
		if _, err := q.exec(ctx, prune, job, tick.Add(-tickRetention)); err != nil {
			return false, fmt.Errorf("pglock: prune the ticks of job %q: %w", job, err)
		}
	}
	return n == 1, nil
}
