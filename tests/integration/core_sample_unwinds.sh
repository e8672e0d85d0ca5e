#!/usr/bin/env bash
# Under LD_PRELOAD (lumalloc a separate object, where the core's sampling path takes a stack the
# unwinder's memo still holds under the sampled pages' lock and counts that unwind with plain
# additions, summed by lum_prof_get_stats), every sample of small blocks is one unwind, counted
# once: from one call site (memo hits), from two taking turns (a walk each, or a memo hit on
# another stack than the thread's last, which is tried again outside the lock), and from two
# threads.  Each sample's stack has the frames below main, and every sampled block's record goes
# when it is freed.
# Usage: core_sample_unwinds.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
src=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

cat > "$work/prog.c" <<'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include "lumalloc_prof.h"
#define N 200000
static void *blocks[N];
static void (*get)(struct lum_prof_stats *);
__attribute__((noinline)) static void *site_a(size_t n) { void *p = malloc(n); __asm__ volatile("" ::: "memory"); return p; }
__attribute__((noinline)) static void *site_b(size_t n) { void *p = malloc(n); __asm__ volatile("" ::: "memory"); return p; }
static int phase(int turns, const char *what)
{
    struct lum_prof_stats a, b, c;
    get(&a);
    for (int i = 0; i < N; i++) {
        blocks[i] = (turns && (i / 7) % 2) ? site_b(100 + i % 900) : site_a(100 + i % 900);
        ((volatile char *)blocks[i])[0] = 1;
    }
    get(&b);
    for (int i = 0; i < N; i++) free(blocks[i]);
    get(&c);
    unsigned long long s = b.samples - a.samples, u = b.unwinds - a.unwinds, f = b.unwind_frames - a.unwind_frames;
    printf("%s: %llu samples, %llu unwinds, %.1f frames each\n", what, s, u, s ? (double)f / s : 0.0);
    if (s < 100) return 2;                 /* 200000 blocks of ~550 bytes at 4k: ~25000 */
    if (u != s) return 3;                  /* one unwind a sample, counted once */
    if (f < 2 * s) return 4;               /* main and what called it, at least */
    if (c.live_samples != a.live_samples) return 5;
    if (c.sample_frees - b.sample_frees != s) return 6;
    return 0;
}
static void *thread_main(void *arg)
{
    (void)arg;
    for (int i = 0; i < 100000; i++) free(site_b(200 + i % 700));
    return NULL;
}
int main(void)
{
    get = (void (*)(struct lum_prof_stats *))dlsym(RTLD_DEFAULT, "lum_prof_get_stats");
    if (!get) return 1;
    int r;
    if ((r = phase(0, "one site")) != 0) return r;
    if ((r = phase(1, "two sites")) != 0) return 10 + r;
    struct lum_prof_stats a, b;
    get(&a);
    pthread_t t;
    pthread_create(&t, NULL, thread_main, NULL);
    for (int i = 0; i < 100000; i++) free(site_a(200 + i % 700));
    pthread_join(t, NULL);
    get(&b);
    printf("threads: %llu samples, %llu unwinds\n", (unsigned long long)(b.samples - a.samples),
           (unsigned long long)(b.unwinds - a.unwinds));
    if (b.samples - a.samples < 100) return 20;
    if (b.unwinds - a.unwinds != b.samples - a.samples) return 21;
    return 0;
}
EOF
cc -O1 -I"$src/include" -o "$work/prog" "$work/prog.c" -ldl -lpthread
# PSI off: no background thread, whose start (pthread_create's own allocations, sampled now and
# then at this interval, and kept) moved the live samples a phase counts (one CI run in many)
LUMALLOC_PSI=off LUMALLOC_SAMPLE_INTERVAL=4k LD_PRELOAD="$lib" "$work/prog" || fail "exit $? (see the output above)"
echo PASS
