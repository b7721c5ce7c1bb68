package locktest

import (
	"context"
	"log/slog"
	"sync"
)

// SlogRecords keeps what is logged through its Logger, for tests that check
// what an adapter logged, at which level and with which error (matched with
// errors.Is, not by its text). It is safe for concurrent use; the zero
// value is ready.
type SlogRecords struct {
	mu   sync.Mutex
	recs []SlogRecord
}

// SlogRecord is one record: its level, its message and the value of its
// "error" attribute (nil when it has none, or one that is not an error).
type SlogRecord struct {
	Level slog.Level
	Msg   string
	Err   error
}

// Logger returns a logger, enabled at every level, that records into s.
func (s *SlogRecords) Logger() *slog.Logger { return slog.New(slogRecorder{s: s}) }

// Errors returns the errors of the records at level whose message is msg,
// in the order they were logged (a nil error for a record without one).
func (s *SlogRecords) Errors(level slog.Level, msg string) []error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, r := range s.recs {
		if r.Level == level && r.Msg == msg {
			errs = append(errs, r.Err)
		}
	}
	return errs
}

// All returns every record, in the order they were logged.
func (s *SlogRecords) All() []SlogRecord {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]SlogRecord(nil), s.recs...)
}

type slogRecorder struct {
	s     *SlogRecords
	attrs []slog.Attr // from WithAttrs
}

func (slogRecorder) Enabled(context.Context, slog.Level) bool { return true }

func (h slogRecorder) Handle(_ context.Context, r slog.Record) error {
	rec := SlogRecord{Level: r.Level, Msg: r.Message}
	take := func(a slog.Attr) bool {
		if err, ok := a.Value.Any().(error); ok && a.Key == "error" {
			rec.Err = err
		}
		return true
	}
	for _, a := range h.attrs {
		take(a)
	}
	r.Attrs(take)
	h.s.mu.Lock()
	h.s.recs = append(h.s.recs, rec)
	h.s.mu.Unlock()
	return nil
}

func (h slogRecorder) WithAttrs(attrs []slog.Attr) slog.Handler {
	return slogRecorder{s: h.s, attrs: append(h.attrs[:len(h.attrs):len(h.attrs)], attrs...)}
}

func (h slogRecorder) WithGroup(string) slog.Handler { return h }
