package riverlock

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/riverqueue/river/rivertype"
)

// DefaultSnooze is how long a job whose key is busy is snoozed by the
// default policy, and by Snooze(0).
const DefaultSnooze = time.Second

// KeyFunc returns the lock key of a job. ok false means the job has no key
// and runs untouched, without a lock. An error fails the job's attempt with
// an error matching [ErrKey] and err; the job is retried as River's retry
// policy says. Return river.JobCancel(err) to cancel the job at once instead
// (River finds its cancel error through the wrapping).
//
// The key is prefixed with the kind's namespace (by default "river:" + kind
// + ":") and then with the Locker's namespace, if any, before it is hashed.
// ("", true, nil) is a valid key: every job of the kind then shares one
// lock.
//
// A KeyFunc runs in the worker middleware, before River decodes the job's
// args: it sees the encoded args in job.EncodedArgs. [ArgsKey] decodes them
// for args types that implement LockKey.
type KeyFunc func(job *rivertype.JobRow) (key string, ok bool, err error)

// JobArgsWithLockKey is job args that name their own lock key, in the way
// River's JobArgsWithInsertOpts name their insert options. An empty LockKey
// means no key: the job runs without a lock.
type JobArgsWithLockKey interface {
	rivertype.JobArgs
	LockKey() string
}

// ArgsKey returns a KeyFunc that decodes a job's args as T, as River does
// before Work, and returns T's LockKey. Register it for T's kind:
//
//	Kinds: map[string]riverlock.KindConfig{
//		ChargeArgs{}.Kind(): {Key: riverlock.ArgsKey[ChargeArgs]()},
//	}
//
// (River decodes args only after the worker middleware has run, so the
// middleware needs T to find the key.) The KeyFunc fails, with [ErrKey], for
// a job whose args do not decode as T or whose kind is not T's kind or one of
// its KindAliases: registered under the wrong kind, it says so rather than
// lock on a wrong key.
func ArgsKey[T JobArgsWithLockKey]() KeyFunc {
	return func(job *rivertype.JobRow) (string, bool, error) {
		var args T
		if err := json.Unmarshal(job.EncodedArgs, &args); err != nil {
			return "", false, fmt.Errorf("decode args as %T: %w", args, err)
		}
		if kind := args.Kind(); kind != job.Kind {
			aliased, ok := any(args).(interface{ KindAliases() []string })
			if !ok || !slices.Contains(aliased.KindAliases(), job.Kind) {
				return "", false, fmt.Errorf("riverlock.ArgsKey[%T] used for kind %q; %T is kind %q", args, job.Kind, args, kind)
			}
		}
		key := args.LockKey()
		return key, key != "", nil
	}
}

type action int

const (
	actSnooze action = iota // the zero Policy: snooze for DefaultSnooze
	actCancel
	actWait
)

// Policy says what the middleware does with a job whose lock another job
// holds. Make one with [Snooze], [Cancel] or [Wait]. The zero Policy is
// Snooze(DefaultSnooze), the default.
type Policy struct {
	act action
	d   time.Duration
	err error
}

// Snooze returns the policy that snoozes a job whose key is busy for d: the
// middleware returns River's snooze error (river.JobSnooze(d), wrapped with
// [ErrBusy]), so River makes the job available again after d without
// counting an attempt (it records no error, and counts snoozes in the job's
// metadata). Jobs of one key then run one after the other, on any node.
// Snooze(0) snoozes for [DefaultSnooze]; a negative d is an error at
// NewMiddleware.
//
// A snooze shorter than River's scheduler interval (5 s by default) makes
// the job available at once with a later scheduled_at; clients see it on
// their next fetch poll (river.Config.FetchPollInterval).
func Snooze(d time.Duration) Policy {
	switch {
	case d < 0:
		return Policy{err: fmt.Errorf("%w: Snooze(%v): negative duration", ErrInvalidConfig, d)}
	case d == 0:
		d = DefaultSnooze
	}
	return Policy{act: actSnooze, d: d}
}

// Cancel returns the dedupe policy: a job whose key is busy is a duplicate
// of the job that holds it, and is cancelled with river.JobCancel. River
// records the reason in the job's errors ("JobCancelError: riverlock: lock
// busy: ... cancelled as a duplicate") and never runs it again.
func Cancel() Policy { return Policy{act: actCancel} }

