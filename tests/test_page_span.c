/* What a page given back to its segment leaves resident.  One now and then leaves at most its
 * first 4 KiB: the next page on its slices may serve a class that carves little, and would
 * otherwise hold the rest resident and idle.  A class emptying page after page keeps the spans
 * for its own next pages, which carve them without a page fault; a page of another class taken
 * on such slices finds as much resident as its class carved last time (the first 4 KiB for a
 * class that never gave a page back).  The dirty limit weighs what free slices hold resident,
 * and over it they go back oldest first.  A class's current page of big blocks keeps its carve
 * when it empties.  Its own process: pages left by other programs' tests would change which
 * page is released and where the next one goes. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_options.h"
#include "internal.h" /* LUM_KEEP_SPAN_AFTER, LUM_RETAIN_EMPTY_PER_CLASS */

#define SLICE ((uintptr_t)64 << 10)
#define BLOCK 1024 /* a one-slice class: 64 blocks a page */
#define OTHER 2048 /* another one-slice class, not used before */
#define DEEP 4096  /* a third one-slice class, not used before: 16 blocks a page */
#define BIG 40000  /* a class of two-slice pages */
#define PAGES 6
#define NBLOCKS (PAGES * 64)
#define BULK_PAGES 16
static void *blocks[BULK_PAGES * 64];

static unsigned resident_pages(uintptr_t start)
{
    unsigned char vec[SLICE / 4096];
    assert_int_equal(mincore((void *)start, SLICE, vec), 0);
    unsigned n = 0;
    for (unsigned i = 0; i < SLICE / 4096; i++) n += vec[i] & 1;
    return n;
}

/* Six pages filled and emptied in turn: the heap keeps two empty pages of the class and its
 * current one, and gives the other three back (fewer than LUM_KEEP_SPAN_AFTER in a row); each
 * of those was carved (and touched) whole. */
static void released_page_keeps_only_its_first_carve(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0); /* no block on a sampled page */
    for (int i = 0; i < NBLOCKS; i++) {
        blocks[i] = malloc(BLOCK);
        assert_non_null(blocks[i]);
        memset(blocks[i], 1, BLOCK);
    }
    uintptr_t slices[NBLOCKS];
    unsigned nslices = 0;
    for (int i = 0; i < NBLOCKS; i++) {
        uintptr_t s = (uintptr_t)blocks[i] & ~(SLICE - 1);
        if (nslices == 0 || slices[nslices - 1] != s) slices[nslices++] = s;
    }
    assert_true(nslices >= PAGES);
    for (unsigned i = 0; i < nslices; i++) assert_int_equal(resident_pages(slices[i]), SLICE / 4096);
    for (int i = 0; i < NBLOCKS; i++) free(blocks[i]);
    unsigned trimmed = 0;
    for (unsigned i = 0; i < nslices; i++) {
        unsigned n = resident_pages(slices[i]);
        printf("# slice %u: %u of %u pages resident\n", i, n, (unsigned)(SLICE / 4096));
        if (n <= 1) trimmed++;
        else assert_int_equal(n, SLICE / 4096); /* kept by the heap: untouched */
    }
    assert_true(trimmed >= 1);
    lum_options_set("sample_interval", "512k");
}

static bool in(uintptr_t s, const uintptr_t *set, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        if (set[i] == s) return true;
    return false;
}

/* blocks[0..n) get n touched blocks of BLOCK; their distinct slices go to slices[]: how many. */
static unsigned fill_blocks(unsigned n, uintptr_t *slices)
{
    unsigned nslices = 0;
    for (unsigned i = 0; i < n; i++) {
        blocks[i] = malloc(BLOCK);
        assert_non_null(blocks[i]);
        memset(blocks[i], 1, BLOCK);
        uintptr_t s = (uintptr_t)blocks[i] & ~(SLICE - 1);
        if (!in(s, slices, nslices)) slices[nslices++] = s;
    }
    return nslices;
}

