/* realloc of a block alone on its page (over 64 KiB) grown in place into the free slices after
 * it (lum_heap_grow_block): contents kept, the page's metadata whole for lum_heap_check, the
 * statistics counting what a copy would, and the block freed from another thread or in a fork
 * child afterwards.  Its own process, with sampling off (sampled growth: test_realloc_grow_sampled),
 * so that the segment's free slices are where prime() left them. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_options.h"
#include "lumalloc_stats.h"
#include "test_support.h"

static void *(*volatile p_malloc)(size_t) = malloc;
static void *(*volatile p_realloc)(void *, size_t) = realloc;

/* A block of n bytes (alone on its page: n is over 64 KiB), filled. */
static unsigned char *filled_block(size_t n)
{
    unsigned char *p = p_malloc(n);
    assert_non_null(p);
    fill_pattern(p, 0, n);
    return p;
}

static uint64_t allocated(void)
{
    static struct lum_stats s;
    lum_stats_snapshot(&s);
    return s.allocated;
}

/* Grows a block from 70000 B by CPython's steps to 224 KiB (not 256: prime() leaves the 256 KiB
 * class's current page with a free block, which malloc takes, and so realloc does); gives how
 * many steps moved it. */
#define TOP (224u << 10)
static unsigned grow(unsigned char **pp, size_t *np)
{
    unsigned moves = 0;
    unsigned char *p = *pp;
    size_t n = *np;
    while (n < TOP) {
        size_t m = n + n / 4;
        if (m > TOP) m = TOP;
        unsigned char *q = p_realloc(p, m);
        assert_non_null(q);
        if (q != p) moves++;
        check_pattern(q, n);
        fill_pattern(q, n, m);
        assert_true(malloc_usable_size(q) >= m);
        p = q;
        n = m;
    }
    *pp = p;
    *np = n;
    return moves;
}

/* Free slices that pages used and gave back, not purged: growth in place takes only those
 * (slices a segment never used, or purged, are not resident, and a page that needs them comes
 * from lum_page_alloc, which looks for resident ones first). */
static void prime_n(int k)
{
    void *b[64];
    for (int i = 0; i < k && i < 64; i++) {
        b[i] = p_malloc(256u << 10);
        assert_non_null(b[i]);
        memset(b[i], 7, 256u << 10);
    }
    for (int i = 0; i < k && i < 64; i++) free(b[i]);
}

static void prime(void)
{
    prime_n(12);
}

static void grows_in_place_and_counts_as_a_copy_would(void **state)
{
    (void)state;
    prime();
    uint64_t before = allocated();
    size_t n = 70000;
    unsigned char *p = filled_block(n);
    unsigned moves = grow(&p, &n);
    /* the slices after its page are free and resident (prime): no step moved it */
    assert_int_equal(moves, 0);
    assert_int_equal(lum_heap_check(1), 0);
    /* the live bytes are the grown block's usable size, as after malloc, copy and free */
    assert_int_equal(allocated() - before, malloc_usable_size(p));
    /* the class's next block takes a page of its own, and the grown one frees as any */
    unsigned char *other = p_malloc(n);
    assert_non_null(other);
    assert_ptr_not_equal(other, p);
    memset(other, 1, n);
    check_pattern(p, n);
    free(p);
    free(other);
    assert_int_equal(allocated(), before);
    assert_int_equal(lum_heap_check(1), 0);
}

static void blocked_growth_moves(void **state)
{
    (void)state;
    /* a neighbour right after the block: the growth is copied, as before */
    size_t n = 70000;
    unsigned char *p = filled_block(n);
    void *next = p_malloc(100000); /* its own page, on the slices after p's if they were free */
    assert_non_null(next);
    unsigned char *q = p_realloc(p, 200000);
    assert_non_null(q);
    check_pattern(q, n);
    if ((unsigned char *)next == p + 2 * 65536) assert_ptr_not_equal(q, p);
    free(next);
    free(q);
    assert_int_equal(lum_heap_check(1), 0);
}

static void *free_it(void *arg)
{
    check_pattern(arg, TOP);
    free(arg);
    return NULL;
}

/* Pages of the classes over 64 KiB (one block each) held, live or not. */
static unsigned big_pages(void)
{
    static struct lum_stats s;
    lum_stats_snapshot(&s);
    unsigned n = 0;
    for (unsigned c = 0; c < LUM_STATS_CLASSES; c++)
        if (s.classes[c].block_size > 65536) n += s.classes[c].pages;
    return n;
}

/* Each round's buffer is grown by this thread and freed by another: the class's current page
 * then holds a block freed remotely, which the next growth must count as free, as malloc does.
 * It made the grown page current over it, and the emptied ones piled up on the avail list,
 * where no decay goes (34 pages after 30 rounds, found in review): here a handful. */
static void grown_block_freed_by_another_thread(void **state)
{
    (void)state;
    prime_n(40); /* room to grow in place in every round */
    uint64_t before = allocated();
    unsigned in_place = 0;
    for (int round = 0; round < 30; round++) {
        size_t n = 70000;
        unsigned char *p = filled_block(n);
        unsigned steps = 0;
        for (size_t m = n; m < TOP; m += m / 4) steps++;
        in_place += steps - grow(&p, &n);
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, free_it, p), 0);
        assert_int_equal(pthread_join(t, NULL), 0);
    }
    /* the remote frees come back to this thread's pages when it next looks */
    void *x = p_malloc(TOP);
    free(x);
    assert_int_equal(lum_heap_check(1), 0);
    assert_true(allocated() <= before + TOP);
    assert_true(in_place > 0);
    unsigned held = big_pages();
    if (held > 12) fail_msg("%u pages of blocks over 64 KiB held with none live (%u steps in place)", held, in_place);
}

static unsigned char *forked_block;
static size_t forked_n;

static int in_the_child(void)
{
    check_pattern(forked_block, forked_n);
    unsigned char *q = realloc(forked_block, 150000); /* shrinks by less than half: stays */
    if (q != forked_block || lum_heap_check(1)) return 2;
    free(q);
    void *r = malloc(forked_n);
    memset(r, 3, forked_n);
    free(r);
    return lum_heap_check(1) ? 3 : 0;
}

static void grown_block_in_a_fork_child(void **state)
{
    (void)state;
    size_t n = 70000;
    unsigned char *p = filled_block(n);
    grow(&p, &n);
    forked_block = p, forked_n = n;
    int status = fork_and_wait(in_the_child);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    check_pattern(p, n);
    free(p);
}

int main(void)
{
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(grows_in_place_and_counts_as_a_copy_would),
        cmocka_unit_test(blocked_growth_moves),
        cmocka_unit_test(grown_block_freed_by_another_thread),
        cmocka_unit_test(grown_block_in_a_fork_child),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
