/* realloc's growth in place of blocks alone on their pages (over 64 KiB) when sampling is on:
 * a grown block the sample point falls in becomes a sample where it stands (its page turns
 * into a sampled page), and a sampled block grows in place too, its page staying sampled or
 * turning ordinary by the grown block's own sample decision.  Copied to a page elsewhere at
 * each such step (as before), CPython's growth chains faulted a fresh block in at every
 * sampled step: python3 took 14% more page faults with default sampling than without.  The
 * profile and the exact counters must come out as they would with the copies. */
#include <malloc.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include "internal.h"
#include "lumalloc.h"
#include "lumalloc_options.h"
#include "lumalloc_prof.h"
#include "lumalloc_stats.h"
#include "test_support.h"

static void *(*volatile p_malloc)(size_t) = malloc;
static void *(*volatile p_realloc)(void *, size_t) = realloc;

static struct lum_stats stats;

static uint64_t allocated(void)
{
    lum_stats_snapshot(&stats);
    return stats.allocated;
}

static uint64_t resident(void)
{
    lum_stats_snapshot(&stats);
    return stats.resident;
}

static struct lum_prof_stats prof(void)
{
    struct lum_prof_stats s;
    lum_prof_get_stats(&s);
    return s;
}

/* Free slices that pages used and gave back, not purged: growth in place takes only those. */
static void prime(void)
{
    void *b[16];
    for (int i = 0; i < 16; i++) {
        b[i] = p_malloc(256u << 10);
        assert_non_null(b[i]);
        memset(b[i], 7, 256u << 10);
    }
    for (int i = 0; i < 16; i++) free(b[i]);
}

/* A point every KiB or so: every block over 64 KiB is sampled, but for the first allocation
 * after the change, from which the next point is drawn. */
static void sample_every_kib(void)
{
    assert_int_equal(lum_options_set("sample_interval", "1k"), 0);
    free(p_malloc(64));
}

static bool sampled(const void *p)
{
    return lum_page_of(p)->kind == LUM_PAGE_SAMPLED;
}

/* A block of n bytes, filled, on a sampled page or not as want_sampled says. */
static unsigned char *filled_block(size_t n, bool want_sampled)
{
    unsigned char *p = p_malloc(n);
    assert_non_null(p);
    assert_int_equal(sampled(p), want_sampled);
    fill_pattern(p, 0, n);
    return p;
}

/* Grows p (n bytes, filled) by CPython's steps up to top, each step's block sampled or not as
 * want_sampled says; gives how many steps moved it, and in *grown how many needed a bigger
 * block (realloc pads growth: the others stay put). */
static unsigned grow(unsigned char **pp, size_t *np, size_t top, bool want_sampled, unsigned *grown)
{
    unsigned moves = 0;
    unsigned char *p = *pp;
    size_t n = *np;
    *grown = 0;
    while (n < top) {
        size_t m = n + n / 4;
        if (m > top) m = top;
        size_t fit = sampled(p) ? lum_sampled_rec(lum_page_of(p), p)->usable : malloc_usable_size(p);
        if (m > fit) ++*grown;
        unsigned char *q = p_realloc(p, m);
        assert_non_null(q);
        if (q != p) moves++;
        check_pattern(q, n);
        fill_pattern(q, n, m);
        assert_true(malloc_usable_size(q) >= m);
        assert_int_equal(sampled(q), want_sampled);
        if (want_sampled) {
            /* a sampled class's page (a power of two): the sampled pages' lists, spares and
             * record arrays go by sampled class (lib/sampled.c, slot_of) */
            size_t bs = lum_page_of(q)->block_size;
            assert_true(bs >= 256 && (bs & (bs - 1)) == 0);
            /* recorded at the size asked for, for its ordinary class's block */
            struct lum_sample_rec *rec = lum_sampled_rec(lum_page_of(q), q);
            if (m > fit) assert_int_equal(rec->requested, m);
            assert_true(rec->usable >= m && rec->usable < malloc_usable_size(q) + 1);
        }
        p = q;
        n = m;
    }
    *pp = p;
    *np = n;
    return moves;
}

#define TOP (224u << 10)

