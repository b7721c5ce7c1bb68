package gocronlock

import "github.com/go-co-op/gocron/v2"

// logger sends a job's (or election's) messages to the gocron.Logger of its
// options, if any, with the attributes that name it.
type logger struct {
	l  gocron.Logger
	kv []any
}

func (l logger) with(kv ...any) []any { return append(append([]any(nil), l.kv...), kv...) }

func (l logger) enabled() bool { return l.l != nil }

func (l logger) info(msg string, kv ...any) {
	if l.l != nil {
		l.l.Info(msg, l.with(kv...)...)
	}
}

func (l logger) warn(err error, msg string, kv ...any) {
	if l.l != nil {
		l.l.Warn(msg, l.with(append(kv, "error", err)...)...)
	}
}

func (l logger) error(err error, msg string, kv ...any) {
	if l.l != nil {
		l.l.Error(msg, l.with(append(kv, "error", err)...)...)
	}
}
