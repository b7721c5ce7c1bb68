package httpkey_test

import (
	"testing"

	"github.com/pglockkit/kit/internal/httpkey"
)

func TestOne(t *testing.T) {
	for _, tc := range []struct {
		vs     []string
		key    string
		ok     bool
		errMsg string
	}{
		{nil, "", false, ""},
		{[]string{""}, "", false, ""},
		{[]string{"42"}, "42", true, ""},
		{[]string{"1", "2"}, "", false, "header X given 2 times"},
	} {
		key, ok, err := httpkey.One("header X", tc.vs)
		msg := ""
		if err != nil {
			msg = err.Error()
		}
		if key != tc.key || ok != tc.ok || msg != tc.errMsg {
			t.Errorf("One(%q) = %q, %v, %q", tc.vs, key, ok, msg)
		}
	}
}
