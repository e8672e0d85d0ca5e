/* A thread that frees what it built, with no malloc in between, turns its caches off
 * (lum_heap_free_run_check): the blocks it freed first would otherwise stay cached and keep
 * their pages from emptying, resident for as long as the thread stays idle (bench burst: 27 MiB
 * 3 s after freeing 1 GiB).  A thread that mallocs between its frees keeps its caches, and a class's
 * next malloc turns its cache on again.  Each case in a thread of its own: a fresh heap. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_stats.h"
#include "internal.h"

static void *(*volatile p_malloc)(size_t) = malloc;

#define NBLOCKS 20000
static void *blocks[NBLOCKS];

static size_t size_of(unsigned i)
{
    static const size_t sizes[] = {16, 40, 100, 256, 600, 1500, 3000, 3328, 7000}; /* 3328: pages of 2 slices */
    return sizes[i % (sizeof sizes / sizeof sizes[0])];
}

/* Pages with a block counted in use: none may be left once everything was freed. */
static unsigned pages_in_use(const struct lum_heap *h)
{
    unsigned n = 0;
    for (unsigned c = 0; c < LUM_CLASSES; c++) {
        for (const struct lum_page *p = h->avail[c].head; p; p = p->next) n += p->used != 0;
        for (const struct lum_page *p = h->full[c].head; p; p = p->next) n += p->used != 0;
    }
    return n;
}

/* Empty pages the heap holds other than those it keeps on purpose (retained, current):
 * nothing would ever retire them while the thread stays idle. */
static unsigned pages_stranded(const struct lum_heap *h)
{
    unsigned n = 0;
    for (unsigned c = 0; c < LUM_CLASSES; c++)
        for (const struct lum_page *p = h->avail[c].head; p; p = p->next)
            n += p->used == 0 && !p->retained && p != h->current[c];
    return n;
}

/* What the threads saw, asserted in the test's own thread (cmocka's failures jump out of it). */
static struct {
    unsigned cached_left, on_left, pages_used, pages_stranded, check_errors;
    uint64_t stats_live;
    bool reenabled, cached_again, other_off;
    unsigned churn_off_rounds;
    bool empty_kept_retained, empty_reused, empty_reenabled;
} seen;

static void *teardown_thread(void *arg)
{
    (void)arg;
    uint64_t s = 12345;
    for (unsigned i = 0; i < NBLOCKS; i++) {
        blocks[i] = p_malloc(size_of(i));
        memset(blocks[i], 1, 16);
    }
    for (unsigned i = NBLOCKS - 1; i > 0; i--) { /* freed in random order, as a burst's */
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        unsigned j = (unsigned)((s >> 33) % (i + 1));
        void *t = blocks[i];
        blocks[i] = blocks[j];
        blocks[j] = t;
    }
    for (unsigned i = 0; i < NBLOCKS; i++) free(blocks[i]);
    struct lum_heap *h = lum_tls_heap;
    for (unsigned c = 0; c < LUM_CLASSES; c++) {
        if (!lum_cache_max[c]) continue;
        seen.cached_left += h->cache[c] != NULL;
        seen.on_left += h->cache_room[c] != 0;
    }
    seen.pages_used = pages_in_use(h);
    seen.pages_stranded = pages_stranded(h);
    seen.check_errors = (unsigned)lum_heap_check(1);
    /* statistics take an off cache for what it is, empty, not full (16 blocks each) */
    static struct lum_stats st;
    lum_stats_snapshot(&st);
    for (unsigned c = 0; c < LUM_CLASSES; c++) seen.stats_live += st.classes[c].live_blocks;

    /* the class's next malloc turns its cache on, and its next free is cached */
    unsigned cls = lum_size_class(100);
    void *p = p_malloc(100);
    seen.reenabled = h->cache_room[cls] == (int8_t)lum_cache_max[cls];
    free(p);
    seen.cached_again = h->cache[cls] == p && h->cache_room[cls] == (int8_t)lum_cache_max[cls] - 1;
    /* another class's stays off until its own malloc */
    unsigned other = lum_size_class(600);
    seen.other_off = h->cache_room[other] == 0 && !h->cache[other];
    return NULL;
}

/* Each case in a thread of its own, whose heap is a fresh one (or a pooled record made fresh). */
static void in_thread(void *(*fn)(void *))
{
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, fn, NULL), 0);
    pthread_join(t, NULL);
}

static void test_teardown_empties_pages(void **state)
{
    (void)state;
    in_thread(teardown_thread);
    assert_int_equal(seen.cached_left, 0);
    assert_int_equal(seen.on_left, 0);
    /* Before: every class kept the first 16 blocks it freed, each pinning its page. */
    assert_int_equal(seen.pages_used, 0);
    assert_int_equal(seen.pages_stranded, 0);
    assert_int_equal(seen.check_errors, 0);
    assert_true(seen.stats_live < 100); /* the test's own few; before: a wrapped count */
    assert_true(seen.reenabled);
    assert_true(seen.cached_again);
    assert_true(seen.other_off);
}

/* Runs of 40 frees of one class (24 past its full cache each), a malloc between runs: ten
 * thousand frees past a full cache, never 256 in a row without a malloc. */
static void *churn_thread(void *arg)
{
    (void)arg;
    static void *ring[40];
    unsigned cls = lum_size_class(48);
    for (unsigned i = 0; i < 40; i++) ring[i] = p_malloc(48);
    struct lum_heap *h = lum_tls_heap;
    for (unsigned round = 0; round < 500; round++) {
        for (unsigned i = 0; i < 40; i++) free(ring[i]);
        seen.churn_off_rounds += h->cache[cls] == NULL; /* the run's first 16 are cached: on */
        for (unsigned i = 0; i < 40; i++) ring[i] = p_malloc(48);
    }
    for (unsigned i = 0; i < 40; i++) free(ring[i]);
    return NULL;
}

static void test_churn_keeps_caches(void **state)
{
    (void)state;
    in_thread(churn_thread);
    assert_int_equal(seen.churn_off_rounds, 0);
}

/* A class whose current page is empty when the caches go off (its last blocks were cached):
 * the page is kept as a retained one and the class's next malloc takes it again, its cache on. */
static void *empty_current_thread(void *arg)
{
    (void)arg;
    enum { A = 200, B = 40, NB = 1200 };
    static void *a[40], *b[NB];
    for (unsigned i = 0; i < 40; i++) a[i] = p_malloc(A);
    for (unsigned i = 0; i < NB; i++) b[i] = p_malloc(B);
    struct lum_heap *h = lum_tls_heap;
    unsigned ca = lum_size_class(A);
    struct lum_page *pa = h->current[ca];
    for (unsigned i = 0; i < 40; i++) free(a[i]); /* the first 16 cached: the page not empty */
    for (unsigned i = 0; i < NB; i++) free(b[i]); /* hundreds past B's full cache, no malloc */
    seen.empty_kept_retained = h->current[ca] == &lum_empty_page && pa->retained && pa->used == 0;
    void *again = p_malloc(A);
    seen.empty_reused = lum_page_of(again) == pa && h->current[ca] == pa;
    seen.empty_reenabled = h->cache_room[ca] == (int8_t)lum_cache_max[ca];
    free(again);
    return NULL;
}

static void test_empty_current_page_kept(void **state)
{
    (void)state;
    in_thread(empty_current_thread);
    assert_true(seen.empty_kept_retained);
    assert_true(seen.empty_reused);
    assert_true(seen.empty_reenabled);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_teardown_empties_pages),
        cmocka_unit_test(test_churn_keeps_caches),
        cmocka_unit_test(test_empty_current_page_kept),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
