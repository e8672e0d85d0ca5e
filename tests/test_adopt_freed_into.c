/* Pages an exited thread left full of data that another thread took over and frees: that
 * thread's new blocks of the class fill the holes its frees leave in those pages, rather than
 * a new page, when it has no page of the class with room (larson: each generation of threads
 * frees what the last one left, and took new pages while the pages it emptied waited to be
 * half empty).  Its own process: pages left by other tests would change which thread holds
 * which page. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_options.h"

#define PAGES 4
#define MAX_BLOCKS (PAGES * 64)
static void *(*volatile p_malloc)(size_t) = malloc;

struct handover {
    size_t size;            /* a one-slice class */
    unsigned per_page;      /* its blocks a 64 KiB page */
    void *left[MAX_BLOCKS]; /* the exited thread's data */
    void *again[MAX_BLOCKS];
    unsigned freed, reused;
};

static void *leaver(void *arg)
{
    struct handover *h = arg;
    for (unsigned i = 0; i < PAGES * h->per_page; i++) {
        h->left[i] = p_malloc(h->size);
        memset(h->left[i], 1, h->size);
    }
    return NULL; /* its pages, full, go to the abandoned lists */
}

static bool on_left_pages(const struct handover *h, const void *p)
{
    for (unsigned j = 0; j < PAGES * h->per_page; j++)
        if (h->left[j] && ((uintptr_t)p >> 16) == ((uintptr_t)h->left[j] >> 16)) return true;
    return false;
}

/* Frees a quarter of the left blocks (every page stays three quarters full), then allocates as
 * many. */
static void *heir(void *arg)
{
    struct handover *h = arg;
    for (unsigned i = 0; i < PAGES * h->per_page; i += 4) {
        free(h->left[i]);
        h->left[i] = NULL;
        h->freed++;
    }
    for (unsigned i = 0; i < h->freed; i++) h->again[i] = p_malloc(h->size);
    for (unsigned i = 0; i < h->freed; i++) h->reused += on_left_pages(h, h->again[i]);
    for (unsigned i = 0; i < h->freed; i++) free(h->again[i]);
    return NULL;
}

static void hand_over(struct handover *h)
{
    assert_int_equal(lum_options_set("sample_interval", "0"), 0); /* no block on a sampled page */
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, leaver, h), 0);
    pthread_join(t, NULL);
    assert_int_equal(pthread_create(&t, NULL, heir, h), 0);
    pthread_join(t, NULL);
    printf("# %zu B: %u of %u allocations filled the holes the heir's frees left\n", h->size, h->reused, h->freed);
    for (unsigned i = 0; i < PAGES * h->per_page; i++) free(h->left[i]);
    lum_options_set("sample_interval", "512k");
}

static struct handover handover = {.size = 1024, .per_page = 64};

static void heir_without_a_page_fills_the_holes(void **state)
{
    (void)state;
    hand_over(&handover);
    assert_int_equal(handover.reused, handover.freed);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(heir_without_a_page_fills_the_holes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
