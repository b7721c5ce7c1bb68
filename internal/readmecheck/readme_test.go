package readmecheck

import (
	"bufio"
	"bytes"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const kit = "github.com/pglockkit/kit"

// imports maps the package names that fragments may use to their import
// paths. "echo" is Echo v4, or v5 in a fragment that uses echo5lock.
var imports = map[string]string{
	"context":    "context",
	"errors":     "errors",
	"fmt":        "fmt",
	"log":        "log",
	"slog":       "log/slog",
	"http":       "net/http",
	"sql":        "database/sql",
	"os":         "os",
	"time":       "time",
	"pgx":        "github.com/jackc/pgx/v5",
	"pgxpool":    "github.com/jackc/pgx/v5/pgxpool",
	"pglock":     kit + "/pglock",
	"httplock":   kit + "/middleware/httplock",
	"echolock":   kit + "/middleware/echolock",
	"echo5lock":  kit + "/middleware/echo5lock",
	"cronlock":   kit + "/cronlock",
	"gocronlock": kit + "/gocronlock",
	"riverlock":  kit + "/riverlock",
	"grpclock":   kit + "/grpclock",
	"otellock":   kit + "/otellock",
	"cron":       "github.com/robfig/cron/v3",
	"gocron":     "github.com/go-co-op/gocron/v2",
	"river":      "github.com/riverqueue/river",
	"riverpgxv5": "github.com/riverqueue/river/riverdriver/riverpgxv5",
	"rivertype":  "github.com/riverqueue/river/rivertype",
	"grpc":       "google.golang.org/grpc",
	"codes":      "google.golang.org/grpc/codes",
	"echo":       "github.com/labstack/echo/v4",
}

const echo5 = "github.com/labstack/echo/v5"

// givens are names a fragment may use without declaring them (see the
// package documentation), with the imports they need. The Echo and River ones
// are given only to fragments that use those packages.
type givens struct {
	imports []string
	decls   string
}

var (
	commonGivens = givens{
		imports: []string{"context", "log/slog", "net/http", "github.com/jackc/pgx/v5/pgxpool", kit + "/pglock"},
		decls: `
var (
	ctx    context.Context
	pool   *pgxpool.Pool
	locker *pglock.Locker
	logger *slog.Logger
	mux    *http.ServeMux
)

func send(ctx context.Context, id int) error { return nil }
func relayOutbox(ctx context.Context) error  { return nil }
func generate(ctx context.Context) error     { return nil }
func report()                                {}

type ChargeArgs struct{ CustomerID string }

func (ChargeArgs) Kind() string      { return "charge" }
func (a ChargeArgs) LockKey() string { return "customer:" + a.CustomerID }
`,
	}
	httpGivens = givens{decls: "\nvar pay http.Handler\n"}
	// The import of echo, v4 or v5, is the fragment's.
	echoGivens = givens{decls: `
var (
	e   *echo.Echo
	pay echo.HandlerFunc
)
`}
	riverGivens = givens{
		imports: []string{"github.com/riverqueue/river"},
		decls:   "\nvar workers *river.Workers\n",
	}
)

// givensFile returns a Go file of package pkg with the givens' imports and
// declarations.
func givensFile(pkg string, gs ...givens) string {
	var b strings.Builder
	fmt.Fprintf(&b, "package %s\n\n", pkg)
	for _, g := range gs {
		for _, p := range g.imports {
			fmt.Fprintf(&b, "import %q\n", p)
		}
	}
	for _, g := range gs {
		b.WriteString(g.decls)
	}
	return b.String()
}

// A snippet is one ```go block of the README.
type snippet struct {
	line int    // README line of the snippet's first line of code
	code string // the code, its fence's indentation removed
}

// snippets returns the ```go blocks of a Markdown file.
func snippets(t *testing.T, path string) []snippet {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var (
		out    []snippet
		cur    *snippet
		indent string
		buf    strings.Builder
		n      int
	)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		n++
		line := sc.Text()
		trimmed := strings.TrimLeft(line, " \t")
		switch {
		case cur == nil && strings.HasPrefix(trimmed, "```"):
			if strings.TrimSpace(strings.TrimPrefix(trimmed, "```")) == "go" {
				cur = &snippet{line: n + 1}
				indent = line[:len(line)-len(trimmed)]
				buf.Reset()
				continue
			}
			// Another language's block: skip to its end.
			for sc.Scan() {
				n++
				if strings.HasPrefix(strings.TrimLeft(sc.Text(), " \t"), "```") {
					break
				}
			}
		case cur != nil && strings.HasPrefix(trimmed, "```"):
			cur.code = buf.String()
			out = append(out, *cur)
			cur = nil
		case cur != nil:
			buf.WriteString(strings.TrimPrefix(line, indent))
			buf.WriteByte('\n')
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if cur != nil {
		t.Fatalf("%s:%d: a ```go block is not closed", path, cur.line-1)
	}
	return out
}

// fileImports reports whether a snippet is a whole file (it starts with a
// package clause, after comments), and returns the paths it imports.
func fileImports(code string) (paths []string, ok bool) {
	fset := token.NewFileSet()
	if _, err := parser.ParseFile(fset, "", code, parser.PackageClauseOnly); err != nil {
		return nil, false
	}
	f, _ := parser.ParseFile(fset, "", code, parser.ImportsOnly)
	if f != nil {
		for _, im := range f.Imports {
			if p, err := strconv.Unquote(im.Path.Value); err == nil {
				paths = append(paths, p)
			}
		}
	}
	return paths, true
}

// A fragment is a snippet made a Go file, and what its package needs.
type fragment struct {
	file  string   // the Go file, without its package clause
	echo  string   // the Echo module it uses, if any
	river bool     // whether it uses River
	paths []string // the paths it imports
}

// newFragment turns a fragment snippet into a Go file (the package clause
// left to the caller), its lines reported at their README lines.
func newFragment(readme string, s snippet) fragment {
	used, declared := names(s.code)
	paths := map[string]string{}
	for _, name := range used {
		if p, ok := imports[name]; ok {
			paths[name] = p
		}
	}
	var fr fragment
	if paths["echo"] != "" || paths["echolock"] != "" {
		fr.echo = imports["echo"]
	}
	if paths["echo5lock"] != "" {
		fr.echo = echo5
	}
	if paths["echo"] != "" {
		paths["echo"] = fr.echo
	}
	fr.river = paths["river"] != "" || paths["riverlock"] != ""
	fr.paths = sortedValues(paths)

	var b strings.Builder
	for _, p := range fr.paths {
		fmt.Fprintf(&b, "import %q\n", p)
	}
	fmt.Fprintf(&b, "\nfunc snippet%d() error {\n\t{\n", s.line)
	// The compiler reports the fragment's lines as README.md's.
	fmt.Fprintf(&b, "//line %s:%d\n", readme, s.line)
	b.WriteString(s.code)
	b.WriteString("//line wrapper.go:1\n")
	for _, name := range declared {
		fmt.Fprintf(&b, "\t\t_ = %s\n", name)
	}
	b.WriteString("\t}\n\treturn nil\n}\n")
	fr.file = b.String()
	return fr
}

// names returns the package-like names a fragment uses (X in X.Sel) and the
// variables it declares at its top level. A fragment that does not parse
// yields what could be read; the compiler then reports its error.
func names(code string) (used, declared []string) {
	src := "package p\nfunc _() {\n" + code + "\n}\n"
	f, _ := parser.ParseFile(token.NewFileSet(), "", src, parser.SkipObjectResolution)
	if f == nil || len(f.Decls) == 0 {
		return nil, nil
	}
	fn, ok := f.Decls[0].(*ast.FuncDecl)
	if !ok || fn.Body == nil {
		return nil, nil
	}
	seen := map[string]bool{}
	ast.Inspect(fn.Body, func(n ast.Node) bool {
		if sel, ok := n.(*ast.SelectorExpr); ok {
			if id, ok := sel.X.(*ast.Ident); ok && !seen[id.Name] {
				seen[id.Name] = true
				used = append(used, id.Name)
			}
		}
		return true
	})
	add := func(id *ast.Ident) {
		if id.Name != "_" && !slices.Contains(declared, id.Name) {
			declared = append(declared, id.Name)
		}
	}
	for _, st := range fn.Body.List {
		switch st := st.(type) {
		case *ast.AssignStmt:
			if st.Tok == token.DEFINE {
				for _, e := range st.Lhs {
					if id, ok := e.(*ast.Ident); ok {
						add(id)
					}
				}
			}
		case *ast.DeclStmt:
			if gd, ok := st.Decl.(*ast.GenDecl); ok && gd.Tok == token.VAR {
				for _, spec := range gd.Specs {
					for _, id := range spec.(*ast.ValueSpec).Names {
						add(id)
					}
				}
			}
		}
	}
	return used, declared
}

func sortedValues(m map[string]string) []string {
	var out []string
	for _, v := range m {
		out = append(out, v)
	}
	slices.Sort(out)
	return out
}

// modules returns the module path of every go.mod under root but root's.
func modules(t *testing.T, root string) map[string]string {
	t.Helper()
	mods := map[string]string{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && path != root && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if d.IsDir() || d.Name() != "go.mod" || filepath.Dir(path) == root {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for l := range strings.Lines(string(data)) {
			if p, ok := strings.CutPrefix(strings.TrimSpace(l), "module "); ok {
				mods[strings.Trim(strings.TrimSpace(p), `"`)] = filepath.Dir(path)
				break
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return mods
}

// goSums returns the lines of every go.sum of the repository, so that the
// fresh module verifies what the repository already pinned without asking
// the checksum database.
func goSums(t *testing.T, root string, mods map[string]string) []byte {
	t.Helper()
	dirs := []string{root}
	for _, d := range mods {
		dirs = append(dirs, d)
	}
	seen := map[string]bool{}
	var out bytes.Buffer
	for _, d := range dirs {
		data, err := os.ReadFile(filepath.Join(d, "go.sum"))
		if err != nil {
			continue
		}
		for l := range strings.Lines(string(data)) {
			if !seen[l] {
				seen[l] = true
				out.WriteString(l)
			}
		}
	}
	return out.Bytes()
}

func TestREADMESnippetsCompile(t *testing.T) {
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	readme := filepath.Join(root, "README.md")
	snips := snippets(t, readme)
	if len(snips) == 0 {
		t.Fatalf("%s: no ```go block found", readme)
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build the snippets: %v", err)
	}

	dir := t.TempDir() // outside the repository
	mods := modules(t, root)
	var mod strings.Builder
	mod.WriteString("module readmecheck.example\n\ngo 1.26.0\n\n")
	fmt.Fprintf(&mod, "replace %s => %s\n", kit, root)
	for _, p := range sortedKeys(mods) {
		fmt.Fprintf(&mod, "replace %s => %s\n", p, mods[p])
	}
	write(t, filepath.Join(dir, "go.sum"), string(goSums(t, root, mods)))

	// Whole files go in packages of their own; fragments in one package per
	// Echo version (none, v4, v5), one file each.
	files := 0
	used := map[string]string{kit: kit} // the repository's modules imported
	groups := map[string]givens{}       // package name -> its Echo givens or net/http's
	river := map[string]bool{}          // packages with a River fragment
	for _, s := range snips {
		paths, isFile := fileImports(s.code)
		if isFile {
			files++
			write(t, filepath.Join(dir, fmt.Sprintf("line%d", s.line), "main.go"),
				fmt.Sprintf("//line %s:%d\n%s", readme, s.line, s.code))
		} else {
			fr := newFragment(readme, s)
			paths = fr.paths
			pkg, g := "fragments", httpGivens
			switch fr.echo {
			case imports["echo"]:
				pkg, g = "fragmentsecho4", givens{imports: []string{fr.echo}, decls: echoGivens.decls}
			case echo5:
				pkg, g = "fragmentsecho5", givens{imports: []string{fr.echo}, decls: echoGivens.decls}
			}
			groups[pkg] = g
			river[pkg] = river[pkg] || fr.river
			write(t, filepath.Join(dir, pkg, fmt.Sprintf("line%d.go", s.line)), "package "+pkg+"\n\n"+fr.file)
		}
		for _, p := range paths {
			if m := moduleOf(p, mods); m != "" {
				used[m] = m
			}
		}
	}
	for pkg, g := range groups {
		gs := []givens{commonGivens, g}
		if river[pkg] {
			gs = append(gs, riverGivens)
		}
		write(t, filepath.Join(dir, pkg, "givens.go"), givensFile(pkg, gs...))
	}
	if files == 0 {
		t.Errorf("%s: no complete program (a ```go block that starts with a package clause)", readme)
	}
	// Require the modules of the repository that the snippets import, so
	// that the other modules come in at the versions the repository pins.
	for _, m := range sortedKeys(used) {
		fmt.Fprintf(&mod, "require %s v0.0.0-00010101000000-000000000000\n", m)
	}
	write(t, filepath.Join(dir, "go.mod"), mod.String())

	cmd := exec.CommandContext(t.Context(), goTool, "build", "./...")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the README's Go snippets do not compile (%d snippets, built in %s):\n%s", len(snips), dir, out)
	}
	t.Logf("%d Go snippets of README.md compile", len(snips))
}

// moduleOf returns the module of the repository that provides the package
// path, or "" for a package from elsewhere.
func moduleOf(path string, mods map[string]string) string {
	best := ""
	for m := range mods {
		if (path == m || strings.HasPrefix(path, m+"/")) && len(m) > len(best) {
			best = m
		}
	}
	if best == "" && (path == kit || strings.HasPrefix(path, kit+"/")) {
		best = kit
	}
	return best
}

func sortedKeys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func write(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}
