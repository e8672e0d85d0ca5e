/* For the ThreadSanitizer run of core_sanitizers.sh: three threads allocate and free (small,
 * medium and large blocks, some freed by another thread, some under an injected-failure
 * countdown of their own) while a reader thread, over and over, calls every public API that
 * walks other threads' state: statistics, mallinfo2 / malloc_info / malloc_stats, the
 * diagnostics report, the profiler's reports and dump, the heap check, the options, and arms and
 * disarms the process-wide failure injector.  Written against the lum_* API (TSan owns malloc). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "lumalloc.h"
#include "lumalloc_failure.h"
#include "lumalloc_options.h"
#include "lumalloc_prof.h"
#include "lumalloc_stats.h"

#define WORKERS 3
#define ROUNDS 12000
#define KEEP 64

static atomic_int workers_left = WORKERS;
/* cross-thread hand-off: a worker parks a block here, the next worker to look frees it */
static _Atomic(void *) mailbox[WORKERS];
static atomic_ulong injected;

static uint64_t next_rand(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static size_t pick_size(uint64_t r)
{
    switch (r % 16) {
    case 15: return 256 * 1024 + (r >> 8) % (1u << 20);  /* large */
    case 13: case 14: return 1024 + (r >> 8) % (128 * 1024); /* medium */
    default: return 1 + (r >> 8) % 1024;                 /* small */
    }
}

static void *worker(void *arg)
{
    long id = (long)arg;
    uint64_t s = 0x9e3779b97f4a7c15ull * (uint64_t)(id + 1);
    void *keep[KEEP] = {0};
    for (int i = 0; i < ROUNDS; i++) {
        uint64_t r = next_rand(&s);
        unsigned k = (unsigned)(r >> 40) % KEEP;
        lum_free(keep[k]);
        size_t size = pick_size(r);
        void *p;
        switch ((r >> 32) % 8) {
        case 0: p = lum_calloc(1, size); break;
        case 1: {
            void *q = lum_malloc(size / 2 + 1);
            p = lum_realloc(q, size);
            if (!p) lum_free(q);
            break;
        }
        case 2: if (lum_posix_memalign(&p, 64, size)) p = NULL; break;
        default: p = lum_malloc(size); break;
        }
        if (p) memset(p, (int)id, size < 64 ? size : 64);
        keep[k] = p;
        if (i % 7 == 0 && p) { /* hand a block to the next worker, free what was left for us */
            keep[k] = NULL;
            void *old = atomic_exchange(&mailbox[(id + 1) % WORKERS], p);
            lum_free(old);
            lum_free(atomic_exchange(&mailbox[id], NULL));
        }
        if (i % 500 == 250) { /* this thread's own injector: the 5th allocation from now fails */
            lum_fail_after(5);
            for (int j = 0; j < 8; j++) lum_free(lum_malloc(32 + (size_t)j * 100));
            if (lum_fail_fired()) atomic_fetch_add(&injected, 1);
            lum_fail_cancel();
        }
    }
    for (unsigned k = 0; k < KEEP; k++) lum_free(keep[k]);
    atomic_fetch_sub(&workers_left, 1);
    return NULL;
}

static int count_site(const struct lum_prof_site *site, void *arg)
{
    (void)site;
    ++*(unsigned long *)arg;
    return 0;
}

static void *reader(void *arg)
{
    (void)arg;
    FILE *null = fopen("/dev/null", "w");
    int fd = open("/dev/null", O_WRONLY);
    if (!null || fd < 0) abort();
    lum_set_diagnostics_fd(fd);
    struct lum_stats *st = lum_malloc(sizeof *st);
    unsigned long rounds = 0, sites = 0;
    char buf[64];
    while (atomic_load(&workers_left) > 0 || rounds < 20) {
        lum_stats_snapshot(st);
        lum_stats_print(null, st);
        lum_stats_print_json(null, st);
        struct mallinfo2 mi = lum_mallinfo2();
        struct mallinfo m1 = lum_mallinfo();
        fprintf(null, "%zu %d\n", mi.uordblks, m1.uordblks);
        lum_malloc_info(0, null);
        if (rounds % 50 == 0) lum_malloc_stats(); /* on stderr */
        lum_diagnostics_report(12345);
        lum_prof_write_text(null);
        lum_prof_write_threads(null);
        lum_prof_write_folded(null, LUM_PROF_LIVE);
        lum_prof_write_folded(null, LUM_PROF_CUMULATIVE);
        lum_prof_write_pprof(fd);
        lum_prof_foreach_site(count_site, &sites);
        struct lum_prof_stats ps;
        lum_prof_get_stats(&ps);
        if (rounds % 10 == 0) lum_prof_dump("/dev/null", LUM_PROF_TEXT);
        if (rounds % 25 == 0) lum_prof_reset();
        lum_probe_semaphore("sample");
        lum_options_print(null);
        lum_options_print_json(null);
        lum_options_get("sample_interval", buf, sizeof buf);
        lum_background_running();
        if (lum_heap_check(1) != 0) { fprintf(stderr, "heap check failed\n"); abort(); }
        /* the process-wide injector: armed on odd rounds (the 50th allocation from now, in any
         * thread, fails), disarmed on even ones */
        lum_fail_nth(rounds % 2 ? 50 : 0);
        if (rounds % 20 == 0) lum_malloc_trim(0);
        rounds++;
    }
    lum_fail_nth(0);
    lum_free(st);
    fclose(null);
    close(fd);
    fprintf(stderr, "reader: %lu rounds, %lu sites seen, %lu injected in workers\n", rounds, sites,
            atomic_load(&injected));
    return NULL;
}

int main(void)
{
    pthread_t w[WORKERS], r;
    pthread_create(&r, NULL, reader, NULL);
    for (long i = 0; i < WORKERS; i++) pthread_create(&w[i], NULL, worker, (void *)i);
    for (int i = 0; i < WORKERS; i++) pthread_join(w[i], NULL);
    pthread_join(r, NULL);
    for (int i = 0; i < WORKERS; i++) lum_free(atomic_load(&mailbox[i]));
    return lum_heap_check(1) != 0;
}