/* Sixteen pages emptied in a row: past the first LUM_KEEP_SPAN_AFTER released, the spans stay. */
static void bulk_release_keeps_spans_for_the_class(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    const unsigned n = BULK_PAGES * 64;
    static uintptr_t slices[BULK_PAGES * 64];
    unsigned nslices = fill_blocks(n, slices);
    assert_true(nslices >= BULK_PAGES);
    for (unsigned i = 0; i < n; i++) free(blocks[i]);
    uintptr_t whole[BULK_PAGES * 64];
    unsigned nwhole = 0, trimmed = 0;
    for (unsigned i = 0; i < nslices; i++) {
        unsigned r = resident_pages(slices[i]);
        if (r == SLICE / 4096) whole[nwhole++] = slices[i];
        else if (r <= 1) trimmed++;
    }
    printf("# %u slices: %u whole, %u trimmed\n", nslices, nwhole, trimmed);
    /* the heap's current and retained pages, and every release after the first few */
    assert_int_equal(trimmed, LUM_KEEP_SPAN_AFTER);
    assert_int_equal(nwhole, nslices - LUM_KEEP_SPAN_AFTER);

    /* a page of another class on these slices: any span it got was returned first */
    void *other = malloc(OTHER);
    assert_non_null(other);
    uintptr_t os = (uintptr_t)other & ~(SLICE - 1);
    if (in(os, slices, nslices)) assert_true(resident_pages(os) <= 2);

    /* The class's own pages again, each block looked at as it comes (its page has carved
     * little so far): a slice that was whole is whole still. */
    unsigned reused = 0;
    for (unsigned i = 0; i < n; i++) {
        blocks[i] = malloc(BLOCK);
        assert_non_null(blocks[i]);
        uintptr_t s = (uintptr_t)blocks[i] & ~(SLICE - 1);
        if (s == os || !in(s, whole, nwhole)) continue;
        assert_int_equal(resident_pages(s), SLICE / 4096);
        reused++;
    }
    printf("# %u blocks on slices whose span was kept\n", reused);
    assert_true(reused > (LUM_RETAIN_EMPTY_PER_CLASS + 1) * 64); /* beyond the pages the heap kept */
    for (unsigned i = 0; i < n; i++) free(blocks[i]);
    free(other);
    lum_options_set("sample_interval", "512k");
}

/* A class whose pages carve whole (DEEP, pages filled and given back) takes over slices whose
 * spans another class (BLOCK) left: it keeps them whole, where it used to get all past the
 * first 4 KiB returned and fault it in again as it carved. */
static void other_class_keeps_what_it_carved_last(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    /* more pages than its heap keeps empty (and its cache of freed blocks holds) go back,
     * carved whole */
    enum { PER = SLICE / DEEP, FIRST_PAGES = LUM_RETAIN_EMPTY_PER_CLASS + 6, DEEP_PAGES = 2 * BULK_PAGES };
    static void *deep[DEEP_PAGES * PER];
    for (unsigned i = 0; i < FIRST_PAGES * PER; i++) {
        deep[i] = malloc(DEEP);
        assert_non_null(deep[i]);
        memset(deep[i], 1, DEEP);
    }
    for (unsigned i = 0; i < FIRST_PAGES * PER; i++) free(deep[i]);

    const unsigned n = BULK_PAGES * 64;
    static uintptr_t slices[BULK_PAGES * 64];
    unsigned nslices = fill_blocks(n, slices);
    for (unsigned i = 0; i < n; i++) free(blocks[i]);
    /* the slices BLOCK gave back with their spans whole (not the pages its heap kept) */
    static uintptr_t whole[BULK_PAGES * 64];
    unsigned nwhole = 0;
    for (unsigned i = 0; i < nslices; i++) {
        struct lum_segment *seg = lum_segment_of((void *)slices[i]);
        unsigned idx = (unsigned)((slices[i] - (uintptr_t)lum_seg_base(seg)) / SLICE);
        if ((seg->free_slices >> idx & 1) && resident_pages(slices[i]) == SLICE / 4096) whole[nwhole++] = slices[i];
    }
    assert_true(nwhole > 0);

    unsigned taken = 0;
    for (unsigned i = 0; i < DEEP_PAGES * PER; i++) {
        deep[i] = malloc(DEEP);
        assert_non_null(deep[i]);
        uintptr_t s = (uintptr_t)deep[i] & ~(SLICE - 1);
        if (((uintptr_t)deep[i] & (SLICE - 1)) != 0 || !in(s, whole, nwhole)) continue;
        /* the page's first block, on a span BLOCK left: nothing of it was given back */
        assert_int_equal(resident_pages(s), SLICE / 4096);
        taken++;
    }
    printf("# %u of %u whole spans taken over by the deep class\n", taken, nwhole);
    assert_true(taken > 0);
    for (unsigned i = 0; i < DEEP_PAGES * PER; i++) free(deep[i]);
    lum_options_set("sample_interval", "512k");
}

