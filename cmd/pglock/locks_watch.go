package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// snapshotTimeout bounds one refresh of "pglock locks --watch": a server
// or network gone silent ends the watch with an error instead of leaving
// an old snapshot on the screen as if it were current.
const snapshotTimeout = 10 * time.Second

// ANSI sequences that redraw the screen in place: move the cursor to the
// top left corner, erase the line it is on, erase everything below it.
const (
	cursorHome = "\x1b[H"
	eraseLine  = "\x1b[2K"
	eraseBelow = "\x1b[J"
)

// locksSnapshot is one refresh of "pglock locks --watch"; its JSON form is
// one line of --watch --json.
type locksSnapshot struct {
	Time   time.Time    `json:"time"`
	Locks  []*lockEntry `json:"locks"`
	Health *lockHealth  `json:"health"`
}

// watchLocks is "pglock locks --watch": a snapshot every interval until a
// signal (or the end of ctx) stops it, with status 0; a database error
// ends it with one line and status 2. It keeps one connection for all
// snapshots.
func (c *cli) watchLocks(ctx context.Context, url string, q locksQuerier, interval time.Duration, asJSON bool) int {
	ictx, stop := c.interruptible(ctx)
	defer stop()
	end := func(err error) int {
		if s := stop(); s != nil {
			return exitOK // Ctrl-C or SIGTERM: the way to stop watching
		}
		return c.fail(exitUsage, "locks", "%v", err)
	}
	pool, err := connect(ictx, url)
	if err != nil {
		return end(err)
	}
	defer pool.Close()
	v := &locksView{w: c.stdout, interval: interval, json: asJSON}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		s, err := takeSnapshot(ictx, pool, q)
		if err == nil {
			err = v.show(s)
		}
		if err != nil {
			return end(err)
		}
		select {
		case <-ictx.Done():
			return end(ictx.Err())
		case <-tick.C:
		}
	}
}

func takeSnapshot(ctx context.Context, pool *pgxpool.Pool, q locksQuerier) (*locksSnapshot, error) {
	tctx, cancel := context.WithTimeout(ctx, snapshotTimeout)
	defer cancel()
	s := &locksSnapshot{Time: time.Now()}
	var err error
	if s.Locks, err = q.locks(tctx, pool); err == nil {
		s.Health, err = readLockHealth(tctx, pool)
	}
	if err != nil {
		if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			return nil, fmt.Errorf("the database did not answer within %v", snapshotTimeout)
		}
		return nil, err
	}
	if s.Locks == nil {
		s.Locks = []*lockEntry{}
	}
	return s, nil
}

// locksView shows snapshots: at a terminal, redrawn in place and cut to
// the screen; elsewhere, one after another, separated by a blank line; with
// json, as JSON Lines.
type locksView struct {
	w        io.Writer
	interval time.Duration
	json     bool
	shown    int
}

func (v *locksView) show(s *locksSnapshot) error {
	if v.json {
		b, err := json.Marshal(s)
		if err != nil {
			return err
		}
		_, err = v.w.Write(append(b, '\n'))
		return err
	}
	head, table, foot, err := v.frame(s)
	if err != nil {
		return err
	}
	var b strings.Builder
	cols, rows, tty := terminalSize(v.w)
	if tty {
		b.WriteString(cursorHome)
		for _, l := range fitScreen(head, table, foot, cols, rows) {
			b.WriteString(eraseLine)
			b.WriteString(l)
			b.WriteString("\r\n")
		}
		b.WriteString(eraseBelow)
	} else {
		if v.shown > 0 {
			b.WriteString("\n")
		}
		for _, part := range [][]string{head, table, foot} {
			for _, l := range part {
				b.WriteString(l)
				b.WriteString("\n")
			}
		}
	}
	v.shown++
	_, err = io.WriteString(v.w, b.String())
	return err
}

// frame returns the lines of a snapshot: head (its time, and a blank
// line), the table (its header first) and foot (a blank line, then the
// lock table's health).
func (v *locksView) frame(s *locksSnapshot) (head, table, foot []string, err error) {
	layout := "2006-01-02 15:04:05 MST"
	if v.interval%time.Second != 0 {
		layout = "2006-01-02 15:04:05.000 MST"
	}
	head = []string{fmt.Sprintf("%s  pglock locks --watch, every %v", s.Time.Format(layout), v.interval), ""}
	var b bytes.Buffer
	if err := writeLocksColumns(&b, s.Locks, true); err != nil {
		return nil, nil, nil, err
	}
	table = strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
	foot = append([]string{""}, s.Health.lines()...)
	return head, table, foot, nil
}

// fitScreen cuts a frame to a terminal of cols x rows (80 x 24 if the
// terminal does not say): each line to cols characters, and the table to
// the rows that leave the head, the foot and the cursor's last line on the
// screen, with a line that counts the rows left out.
func fitScreen(head, table, foot []string, cols, rows int) []string {
	if cols <= 0 {
		cols = 80
	}
	if rows <= 0 {
		rows = 24
	}
	room := rows - 1 - len(head) - len(foot) // for the table
	if len(table) > room && len(table) > 1 {
		keep := max(room-2, 0) // the table's header, and the line that counts
		more := len(table) - 1 - keep
		table = append(table[:1+keep:1+keep], fmt.Sprintf("... and %d more (a taller terminal, or --key NAME, shows them)", more))
	}
	lines := append(append(append([]string{}, head...), table...), foot...)
	lines = lines[:min(len(lines), max(rows-1, 1))]
	for i, l := range lines {
		if r := []rune(l); len(r) > cols {
			lines[i] = string(r[:cols])
		}
	}
	return lines
}
