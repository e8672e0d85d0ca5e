/* Sampled blocks come from power-of-two classes, blocks under 256 bytes from the 256-byte one:
 * with every allocation sampled, each still holds its size (malloc_usable_size says so), keeps
 * the alignment asked for (memalign and aligned_alloc reach the sampling path too), keeps its
 * bytes through realloc, and the thread's exact counters come back level once all are freed. */
#include <malloc.h>
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

#define N 4200
static void *blocks[N];

static void fill(void *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++) ((uint8_t *)p)[i] = (uint8_t)(seed + i * 7);
}

static bool holds(const void *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        if (((const uint8_t *)p)[i] != (uint8_t)(seed + i * 7)) return false;
    return true;
}

static void every_block_sampled_still_fits(void **state)
{
    (void)state;
    free(malloc(1)); /* the thread's heap */
    struct lum_heap *heap = lum_tls_heap;
    assert_int_equal(lum_options_set("sample_interval", "1"), 0);
    uint64_t live0 = heap->tc.alloc_bytes - heap->tc.free_bytes, sampled0 = heap->tc.sampled_count;
    for (size_t s = 0; s < N; s++) {
        blocks[s] = malloc(s);
        assert_non_null(blocks[s]);
        assert_true(malloc_usable_size(blocks[s]) >= s);
        assert_int_equal((uintptr_t)blocks[s] % 16, 0);
        fill(blocks[s], s, (unsigned)s);
    }
    assert_true(heap->tc.sampled_count - sampled0 >= N / 2);
    for (size_t s = 0; s < N; s++) {
        assert_true(holds(blocks[s], s, (unsigned)s));
        /* up, then down past half: moved, the bytes kept */
        size_t up = s * 3 + 40, down = s / 3;
        void *q = realloc(blocks[s], up);
        assert_non_null(q);
        assert_true(malloc_usable_size(q) >= up);
        assert_true(holds(q, s, (unsigned)s));
        q = realloc(q, down ? down : 1);
        assert_non_null(q);
        assert_true(malloc_usable_size(q) >= down);
        assert_true(holds(q, down, (unsigned)s));
        blocks[s] = q;
    }
    for (size_t s = 0; s < N; s++) free(blocks[s]);
    /* aligned requests of every power of two up to a slice, small and around the alignment */
    for (size_t al = 32; al <= LUM_SLICE_SIZE; al *= 2) {
        size_t sizes[] = {1, 24, 200, al - 1, al, al + 1, 3 * al};
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            void *p = aligned_alloc(al, sizes[i]);
            void *m = memalign(al, sizes[i]);
            assert_non_null(p);
            assert_non_null(m);
            assert_int_equal((uintptr_t)p % al, 0);
            assert_int_equal((uintptr_t)m % al, 0);
            assert_true(malloc_usable_size(p) >= sizes[i]);
            assert_true(malloc_usable_size(m) >= sizes[i]);
            fill(p, sizes[i], 3);
            fill(m, sizes[i], 5);
            assert_true(holds(p, sizes[i], 3));
            free(p);
            free(m);
        }
    }
    lum_options_set("sample_interval", "512k");
    assert_int_equal(heap->tc.alloc_bytes - heap->tc.free_bytes, live0);
}

/* A sampled block grows and shrinks in place exactly where its ordinary class's block would:
 * the profile assumes sampled and unsampled blocks move alike.  Kept wherever it fit its bigger
 * sampled class, it stayed where its unsampled siblings moved and were sampled again, and the
 * in-use figures counted those blocks twice. */
static void sampled_block_moves_as_its_class_would(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "1"), 0);
    unsigned char *p = NULL;
    for (int i = 0; i < 1000 && !p; i++) {
        unsigned char *x = malloc(300);
        assert_non_null(x);
        if (lum_page_of(x)->kind == LUM_PAGE_SAMPLED) p = x;
        else free(x);
    }
    assert_non_null(p);
    size_t own = lum_class_size[lum_size_class(300)];
    assert_true(malloc_usable_size(p) > own); /* room to stay, which an ordinary block lacks */
    fill(p, 300, 9);
    uintptr_t at = (uintptr_t)p;
    unsigned char *q = realloc(p, own); /* within its own class: stays */
    assert_int_equal((uintptr_t)q, at);
    q = realloc(q, own + 1); /* past it, though the sampled block could hold it: moves */
    assert_non_null(q);
    assert_int_not_equal((uintptr_t)q, at);
    assert_true(holds(q, 300, 9));
    free(q);

    /* realloc pads growth (lum_realloc): the sample shows the size asked for, not the padding */
    size_t grow = lum_class_size[lum_size_class(2000)] + 1;
    bool seen = false;
    for (int i = 0; i < 1000 && !seen; i++) {
        p = malloc(2000);
        assert_non_null(p);
        q = realloc(p, grow);
        assert_non_null(q);
        struct lum_page *page = lum_page_of(q);
        if (page->kind == LUM_PAGE_SAMPLED) {
            seen = true;
            assert_true(lum_sampled_rec(page, q)->usable > lum_class_size[lum_size_class(grow)]); /* padded */
            assert_int_equal(lum_sampled_rec(page, q)->requested, grow);
        }
        free(q);
    }
    assert_true(seen);
    lum_options_set("sample_interval", "512k");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_block_sampled_still_fits),
        cmocka_unit_test(sampled_block_moves_as_its_class_would),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
