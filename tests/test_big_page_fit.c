/* Where a page of big blocks goes among free slices still resident: the shortest run of them
 * that fits it, so that a longer run stays whole for a page that needs it.  Pages are taken and
 * given back here directly (lum_page_alloc, lum_page_release): the test lays out the slices
 * itself.  Its own process: slices other tests left free would be shorter runs than its own. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_options.h"
#include "internal.h"

#define SLICE ((uintptr_t)64 << 10)
#define ONE_SLICE 1024   /* a class of one-slice pages */
#define FILL 80          /* one-slice pages: every free slice of the first segment, and more */
#define ROW 10           /* consecutive slices of those, in one segment */

static struct lum_page *fill[FILL];
static unsigned nfill;

static struct lum_page *take(size_t size, enum lum_page_kind kind)
{
    struct lum_page *page = lum_page_alloc(lum_size_class(size), kind, kind == LUM_PAGE_SMALL ? lum_tls_heap : NULL);
    assert_non_null(page);
    return page;
}

/* One-slice pages over every free slice there is, until ROW of them stand side by side in one
 * segment: the first of them is returned, the other free slices around them are not resident
 * (never touched). */
static struct lum_page **row_of_pages(void)
{
    free(malloc(16)); /* the thread's heap */
    nfill = 0;
    for (unsigned i = 0; i < FILL; i++) fill[nfill++] = take(ONE_SLICE, LUM_PAGE_SMALL);
    for (unsigned i = 0; i + ROW <= nfill; i++) {
        bool row = true;
        for (unsigned k = 1; k < ROW && row; k++) row = fill[i + k]->start == fill[i]->start + k * SLICE;
        if (row) return &fill[i];
    }
    fail_msg("no %d one-slice pages side by side", ROW);
    return NULL;
}

static void release_all(void)
{
    for (unsigned i = 0; i < nfill; i++)
        if (fill[i]) lum_page_release(fill[i], false);
    nfill = 0;
}

/* Slices r+1..r+4 and r+6..r+7 of a row freed: runs of 4 and of 2 resident free slices, the
 * longer one first.  A page of 2 slices takes the run of 2, and the run of 4 stays whole for
 * a page of 4. */
static void page_takes_the_shortest_run_that_fits(void **state)
{
    (void)state;
    struct lum_page **row = row_of_pages();
    uint8_t *base = row[0]->start;
    for (unsigned k = 1; k <= 7; k++)
        if (k != 5) {
            lum_page_release(row[k], false);
            row[k] = NULL;
        }
    struct lum_page *two = take(114688, LUM_PAGE_SMALL); /* one block on 2 slices */
    assert_int_equal(two->slices, 2);
    printf("# runs of 4 and 2 free at slices +1 and +6: a page of 2 took +%ld\n",
           (long)((two->start - base) / (ptrdiff_t)SLICE));
    assert_ptr_equal(two->start, base + 6 * SLICE);
    struct lum_page *four = take(262144, LUM_PAGE_SMALL); /* one block on 4 slices */
    assert_int_equal(four->slices, 4);
    assert_ptr_equal(four->start, base + 1 * SLICE);
    lum_page_release(two, false);
    lum_page_release(four, false);
    release_all();
}

int main(void)
{
    assert_int_equal(lum_options_set("sample_interval", "0"), 0); /* no sample takes a page */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(page_takes_the_shortest_run_that_fits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
