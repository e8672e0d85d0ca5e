#!/usr/bin/env bash
# A slice of CPython's own regression suite (Debian package libpython3.11-testsuite) under
# LD_PRELOAD=liblumalloc.so gives the same per-test-case results as under glibc: every test case
# that passes (or is skipped, or is an expected failure) with glibc does the same with lumalloc,
# no crash, no hang.  Both runs go side by side (the slice is mostly sleeps and short bursts), each
# bounded by a timeout.  Usage: core_programs_python.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
work=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] && echo "kept $work" || rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

if ! python3 -c 'import test.libregrtest' 2>/dev/null; then
  [ "${CI:-}" = true ] && fail "CPython's test suite is missing (apt-get install libpython3.11-testsuite)"
  echo "SKIP: CPython's test suite is missing (apt-get install libpython3.11-testsuite)"; exit 0
fi

tests="test_list test_dict test_set test_json test_re test_collections test_unicode test_heapq
       test_struct test_array test_deque test_functools test_sort test_tuple test_long test_thread
       test_bisect test_string test_weakset"
run() { # name, env...
  local name=$1; shift
  mkdir -p "$work/$name"
  ( cd "$work/$name"; rc=0
    env "$@" timeout -s KILL 240 python3 -m test -j1 --timeout 120 \
      --junit-xml "$work/$name.xml" $tests > "$work/$name.out" 2>&1 || rc=$?
    echo $rc > "$work/$name.rc" ) &
}
start=$(date +%s)
run glibc LUMALLOC_UNUSED=1
run lum LD_PRELOAD="$lib"
wait
echo "both runs took $(( $(date +%s) - start )) s"

for n in glibc lum; do
  rc=$(cat "$work/$n.rc")
  # regrtest exits 0 (all passed) or 2 (some failed); anything else is a crash or a kill
  [ "$rc" = 0 ] || [ "$rc" = 2 ] || { tail -30 "$work/$n.out"; fail "python3 -m test under $n exited with $rc"; }
  [ -s "$work/$n.xml" ] || { tail -30 "$work/$n.out"; fail "no junit report under $n"; }
done

# Per test case: pass / skipped / failure / error, from the junit reports.
summarise() {
  python3 - "$1" <<'PY'
import sys, xml.etree.ElementTree as ET
for tc in ET.parse(sys.argv[1]).iter("testcase"):
    status = "pass"
    for child in tc:
        if child.tag in ("failure", "error", "skipped"):
            status = child.tag
    print(f"{tc.get('name')} {status}")
PY
}
summarise "$work/glibc.xml" | sort > "$work/glibc.cases"
summarise "$work/lum.xml" | sort > "$work/lum.cases"
cases=$(wc -l < "$work/glibc.cases")
[ "$cases" -gt 1000 ] || fail "only $cases test cases ran under glibc"
if ! cmp -s "$work/glibc.cases" "$work/lum.cases"; then
  diff "$work/glibc.cases" "$work/lum.cases" | head -40 || true
  python3 - "$work/lum.xml" <<'PY' || true
import sys, xml.etree.ElementTree as ET
shown = 0
for tc in ET.parse(sys.argv[1]).iter("testcase"):
    for child in tc:
        if child.tag in ("failure", "error") and shown < 2:
            shown += 1
            print(f"--- {tc.get('name')}: {child.get('message')}\n{child.text or ''}")
PY
  fail "per-test-case results differ between glibc and lumalloc"
fi
echo "ok: $cases test cases, same results ($(grep -c ' pass$' "$work/lum.cases") passed) under glibc and lumalloc"
