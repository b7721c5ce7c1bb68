// Package readmecheck holds one test: every Go snippet of the repository's
// README.md compiles, unchanged, in a fresh module outside the repository, as
// a user's code would.
//
// The test takes each ```go block of README.md and builds them all with one
// `go build ./...` in a temporary module whose go.mod requires the
// repository's modules that the snippets import and replaces each with this
// checkout (GOWORK=off, GOFLAGS=-mod=mod: the other requirements come in at
// the versions the repository's modules pin, from the module cache or the
// proxy). Compile errors are reported at their README.md lines.
//
// The snippets follow one convention:
//
//   - A block that starts with a package clause is a whole file, built as it
//     is, in a package of its own.
//   - Any other block is a fragment: it becomes the body of a function of its
//     own that returns error (so a fragment may `return err`), in a file of
//     its own with imports for the package names it uses (context, pglock,
//     pgxpool, echo, river...: the table in the test; echo is Echo v5 in a
//     fragment that uses echo5lock, else v4), followed by `_ = x` for each
//     variable it declares at its top level, so that an err only assigned is
//     not an error.
//   - A fragment may use these names without declaring them: ctx, pool (a
//     *pgxpool.Pool), locker (a *pglock.Locker), logger (a *slog.Logger),
//     mux (a *http.ServeMux), e (an *echo.Echo), pay (an http.Handler, or an
//     echo.HandlerFunc where the fragment uses Echo), workers (a
//     *river.Workers), the job args type ChargeArgs, and the functions
//     send(ctx, id int) error, relayOutbox(ctx) error, generate(ctx) error
//     and report().
//
// Code that is not Go (shell commands, output) goes in blocks of another
// language, which the test skips.
package readmecheck
