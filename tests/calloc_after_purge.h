/* What test_calloc_mlocked and test_calloc_dontneed_kept share: blocks of 4 KiB and up written
 * whole, freed, their memory given back by a purge that kept their bytes, then calloc'd again.
 * calloc must clear them whole: they are not the fresh, kernel-zeroed memory it may leave as it
 * is (lib/page.c, lum_page_refill).  Include after cmocka.h and test_support.h. */
#ifndef LUM_CALLOC_AFTER_PURGE_H
#define LUM_CALLOC_AFTER_PURGE_H
#include <pthread.h>
#include <string.h>
#include "lumalloc.h"

static void *(*volatile p_malloc)(size_t) = malloc;
static void *(*volatile p_calloc)(size_t, size_t) = calloc;
static void (*volatile p_free)(void *) = free;

static const size_t sizes[] = { 4096, 5000, 20000, 60000, 100000, 131072, 200000, 262144 };
#define NSIZES (sizeof sizes / sizeof sizes[0])

/* In a thread of its own, so that its heap has no page yet: blocks written whole and freed,
 * their memory "given back" (by a purge that kept the bytes), then calloc'd again. */
static void *write_free_purge_calloc(void *arg)
{
    size_t size = *(const size_t *)arg;
    enum { N = 8 };
    unsigned char *held[N];
    for (int k = 0; k < N; k++) {
        held[k] = p_malloc(size);
        assert_non_null(held[k]);
        memset(held[k], 0xa5, size);
    }
    for (int k = 0; k < N; k++) p_free(held[k]);
    lum_purge();
    for (int k = 0; k < N; k++) {
        held[k] = p_calloc(1, size);
        assert_non_null(held[k]);
        assert_zero(held[k], size);
    }
    for (int k = 0; k < N; k++) p_free(held[k]);
    return NULL;
}

static void calloc_clears_what_a_purge_kept(void **state)
{
    (void)state;
    for (size_t i = 0; i < NSIZES; i++) {
        pthread_t th;
        assert_int_equal(pthread_create(&th, NULL, write_free_purge_calloc, (void *)&sizes[i]), 0);
        assert_int_equal(pthread_join(th, NULL), 0);
    }
}

#endif
