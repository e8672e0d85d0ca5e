/* The order a page hands its free blocks out in: address order once it is its heap's current
 * page again (lum_page_order_free), whatever order they were freed in. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "internal.h"
#include "lumalloc_options.h"
#include "test_support.h"

static void *(*volatile p_malloc)(size_t) = malloc;

#define MAXB 4096
static void *blocks[MAXB];

static uint64_t rng = 0x9e3779b97f4a7c15u;
static unsigned next_random(unsigned below)
{
    return (unsigned)(xorshift(&rng) % below);
}

static void shuffle(void **v, int n)
{
    for (int i = n - 1; i > 0; i--) {
        int j = (int)next_random((unsigned)i + 1);
        void *t = v[i];
        v[i] = v[j];
        v[j] = t;
    }
}

/* Fills a page that was fresh when its first block was taken: size-byte blocks until one
 * starts a new page (those before go to before[], never freed: they hold whatever pages the
 * class had), then that page's blocks into blocks[]; returns how many (the last one starts the
 * next page).  So the page of blocks[0] is all this test's, whatever the process did before. */
static void *before[MAXB];
static int fill_fresh_page(size_t size)
{
    int nb = fill_until_new_page_in(blocks, MAXB, p_malloc, size, 0);
    memcpy(before, blocks, (size_t)(nb - 1) * sizeof blocks[0]);
    blocks[0] = blocks[nb - 1];
    return fill_until_new_page_in(blocks, MAXB, p_malloc, size, 1);
}

/* A page that has live blocks and many free ones, in the order they were freed (any order),
 * hands them out again in address order once it is the thread's current page again: objects
 * allocated one after another lie side by side, as they do in a fresh page. */
static void recycled_page_hands_out_its_free_blocks_in_address_order(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    const size_t size = 80;
    int n = fill_fresh_page(size);
    struct lum_page *full = lum_page_of(blocks[0]);
    assert_ptr_equal(blocks[0], full->start);
    /* two blocks in three of the full page, freed in a shuffled order (a page is sorted when
     * half of it or more is free) */
    static void *freed[MAXB];
    int nf = 0;
    for (int i = 0; i < n - 1; i++)
        if (i % 3) freed[nf++] = blocks[i];
    assert_true(nf >= 2 * LUM_ORDER_MIN_FREE);
    shuffle(freed, nf);
    for (int i = 0; i < nf; i++) free(freed[i]);
    /* the first frees went to the thread's cache, which hands them out first (last freed first);
     * the rest, after the current page's carve, from the full page */
    unsigned cached = lum_cache_max[lum_size_class(size)];
    static void *again[MAXB];
    int m = 0, on_full = 0, ascending = 0;
    uintptr_t last = 0;
    while (on_full < nf && m < MAXB) {
        void *p = again[m++] = p_malloc(size);
        if (lum_page_of(p) != full || ++on_full <= (int)cached) continue;
        ascending += (uintptr_t)p > last;
        last = (uintptr_t)p;
    }
    printf("# %d blocks freed in a shuffled order came back from their page, %d of the %d after the "
           "cache's %u in ascending order\n", on_full, ascending, on_full - (int)cached, cached);
    assert_int_equal(on_full, nf);
    assert_int_equal(ascending, nf - (int)cached);
    for (int i = 0; i < m; i++) free(again[i]);
    for (int i = 0; i < n - 1; i += 3) free(blocks[i]);
    free(blocks[n - 1]);
    lum_options_set("sample_interval", "512k");
}

/* A page record over a buffer of ours, with the blocks at the given indexes on its list in
 * that order. */
static struct lum_page crafted;
static void craft(uint8_t *area, uint32_t block_size, uint32_t carved, const uint32_t *idx, int n)
{
    memset(&crafted, 0, sizeof crafted);
    crafted.start = area;
    crafted.block_size = block_size;
    crafted.carved = carved;
    crafted.capacity = carved;
    crafted.used = carved - (uint32_t)n;
    lum_block *head = NULL;
    for (int i = n; i-- > 0;) {
        lum_block *b = (lum_block *)(area + (size_t)idx[i] * block_size);
        b->next = head;
        head = b;
    }
    crafted.free = head;
}

