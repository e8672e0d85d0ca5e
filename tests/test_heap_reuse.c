/* A pooled heap record is handed to the next thread as lum_heap_abandon left it (heap_create
 * skips heap_forget_pages for it): abandon must leave every field heap_forget_pages resets as a
 * fresh record has it, whatever the exited thread held (caches, retained pages, parked full
 * pages, a kept empty big page) and whatever frees reach its pages after it left.  Its own
 * process: the pool's order decides which record a thread gets. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "internal.h"

static void *(*volatile p_malloc)(size_t) = malloc;

static const size_t sizes[] = {24, 200, 1000, 3000, 4096, 7000, 12000, 40000, 100000};
#define NSIZES (sizeof sizes / sizeof sizes[0])
#define PER_SIZE 300
static void *left[NSIZES][PER_SIZE]; /* the exited thread's blocks, freed by main after it left */
static struct lum_heap *exited;
static bool had_empty_big, had_retained, had_full;

static void *busy_thread(void *arg)
{
    (void)arg;
    static void *mine[PER_SIZE];
    for (unsigned s = 0; s < NSIZES; s++) {
        unsigned n = sizes[s] > 16384 ? 24 : PER_SIZE;
        for (unsigned i = 0; i < n; i++) {
            mine[i] = p_malloc(sizes[s]);
            left[s][i] = p_malloc(sizes[s]);
            memset(mine[i], 1, 16);
            memset(left[s][i], 1, 16);
        }
        /* the thread's own frees: its cache fills, pages empty and are retained */
        for (unsigned i = 0; i < n; i++) free(mine[i]);
    }
    /* pages emptied by the thread's own frees, not current: retained */
    static void *many[4000];
    for (unsigned i = 0; i < 4000; i++) many[i] = p_malloc(5000);
    for (unsigned i = 0; i < 4000; i++) free(many[i]);
    /* a page of more than one slice emptied while current: kept as empty_big */
    void *big = p_malloc(20000); /* a class with no cache (lum_cache_max 0) */
    free(big);
    struct lum_heap *h = lum_tls_heap;
    had_empty_big = h->empty_big != NULL;
    had_retained = h->retained_bytes != 0;
    for (unsigned c = 0; c < LUM_CLASSES; c++) had_full |= h->full[c].head != NULL;
    exited = h;
    return NULL;
}

/* Every field heap_forget_pages resets, as it leaves them. */
static void assert_forgotten(const struct lum_heap *h, int skip_cls)
{
    for (unsigned c = 0; c < LUM_CLASSES; c++) {
        if ((int)c == skip_cls) continue;
        assert_ptr_equal(h->current[c], &lum_empty_page);
        assert_null(h->avail[c].head);
        assert_null(h->avail[c].tail);
        assert_null(h->full[c].head);
        assert_null(h->full[c].tail);
        assert_int_equal(h->retained_count[c], 0);
        assert_null(h->cache[c]);
        assert_int_equal(h->cache_room[c], lum_cache_max[c]);
    }
    /* not reset but kept: malloc's fast path reads its classes there */
    assert_memory_equal(h->slot_class, lum_small_class, sizeof h->slot_class);
    assert_memory_equal(h->class_size, lum_class_size, sizeof lum_class_size);
    /* the slow class, where no size goes while the large warning is off */
    assert_int_equal(h->class_size[LUM_SLOW_CLASS], 0);
    assert_ptr_equal(h->current[LUM_SLOW_CLASS], &lum_empty_page);
    assert_null(h->cache[LUM_SLOW_CLASS]);
    if (skip_cls < 0) assert_int_equal(h->retained_bytes, 0);
    assert_null(h->empty_big);
}

static struct lum_heap *reused;
static int reused_check;

static void *next_thread(void *arg)
{
    (void)arg;
    void *p = p_malloc(24);
    reused = lum_tls_heap;
    assert_forgotten(reused, (int)lum_size_class(24));
    assert_int_equal(reused->remote_collected, 0);
    assert_int_equal(reused->tc.alloc_count, 1);
    assert_int_equal(reused->tc.free_count, 0);
    reused_check = lum_heap_check(1);
    free(p);
    return NULL;
}

static void pooled_record_comes_back_as_a_fresh_one(void **state)
{
    (void)state;
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, busy_thread, NULL), 0);
    pthread_join(t, NULL);
    assert_true(had_empty_big);
    assert_true(had_retained);
    assert_true(exited->pooled);
    assert_forgotten(exited, -1);
    assert_int_equal(exited->remote_collected, 0);
    /* frees that reach the exited thread's pages after it left */
    for (unsigned s = 0; s < NSIZES; s++)
        for (unsigned i = 0; i < PER_SIZE; i++) free(left[s][i]);
    assert_forgotten(exited, -1);
    assert_int_equal(lum_heap_check(1), 0);
    assert_int_equal(pthread_create(&t, NULL, next_thread, NULL), 0);
    pthread_join(t, NULL);
    assert_ptr_equal(reused, exited);
    assert_int_equal(reused_check, 0);
    printf("exited thread held full pages: %d\n", had_full);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(pooled_record_comes_back_as_a_fresh_one),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
