/* Size classes: every size maps to the smallest class that holds it, by the tables and formula
 * of lum_size_class and by malloc's fast path alike, and the classes keep the properties the
 * allocator relies on (16-byte multiples, powers of two present, pages that hold them). */
#include <malloc.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <cmocka.h>
#include "internal.h"
#include "lumalloc_options.h"

static void every_size_gets_the_smallest_class_that_holds_it(void **state)
{
    (void)state;
    unsigned want = 0;
    for (size_t size = 1; size <= LUM_SMALL_MAX; size++) {
        while (lum_class_size[want] < size) want++;
        if (lum_size_class(size) != want) fail_msg("size %zu: class %u, want %u", size, lum_size_class(size), want);
    }
    assert_int_equal(lum_class_size[LUM_CLASSES - 1], LUM_SMALL_MAX);
}

static void malloc_serves_the_class_size(void **state)
{
    (void)state;
    /* a sampled block may come from a larger class: no sampling here */
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    for (size_t size = 1; size <= LUM_SMALL_MAX; size += size < 20000 ? 1 : 61) {
        void *p = malloc(size);
        assert_non_null(p);
        size_t usable = malloc_usable_size(p);
        if (usable != lum_class_size[lum_size_class(size)])
            fail_msg("size %zu: usable %zu, class %u", size, usable, lum_class_size[lum_size_class(size)]);
        free(p);
    }
    lum_options_set("sample_interval", "512k");
}

static void classes_keep_their_invariants(void **state)
{
    (void)state;
    for (unsigned c = 0; c < LUM_CLASSES; c++) {
        uint32_t size = lum_class_size[c];
        assert_int_equal(size % LUM_ALIGN, 0);
        if (c) assert_true(size > lum_class_size[c - 1]);
        size_t span = (size_t)lum_class_slices[c] * LUM_SLICE_SIZE;
        /* blocks over 64 KiB have a page each, on no more slices than they need */
        if (size > LUM_SLICE_SIZE) assert_int_equal(lum_class_slices[c], (size + LUM_SLICE_SIZE - 1) / LUM_SLICE_SIZE);
        else assert_true(span / size >= 4);
        assert_true(span >= size);
        assert_true(lum_class_slices[c] <= LUM_MAX_PAGE_SLICES);
        assert_true((size_t)lum_cache_max[c] * size <= 65536);
        assert_true(lum_cache_max[c] <= LUM_CACHE_BLOCKS);
    }
    /* aligned allocations and sampled blocks move up to a class that is a power of two */
    for (uint32_t pow = LUM_ALIGN; pow <= LUM_SMALL_MAX; pow *= 2)
        assert_int_equal(lum_class_size[lum_size_class(pow)], pow);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_size_gets_the_smallest_class_that_holds_it),
        cmocka_unit_test(malloc_serves_the_class_size),
        cmocka_unit_test(classes_keep_their_invariants),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
