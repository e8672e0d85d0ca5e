#!/bin/bash
# Symbolisation: a stripped executable resolved through its separate debug info (debuglink),
# [unknown] frames with module+offset when there is none, C++ names demangled, and the target's
# exit survived (symbols from the snapshot taken while it ran).
source "$(dirname "$0")/tools_common.inc"

cp "$WORKLOAD" "$TMP/wl"
objcopy --only-keep-debug "$TMP/wl" "$TMP/wl.debug"
objcopy --strip-all --add-gnu-debuglink="$TMP/wl.debug" "$TMP/wl"
nm "$TMP/wl" 2>&1 | grep -q "no symbols" || fail "strip did not strip"

echo "== stripped + debuglink ($MODE)"
"$ALLOCSNOOP" -c "$TMP/wl -m 1 -L 0 -o /dev/null" --preload "$LIB" -U -e failure > "$TMP/a.txt" 2>&1 || fail "allocsnoop"
grep -q "#0 *fail_site" "$TMP/a.txt" || { cat "$TMP/a.txt"; fail "fail_site not resolved from separate debug info"; }
grep -q "#1 *main" "$TMP/a.txt" || fail "main not resolved"

echo "== stripped, no debug info ($MODE)"
rm "$TMP/wl.debug"
"$ALLOCSNOOP" -c "$TMP/wl -m 1 -L 0 -o /dev/null" --preload "$LIB" -U -e failure > "$TMP/b.txt" 2>&1 || fail "allocsnoop"
grep -Eq "#0 *\[unknown\] \(wl\+0x[0-9a-f]+\)" "$TMP/b.txt" || { cat "$TMP/b.txt"; fail "no module+offset for unknown frame"; }
grep -q "__libc_start_main" "$TMP/b.txt" || fail "libc frames not resolved"

echo "== C++ demangling ($MODE)"
"$ALLOCSNOOP" -c "$CXX_WORKLOAD 3000" --preload "$LIB" -q --folded "$TMP/cxx.folded" > "$TMP/c.txt" 2>&1 ||
    fail "allocsnoop cxx"
grep -q "lumtest::Pool<double>::fill(unsigned long)" "$TMP/c.txt" ||
    { cat "$TMP/c.txt"; fail "top site not demangled as lumtest::Pool<double>::fill(unsigned long)"; }
grep -q "lumtest::Widget::churn(unsigned long);lumtest::Pool<double>::fill(unsigned long)" "$TMP/cxx.folded" ||
    fail "folded stacks lack the demangled caller chain"
grep -q "_ZN" "$TMP/cxx.folded" && fail "mangled names left in folded output"
echo "PASS"
