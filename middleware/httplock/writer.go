package httplock

import (
	"bufio"
	"bytes"
	"net"
	"net/http"
)

// txWriter is the response writer a handler gets in Transaction scope. It
// records the status for the commit rule and holds the response back until
// the lock's transaction has ended, so that a client never sees a success
// for writes that did not commit: if the commit fails, the held response is
// dropped and the error answered instead.
//
// Flush (http.Flusher, http.ResponseController) and Hijack (http.Hijacker)
// work: they send what is held and stop holding, since the handler asked
// for the bytes to go out now; a commit that fails after that can only be
// logged. Unwrap gives http.ResponseController the underlying writer for
// everything else (deadlines, full duplex).
type txWriter struct {
	w      http.ResponseWriter
	status int // the final status the handler set; 0 while none
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
		tw.w.WriteHeader(code) // informational (103 Early Hints): not final
		return
	}
	if tw.status != 0 {
		return // superfluous, as net/http would ignore it
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

// FlushError sends what is held, then flushes the underlying writer. It
// returns http.ErrNotSupported when the underlying writer cannot flush (the
// held bytes are sent anyway). http.ResponseController.Flush calls it.
func (tw *txWriter) FlushError() error {
	if err := tw.release(); err != nil {
		return err
	}
	return http.NewResponseController(tw.w).Flush()
}

// Flush is http.Flusher's form of FlushError.
func (tw *txWriter) Flush() { _ = tw.FlushError() }

// Hijack sends what is held, then hijacks the underlying connection; it
// returns http.ErrNotSupported when the underlying writer cannot.
func (tw *txWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if err := tw.release(); err != nil {
		return nil, nil, err
	}
	return http.NewResponseController(tw.w).Hijack()
}

// Unwrap returns the underlying writer, for http.ResponseController.
func (tw *txWriter) Unwrap() http.ResponseWriter { return tw.w }

// statusOrOK is the status the commit rule sees: 200 when the handler set
// none, as net/http would send.
func (tw *txWriter) statusOrOK() int {
	if tw.status == 0 {
		return http.StatusOK
	}
	return tw.status
}

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
// handler set) so that an error can be answered instead. It reports false
// when part of the response was sent already.
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
