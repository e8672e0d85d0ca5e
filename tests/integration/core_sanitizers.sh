#!/usr/bin/env bash
# Sanitizer builds as tests.
#
#  - UndefinedBehaviorSanitizer: the tree configured with -DLUMALLOC_SANITIZE=undefined in
#    BUILD_DIR/sanitize-undefined; the threaded and edge-case unit tests run with
#    UBSAN_OPTIONS=halt_on_error=1: any undefined behaviour in the allocator fails the test.
#  - ThreadSanitizer: -DLUMALLOC_SANITIZE=thread in BUILD_DIR/sanitize-thread.  TSan must own the
#    process malloc (its runtime allocates through malloc before main), so the static library is
#    copied with the standard names (malloc, free, ...) made local, and programs written against
#    the lum_* API are linked with that copy: lumalloc's code runs instrumented, and every
#    cross-thread hand-off of a block must be ordered by the allocator's own synchronisation.  The
#    programs: tests/test_stress.c, tests/test_large_ranges.c, a first use of the allocator
#    from two threads at once, and tests/integration/tsan_readers.c: three threads allocate and
#    free (small, medium, large; some cross-thread frees; injected failures of their own) while
#    a fourth calls every public API that reads other threads' state (statistics, mallinfo2,
#    malloc_info/malloc_stats, the diagnostics report, the profiler's reports and dump, the heap
#    check, the options) and arms and disarms the process-wide failure injector.
#    Sampling runs with the profiler on (LUMALLOC_SAMPLE_INTERVAL=64k: a sample every few dozen
#    allocations, each unwound by lib/unwind.c and recorded in the profile tables) in test_stress,
#    test_large_ranges and one tsan_readers run, so the sampler, the unwinder's per-thread memo,
#    the profile tables and the sampled pages run against every other thread and the readers;
#    tsan_readers also runs with sampling off and with LUMALLOC_PROF=off (samples taken, not
#    unwound).  The library does not use libunwind (only a -DLUM_UNWIND_VERIFY build does), so
#    the programs are not linked with it.  Any race report fails
#    the test (TSAN_OPTIONS=halt_on_error=0 so that one run lists every race, one line per distinct
#    report; the exit status is 66 all the same).  test_threads and test_stats call malloc, which
#    is TSan's in such a build, so they run under UBSan only.
# Usage: core_sanitizers.sh LIBLUMALLOC.so BUILD_DIR      (about 3-4 minutes on 2 cores)
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
build=$(realpath "$2")
fail() { echo "FAIL: $*"; exit 1; }
jobs=${LUMALLOC_SANITIZE_JOBS:-2}

configure() { # sanitizer
  local dir=$build/sanitize-$1
  cmake -S "$src" -B "$dir" -DLUMALLOC_SANITIZE=$1 -DLUMALLOC_BUILD_TOOLS=OFF \
    -DLUMALLOC_BUILD_BENCH=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo > "$dir.configure.log" 2>&1 \
    || { tail -20 "$dir.configure.log"; fail "configure with $1"; }
}

failed=0
run_test() { # label, timeout, command...   (a failure is reported and counted, the run goes on)
  local label=$1 t=$2; shift 2
  local log; log=$(mktemp)
  local start; start=$(date +%s)
  local rc=0
  timeout -s KILL "$t" "$@" > "$log" 2>&1 || rc=$?
  if [ "$rc" != 0 ] || grep -qE "runtime error|WARNING: ThreadSanitizer" "$log"; then
    if grep -qE "runtime error|WARNING: ThreadSanitizer" "$log"; then
      # the first report in full, then one line per distinct report
      awk '/runtime error|WARNING: ThreadSanitizer/ {p = 1} p && n++ < 45' "$log"
      echo "--- distinct reports:"
      grep -E "^SUMMARY: |runtime error" "$log" | sort | uniq -c | sort -rn | head -30
    else
      grep -E -B5 -A30 "ERROR|FAILED|SEGV" "$log" | head -60 || tail -40 "$log"
    fi
    echo "FAIL: $label (exit $rc)"
    failed=$((failed + 1))
  else
    echo "ok: $label ($(( $(date +%s) - start )) s)"
  fi
  rm -f "$log"
}

