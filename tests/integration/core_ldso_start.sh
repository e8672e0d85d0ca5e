#!/usr/bin/env bash
# A program started as an argument of the dynamic loader (ld.so ./prog: AT_BASE is 0 then) still
# uses the loader's lock-free index in its unwinder: taken for a static executable, it went back
# to dl_iterate_phdr, and test_loader_lock's fork and lock-order cases failed again.
# Usage: core_ldso_start.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
build=$(realpath "$2")
prog=$build/tests/test_loader_lock
[ -x "$prog" ] || { echo "FAIL: $prog not built"; exit 1; }
interp=$(readelf -lW "$prog" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
[ -x "$interp" ] || { echo "FAIL: no interpreter found for $prog"; exit 1; }
cd "$build/tests"
"$interp" "$prog"
