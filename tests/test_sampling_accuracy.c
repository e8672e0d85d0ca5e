/* Statistical accuracy of the sampling profiler through the real allocator: 1 GiB allocated at
 * four call sites (small, medium, mixed and large sizes) by four threads.  Per-site estimates of
 * bytes and objects must be within 10% of the truth; per-thread counters must be exact, and the
 * per-thread sampled bytes must add up exactly to the per-site figures. */
#define _GNU_SOURCE 1
#define UNW_LOCAL_ONLY
#include <libunwind.h>
#include <malloc.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include "lumalloc_probes.h"
#include "lumalloc_prof.h"
#include "options.h"

extern struct lum_registry_v1 lumalloc_registry;

#define THREADS 4
#define SITES 4
#define BYTES_PER_SITE_THREAD ((uint64_t)64 << 20) /* 4 sites x 4 threads x 64 MiB = 1 GiB */
#define RETAIN_BYTES ((uint64_t)32 << 20)          /* per thread, kept live until checked */
#define RING 64

struct truth {
    uint64_t bytes[SITES + 1], objects[SITES + 1]; /* requested sizes; [SITES] = retained */
    uint64_t allocs, frees, alloc_usable, free_usable;
};

struct worker {
    pthread_t t;
    struct truth truth;
    struct lum_thread_counters_v1 before, after;
    void **retained;
    size_t nretained;
};

static uint64_t lcg(uint64_t *x)
{
    *x = *x * 6364136223846793005ULL + 1442695040888963407ULL;
    return *x >> 33;
}

/* One site = one function; `ring` bounds the live set so memory stays small. */
#define SITE_BODY(idx, size_expr)                                                    \
    void *ring[RING] = {0};                                                          \
    uint64_t done = 0, x = (uint64_t)(uintptr_t)w + idx;                             \
    for (unsigned i = 0; done < BYTES_PER_SITE_THREAD; i++) {                        \
        size_t s = (size_expr);                                                      \
        (void)lcg(&x);                                                               \
        unsigned slot = i % RING;                                                    \
        if (ring[slot]) {                                                            \
            w->truth.free_usable += malloc_usable_size(ring[slot]);                  \
            w->truth.frees++;                                                        \
            free(ring[slot]);                                                        \
        }                                                                            \
        ring[slot] = malloc(s);                                                      \
        assert_non_null(ring[slot]);                                                 \
        ((volatile char *)ring[slot])[0] = 1;                                        \
        w->truth.alloc_usable += malloc_usable_size(ring[slot]);                     \
        w->truth.allocs++;                                                           \
        w->truth.bytes[idx] += s;                                                    \
        w->truth.objects[idx]++;                                                     \
        done += s;                                                                   \
    }                                                                                \
    for (unsigned slot = 0; slot < RING; slot++)                                     \
        if (ring[slot]) {                                                            \
            w->truth.free_usable += malloc_usable_size(ring[slot]);                  \
            w->truth.frees++;                                                        \
            free(ring[slot]);                                                        \
        }

__attribute__((noinline)) void acc_site_small(struct worker *w) { SITE_BODY(0, 48) }
__attribute__((noinline)) void acc_site_medium(struct worker *w) { SITE_BODY(1, 1500) }
__attribute__((noinline)) void acc_site_mixed(struct worker *w) { SITE_BODY(2, 16 + lcg(&x) % 16368) }
__attribute__((noinline)) void acc_site_large(struct worker *w) { SITE_BODY(3, 320 << 10) }

__attribute__((noinline)) void acc_site_retain(struct worker *w)
{
    size_t n = RETAIN_BYTES / 4096;
    for (size_t i = 0; i < n; i++) {
        void *p = malloc(4096);
        assert_non_null(p);
        w->retained[w->nretained++] = p;
        w->truth.alloc_usable += malloc_usable_size(p);
        w->truth.allocs++;
        w->truth.bytes[SITES] += 4096;
        w->truth.objects[SITES]++;
    }
}

static struct lum_thread_counters_v1 *my_counters(void)
{
    pid_t tid = gettid();
    for (uint64_t a = lumalloc_registry.threads_head; a;) {
        struct lum_thread_counters_v1 *tc = (void *)(uintptr_t)a;
        if (tc->tid == (uint32_t)tid && tc->state == LUM_THREAD_LIVE)
            return tc;
        a = tc->next;
    }
    return NULL;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    /* The array of retained pointers is allocated before the measured window. */
    w->retained = malloc((RETAIN_BYTES / 4096) * sizeof(void *));
    struct lum_thread_counters_v1 *tc = my_counters();
    assert_non_null(tc);
    w->before = *tc;
    acc_site_small(w);
    acc_site_medium(w);
    acc_site_mixed(w);
    acc_site_large(w);
    acc_site_retain(w);
    w->after = *tc;
    return NULL;
}

struct range {
    uintptr_t lo, hi;
};

static struct range fn_range(void *fn)
{
    unw_proc_info_t pi;
    assert_int_equal(unw_get_proc_info_by_ip(unw_local_addr_space, (unw_word_t)fn, &pi, NULL), 0);
    return (struct range){pi.start_ip, pi.end_ip};
}

