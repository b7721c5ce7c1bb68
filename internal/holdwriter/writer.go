package holdwriter

import (
	"bufio"
	"bytes"
	"net"
	"net/http"
)

// Writer is the response writer a handler gets in Transaction scope. It
// records the status for the commit rule and holds the response back until
// the lock's transaction has ended, so that a client never sees a success
// for writes that did not commit: if the commit fails, the held response is
// dropped (Discard) and the error answered instead; else it is sent (Release).
//
// Flush (http.Flusher, http.ResponseController) and Hijack (http.Hijacker)
// work: they send what is held and stop holding, since the handler asked
// for the bytes to go out now; a commit that fails after that can only be
// logged. Unwrap gives http.ResponseController the underlying writer for
// everything else (deadlines, full duplex).
type Writer struct {
	w      http.ResponseWriter
	status int // the final status the handler set; 0 while none
	hold   bool
	buf    bytes.Buffer
	// pre is the header as it was before the handler ran (set by outer
	// middleware: CORS, request IDs), restored by Discard.
	pre http.Header
}

// New returns a Writer that holds what is written to w.
func New(w http.ResponseWriter) *Writer {
	return &Writer{w: w, hold: true, pre: w.Header().Clone()}
}

var (
	_ http.Flusher  = (*Writer)(nil)
	_ http.Hijacker = (*Writer)(nil)
)

// Header returns the underlying writer's header.
func (tw *Writer) Header() http.Header { return tw.w.Header() }

// WriteHeader records the final status; it is sent when the Writer stops
// holding. Informational statuses (1xx) go out at once.
func (tw *Writer) WriteHeader(code int) {
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

// Write holds p, or writes it through once the Writer stopped holding.
func (tw *Writer) Write(p []byte) (int, error) {
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
func (tw *Writer) FlushError() error {
	if err := tw.Release(); err != nil {
		return err
	}
	return http.NewResponseController(tw.w).Flush()
}

// Flush is http.Flusher's form of FlushError.
func (tw *Writer) Flush() { _ = tw.FlushError() }

// Hijack sends what is held, then hijacks the underlying connection; it
// returns http.ErrNotSupported when the underlying writer cannot.
func (tw *Writer) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if err := tw.Release(); err != nil {
		return nil, nil, err
	}
	return http.NewResponseController(tw.w).Hijack()
}

// Unwrap returns the underlying writer, for http.ResponseController.
func (tw *Writer) Unwrap() http.ResponseWriter { return tw.w }

// StatusOrOK returns the status the commit rule sees: 200 when the handler set
// none, as net/http would send.
func (tw *Writer) StatusOrOK() int {
	if tw.status == 0 {
		return http.StatusOK
	}
	return tw.status
}

// Release stops holding and sends what was held.
func (tw *Writer) Release() error {
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

// Discard drops the held response (status, body, and the headers the
// handler set) so that an error can be answered instead. It reports false
// when part of the response was sent already.
func (tw *Writer) Discard() bool {
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
