# pglockkit: every target loops over the modules of go.work.
#   make demo   the demo: every capability in a few seconds (scripts/demo.sh)
#   make test   every test of every module, with -race, then the demo, checked
#   make bench  the benchmarks, each beside raw pgx doing the same SQL
#   make lint   gofmt, go vet and staticcheck over every module

GO       ?= go
MODULES  := $(shell $(GO) list -m -f '{{.Dir}}')
# withpg finds or starts PostgreSQL and exports DATABASE_URL; as root on
# Debian it installs what is missing: PostgreSQL for everything, PgBouncer
# only for the tests and benchmarks (some run a real one), never for the demo.
WITHPG       := $(GO) run ./internal/pgtest/withpg -install --
WITHPG_TESTS := $(GO) run ./internal/pgtest/withpg -install -install-pgbouncer --
STATICCHECK_VERSION ?= v0.8.2

.PHONY: test test-modules vet demo demo-check bench bench-modules lint

test:
	$(WITHPG_TESTS) $(MAKE) --no-print-directory test-modules demo-check

# Every module is tested even when one fails; the failing ones are listed at
# the end and the target fails.
test-modules: vet
	@failed=""; for m in $(MODULES); do \
		echo "== go test -race $$m"; \
		(cd $$m && $(GO) test -race -count=1 -timeout 15m ./...) || failed="$$failed $$m"; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED modules:$$failed"; exit 1; fi

vet:
	@set -e; for m in $(MODULES); do (cd $$m && $(GO) vet ./...); done
	@test -z "$$(gofmt -l $(MODULES))" || (echo "gofmt needed:"; gofmt -l $(MODULES); exit 1)

demo:
	$(WITHPG) ./scripts/demo.sh

# The demo, with its output checked section by section (part of make test).
demo-check:
	./scripts/check-demo.sh

# Every benchmark beside raw pgx, summarized by scripts/benchratio.awk (the
# raw output is kept in bench.out). COUNT=n runs each n times (default 4).
bench:
	$(WITHPG_TESTS) $(MAKE) --no-print-directory bench-modules

bench-modules:
	@set -e; : > bench.out; for m in $(MODULES); do \
		(cd $$m && $(GO) test -run XXX -bench . -benchmem -count $${COUNT:-4} ./...) | tee -a bench.out; \
	done; echo; awk -f scripts/benchratio.awk bench.out

lint: vet
	@set -e; for m in $(MODULES); do \
		(cd $$m && $(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...); \
	done
