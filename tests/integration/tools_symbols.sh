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
echo "== a plugin loaded again elsewhere, and rebuilt in place ($MODE)"
# The same file at a new address, then a new build at the old path: each frame is named from
# the file mapped there when the event came (the rebuilt plugin's frames are not the old
# file's symbols at the same offsets).
mkdir "$TMP/plug"
cp "$HERE/../workloads/reload_plugin.c" "$TMP/plug/"
printf '%s\n' '#include <stdint.h>' '#include <stdlib.h>' \
    '__attribute__((noinline)) void *plug_fail(void) { void *p = malloc(SIZE_MAX / 2); __asm__ volatile("" ::: "memory"); return p; }' \
    > "$TMP/plug/v1.c"
printf '%s\n' '#include <stdint.h>' '#include <stdlib.h>' \
    '__attribute__((noinline)) void *plug_v2_inner(void) { void *p = malloc(SIZE_MAX / 2); __asm__ volatile("" ::: "memory"); return p; }' \
    '__attribute__((noinline)) void *plug_fail(void) { void *p = plug_v2_inner(); __asm__ volatile("" ::: "memory"); return p; }' \
    > "$TMP/plug/v2.c"
cc -O1 -g -shared -fPIC "$TMP/plug/v1.c" -o "$TMP/plug/libplug.so" &&
    cc -O1 -g -shared -fPIC "$TMP/plug/v2.c" -o "$TMP/plug/libplug.new.so" &&
    cc -O1 -g "$TMP/plug/reload_plugin.c" -o "$TMP/plug/reload" -ldl || fail "building the plugin test"
"$ALLOCSNOOP" -c "$TMP/plug/reload $TMP/plug/libplug.so $TMP/plug/libplug.new.so" --preload "$LIB" -U -e failure \
    > "$TMP/plug.txt" 2>&1 || { cat "$TMP/plug.txt"; fail "allocsnoop (plugin reloads)"; }
grep -A1 "alloc_failure" "$TMP/plug.txt" | grep "#0" | awk '{print $2}' | tr '\n' ' ' > "$TMP/plug.top"
[ "$(cat "$TMP/plug.top")" = "plug_fail plug_fail plug_v2_inner " ] ||
    { cat "$TMP/plug.txt"; fail "plugin frames after reloads: $(cat "$TMP/plug.top") (want plug_fail plug_fail plug_v2_inner)"; }
echo "PASS"
