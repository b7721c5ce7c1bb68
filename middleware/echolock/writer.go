package echolock

import (
	"bufio"
	"bytes"
	"net"
	"net/http"
)

// txWriter replaces the echo.Response's Writer in Transaction scope. It holds
// the response back until the lock's transaction has ended, so that a client
// never sees a success for writes that did not commit. echo.Response keeps
// the status and the committed flag; this only holds the bytes.
//
// Flush (echo.Response.Flush, http.ResponseController) and Hijack send what
// is held and stop holding; Unwrap gives http.ResponseController the
// underlying writer for everything else.
type txWriter struct {
	w      http.ResponseWriter
	status int
	hold   bool
	buf    bytes.Buffer
	// pre is the header as it was before the handler ran (set by outer
	// middleware: CORS, request IDs), restored by discard.
	pre http.Header
}

func newTxWriter(w http.ResponseWriter) *txWriter {
	return &txWriter{w: w, hold: true, pre: w.Header().Clone()}
}

var (
	_ http.Flusher  = (*txWriter)(nil)
	_ http.Hijacker = (*txWriter)(nil)
)

func (tw *txWriter) Header() http.Header { return tw.w.Header() }

func (tw *txWriter) WriteHeader(code int) {
	if code >= 100 && code < 200 && code != http.StatusSwitchingProtocols {
		tw.w.WriteHeader(code)
		return
	}
	if tw.status != 0 {
		return
	}
	tw.status = code
	if !tw.hold {
		tw.w.WriteHeader(code)
	}
}

func (tw *txWriter) Write(p []byte) (int, error) {
	if tw.status == 0 {
		tw.WriteHeader(http.StatusOK)
	}
	if tw.hold {
		return tw.buf.Write(p)
	}
	return tw.w.Write(p)
}

// FlushError sends what is held, then flushes the underlying writer.
func (tw *txWriter) FlushError() error {
	if err := tw.release(); err != nil {
		return err
	}
	return http.NewResponseController(tw.w).Flush()
}

// Flush is http.Flusher's form of FlushError.
func (tw *txWriter) Flush() { _ = tw.FlushError() }

// Hijack sends what is held, then hijacks the underlying connection.
func (tw *txWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if err := tw.release(); err != nil {
		return nil, nil, err
	}
	return http.NewResponseController(tw.w).Hijack()
}

// Unwrap returns the underlying writer, for http.ResponseController.
func (tw *txWriter) Unwrap() http.ResponseWriter { return tw.w }

// release stops holding and sends what was held.
func (tw *txWriter) release() error {
	if !tw.hold {
		return nil
	}
	tw.hold = false
	if tw.status != 0 {
		tw.w.WriteHeader(tw.status)
	}
	if tw.buf.Len() == 0 {
		return nil
	}
	_, err := tw.w.Write(tw.buf.Bytes())
	tw.buf = bytes.Buffer{}
	return err
}

// discard drops the held response (status, body, and the headers the
// handler set). It reports false when part of the response was sent already.
func (tw *txWriter) discard() bool {
	if !tw.hold {
		return false
	}
	h := tw.w.Header()
	for k := range h {
		delete(h, k)
	}
	for k, v := range tw.pre {
		h[k] = v
	}
	tw.status = 0
	tw.buf = bytes.Buffer{}
	tw.hold = false
	return true
}
