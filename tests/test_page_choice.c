/* Which page a thread takes blocks from when its current page runs out: blocks that came back
 * to its other pages (by its own frees or by other threads') before memory it never touched.
 * Its own process: the tests count on the classes they use having no pages from elsewhere. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>
#include "internal.h"
#include "lumalloc.h"
#include "lumalloc_options.h"

static void *(*volatile p_malloc)(size_t) = malloc;

#define MAXB 4096
static void *blocks[MAXB];

/* Allocates size-byte blocks until one lands on a new page; returns how many were allocated
 * (blocks[0..n)), the last being the first block of the new page. */
static int fill_until_new_page(size_t size)
{
    int n = 0;
    blocks[n++] = p_malloc(size);
    while (n < MAXB) {
        blocks[n] = p_malloc(size);
        if (lum_page_of(blocks[n]) != lum_page_of(blocks[n - 1])) return n + 1;
        n++;
    }
    fail_msg("no new page after %d blocks", MAXB);
    return 0;
}

struct frees { void **list; int n; };

static void *free_them(void *arg)
{
    struct frees *f = arg;
    for (int i = 0; i < f->n; i++) free(f->list[i]);
    return NULL;
}

/* Another thread frees half of a full page's blocks (remote frees: they wait on the page's own
 * list until the owner collects it).  When the owner's current page runs out of carved blocks,
 * it takes those before carving further into the current page. */
static void remote_frees_are_reused_before_fresh_carving(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0); /* no block on a sampled page */
    const size_t size = 240;
    int n = fill_until_new_page(size);
    struct lum_page *full = lum_page_of(blocks[0]), *cur = lum_page_of(blocks[n - 1]);
    assert_ptr_not_equal(full, cur);
    static void *freed[MAXB];
    int nf = 0;
    for (int i = 0; i < n - 1; i += 2) freed[nf++] = blocks[i];
    assert_true(nf >= 64);
    struct frees f = { freed, nf };
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, free_them, &f), 0);
    pthread_join(t, NULL);
    /* one carve of the current page (4 KiB), then the freed blocks */
    int on_full = 0;
    static void *again[128];
    for (int i = 0; i < 128; i++) {
        again[i] = p_malloc(size);
        if (lum_page_of(again[i]) == full) on_full++;
    }
    printf("# %d of 128 allocations reused the %d blocks freed by another thread; the current page "
           "carved %u of %u\n", on_full, nf, cur->carved, cur->capacity);
    assert_true(on_full >= 64);
    assert_true(cur->carved < cur->capacity / 2);
    for (int i = 0; i < 128; i++) free(again[i]);
    for (int i = 1; i < n; i += 2) free(blocks[i]);
    if (!((n - 1) & 1)) free(blocks[n - 1]);
    lum_options_set("sample_interval", "512k");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(remote_frees_are_reused_before_fresh_carving),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