/* Every block of the list comes back, once, in address order: across the bitmap's words, at
 * the first and last block a page can carve, for a block size that does not divide 2^32. */
static void free_list_is_put_in_address_order(void **state)
{
    (void)state;
    static const uint32_t sizes[] = {16, 48, 80, 1008, 3072};
    for (unsigned s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        uint32_t bs = sizes[s], carved = (uint32_t)(LUM_SLICE_SIZE / bs);
        uint8_t *area = aligned_alloc(64, LUM_SLICE_SIZE);
        assert_non_null(area);
        static uint32_t idx[LUM_SLICE_SIZE / 16];
        int n = 0;
        for (uint32_t i = 0; i < carved; i++)
            if (i == 0 || i == carved - 1 || next_random(3) == 0) idx[n++] = i;
        for (int i = n - 1; i > 0; i--) {
            int j = (int)next_random((unsigned)i + 1);
            uint32_t t = idx[i];
            idx[i] = idx[j];
            idx[j] = t;
        }
        craft(area, bs, carved, idx, n);
        lum_page_order_free(&crafted);
        int seen = 0;
        uintptr_t last = 0;
        for (lum_block *b = crafted.free; b; b = b->next, seen++) {
            assert_true((uintptr_t)b > last);
            assert_int_equal(((uintptr_t)b - (uintptr_t)area) % bs, 0);
            last = (uintptr_t)b;
        }
        assert_int_equal(seen, n);
        assert_ptr_equal(crafted.free, area);
        assert_ptr_equal(last, area + (size_t)(carved - 1) * bs);
        free(area);
    }
}

/* A list a stray write damaged, with a link out of the page's carved blocks, is left as it is:
 * the bad link is never followed and nothing is written outside the sort's own bitmap. */
static void damaged_free_list_is_left_as_it_is(void **state)
{
    (void)state;
    static uint8_t elsewhere[64];
    const uint32_t bs = 64, carved = 1024; /* carved a multiple of 64: the bitmap's last bit */
    uint8_t *area = aligned_alloc(64, (size_t)bs * carved);
    assert_non_null(area);
    lum_block *bad[] = {(lum_block *)elsewhere, (lum_block *)(area + (size_t)carved * bs),
                        (lum_block *)(area - 64)};
    for (unsigned k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        uint32_t idx[] = {7, 3, 1023, 500, 9};
        craft(area, bs, carved, idx, (int)(sizeof idx / sizeof idx[0]));
        lum_block *third = (lum_block *)(area + (size_t)1023 * bs), *fourth = third->next;
        third->next = bad[k]; /* never dereferenced */
        lum_block *before = crafted.free;
        lum_page_order_free(&crafted);
        assert_ptr_equal(crafted.free, before);
        assert_ptr_equal(before, area + 7 * bs);
        assert_ptr_equal(third->next, bad[k]);
        assert_ptr_equal(fourth, area + 500 * bs);
    }
    free(area);
}

/* A list with a loop in it (a block freed twice) is left as it is: the walk ends. */
static void looped_free_list_is_left_as_it_is(void **state)
{
    (void)state;
    const uint32_t bs = 48, carved = 1365;
    uint8_t *area = aligned_alloc(64, (size_t)bs * carved);
    assert_non_null(area);
    for (int loop = 1; loop <= 3; loop += 2) {
        uint32_t idx[] = {900, 12, 400, 77};
        craft(area, bs, carved, idx, 4);
        lum_block *last = (lum_block *)(area + (size_t)77 * bs);
        lum_block *back = loop == 1 ? last : (lum_block *)(area + (size_t)12 * bs); /* 1 or 3 blocks round */
        last->next = back;
        lum_block *before_head = crafted.free;
        lum_page_order_free(&crafted);
        assert_ptr_equal(crafted.free, before_head);
        assert_ptr_equal(last->next, back);
        assert_ptr_equal(((lum_block *)(area + (size_t)900 * bs))->next, area + (size_t)12 * bs);
    }
    free(area);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(recycled_page_hands_out_its_free_blocks_in_address_order),
        cmocka_unit_test(free_list_is_put_in_address_order),
        cmocka_unit_test(damaged_free_list_is_left_as_it_is),
        cmocka_unit_test(looped_free_list_is_left_as_it_is),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