# ---- UBSan ----
ubsan_tests="test_threads test_api_edges test_stats test_stress test_oom test_failure_sweep test_large_ranges"
configure undefined
make -C "$build/sanitize-undefined" -j"$jobs" $ubsan_tests > "$build/sanitize-undefined.build.log" 2>&1 \
  || { grep -E "error|Error" "$build/sanitize-undefined.build.log" | head -20; fail "UBSan build"; }
for t in $ubsan_tests; do
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 run_test "UBSan $t" 300 "$build/sanitize-undefined/tests/$t"
done

# ---- TSan ----
configure thread
dir=$build/sanitize-thread
make -C "$dir" -j"$jobs" lumalloc_static > "$dir.build.log" 2>&1 || { tail -20 "$dir.build.log"; fail "TSan build"; }
std="malloc free calloc realloc reallocarray memalign posix_memalign aligned_alloc valloc pvalloc
     malloc_usable_size free_sized free_aligned_sized malloc_trim mallinfo2 malloc_stats cfree
     __libc_malloc __libc_free __libc_calloc __libc_realloc __libc_memalign"
args=()
for s in $std; do args+=(--localize-symbol=$s); done
objcopy "${args[@]}" "$dir/lib/liblumalloc.a" "$dir/liblumalloc_lum_only.a"
if nm "$dir/liblumalloc_lum_only.a" | grep -qE " [TW] (malloc|free|calloc|realloc)$"; then
  fail "standard names still global in the TSan copy of the library"
fi
tsan_cc() { # output, sources...
  local out=$1; shift
  gcc -std=gnu11 -O1 -g -fsanitize=thread -fno-omit-frame-pointer -I"$src/include" -I"$src/lib" "$@" \
    "$dir/liblumalloc_lum_only.a" $(pkg-config --libs cmocka) -lpthread -lm -o "$out" \
    || fail "TSan compile of $out"
}
cat > "$dir/first_use.c" <<'C'
/* The allocator's very first use happens in two threads at once (no allocation before). */
#include <pthread.h>
#include <stdio.h>
#include "lumalloc.h"
static pthread_barrier_t go;
static void *first(void *arg)
{
    pthread_barrier_wait(&go);
    for (int i = 0; i < 1000; i++) lum_free(lum_malloc(1000 + (size_t)arg * 8 + (size_t)i % 4000));
    return NULL;
}
int main(void)
{
    pthread_t t[2];
    pthread_barrier_init(&go, NULL, 2);
    for (long i = 0; i < 2; i++) pthread_create(&t[i], NULL, first, (void *)i);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    return lum_heap_check(1) != 0;
}
C
tsan_cc "$dir/test_stress_tsan" "$src/tests/test_stress.c"
tsan_cc "$dir/first_use_tsan" "$dir/first_use.c"
tsan_cc "$dir/test_large_ranges_tsan" "$src/tests/test_large_ranges.c"
tsan_cc "$dir/tsan_readers" "$src/tests/integration/tsan_readers.c"
# halt_on_error=0: every race of the run is listed (the exit status is still 66 after a report)
export LUMALLOC_SAMPLE_INTERVAL=64k
TSAN_OPTIONS=halt_on_error=0:second_deadlock_stack=1 run_test "TSan test_stress, sampling and profiler on" 300 "$dir/test_stress_tsan"
TSAN_OPTIONS=halt_on_error=0 run_test "TSan test_large_ranges, sampling and profiler on" 300 "$dir/test_large_ranges_tsan"
for i in 1 2 3; do
  TSAN_OPTIONS=halt_on_error=0 run_test "TSan first use from two threads, sampling on ($i)" 60 "$dir/first_use_tsan"
done
TSAN_OPTIONS=halt_on_error=0 run_test "TSan readers against allocating threads, sampling and profiler on" 300 "$dir/tsan_readers"
LUMALLOC_PROF=off TSAN_OPTIONS=halt_on_error=0 \
  run_test "TSan readers, sampling on, profiler off" 300 "$dir/tsan_readers"
LUMALLOC_SAMPLE_INTERVAL=0 TSAN_OPTIONS=halt_on_error=0 \
  run_test "TSan readers, sampling off" 300 "$dir/tsan_readers"
[ "$failed" = 0 ] || fail "$failed sanitizer runs failed"
echo "sanitizers: all clean"
