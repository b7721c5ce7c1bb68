// Package httpkey holds what httplock's and echolock's ready-made key
// functions share. It is internal support, not an API.
package httpkey

import "fmt"

// One returns the single value of a header or query parameter as a lock
// key: none (or one empty value) means no key, so the request passes through
// unlocked; several values are an error, since any choice among them would
// let two requests for the same thing take different locks. what names the
// source in the error ("header Idempotency-Key").
func One(what string, vs []string) (key string, ok bool, err error) {
	switch {
	case len(vs) == 0 || (len(vs) == 1 && vs[0] == ""):
		return "", false, nil
	case len(vs) > 1:
		return "", false, fmt.Errorf("%s given %d times", what, len(vs))
	}
	return vs[0], true, nil
}
