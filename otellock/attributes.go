package otellock

import (
	"context"
	"errors"

	"github.com/jackc/pgx/v5/pgconn"
	"go.opentelemetry.io/otel/attribute"
	semconv "go.opentelemetry.io/otel/semconv/v1.40.0"

	"github.com/pglockkit/kit/pglock"
)

// The attributes this package sets. The key is on spans only: a metric
// attribute per key would make a time series per key.
const (
	scopeKey     = attribute.Key("pglock.scope")    // "session" | "transaction"
	modeKey      = attribute.Key("pglock.mode")     // "exclusive" | "shared"
	outcomeKey   = attribute.Key("pglock.outcome")  // "acquired" | "busy" | "cancelled" | "error"
	keyKey       = attribute.Key("pglock.key")      // int64, spans only
	keyPairKey   = attribute.Key("pglock.key_pair") // true for an Int32PairKey, spans only
	keyNameKey   = attribute.Key("pglock.key_name") // WithKeyNames only, spans only
	connTypeKey  = attribute.Key("pglock.connection.type")
	connStateKey = attribute.Key("pglock.connection.state") // of a "wait" connection: "waiting" | "holding" | "idle" | "leader"
	errorTypeKey = semconv.ErrorTypeKey                     // "error.type"
)

// ownKey reports whether k is an attribute this package sets.
func ownKey(k attribute.Key) bool {
	switch k {
	case scopeKey, modeKey, outcomeKey, keyKey, keyPairKey, keyNameKey, connTypeKey, connStateKey, errorTypeKey:
		return true
	}
	return false
}

// The values of pglock.outcome.
const (
	outcomeAcquired  = "acquired"
	outcomeBusy      = "busy"
	outcomeCancelled = "cancelled"
	outcomeError     = "error"
)

// outcome says how an attempt to take a lock ended: held, busy (TryAcquire
// or TryDo found it held elsewhere), cancelled (the context ended or the
// wait timeout passed first), or error (anything else).
func outcome(held bool, err error) string {
	switch {
	case held:
		return outcomeAcquired
	case err == nil:
		return outcomeBusy
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return outcomeCancelled
	}
	return outcomeError
}

// errorTypes are the values of error.type, most telling first.
var errorTypes = []struct {
	err  error
	name string
}{
	{pglock.ErrLockLost, "lock_lost"},
	{pglock.ErrTxEnded, "tx_ended"},
	{pglock.ErrLockerClosed, "locker_closed"},
	{pglock.ErrTooManyLocks, "too_many_locks"},
	{pglock.ErrTransactionPooler, "transaction_pooler"},
	{pglock.ErrUnavailable, "unavailable"},
	{pglock.ErrAlreadyHeld, "already_held"},
	{pglock.ErrInDo, "in_do"},
	{context.DeadlineExceeded, "timeout"},
	{context.Canceled, "cancelled"},
	{pglock.ErrNotHeld, "not_held"},
}

// errorType is the error.type of err, a value of low cardinality: the
// pglock sentinel or context error it matches, else the SQLSTATE of a
// database error, else "_OTHER" (an error of the function given to Do).
func errorType(err error) string {
	for _, t := range errorTypes {
		if errors.Is(err, t.err) {
			return t.name
		}
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code != "" {
		return pgErr.Code
	}
	return semconv.ErrorTypeOther.Value.AsString()
}