static bool slice_free(uintptr_t s)
{
    struct lum_segment *seg = lum_segment_of((void *)s);
    return seg->free_slices >> ((s - (uintptr_t)lum_seg_base(seg)) / SLICE) & 1;
}

/* The dirty limit weighs what free slices hold resident: a trimmed one 4 KiB, one whose span
 * was kept all of it, not 64 KiB each. */
static void dirty_figure_is_what_free_slices_hold(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    const unsigned n = BULK_PAGES * 64;
    static uintptr_t slices[BULK_PAGES * 64];
    unsigned nslices = fill_blocks(n, slices);
    size_t before = lum_segments_dirty_resident(), slices_before = lum_segments_dirty_bytes();
    for (unsigned i = 0; i < n; i++) free(blocks[i]);
    size_t held = 0;
    unsigned freed = 0;
    for (unsigned i = 0; i < nslices; i++)
        if (slice_free(slices[i])) {
            held += (size_t)resident_pages(slices[i]) * 4096;
            freed++;
        }
    printf("# %u slices given back, %zu KiB of them resident\n", freed, held >> 10);
    assert_true(freed > 0);
    assert_int_equal(lum_segments_dirty_bytes() - slices_before, (size_t)freed * SLICE);
    assert_int_equal(lum_segments_dirty_resident() - before, held);
    lum_options_set("sample_interval", "512k");
}

/* Two generations of free slices, the older freed 300 ms before the younger: a purge down to
 * what is left once the older are gone takes them and leaves the younger resident. */
static void excess_goes_back_oldest_first(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    const unsigned n = BULK_PAGES * 64;
    static void *young[BULK_PAGES * 64];
    static uintptr_t old_s[BULK_PAGES * 64], young_s[BULK_PAGES * 64];
    unsigned nold = 0, nyoung = 0;
    for (unsigned i = 0; i < n; i++) {
        blocks[i] = malloc(BLOCK);
        young[i] = malloc(OTHER);
        assert_non_null(blocks[i]);
        assert_non_null(young[i]);
        memset(blocks[i], 1, BLOCK);
        memset(young[i], 1, OTHER);
    }
    for (unsigned i = 0; i < n; i++) free(blocks[i]);
    for (unsigned i = 0; i < n; i++) {
        uintptr_t s = (uintptr_t)blocks[i] & ~(SLICE - 1);
        if (slice_free(s) && !in(s, old_s, nold)) old_s[nold++] = s;
    }
    struct timespec nap = {0, 300 * 1000 * 1000};
    nanosleep(&nap, NULL);
    size_t before = lum_segments_dirty_bytes();
    for (unsigned i = 0; i < n; i++) free(young[i]);
    for (unsigned i = 0; i < n; i++) {
        uintptr_t s = (uintptr_t)young[i] & ~(SLICE - 1);
        if (slice_free(s) && !in(s, young_s, nyoung) && !in(s, old_s, nold)) young_s[nyoung++] = s;
    }
    size_t added = lum_segments_dirty_bytes() - before;
    printf("# %u older free slices, %u younger; %zu KiB dirty, %zu of it younger\n", nold, nyoung,
           lum_segments_dirty_bytes() >> 10, added >> 10);
    assert_true(nold > 0 && nyoung > 0);
    lum_segments_purge_excess(added, 0);
    for (unsigned i = 0; i < nold; i++)
        if (slice_free(old_s[i])) assert_int_equal(resident_pages(old_s[i]), 0);
    unsigned kept = 0;
    for (unsigned i = 0; i < nyoung; i++) kept += resident_pages(young_s[i]) > 0;
    assert_int_equal(kept, nyoung);
    lum_options_set("sample_interval", "512k");
}

/* Over the dirty limit, memory freed in the last LUM_DIRTY_HOT_MS stays, spans and large
 * ranges alike, while it is under LUM_DIRTY_HARD times the limit: a ring of buffers whose
 * count swings takes it again within milliseconds (bench buffers: every fresh mapping emptied
 * the large cache and purged the spans, 80k faults where the peers took ~10k).  Once older it
 * goes at the next check, and past the hard bound (a program changing shape) at once. */