/* With every block sampled (a point every KiB or so falls in any block over 64 KiB), each step
 * of a growth chain is a sample, taken in place: no copy, no fresh memory, one sample a step,
 * and only the last one live. */
static void sampled_steps_grow_in_place(void **state)
{
    (void)state;
    sample_every_kib();
    prime();
    uint64_t before = allocated(), res = resident();
    struct lum_prof_stats p0 = prof();
    size_t n = 70000;
    unsigned char *p = filled_block(n, true);
    unsigned steps;
    unsigned moves = grow(&p, &n, TOP, true, &steps);
    assert_true(steps >= 3);
    if (moves) fail_msg("%u of %u sampled steps copied the block", moves, steps);
    struct lum_prof_stats p1 = prof();
    assert_int_equal(p1.samples - p0.samples, steps + 1);
    assert_int_equal(p1.live_samples - p0.live_samples, 1);
    assert_int_equal(p1.sample_frees - p0.sample_frees, steps);
    /* what the chain wrote was resident already (prime): a copy faulted a fresh block in */
    uint64_t grew = resident() - res;
    if (grew > (64u << 10)) fail_msg("resident grew %llu bytes over the chain", (unsigned long long)grew);
    assert_int_equal(allocated() - before, malloc_usable_size(p));
    assert_int_equal(lum_heap_check(1), 0);
    free(p);
    assert_int_equal(allocated(), before);
    assert_int_equal(prof().live_samples, p0.live_samples);
    assert_int_equal(lum_heap_check(1), 0);
}

/* A sampled block whose growth is not sampled grows in place too, its page an ordinary one of
 * the grown class from then on: the sample ends there, as the copy's free would end it. */
static void sampled_block_grows_into_an_ordinary_one(void **state)
{
    (void)state;
    sample_every_kib();
    prime();
    uint64_t before = allocated();
    struct lum_prof_stats p0 = prof();
    size_t n = 70000;
    unsigned char *p = filled_block(n, true);
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    unsigned steps;
    unsigned moves = grow(&p, &n, TOP, false, &steps);
    assert_true(steps >= 3);
    assert_int_equal(moves, 0);
    struct lum_prof_stats p1 = prof();
    assert_int_equal(p1.samples - p0.samples, 1);
    assert_int_equal(p1.live_samples, p0.live_samples);
    assert_int_equal(allocated() - before, malloc_usable_size(p));
    assert_int_equal(lum_heap_check(1), 0);
    /* an ordinary page of the heap's now: the class's next block takes another page */
    unsigned char *other = p_malloc(n);
    assert_non_null(other);
    memset(other, 1, n);
    check_pattern(p, n);
    free(p);
    free(other);
    assert_int_equal(allocated(), before);
    assert_int_equal(lum_heap_check(1), 0);
}

/* A sampled block on its sampled class's page (256 KiB, 4 slices) whose growth is not sampled,
 * into its ordinary class below that (192 KiB, 3 slices): the page keeps its slices and only
 * the class changes.  realloc pads growth by half, which takes such a block to 256 KiB, but
 * not where the padded size would pass the fast limit (a lowered large threshold or large
 * warning): there the carve's records were brought up to an end below the old block's
 * (lum_page_touch), a span of -1 slices, read until the process faulted. */
static void sampled_block_into_a_smaller_class_on_its_slices(void **state)
{
    (void)state;
    sample_every_kib();
    prime();
    assert_int_equal(lum_options_set("large_threshold", "200k"), 0);
    uint64_t before = allocated();
    unsigned char *p = filled_block(150000, true);
    assert_int_equal(lum_page_of(p)->block_size, 256u << 10);
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    unsigned char *q = p_realloc(p, 190000);
    assert_ptr_equal(q, p);
    assert_false(sampled(q));
    assert_int_equal(lum_page_of(q)->block_size, 192u << 10);
    check_pattern(q, 150000);
    fill_pattern(q, 150000, 190000);
    assert_int_equal(allocated() - before, malloc_usable_size(q));
    assert_int_equal(lum_heap_check(1), 0);
    free(q);
    assert_int_equal(allocated(), before);
    assert_int_equal(lum_heap_check(1), 0);
    assert_int_equal(lum_options_set("large_threshold", "256k"), 0);
}

