#!/bin/bash
# USDT probes of liblumalloc.so under a real tracer.
#   1. readelf: every probe of the contract is in the library's stapsdt notes, with a semaphore.
#   2. With nothing attached every semaphore reads zero (read by the process itself).
#   3. bpftrace attached by PID: the semaphore rises, the counts and summed weights bpftrace sees
#      equal the in-process counters over the same window, stacks arrive with the sample.  It is
#      attached to sample_batch too: the per-event probes keep firing beside a batch consumer,
#      and the batches carry exactly as many records as there were samples and frees.
#   4. After bpftrace exits the semaphores are back to zero.
# Usage: probes_bpftrace.sh /path/to/liblumalloc.so [build-dir]
# Needs root and bpftrace.  Exit 77 = skipped (missing capability), unless CI=true: then FAIL.
set -u
LIB=$(readlink -f "${1:?usage: $0 liblumalloc.so [build-dir]}")
SRC=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/lum_probes.XXXXXX)
trap 'rm -rf "$WORK"; [ -n "${WPID:-}" ] && kill "$WPID" 2>/dev/null' EXIT

fail() { echo "FAIL: $*"; exit 1; }
skip() {
    if [ "${CI:-}" = "true" ]; then fail "$* (CI=true: a missing capability is a failure)"; fi
    echo "SKIP: $*"; exit 77
}

[ -f "$LIB" ] || fail "no library at $LIB"
command -v readelf >/dev/null || skip "readelf not installed"

# ---- 1. probe notes and semaphores ----
NOTES=$(readelf -n "$LIB")
for p in sample sample_free large_alloc large_free alloc_failure thread_start thread_exit purge pressure sample_batch; do
    entry=$(echo "$NOTES" | grep -A2 -E "^\s+Name: $p\$")
    [ -n "$entry" ] || fail "probe lumalloc:$p missing from $LIB"
    echo "$entry" | grep -q "Semaphore: 0x0*[1-9a-f]" || fail "probe lumalloc:$p has no semaphore"
    provider=$(echo "$NOTES" | grep -B1 -E "^\s+Name: $p\$" | head -1)
    echo "$provider" | grep -q "Provider: lumalloc" || fail "probe $p: provider is not lumalloc"
done
echo "ok: 10 probes with semaphores in $(basename "$LIB")"

command -v bpftrace >/dev/null || skip "bpftrace not installed"
[ "$(id -u)" = 0 ] || skip "not root: bpftrace cannot attach"

# ---- the workload ----
cat > "$WORK/work.c" <<'EOF'
#define _GNU_SOURCE 1
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "lumalloc_probes.h"
#include "lumalloc_prof.h"

extern struct lum_registry_v1 lumalloc_registry;
static void *volatile sink;
static const char *const probes[] = {"sample", "sample_free", "large_alloc", "large_free",
    "alloc_failure", "thread_start", "thread_exit", "purge", "pressure", "sample_batch"};

static struct lum_thread_counters_v1 *mine(void)
{
    for (uint64_t a = lumalloc_registry.threads_head; a;) {
        struct lum_thread_counters_v1 *tc = (void *)(uintptr_t)a;
        if (tc->tid == (uint32_t)gettid() && tc->state == LUM_THREAD_LIVE) return tc;
        a = tc->next;
    }
    return NULL;
}

static int wait_sem(int want_nonzero, int seconds)
{
    for (int i = 0; i < seconds * 100; i++) {
        int on = lum_probe_semaphore("sample") != 0 && lum_probe_semaphore("sample_batch") != 0;
        int off = lum_probe_semaphore("sample") == 0 && lum_probe_semaphore("sample_batch") == 0;
        if (want_nonzero ? on : off) return 1;
        usleep(10000);
    }
    return 0;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    sink = malloc(1); /* bootstrap, and this thread's counters */
    struct lum_thread_counters_v1 *tc = mine();
    if (!tc) { printf("NOCOUNTERS\n"); return 1; }
    for (size_t i = 0; i < sizeof probes / sizeof *probes; i++)
        printf("SEM %s %d\n", probes[i], lum_probe_semaphore(probes[i]));
    printf("READY\n");
    if (!wait_sem(1, 60)) { printf("NOTRACER\n"); return 1; }
    sleep(1); /* let the tracer finish attaching every probe */
    struct lum_prof_stats a, b;
    lum_prof_get_stats(&a);
    uint64_t sb0 = tc->sampled_bytes, sc0 = tc->sampled_count, lc0 = tc->large_count;
    void *ring[256] = {0};
    for (unsigned i = 0; i < (1u << 18); i++) { /* 1 GiB through a ring of 256 live blocks */
        unsigned s = i & 255;
        free(ring[s]);
        ring[s] = malloc(4096);
    }
    for (unsigned s = 0; s < 256; s++) free(ring[s]);
    for (int i = 0; i < 10; i++) { sink = malloc(1 << 20); free(sink); }
    lum_prof_get_stats(&b);
    printf("INPROC samples=%llu frees=%llu count=%llu bytes=%llu large=%llu\n",
           (unsigned long long)(b.samples - a.samples),
           (unsigned long long)(b.sample_frees - a.sample_frees),
           (unsigned long long)(tc->sampled_count - sc0),
           (unsigned long long)(tc->sampled_bytes - sb0),
           (unsigned long long)(tc->large_count - lc0));
    int detached = wait_sem(0, 60);
    printf("DETACHED %d\n", detached ? lum_probe_semaphore("sample") : -1);
    return 0;
}
EOF
gcc -O2 -g -I"$SRC/include" "$WORK/work.c" -o "$WORK/work" "$LIB" -Wl,-rpath,"$(dirname "$LIB")" \
    || fail "cannot build the workload"

