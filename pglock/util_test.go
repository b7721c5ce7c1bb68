package pglock_test

import (
	"fmt"
	"math/rand/v2"
)

func randomSuffix() string { return fmt.Sprintf("%x", rand.Uint64()) }