/* An ordinary block whose growth the sample point falls in becomes a sample where it stands,
 * into 128 and 256 KiB too, which are their own sampled class: growths into them took the
 * sample's point and then went on as ordinary pages, recorded nowhere (the profile under-
 * counted exactly the call sites of CPython's growth chains). */
static void ordinary_block_grown_into_its_own_sampled_class(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    prime();
    /* 81920 B, two slices; grown to 128000 (no padding: the step is over half the block) the
     * page stays two slices, of the 128 KiB class */
    unsigned char *p = filled_block(70000, false);
    sample_every_kib();
    struct lum_prof_stats p0 = prof();
    unsigned char *q = p_realloc(p, 128000);
    assert_ptr_equal(q, p);
    assert_true(sampled(q));
    assert_int_equal(lum_page_of(q)->block_size, 128u << 10); /* the sampled class's */
    check_pattern(q, 70000);
    struct lum_prof_stats p1 = prof();
    assert_int_equal(p1.samples - p0.samples, 1);
    assert_int_equal(p1.live_samples - p0.live_samples, 1);
    assert_int_equal(lum_sampled_rec(lum_page_of(q), q)->requested, 128000);
    assert_int_equal(lum_heap_check(1), 0);
    free(q);
    assert_int_equal(prof().live_samples, p0.live_samples);
    assert_int_equal(lum_heap_check(1), 0);
}

/* Pages of the class of block size bs held (sampled or not). */
static unsigned pages_of(size_t bs)
{
    lum_stats_snapshot(&stats);
    unsigned n = 0;
    for (unsigned c = 0; c < LUM_STATS_CLASSES; c++)
        if (stats.classes[c].block_size == bs) n += stats.classes[c].pages;
    return n;
}

/* A sampled page of one block goes back to its segment when its block is freed, where the
 * class's ordinary pages and growth in place take its span (kept as the class's spare, it held
 * its slices, and its memory came back faulted in at the next sample). */
static void emptied_sampled_page_of_one_block_goes_back(void **state)
{
    (void)state;
    sample_every_kib();
    unsigned held = pages_of(256u << 10);
    void *p = p_malloc(200000);
    assert_non_null(p);
    assert_true(sampled(p));
    memset(p, 1, 200000);
    assert_int_equal(pages_of(256u << 10), held + 1);
    free(p);
    assert_int_equal(pages_of(256u << 10), held);
    assert_int_equal(lum_heap_check(1), 0);
}

/* An empty sampled page of several slices (blocks of 8-64 KiB) goes back once it has stayed
 * empty a while: kept for good, such pages held slices no other page could take while they
 * carved a block or two, and bench python's overflowed into a segment more. */
static void idle_empty_sampled_pages_go_back(void **state)
{
    (void)state;
    sample_every_kib();
    size_t bs = 32u << 10; /* the sampled class of 20000 B blocks: 4 slices a page */
    unsigned held = pages_of(bs);
    void *b[3];
    for (int i = 0; i < 3; i++) {
        b[i] = p_malloc(20000);
        assert_non_null(b[i]);
        assert_true(sampled(b[i]));
        memset(b[i], 2, 20000);
    }
    assert_true(pages_of(bs) > held);
    for (int i = 0; i < 3; i++) free(b[i]);
    /* past the delay, any sampled free looks */
    usleep(60 * 1000);
    free(p_malloc(100000));
    assert_int_equal(pages_of(bs), held);
    assert_int_equal(lum_heap_check(1), 0);
}

int main(void)
{
    /* no purge between the priming and the chains */
    assert_int_equal(lum_options_set("decay_ms", "600000"), 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(sampled_steps_grow_in_place),
        cmocka_unit_test(sampled_block_grows_into_an_ordinary_one),
        cmocka_unit_test(ordinary_block_grown_into_its_own_sampled_class),
        cmocka_unit_test(sampled_block_into_a_smaller_class_on_its_slices),
        cmocka_unit_test(emptied_sampled_page_of_one_block_goes_back),
        cmocka_unit_test(idle_empty_sampled_pages_go_back),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
