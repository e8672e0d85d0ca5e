/* The sampling interval changed at run time (and failure injection armed at run time) reaches
 * threads that are already running, and no
 * sample is weighted with an interval its point was not drawn with.  Each thread had drawn its
 * next point under the old interval: weighted with the new one, 64k -> 1t gave every thread a
 * sample worth ~1 TiB for 64 MiB allocated; points drawn with sampling off were never reached,
 * so off -> 64k left running threads unsampled for good.  The workers allocate from their
 * caches only (one size, freed at once), so they never leave malloc's fast path but at a point. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <cmocka.h>
#include "internal.h"
#include "lumalloc_failure.h"
#include "lumalloc_options.h"

#define WORKERS 4
#define BLOCK 1024
#define BYTES ((uint64_t)64 << 20)

static pthread_barrier_t ready, go, done;

struct worker {
    pthread_t th;
    uint64_t samples, sampled_bytes;
};

static void churn(uint64_t bytes)
{
    for (uint64_t n = 0; n < bytes; n += BLOCK) {
        void *volatile p = malloc(BLOCK);
        free(p);
    }
    /* GCC takes malloc and free to write no memory the caller sees: the counters read before
     * would be reused */
    __asm__ volatile("" ::: "memory");
}

static void *work(void *arg)
{
    struct worker *w = arg;
    churn(1 << 20); /* a point drawn under the interval of the start */
    pthread_barrier_wait(&ready);
    pthread_barrier_wait(&go);
    struct lum_heap *heap = lum_tls_heap;
    uint64_t s0 = heap->tc.sampled_count, b0 = heap->tc.sampled_bytes;
    churn(BYTES);
    w->samples = heap->tc.sampled_count - s0;
    w->sampled_bytes = heap->tc.sampled_bytes - b0;
    pthread_barrier_wait(&done);
    return NULL;
}

/* Starts the workers under interval `from`, changes it to `to` while they wait, lets them
 * allocate BYTES each. */
static void run(const char *from, const char *to, struct worker *w)
{
    assert_int_equal(lum_options_set("sample_interval", from), 0);
    pthread_barrier_init(&ready, NULL, WORKERS + 1);
    pthread_barrier_init(&go, NULL, WORKERS + 1);
    pthread_barrier_init(&done, NULL, WORKERS + 1);
    for (int i = 0; i < WORKERS; i++) assert_int_equal(pthread_create(&w[i].th, NULL, work, &w[i]), 0);
    pthread_barrier_wait(&ready);
    assert_int_equal(lum_options_set("sample_interval", to), 0);
    pthread_barrier_wait(&go);
    pthread_barrier_wait(&done);
    for (int i = 0; i < WORKERS; i++) pthread_join(w[i].th, NULL);
    pthread_barrier_destroy(&ready);
    pthread_barrier_destroy(&go);
    pthread_barrier_destroy(&done);
    lum_options_set("sample_interval", "512k");
}

static void off_to_on_reaches_running_threads(void **state)
{
    (void)state;
    struct worker w[WORKERS] = {0};
    run("0", "64k", w);
    for (int i = 0; i < WORKERS; i++) {
        /* ~1000 samples expected; the estimate of 64 MiB within 25% is > 8 standard errors */
        assert_true(w[i].samples > 500);
        assert_true(w[i].sampled_bytes > BYTES * 3 / 4 && w[i].sampled_bytes < BYTES * 5 / 4);
    }
}

static void short_to_long_weights_no_stale_point(void **state)
{
    (void)state;
    struct worker w[WORKERS] = {0};
    run("64k", "1t", w);
    /* at 1 TiB a sample in 64 MiB is a 1 in 16000 chance a thread; each stale point reached
     * within 64k was one worth ~1 TiB */
    for (int i = 0; i < WORKERS; i++) assert_int_equal(w[i].samples, 0);
}

static void on_to_off_stops_sampling(void **state)
{
    (void)state;
    struct worker w[WORKERS] = {0};
    run("64k", "0", w);
    for (int i = 0; i < WORKERS; i++) assert_int_equal(w[i].samples, 0);
}

static void long_to_short_reaches_running_threads(void **state)
{
    (void)state;
    struct worker w[WORKERS] = {0};
    run("1t", "64k", w);
    for (int i = 0; i < WORKERS; i++) assert_true(w[i].samples > 500);
}

/* lum_fail_nth armed at run time reaches a thread that allocates from its cache alone, with
 * sampling off too: it never left its fast path, and the failure never came. */
static void *count_failures(void *arg)
{
    uint64_t *failures = arg;
    churn(1 << 20);
    pthread_barrier_wait(&ready);
    pthread_barrier_wait(&go);
    for (uint64_t n = 0; n < BYTES; n += BLOCK) {
        void *volatile p = malloc(BLOCK);
        if (!p) ++*failures;
        free(p);
    }
    return NULL;
}

static void fail_nth_reaches_running_threads(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    pthread_barrier_init(&ready, NULL, 2);
    pthread_barrier_init(&go, NULL, 2);
    pthread_t th;
    uint64_t failures = 0;
    assert_int_equal(pthread_create(&th, NULL, count_failures, &failures), 0);
    pthread_barrier_wait(&ready);
    lum_fail_nth(100);
    pthread_barrier_wait(&go);
    pthread_join(th, NULL);
    lum_fail_nth(0);
    pthread_barrier_destroy(&ready);
    pthread_barrier_destroy(&go);
    lum_options_set("sample_interval", "512k");
    assert_int_equal(failures, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(off_to_on_reaches_running_threads),
        cmocka_unit_test(short_to_long_weights_no_stale_point),
        cmocka_unit_test(on_to_off_stops_sampling),
        cmocka_unit_test(long_to_short_reaches_running_threads),
        cmocka_unit_test(fail_nth_reaches_running_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