// Wait returns the policy that waits up to limit for a busy key, holding the
// job's worker slot and a connection of the Locker's pool while it waits. River's job timeout covers only Work, not
// the middleware, hence the limit of its own, which must be positive. When it
// passes, the attempt fails with an error matching [ErrBusy],
// pglock.ErrNotAcquired and context.DeadlineExceeded, and River retries the
// job as its retry policy says (an attempt is counted: use Snooze to avoid
// that).
func Wait(limit time.Duration) Policy {
	if limit <= 0 {
		return Policy{err: fmt.Errorf("%w: Wait(%v): the limit must be positive", ErrInvalidConfig, limit)}
	}
	return Policy{act: actWait, d: limit}
}

// String describes the policy: "snooze(1s)", "cancel" or "wait(30s)".
func (p Policy) String() string {
	switch {
	case p.err != nil:
		return "invalid(" + p.err.Error() + ")"
	case p.act == actCancel:
		return "cancel"
	case p.act == actWait:
		return fmt.Sprintf("wait(%v)", p.d)
	case p.d == 0:
		return fmt.Sprintf("snooze(%v)", DefaultSnooze)
	default:
		return fmt.Sprintf("snooze(%v)", p.d)
	}
}

func (p Policy) isZero() bool { return p == Policy{} }

// Config configures a [Middleware]. A nil *Config is the zero Config: no
// key function and no kinds, so every job runs untouched; give a Key or
// Kinds to lock anything.
type Config struct {
	// Key gives the lock key of jobs whose kind has no Key of its own in
	// Kinds. Nil (the default): such jobs run untouched.
	Key KeyFunc

	// Busy is what happens to a job whose key is busy, for kinds that do
	// not set their own. The zero Policy (the default) is
	// Snooze(DefaultSnooze).
	Busy Policy

	// Namespace prefixes every key, for kinds that do not set their own.
	// Empty (the default) means "river:" + kind + ":", so that jobs of two
	// kinds never contend by accident; give two kinds the same Namespace to
	// serialize them with each other (all jobs of one customer, say).
	Namespace string

	// Limit is how many jobs of one key may run at once, across every node,
	// for kinds that do not set their own: at most 3 exports per tenant,
	// say. Zero (the default) and 1 mean one at a time, the key's lock.
	// Above 1 the key names a pglock.Semaphore of Limit slots
	// ([pglock.Locker.Semaphore]) and each job holds a slot while it runs; a
	// job that finds every slot taken is busy, and the busy Policy decides
	// as for a held lock (under Wait it queues for a slot, first come first
	// served across nodes). Every node must give a key the same Limit, and
	// kinds that share a Namespace must too (NewMiddleware checks its own
	// Config). A limit above 1 needs a Locker in Session scope, gives the
	// worker's context no fencing token (slots take none), and is 1024 at
	// most; a negative Limit is an error.
	Limit int

	// Kinds overrides Key, Busy, Namespace and Limit per job kind. Zero
	// fields of a KindConfig take the values above.
	Kinds map[string]KindConfig

	// Logger logs busy jobs (Debug), key errors and locks lost or not
	// released cleanly (Warn). Nil (the default) logs nothing. The Locker's
	// own logger, if any, logs each lock as well.
	Logger *slog.Logger
}

// KindConfig is the per-kind part of [Config]. Its zero fields take the
// Config's values.
type KindConfig struct {
	// Key gives the lock key of this kind's jobs; [ArgsKey] reads it from
	// args that implement LockKey. Nil: Config.Key.
	Key KeyFunc

	// Busy overrides Config.Busy for this kind. Zero: Config.Busy.
	Busy Policy

	// Namespace overrides Config.Namespace for this kind. Empty:
	// Config.Namespace, else "river:" + kind + ":".
	Namespace string

	// Limit overrides Config.Limit for this kind: how many of its jobs of
	// one key may run at once. Zero: Config.Limit.
	Limit int
}

// kindSettings is a kind's resolved configuration.
type kindSettings struct {
	key       KeyFunc
	busy      Policy
	namespace string // "" means "river:" + kind + ":"
	limit     int    // 0 means 1
}

func (s kindSettings) prefix(kind string) string {
	if s.namespace != "" {
		return s.namespace
	}
	return DefaultNamespace(kind)
}

// DefaultNamespace returns the namespace of a kind's keys when none is
// configured: "river:" + kind + ":". [WorkTx] always uses it.
func DefaultNamespace(kind string) string { return "river:" + kind + ":" }