static size_t free_big_blocks(unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        blocks[i] = malloc(BIG);
        assert_non_null(blocks[i]);
        memset(blocks[i], 1, BIG);
    }
    size_t before = lum_segments_dirty_resident();
    for (unsigned i = 0; i < n; i++) free(blocks[i]);
    return lum_segments_dirty_resident() - before;
}

static void recent_frees_stay_over_the_dirty_limit(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    lum_purge();
    void *large = malloc(1 << 20);
    assert_non_null(large);
    memset(large, 1, 1 << 20);
    /* ~5 MiB of spans: over the limit (its floor, 2 MiB, in this small process), under 4x */
    uint64_t t0 = lum_now_ms();
    size_t added = free_big_blocks(128);
    free(large);
    size_t dirty = lum_segments_dirty_resident(), cached = lum_large_cache_bytes();
    size_t limit = lum_dirty_limit(dirty + cached);
    printf("# %zu KiB of spans freed (%zu KiB free in all), %zu KiB cached, limit %zu KiB\n",
           added >> 10, dirty >> 10, cached >> 10, limit >> 10);
    assert_true(dirty + cached > limit && dirty + cached <= limit * LUM_DIRTY_HARD);
    assert_true(cached >= 1 << 20);
    lum_dirty_limit_check(true);
    /* What this test freed stays (free slices freed earlier may go).  The ages are read off a
     * coarse clock: the check must come a tick short of the window after the frees to count
     * (a loaded machine may delay it past; then there is nothing to assert). */
    struct timespec tick;
    clock_getres(CLOCK_MONOTONIC_COARSE, &tick);
    uint64_t waited = lum_now_ms() - t0, tick_ms = (uint64_t)tick.tv_nsec / 1000000 + 1;
    if (waited + tick_ms < LUM_DIRTY_HOT_MS) {
        assert_true(lum_segments_dirty_resident() >= added);
        assert_true(lum_large_cache_bytes() >= 1 << 20);
    } else {
        printf("# the check came %llu ms after the frees (clock tick %llu ms): not asserted\n",
               (unsigned long long)waited, (unsigned long long)tick_ms);
    }
    struct timespec nap = {0, 3 * LUM_DIRTY_HOT_MS * 1000 * 1000};
    nanosleep(&nap, NULL);
    lum_dirty_limit_check(true);
    printf("# %d ms later: %zu KiB of spans, %zu KiB cached\n", 3 * LUM_DIRTY_HOT_MS,
           lum_segments_dirty_resident() >> 10, lum_large_cache_bytes() >> 10);
    assert_true(lum_segments_dirty_resident() <= limit / 2);
    assert_int_equal(lum_large_cache_bytes(), 0);
    /* past the hard bound, at once */
    added = free_big_blocks(BULK_PAGES * 64 / 2);
    dirty = lum_segments_dirty_resident();
    limit = lum_dirty_limit(dirty);
    printf("# then %zu KiB freed at once, limit %zu KiB\n", added >> 10, limit >> 10);
    assert_true(dirty > limit * LUM_DIRTY_HARD);
    lum_dirty_limit_check(true);
    assert_true(lum_segments_dirty_resident() <= limit / 2);
    lum_options_set("sample_interval", "512k");
}

/* Two big blocks taken and given back, round after round: their page stays the class's
 * current one and keeps its carve, so the next round finds the same memory resident. */
static void emptied_current_big_page_keeps_its_carve(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    assert_true(lum_class_slices[lum_size_class(BIG)] > 1);
    char *a = malloc(BIG), *b = malloc(BIG);
    assert_non_null(a);
    assert_non_null(b);
    memset(a, 1, BIG);
    memset(b, 1, BIG);
    uintptr_t s = (uintptr_t)a & ~(SLICE - 1);
    unsigned before = resident_pages(s);
    free(a);
    free(b);
    assert_int_equal(resident_pages(s), before);
    char *c = malloc(BIG);
    assert_true(c == a || c == b);
    free(c);
    lum_options_set("sample_interval", "512k");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(released_page_keeps_only_its_first_carve),
        cmocka_unit_test(bulk_release_keeps_spans_for_the_class),
        cmocka_unit_test(other_class_keeps_what_it_carved_last),
        cmocka_unit_test(dirty_figure_is_what_free_slices_hold),
        cmocka_unit_test(excess_goes_back_oldest_first),
        cmocka_unit_test(recent_frees_stay_over_the_dirty_limit),
        cmocka_unit_test(emptied_current_big_page_keeps_its_carve),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