"$WORK/work" > "$WORK/work.out" 2>&1 &
WPID=$!
for _ in $(seq 100); do grep -q READY "$WORK/work.out" && break; sleep 0.1; done
grep -q READY "$WORK/work.out" || fail "workload did not start: $(cat "$WORK/work.out")"

# ---- 2. semaphores are zero with nothing attached ----
zeros=$(grep -c '^SEM [a-z_]* 0$' "$WORK/work.out")
[ "$zeros" = 10 ] || fail "semaphores not zero before attaching: $(grep ^SEM "$WORK/work.out" | tr '\n' ' ')"
echo "ok: all 10 semaphores read 0 with no tracer"

# ---- 3. attach ----
BATCH_BYTES=$(sed -n 's/^#define LUM_BATCH_BYTES \([0-9]*\).*/\1/p' "$SRC/include/lumalloc_probes.h")
[ -n "$BATCH_BYTES" ] || fail "LUM_BATCH_BYTES not found in lumalloc_probes.h"
timeout 60 bpftrace -p "$WPID" -e "
usdt:$LIB:lumalloc:sample { @n = count(); @w = sum(arg3); if (arg5 > 0) { @stack = count(); } }
usdt:$LIB:lumalloc:sample_free { @f = count(); }
usdt:$LIB:lumalloc:large_alloc { @l = count(); }
usdt:$LIB:lumalloc:sample_batch { @r = sum(arg2); @b = count(); if (arg1 > $BATCH_BYTES) { @big = count(); } }
interval:s:8 { exit(); }" > "$WORK/bt.out" 2>&1
btrc=$?
wait "$WPID"; wrc=$?; WPID=
cat "$WORK/work.out" | grep -v '^SEM'
grep '^@' "$WORK/bt.out"
[ $btrc = 0 ] || fail "bpftrace failed ($btrc): $(head -5 "$WORK/bt.out")"
[ $wrc = 0 ] || fail "workload failed ($wrc)"

val() { grep "^@$1:" "$WORK/bt.out" | awk '{print $2}'; }
inproc() { grep '^INPROC' "$WORK/work.out" | tr ' ' '\n' | grep "^$1=" | cut -d= -f2; }
n=$(val n); w=$(val w); st=$(val stack); f=$(val f); l=$(val l); r=$(val r); b=$(val b)
[ -n "$n" ] && [ "$n" -gt 0 ] || fail "bpftrace saw no sample probe"
[ "$n" = "$(inproc samples)" ] || fail "sample probes: bpftrace $n, in-process $(inproc samples)"
[ "$n" = "$(inproc count)" ] || fail "sample probes $n != thread sampled_count $(inproc count)"
[ "$w" = "$(inproc bytes)" ] || fail "summed weights: bpftrace $w, thread sampled_bytes $(inproc bytes)"
[ "$st" = "$n" ] || fail "samples with a stack: $st of $n"
[ "$f" = "$(inproc frees)" ] || fail "sample_free probes: bpftrace $f, in-process $(inproc frees)"
[ "$l" = "$(inproc large)" ] || fail "large_alloc probes: bpftrace $l, in-process $(inproc large)"
echo "ok: bpftrace counts equal in-process counters (samples $n, weights $w, frees $f, large $l)"
# The window bpftrace sees is wider than the workload's (the workload's own start-up and exit
# allocations), never narrower: every sample and free of the loop is in a batch.
[ -n "$r" ] && [ -n "$b" ] || fail "bpftrace saw no sample_batch probe"
[ "$r" -ge $((n + f)) ] && [ "$r" -le $((n + f + 64)) ] ||
    fail "sample_batch records: $r, samples + frees in-process: $((n + f))"
[ "$b" -lt $(((n + f) / 50)) ] || fail "$b batches for $((n + f)) records: not batching"
[ "$(val big)" -eq 0 ] 2>/dev/null || [ -z "$(val big)" ] || fail "a batch larger than LUM_BATCH_BYTES"
echo "ok: $b sample_batch firings carried $r records beside the per-event probes"

# ---- 4. detached ----
grep -q '^DETACHED 0$' "$WORK/work.out" || fail "semaphore not back to 0 after bpftrace exited"
echo "ok: semaphores back to 0 after detach"
echo PASS
