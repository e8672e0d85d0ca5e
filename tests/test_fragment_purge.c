/* A page that has to fault in slices that are not resident (a new segment, or purged ones),
 * because no run of resident free slices is long enough for it, gives back as much of the
 * resident free slices in runs too short for it: what is resident stays what it was, instead
 * of growing by the page while those fragments wait for decay.  A ring of buffers of 16-256
 * KiB (bench buffers) left its free slices in such fragments, and each page of 2 or 4 slices
 * then took fresh memory beside them.  Its own process: the layout of the slices is the test's
 * alone. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_options.h"
#include "internal.h"

#define SLICE ((uintptr_t)64 << 10)
#define TWO_SLICES 81920   /* a page of one block on two slices */
#define FOUR_SLICES 200000 /* a page of one block on four slices */
#define NBLOCKS 80         /* over two segments' worth of slices */

static void *blocks[NBLOCKS];

static unsigned resident_pages(uintptr_t start)
{
    unsigned char vec[SLICE / 4096];
    assert_int_equal(mincore((void *)start, SLICE, vec), 0);
    unsigned n = 0;
    for (unsigned i = 0; i < SLICE / 4096; i++) n += vec[i] & 1;
    return n;
}

static bool slice_free(uintptr_t s)
{
    struct lum_segment *seg = lum_segment_of((void *)s);
    return seg->free_slices >> ((s - (uintptr_t)lum_seg_base(seg)) / SLICE) & 1;
}

/* Pages of one block on two slices, every other one freed: pairs of free slices, resident,
 * between pages in use.  A page of four slices then fits only in memory not resident; it faults in
 * four slices, and at least as much of the fragments goes back. */
static void cold_page_gives_back_fragments(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0); /* no block on a sampled page */
    for (unsigned i = 0; i < NBLOCKS; i++) {
        blocks[i] = malloc(TWO_SLICES);
        assert_non_null(blocks[i]);
        memset(blocks[i], 1, TWO_SLICES);
    }
    /* the holes: in a segment the blocks fill, every other block freed, so that no run of free
     * slices there is long enough for a page of four */
    struct lum_segment *seg = lum_segment_of(blocks[NBLOCKS / 2]);
    static uintptr_t holes[NBLOCKS];
    unsigned nholes = 0;
    for (unsigned i = 1; i < NBLOCKS; i += 2)
        if (lum_segment_of(blocks[i]) == seg && lum_segment_of(blocks[i - 1]) == seg &&
            i + 1 < NBLOCKS && lum_segment_of(blocks[i + 1]) == seg) {
            free(blocks[i]);
            blocks[i] = NULL;
        }
    size_t held_before = 0;
    for (uintptr_t s = (uintptr_t)lum_seg_base(seg) + SLICE; s < (uintptr_t)lum_seg_base(seg) + LUM_SEGMENT_SIZE; s += SLICE)
        if (slice_free(s)) {
            holes[nholes++] = s;
            held_before += (size_t)resident_pages(s) * 4096;
        }
    printf("# %u free slices between pages, %zu KiB of them resident\n", nholes, held_before >> 10);
    /* the heap keeps the first few emptied pages; the rest of the holes are free slices, most
     * of them still holding the block they had (spans of big blocks are kept) */
    assert_true(nholes >= 24);
    assert_true(held_before >= 4 * SLICE);
    void *big = malloc(FOUR_SLICES);
    assert_non_null(big);
    memset(big, 1, FOUR_SLICES);
    assert_true(lum_segment_of(big) != seg);
    size_t held_after = 0;
    for (unsigned i = 0; i < nholes; i++)
        if (slice_free(holes[i])) held_after += (size_t)resident_pages(holes[i]) * 4096;
    printf("# after a page of 4 slices elsewhere: %zu KiB resident\n", held_after >> 10);
    assert_true(held_after + 4 * SLICE <= held_before);
    free(big);
    for (unsigned i = 0; i < NBLOCKS; i++) free(blocks[i]);
    lum_options_set("sample_interval", "512k");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(cold_page_gives_back_fragments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
