/* A page given back to its segment leaves resident at most its first 4 KiB: the next page on
 * its slices may serve a class that carves little, and would otherwise hold the rest resident
 * and idle.  Its own process: pages left by other tests would change which page is released. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_options.h"

#define SLICE ((uintptr_t)64 << 10)
#define BLOCK 1024 /* a one-slice class: 64 blocks a page */
#define PAGES 6
#define NBLOCKS (PAGES * 64)
static void *blocks[NBLOCKS];

static unsigned resident_pages(uintptr_t start)
{
    unsigned char vec[SLICE / 4096];
    assert_int_equal(mincore((void *)start, SLICE, vec), 0);
    unsigned n = 0;
    for (unsigned i = 0; i < SLICE / 4096; i++) n += vec[i] & 1;
    return n;
}

/* Six pages filled and emptied in turn: the heap keeps two empty pages of the class and its
 * current one, and gives the others back; each of those was carved (and touched) whole. */
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(released_page_keeps_only_its_first_carve),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
