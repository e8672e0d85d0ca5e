/* Large blocks and residency: a fresh block is left to fault in page by page (nothing says
 * it will all be written), while the part realloc adds to a block is populated at once (a
 * block grows when it is full, so its new part will be written too), up to the size the block
 * had: a program that reserves capacity (1 MiB to 512 MiB) keeps the rest lazy. */
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
    unsigned char *b = p_realloc(a, 2 << 20);
    assert_non_null(b);
    size_t added = (1 << 20) - 4096; /* the new part, whole pages */
    assert_int_equal(resident_pages(b + (1 << 20), added), added / 4096);
    for (size_t i = 0; i < 1 << 20; i++) assert_int_equal(b[i], (unsigned char)(i * 13));
    free(b);
}

/* Grows a written block of from bytes to to bytes; asserts that some but at most `most`
 * bytes (and the header's page) of what follows the old size are resident. */
static void grow_and_check_ahead(size_t from, size_t to, size_t most)
{
    lum_purge();
    unsigned char *a = p_malloc(from);
    assert_non_null(a);
    memset(a, 7, from);
    unsigned char *b = p_realloc(a, to);
    assert_non_null(b);
    size_t resident = resident_pages(b + from, to - from - 4096);
    assert_true(resident > 0);
    assert_true(resident <= (most + 8192) / 4096);
    assert_int_equal(b[from - 1], 7);
    free(b);
}

/* A program that reserves capacity: what follows the old size is populated up to the old size,
 * no more. */
static void growth_far_beyond_the_block_stays_lazy(void **state)
{
    (void)state;
    grow_and_check_ahead(1 << 20, 8 << 20, 1 << 20);
}

/* A buffer that doubles when full is written up to somewhere in its new half: populated whole,
 * it held twice what the program wrote (sed on a 30 MB line: 116 MB resident, glibc 90). */
static void doubling_populates_a_little_ahead(void **state)
{
    (void)state;
    grow_and_check_ahead(8 << 20, 16 << 20, 2 << 20);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(a_fresh_block_is_not_populated),
        cmocka_unit_test(growth_is_populated),
        cmocka_unit_test(growth_far_beyond_the_block_stays_lazy),
        cmocka_unit_test(doubling_populates_a_little_ahead),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
