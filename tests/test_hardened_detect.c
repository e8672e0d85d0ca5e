/* The hardened library catches what corrupts heaps: each detection is shown to fire (in a child
 * process, with its message checked) and ordinary use to be undisturbed. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include "test_support.h"
#include "lumalloc.h"
#include "lumalloc_options.h"

static void *(*volatile p_malloc)(size_t) = malloc;
static void (*volatile p_free)(void *) = free;
static void *(*volatile p_realloc)(void *, size_t) = realloc;

static char *victim;

static void do_double_free(void)
{
    victim = p_malloc(48);
    char *other = p_malloc(48);
    p_free(victim);
    p_free(other);
    p_free(victim);
}

static void do_interior_free(void)
{
    char *p = p_malloc(100);
    p_free(p + 16);
}

static void do_foreign_free(void)
{
    static char not_ours[64];
    p_free(not_ours + 16);
}

static void do_use_after_free_write(void)
{
    /* A sampled a or b would live on a sampled page, which the mallocs below never take from
     * (about 1 run in 4000 went undetected that way). */
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    char *a = p_malloc(64);
    char *b = p_malloc(64);
    p_free(a);
    p_free(b);
    memset(b, 0x41, 16); /* overwrite the encoded free-list pointer */
    for (int i = 0; i < 4; i++) (void)p_malloc(64);
}

static void do_large_double_free(void)
{
    char *p = p_malloc(1 << 20);
    p_free(p);
    p_free(p);
}

/* realloc of a freed large block: it handed the block's memory out again beside its new owner */
static void do_large_realloc_after_free(void)
{
    char *p = p_malloc(1 << 20);
    p_free(p);
    char *q = realloc(p, 2 << 20);
    printf("%p\n", (void *)q);
}

/* realloc of a freed small block to a size its block holds: it was kept in place and handed
 * out again beside its new owner */
static void do_small_realloc_after_free(void)
{
    char *p = p_malloc(64);
    p_free(p);
    char *q = p_realloc(p, 48);
    char *r = p_malloc(64);
    printf("%p %p\n", (void *)q, (void *)r);
}

static void do_interior_realloc(void)
{
    char *p = p_malloc(64);
    char *q = p_realloc(p + 16, 40);
    printf("%p\n", (void *)q);
}

static void *free_it(void *p)
{
    p_free(p);
    return NULL;
}

/* A write into a block another thread freed (it waits on its page's list of remote frees):
 * its link pointed the owner at a live block of the page, which malloc handed out a second
 * time. */
static void do_write_after_remote_free(void)
{
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    char *v[64];
    for (int i = 0; i < 64; i++) v[i] = calloc(1, 64);
    for (int i = 10; i <= 20; i += 10) {
        pthread_t t;
        pthread_create(&t, NULL, free_it, v[i]);
        pthread_join(t, NULL);
    }
    *(uintptr_t *)v[20] = (uintptr_t)v[30]; /* a live block's address */
    for (int i = 0; i < 4096; i++)
        if (p_malloc(64) == v[30]) printf("the live block handed out again\n");
}

static void do_free_sized_too_large(void)
{
    char *p = p_malloc(64);
    free_sized(p, 100000);
}

static void do_usable_size_of_freed(void)
{
    char *p = p_malloc(64);
    char *q = p_malloc(64);
    p_free(p);
    p_free(q);
    printf("%zu\n", malloc_usable_size(p));
}

static void do_overrun_large(void)
{
    char *p = p_malloc(300000);
    size_t usable = malloc_usable_size(p);
    memset(p, 1, usable + 100); /* runs into the trailing guard page */
}

static void expect(void (*fn)(void), int sig, const char *message)
{
    char err[1024];
    int got = run_child(fn, err, sizeof err);
    printf("# %s -> signal %d: %s", message ? message : "overrun", got, err[0] ? err : "(nothing)\n");
    assert_int_equal(got, sig);
    if (message) assert_non_null(strstr(err, message));
}

