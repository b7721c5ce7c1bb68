package cronlock

import (
	"context"
	"log/slog"

	"github.com/robfig/cron/v3"
)

// logger sends a job's messages to the cron.Logger and the *slog.Logger of
// its options, either or both of which may be nil; with neither option
// given, to slog.Default() (def).
type logger struct {
	cron cron.Logger
	slog *slog.Logger
	// def: no logger was given, so messages go to slog.Default(), read at
	// each message (a program may set it after making its jobs).
	def bool
	// attrs name the job and key on every message.
	kv []any
}

func (l logger) enabled() bool { return l.cron != nil || l.slog != nil || l.def }

func (l logger) slogger() *slog.Logger {
	if l.def {
		return slog.Default()
	}
	return l.slog
}

// info logs routine events: level is slog's (Debug or Info); a cron.Logger
// gets them at Info.
func (l logger) info(level slog.Level, msg string, kv ...any) {
	kv = append(append([]any(nil), l.kv...), kv...)
	if l.cron != nil {
		l.cron.Info(msg, kv...)
	}
	if s := l.slogger(); s != nil {
		s.Log(context.Background(), level, msg, kv...)
	}
}

// error logs failures: level is slog's (Warn or Error); a cron.Logger gets
// them at Error, with err.
func (l logger) error(level slog.Level, err error, msg string, kv ...any) {
	kv = append(append([]any(nil), l.kv...), kv...)
	if l.cron != nil {
		l.cron.Error(err, msg, kv...)
	}
	if s := l.slogger(); s != nil {
		s.Log(context.Background(), level, msg, append(kv, "error", err)...)
	}
}
