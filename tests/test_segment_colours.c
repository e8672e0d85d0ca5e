/* Segments put their page structs at one of LUM_SEG_COLOURS offsets in slice 0, in turn, so that
 * the metadata free() reads does not land on the same cache sets in every segment.  Checks where
 * they go, that they stay inside slice 0, and that the accounting (lum_seg_header_bytes) counts
 * every page of slice 0 that ends up resident. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_options.h"
#include "internal.h"

#define BLOCK 1024
#define MAX_BLOCKS (48 * 4096) /* 192 MiB of 1 KiB blocks: far more segments than colours */
static void *blocks[MAX_BLOCKS];

struct seen {
    uintptr_t base;
    const struct lum_segment *seg;
};

static unsigned resident_4k(uintptr_t start, size_t len)
{
    unsigned char vec[LUM_SLICE_SIZE / 4096];
    assert_int_equal(mincore((void *)start, len, vec), 0);
    unsigned n = 0;
    for (size_t i = 0; i < len / 4096; i++) n += vec[i] & 1;
    return n;
}

static void segments_take_turns_at_colours(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    struct seen segs[2 * LUM_SEG_COLOURS + 2];
    unsigned nseg = 0, n = 0;
    /* in address order of creation: a block in a segment not seen yet belongs to the newest */
    while (nseg < 2 * LUM_SEG_COLOURS + 1 && n < MAX_BLOCKS) {
        void *p = malloc(BLOCK);
        assert_non_null(p);
        memset(p, 1, BLOCK);
        blocks[n++] = p;
        uintptr_t base = (uintptr_t)p & ~(uintptr_t)(LUM_SEGMENT_SIZE - 1);
        bool known = false;
        for (unsigned i = 0; i < nseg; i++) known |= segs[i].base == base;
        if (!known) segs[nseg++] = (struct seen){base, lum_segment_of(p)};
    }
    assert_true(nseg >= LUM_SEG_COLOURS + 1);
    unsigned used[LUM_SEG_COLOURS] = {0};
    for (unsigned i = 0; i < nseg; i++) {
        const struct lum_segment *seg = segs[i].seg;
        uintptr_t base = segs[i].base, at = (uintptr_t)seg->pages - base;
        assert_true(seg->colour < LUM_SEG_COLOURS);
        used[seg->colour]++;
        assert_int_equal(at, LUM_SEG_PAGES_AT(seg->colour));
        /* all of them in slice 0, past the fixed header */
        assert_true(at >= LUM_HEADER_OFFSET + sizeof(struct lum_segment));
        assert_true(at + LUM_SLICES * sizeof(struct lum_page) <= LUM_SLICE_SIZE);
        /* the accounting counts at least what is resident of slice 0 (structs of slices no page
         * has used yet may still be untouched), and a colour past 0 costs one 4 KiB page more */
        assert_true(resident_4k(base, LUM_SLICE_SIZE) * 4096u <= lum_seg_header_bytes(seg->colour));
    }
    /* every colour in use, each at its own offset in the low 16 address bits (the sets of a
     * cache that indexes by them) */
    assert_int_equal(lum_seg_header_bytes(0), 2 * 4096);
    for (unsigned c = 0; c < LUM_SEG_COLOURS; c++) {
        assert_true(used[c] >= 1);
        if (c) assert_int_equal(lum_seg_header_bytes(c), 3 * 4096);
        for (unsigned d = 0; d < c; d++)
            assert_int_not_equal(LUM_SEG_PAGES_AT(c) & 0xffff, LUM_SEG_PAGES_AT(d) & 0xffff);
    }
    /* the page a block's slice maps to is one of its segment's structs */
    for (unsigned i = 0; i < n; i += 97) {
        const struct lum_segment *seg = lum_segment_of(blocks[i]);
        const struct lum_page *page = lum_page_of(blocks[i]);
        assert_true(page >= seg->pages && page < seg->pages + LUM_SLICES);
    }
    /* the heap check knows where a segment's page structs belong */
    assert_int_equal(lum_heap_check(0), 0);
    struct lum_segment *seg = lum_segment_of(blocks[0]);
    uint32_t colour = seg->colour;
    seg->colour = (colour + 1) % LUM_SEG_COLOURS;
    assert_true(lum_heap_check(0) > 0);
    seg->colour = colour;
    assert_int_equal(lum_heap_check(0), 0);
    for (unsigned i = 0; i < n; i++) free(blocks[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(segments_take_turns_at_colours),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
