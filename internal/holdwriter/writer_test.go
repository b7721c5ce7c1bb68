package holdwriter_test

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/pglockkit/kit/internal/holdwriter"
)

func TestHoldThenRelease(t *testing.T) {
	rec := httptest.NewRecorder()
	w := holdwriter.New(rec)
	w.Header().Set("X-Handler", "1")
	w.WriteHeader(http.StatusCreated)
	w.WriteHeader(http.StatusTeapot) // superfluous: ignored
	if _, err := w.Write([]byte("made")); err != nil {
		t.Fatal(err)
	}
	if rec.Body.Len() != 0 || rec.Code != http.StatusOK || rec.Flushed {
		t.Fatalf("sent before Release: %d %q", rec.Code, rec.Body.String())
	}
	if w.StatusOrOK() != http.StatusCreated {
		t.Fatalf("StatusOrOK = %d", w.StatusOrOK())
	}
	if err := w.Release(); err != nil {
		t.Fatal(err)
	}
	if rec.Code != http.StatusCreated || rec.Body.String() != "made" || rec.Header().Get("X-Handler") != "1" {
		t.Fatalf("after Release: %d %q %v", rec.Code, rec.Body.String(), rec.Header())
	}
	if w.Discard() {
		t.Fatal("Discard after Release reported success")
	}
}

func TestDiscardRestoresOuterHeaders(t *testing.T) {
	rec := httptest.NewRecorder()
	rec.Header().Set("X-Request-Id", "abc") // set by outer middleware
	w := holdwriter.New(rec)
	w.Header().Set("X-Handler", "1")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write([]byte("not committed"))
	if !w.Discard() {
		t.Fatal("Discard of a held response failed")
	}
	if rec.Body.Len() != 0 || rec.Header().Get("X-Handler") != "" || rec.Header().Get("X-Request-Id") != "abc" {
		t.Fatalf("after Discard: %q %v", rec.Body.String(), rec.Header())
	}
	if w.StatusOrOK() != http.StatusOK {
		t.Fatalf("StatusOrOK after Discard = %d", w.StatusOrOK())
	}
}

func TestFlushSendsHeldBytes(t *testing.T) {
	rec := httptest.NewRecorder()
	w := holdwriter.New(rec)
	_, _ = w.Write([]byte("early"))
	if err := http.NewResponseController(w).Flush(); err != nil {
		t.Fatal(err)
	}
	if !rec.Flushed || rec.Body.String() != "early" {
		t.Fatalf("Flush did not send the held bytes: %q", rec.Body.String())
	}
	_, _ = w.Write([]byte(" late"))
	if rec.Body.String() != "early late" {
		t.Fatalf("write after Flush: %q", rec.Body.String())
	}
}
