/* Empty pages of exited threads that later threads leave alone go back after a bounded number
 * of thread exits (heap.c, abandoned_release_stale), while a page that threads keep taking
 * stays pooled.  Its own process: pages other tests leave behind would count in the class. */
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
#include "lumalloc_stats.h"

#define CLASS_SIZE 7000 /* a class nothing else in this process allocates */
static void *(*volatile p_malloc)(size_t) = malloc;

/* Carves more than the stale pages kept (heap.c, LUM_STALE_KEEP: 32 KiB) in one page. */
#define CLASS_BLOCKS 6

static void *use_class(void *arg)
{
    (void)arg;
    char *p[CLASS_BLOCKS];
    for (int i = 0; i < CLASS_BLOCKS; i++) {
        p[i] = p_malloc(CLASS_SIZE);
        memset(p[i], 1, CLASS_SIZE);
    }
    for (int i = 0; i < CLASS_BLOCKS; i++) free(p[i]);
    return NULL;
}

/* One block: a stale page that carves less than the bytes kept. */
static void *use_class_once(void *arg)
{
    (void)arg;
    char *p = p_malloc(CLASS_SIZE);
    memset(p, 1, CLASS_SIZE);
    free(p);
    return NULL;
}

/* A thread with a heap of its own (so its exit counts) that never touches the class. */
static void *other_class(void *arg)
{
    (void)arg;
    char *p = p_malloc(24);
    memset(p, 1, 24);
    free(p);
    return NULL;
}

static void run_threads(void *(*fn)(void *), int n)
{
    for (int i = 0; i < n; i++) {
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, fn, NULL), 0);
        pthread_join(t, NULL);
    }
}

static unsigned class_pages(void)
{
    static struct lum_stats s;
    lum_stats_snapshot(&s);
    for (int k = 0; k < LUM_STATS_CLASSES; k++)
        if (s.classes[k].block_size >= CLASS_SIZE) return s.classes[k].pages;
    fail_msg("no class holds %d bytes", CLASS_SIZE);
    return 0;
}

/* Kept across a few exits (the next thread that needs the class takes it back), released once
 * many threads have come and gone without it. */
static void unused_page_goes_after_many_exits(void **state)
{
    (void)state;
    unsigned base = class_pages();
    run_threads(use_class, 1);
    assert_int_equal(class_pages(), base + 1);
    run_threads(other_class, 4);
    assert_int_equal(class_pages(), base + 1);
    run_threads(other_class, 40);
    assert_int_equal(class_pages(), base);
    assert_int_equal(lum_heap_check(1), 0);
}

/* A thread that takes the page over and exits files it afresh: its wait starts again. */
static void adopted_page_waits_again(void **state)
{
    (void)state;
    unsigned base = class_pages();
    run_threads(use_class, 1);
    run_threads(other_class, 10);
    run_threads(use_class, 1); /* adopts the pooled page: no second page */
    assert_int_equal(class_pages(), base + 1);
    run_threads(other_class, 10); /* 21 exits since the first filing, 10 since the second */
    assert_int_equal(class_pages(), base + 1);
    run_threads(other_class, 40);
    assert_int_equal(class_pages(), base);
    assert_int_equal(lum_heap_check(1), 0);
}

/* A few stale bytes stay pooled (a later thread's mix may want them back), until more come:
 * then the oldest go first. */
static void small_stale_page_stays_until_more_come(void **state)
{
    (void)state;
    unsigned base = class_pages();
    run_threads(use_class_once, 1);
    run_threads(other_class, 40);
    assert_int_equal(class_pages(), base + 1);
    run_threads(use_class, 1); /* adopts it and carves past the bytes kept */
    run_threads(other_class, 40);
    assert_int_equal(class_pages(), base);
    assert_int_equal(lum_heap_check(1), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(unused_page_goes_after_many_exits),
        cmocka_unit_test(adopted_page_waits_again),
        cmocka_unit_test(small_stale_page_stays_until_more_come),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
