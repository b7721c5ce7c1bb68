// Package holdwriter is the http.ResponseWriter that httplock and echolock
// give a handler in Transaction scope: it holds the response back until the
// lock's transaction has ended, so that a client never sees a success for
// writes that did not commit. It is internal support shared by the two
// adapters, not an API.
package holdwriter
