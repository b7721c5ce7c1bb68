package otellock

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel/metric"
)

// The instruments of the server's lock table (RecordLockTable).
const (
	advisoryName = "pglock.server.advisory_locks"
	capacityName = "pglock.server.lock_table.capacity"
	tableUseName = "pglock.server.lock_table.utilization"
)

// lockTableSQL counts the advisory locks of the whole server (pg_locks shows
// every database) and reads the lock table's size, as `pglock locks` does.
const lockTableSQL = `SELECT count(*) FILTER (WHERE locktype = 'advisory'),
	current_setting('max_locks_per_transaction')::int8 *
	(current_setting('max_connections')::int8 + current_setting('max_prepared_transactions')::int8)
FROM pg_catalog.pg_locks`

// RecordLockTable reports, at each collection, the server's lock-table
// health, the figures `pglock locks` prints: read with one query on db
// (bounded by timeout, 2 s when zero), until the returned registration is
// unregistered.
//
//   - pglock.server.advisory_locks {lock}: advisory locks held or waited
//     for on the whole server (every database; pg_locks rows).
//   - pglock.server.lock_table.capacity {lock}: the lock table's size,
//     max_locks_per_transaction * (max_connections + max_prepared_transactions).
//   - pglock.server.lock_table.utilization (unit 1): the first over the
//     second. A full lock table fails every session of the server with "out
//     of shared memory"; alert well before 1 (`pglock locks` warns above
//     0.5).
//
// Reading pg_locks takes each of the lock manager's partition locks in turn:
// record it from one process of a fleet, at the usual collection interval,
// not from every replica every second. A failed query reports nothing for
// that collection and returns its error to the SDK.
func (in *Instrumentation) RecordLockTable(db *pgxpool.Pool, timeout time.Duration) (metric.Registration, error) {
	if db == nil {
		return nil, fmt.Errorf("%w: RecordLockTable: nil *pgxpool.Pool", ErrInvalidOption)
	}
	if timeout < 0 {
		return nil, fmt.Errorf("%w: RecordLockTable: negative timeout %v", ErrInvalidOption, timeout)
	}
	if timeout == 0 {
		timeout = 2 * time.Second
	}
	s := in.statSets
	return in.meter.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		var held, capacity int64
		if err := db.QueryRow(ctx, lockTableSQL).Scan(&held, &capacity); err != nil {
			return fmt.Errorf("otellock: read the lock table: %w", err)
		}
		o.ObserveInt64(in.advisory, held, s.base)
		o.ObserveInt64(in.capacity, capacity, s.base)
		if capacity > 0 {
			o.ObserveFloat64(in.tableUse, float64(held)/float64(capacity), s.base)
		}
		return nil
	}, in.advisory, in.capacity, in.tableUse)
}

func (in *Instrumentation) newLockTableInstruments() (err error) {
	m := in.meter
	if in.advisory, err = m.Int64ObservableUpDownCounter(advisoryName, metric.WithUnit("{lock}"),
		metric.WithDescription("Advisory locks held or waited for on the whole server (pg_locks rows of every database).")); err != nil {
		return err
	}
	if in.capacity, err = m.Int64ObservableUpDownCounter(capacityName, metric.WithUnit("{lock}"),
		metric.WithDescription("The server's shared lock table: max_locks_per_transaction * (max_connections + max_prepared_transactions).")); err != nil {
		return err
	}
	in.tableUse, err = m.Float64ObservableGauge(tableUseName, metric.WithUnit("1"),
		metric.WithDescription("pglock.server.advisory_locks over pglock.server.lock_table.capacity: a full table fails every session of the server."))
	return err
}
