package gocronlock

import (
	"log/slog"

	"github.com/go-co-op/gocron/v2"
)

// logger sends a job's (or election's) messages to the gocron.Logger of its
// options, with the attributes that name it; with no logger given, to
// slog.Default() (def).
type logger struct {
	l gocron.Logger
	// def: no logger was given, so messages go to slog.Default(), read at
	// each message (a program may set it after making its jobs).
	def bool
	kv  []any
}

// newLogger returns the logger of cfg's options, naming kv on every message.
func (c *config) newLogger(kv ...any) logger {
	return logger{l: c.log, def: !c.logSet, kv: kv}
}

// withKV returns l naming kv too.
func (l logger) withKV(kv ...any) logger {
	l.kv = l.with(kv...)
	return l
}

func (l logger) with(kv ...any) []any { return append(append([]any(nil), l.kv...), kv...) }

// to returns where messages go: nil when logging is off.
func (l logger) to() gocron.Logger {
	if l.def {
		return slog.Default()
	}
	return l.l
}

func (l logger) enabled() bool { return l.def || l.l != nil }

func (l logger) debug(err error, msg string, kv ...any) {
	if to := l.to(); to != nil {
		to.Debug(msg, l.with(append(kv, "error", err)...)...)
	}
}

func (l logger) info(msg string, kv ...any) {
	if to := l.to(); to != nil {
		to.Info(msg, l.with(kv...)...)
	}
}

func (l logger) warn(err error, msg string, kv ...any) {
	if to := l.to(); to != nil {
		to.Warn(msg, l.with(append(kv, "error", err)...)...)
	}
}

func (l logger) error(err error, msg string, kv ...any) {
	if to := l.to(); to != nil {
		to.Error(msg, l.with(append(kv, "error", err)...)...)
	}
}
