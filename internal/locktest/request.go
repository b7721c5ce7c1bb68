package locktest

import (
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
)

// Result is what a client saw of one request.
type Result struct {
	Status     int
	RetryAfter string // the Retry-After header
	Body       string
	Err        error // the client's error; then the rest is zero
}

// Do sends one request without a body to srv and reads the whole answer.
func Do(srv *httptest.Server, method, path string) Result {
	req, err := http.NewRequest(method, srv.URL+path, nil)
	if err != nil {
		return Result{Err: err}
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		return Result{Err: err}
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	return Result{Status: resp.StatusCode, RetryAfter: resp.Header.Get("Retry-After"), Body: string(b), Err: err}
}

// Fire sends n POST requests at once, request i to path(i) on
// servers[i%len(servers)], all released together, and returns their
// results in order.
func Fire(servers []*httptest.Server, n int, path func(i int) string) []Result {
	res := make([]Result, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			res[i] = Do(servers[i%len(servers)], http.MethodPost, path(i))
		})
	}
	close(start)
	wg.Wait()
	return res
}
