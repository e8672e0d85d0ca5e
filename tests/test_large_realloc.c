/* Large blocks and residency: a fresh block is left to fault in page by page (nothing says
 * it will all be written), while the part realloc adds to a block is populated at once (a
 * block grows when it is full, so its new part will be written too). */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_options.h"

static void *(*volatile p_malloc)(size_t) = malloc;
static void *(*volatile p_realloc)(void *, size_t) = realloc;

/* Pages of [p, p + len) that are resident, whole pages only. */
static size_t resident_pages(const void *p, size_t len)
{
    uintptr_t start = ((uintptr_t)p + 4095) & ~(uintptr_t)4095;
    uintptr_t end = ((uintptr_t)p + len) & ~(uintptr_t)4095;
    size_t n = (end - start) / 4096, count = 0;
    static unsigned char vec[(8 << 20) / 4096];
    assert_true(n <= sizeof vec);
    assert_int_equal(mincore((void *)start, end - start, vec), 0);
    for (size_t i = 0; i < n; i++) count += vec[i] & 1;
    return count;
}

static int setup(void **state)
{
    (void)state;
    return lum_options_set("sample_interval", "0");
}

static void a_fresh_block_is_not_populated(void **state)
{
    (void)state;
    lum_purge(); /* nothing cached: the block is new memory */
    unsigned char *a = p_malloc(4 << 20);
    assert_non_null(a);
    assert_int_equal(resident_pages(a, 4 << 20), 0);
    free(a);
}

static void growth_is_populated(void **state)
{
    (void)state;
    lum_purge(); /* nothing cached: the growth is new memory */
    unsigned char *a = p_malloc(1 << 20);
    assert_non_null(a);
    for (size_t i = 0; i < 1 << 20; i++) a[i] = (unsigned char)(i * 13);
    unsigned char *b = p_realloc(a, 4 << 20);
    assert_non_null(b);
    size_t added = (3 << 20) - 4096; /* the new part, whole pages */
    assert_int_equal(resident_pages(b + (1 << 20), added), added / 4096);
    for (size_t i = 0; i < 1 << 20; i++) assert_int_equal(b[i], (unsigned char)(i * 13));
    free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(a_fresh_block_is_not_populated),
        cmocka_unit_test(growth_is_populated),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
