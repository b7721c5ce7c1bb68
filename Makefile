# pglockkit: every target loops over the modules of go.work.
#   make demo   run the quickstart demo against PostgreSQL (found or started)
#   make test   every test of every module, with -race, against PostgreSQL
#   make bench  the benchmarks against raw pgx
#   make lint   gofmt, go vet and staticcheck over every module

GO       ?= go
MODULES  := $(shell $(GO) list -m -f '{{.Dir}}')
WITHPG   := $(GO) run ./internal/pgtest/withpg -install --
STATICCHECK_VERSION ?= v0.8.2

.PHONY: test test-modules vet demo bench lint

test:
	$(WITHPG) $(MAKE) --no-print-directory test-modules

test-modules: vet
	@set -e; for m in $(MODULES); do \
		echo "== go test -race $$m"; \
		(cd $$m && $(GO) test -race -count=1 -timeout 15m ./...); \
	done

vet:
	@set -e; for m in $(MODULES); do (cd $$m && $(GO) vet ./...); done
	@test -z "$$(gofmt -l $(MODULES))" || (echo "gofmt needed:"; gofmt -l $(MODULES); exit 1)

demo:
	$(WITHPG) $(GO) run ./examples/quickstart

bench:
	$(WITHPG) sh -c 'cd bench && $(GO) test -run XXX -bench . -benchmem -count 5 ./...'

lint: vet
	@set -e; for m in $(MODULES); do \
		(cd $$m && $(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...); \
	done