static void double_free_is_detected(void **s) { (void)s; expect(do_double_free, SIGABRT, "double free of 0x"); }
static void interior_free_is_detected(void **s) { (void)s; expect(do_interior_free, SIGABRT, "invalid free"); }
static void foreign_free_is_detected(void **s) { (void)s; expect(do_foreign_free, SIGABRT, "no allocation returned"); }
static void free_list_corruption_is_detected(void **s) { (void)s; expect(do_use_after_free_write, SIGABRT, "free list corrupted"); }
static void large_double_free_is_detected(void **s) { (void)s; expect(do_large_double_free, SIGABRT, "double free of"); }
static void large_realloc_after_free_is_detected(void **s) { (void)s; expect(do_large_realloc_after_free, SIGABRT, "realloc of a freed block"); }
static void small_realloc_after_free_is_detected(void **s) { (void)s; expect(do_small_realloc_after_free, SIGABRT, "realloc of a freed block"); }
static void interior_realloc_is_detected(void **s) { (void)s; expect(do_interior_realloc, SIGABRT, "invalid realloc"); }
static void write_after_remote_free_is_detected(void **s) { (void)s; expect(do_write_after_remote_free, SIGABRT, "free list corrupted"); }
static void free_sized_too_large_is_detected(void **s) { (void)s; expect(do_free_sized_too_large, SIGABRT, "free_sized with a size larger"); }
static void usable_size_of_freed_is_detected(void **s) { (void)s; expect(do_usable_size_of_freed, SIGABRT, "malloc_usable_size of a freed block"); }
/* A block over the large threshold grown by small steps is copied (its guard page cannot
 * move): with room to grow into, a few times, not at every step (quadratic: 8 MiB in 4 KiB
 * steps took 3 s). */
static void growth_by_small_steps_moves_rarely(void **s)
{
    (void)s;
    char *p = p_malloc(300 << 10);
    assert_non_null(p);
    memset(p, 7, 300 << 10);
    int moves = 0;
    for (size_t n = 300 << 10; n < (8u << 20); n += 4096) {
        char *q = p_realloc(p, n + 4096);
        assert_non_null(q);
        moves += q != p;
        p = q;
        p[n] = 7;
    }
    printf("# grown 300 KiB -> 8 MiB in 4 KiB steps: %d moves\n", moves);
    assert_true(moves < 20);
    for (size_t i = 0; i < 300 << 10; i += 4093) assert_int_equal(p[i], 7);
    p_free(p);
}

static void guard_page_stops_overrun(void **s) { (void)s; expect(do_overrun_large, SIGSEGV, NULL); }

static void slot_order_is_randomised(void **state)
{
    (void)state;
    /* consecutive allocations are not simply neighbours */
    int adjacent = 0;
    char *prev = p_malloc(32);
    for (int i = 0; i < 200; i++) {
        char *p = p_malloc(32);
        if (p == prev + 32) adjacent++;
        prev = p;
    }
    printf("# %d of 200 consecutive 32-byte blocks were neighbours\n", adjacent);
    assert_true(adjacent < 50);
}

static void ordinary_use_is_undisturbed(void **state)
{
    (void)state;
    void *v[5000];
    for (int round = 0; round < 5; round++) {
        for (int i = 0; i < 5000; i++) {
            v[i] = p_malloc((size_t)(i * 37 % 9000) + 1);
            memset(v[i], i, (size_t)(i * 37 % 9000) + 1);
        }
        for (int i = 0; i < 5000; i += 2) p_free(v[i]);
        for (int i = 1; i < 5000; i += 2) p_free(v[i]);
    }
    char *big = NULL;
    for (size_t n = 1 << 18; n < (64u << 20); n *= 2) {
        big = realloc(big, n);
        big[n - 1] = 1;
    }
    free(big);
    assert_int_equal(lum_heap_check(1), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(double_free_is_detected),
        cmocka_unit_test(interior_free_is_detected),
        cmocka_unit_test(foreign_free_is_detected),
        cmocka_unit_test(free_list_corruption_is_detected),
        cmocka_unit_test(large_double_free_is_detected),
        cmocka_unit_test(large_realloc_after_free_is_detected),
        cmocka_unit_test(small_realloc_after_free_is_detected),
        cmocka_unit_test(interior_realloc_is_detected),
        cmocka_unit_test(write_after_remote_free_is_detected),
        cmocka_unit_test(free_sized_too_large_is_detected),
        cmocka_unit_test(growth_by_small_steps_moves_rarely),
        cmocka_unit_test(usable_size_of_freed_is_detected),
        cmocka_unit_test(guard_page_stops_overrun),
        cmocka_unit_test(slot_order_is_randomised),
        cmocka_unit_test(ordinary_use_is_undisturbed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
