package pgtest

import "syscall"

// dieWithParent makes a child started with attr get SIGTERM when the test
// process dies, so that no PgBouncer outlives a killed test run.
func dieWithParent(attr *syscall.SysProcAttr) { attr.Pdeathsig = syscall.SIGTERM }