struct est {
    struct range r[SITES + 1];
    double bytes[SITES + 1], objects[SITES + 1], live_bytes[SITES + 1];
    uint64_t samples[SITES + 1], raw_bytes[SITES + 1];
};

static int collect(const struct lum_prof_site *s, void *arg)
{
    struct est *e = arg;
    for (int k = 0; k <= SITES; k++) {
        bool hit = false;
        for (uint32_t f = 0; f < s->depth; f++)
            hit |= s->frames[f] - 1 >= e->r[k].lo && s->frames[f] - 1 < e->r[k].hi;
        if (hit) {
            e->bytes[k] += s->alloc_bytes;
            e->objects[k] += s->alloc_objects;
            e->live_bytes[k] += s->live_bytes;
            e->samples[k] += s->samples;
            e->raw_bytes[k] += (uint64_t)s->alloc_bytes;
        }
    }
    return 0;
}

static void test_accuracy(void **state)
{
    (void)state;
    /* The allocator starts its background (purge/PSI) thread lazily, from whichever thread
     * first has enough memory mapped; pthread_create's own allocations would then be charged
     * to a worker inside the measured window.  Map (and free) enough here first. */
    void *warm[40];
    for (int i = 0; i < 40; i++)
        warm[i] = malloc(2 << 20);
    for (int i = 0; i < 40; i++)
        free(warm[i]);
    assert_int_equal(lum_options_set("sample_interval", "128k"), 0);
    lum_prof_reset();
    static struct worker w[THREADS];
    memset(w, 0, sizeof w);
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&w[i].t, NULL, worker_main, &w[i]), 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(w[i].t, NULL);

    static struct est e;
    memset(&e, 0, sizeof e);
    e.r[0] = fn_range((void *)acc_site_small);
    e.r[1] = fn_range((void *)acc_site_medium);
    e.r[2] = fn_range((void *)acc_site_mixed);
    e.r[3] = fn_range((void *)acc_site_large);
    e.r[4] = fn_range((void *)acc_site_retain);
    assert_int_equal(lum_prof_foreach_site(collect, &e), 0);

    struct truth t;
    memset(&t, 0, sizeof t);
    uint64_t sampled_bytes = 0, sampled_count = 0;
    for (int i = 0; i < THREADS; i++) {
        for (int k = 0; k <= SITES; k++) {
            t.bytes[k] += w[i].truth.bytes[k];
            t.objects[k] += w[i].truth.objects[k];
        }
        /* Exact per-thread counters over the window. */
        struct lum_thread_counters_v1 *b = &w[i].before, *a = &w[i].after;
        assert_int_equal(a->alloc_count - b->alloc_count, w[i].truth.allocs);
        assert_int_equal(a->free_count - b->free_count, w[i].truth.frees);
        assert_int_equal(a->alloc_bytes - b->alloc_bytes, w[i].truth.alloc_usable);
        assert_int_equal(a->free_bytes - b->free_bytes, w[i].truth.free_usable);
        assert_int_equal(a->large_count - b->large_count, w[i].truth.objects[3]);
        assert_int_equal(a->failures - b->failures, 0);
        sampled_bytes += a->sampled_bytes - b->sampled_bytes;
        sampled_count += a->sampled_count - b->sampled_count;
    }
    static const char *const names[] = {"small 48 B", "medium 1500 B", "mixed 16-16 KiB",
                                        "large 320 KiB", "retained 4 KiB"};
    uint64_t site_samples = 0, site_bytes = 0;
    for (int k = 0; k <= SITES; k++) {
        double rb = e.bytes[k] / (double)t.bytes[k], ro = e.objects[k] / (double)t.objects[k];
        printf("%-16s truth %11llu bytes %9llu objects; estimate %.4f x bytes, %.4f x objects, "
               "%llu samples\n",
               names[k], (unsigned long long)t.bytes[k], (unsigned long long)t.objects[k], rb, ro,
               (unsigned long long)e.samples[k]);
        assert_true(fabs(rb - 1) < 0.10);
        /* Objects at the mixed site: a sample of an s-byte block stands for ~T/s objects, so
         * the estimate's sd is ~4% (bytes: ~2%) but its tail is long: one sample of a 16-32 B
         * block (~0.6% of runs) alone adds 12-25% of the site's 33k objects.  30% leaves that
         * tail room; a biased estimator still fails here and at the other sites' 10%. */
        assert_true(fabs(ro - 1) < (k == 2 ? 0.30 : 0.10));
        site_samples += e.samples[k];
        site_bytes += e.raw_bytes[k];
    }
    /* Live heap: only the retained site's blocks are still allocated. */
    double live = e.live_bytes[SITES] / (double)t.bytes[SITES];
    printf("retained live estimate %.4f x truth\n", live);
    assert_true(fabs(live - 1) < 0.20);
    for (int k = 0; k < SITES; k++)
        assert_true(e.live_bytes[k] == 0);
    /* The per-thread estimate and the per-site one are the same samples. */
    assert_int_equal(sampled_count, site_samples);
    assert_int_equal(sampled_bytes, site_bytes);

    for (int i = 0; i < THREADS; i++) {
        for (size_t j = 0; j < w[i].nretained; j++)
            free(w[i].retained[j]);
        free(w[i].retained);
    }
    assert_int_equal(lum_options_set("sample_interval", "512k"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_accuracy)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
