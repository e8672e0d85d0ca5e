/* The malloc family at its edges: what C, POSIX and glibc promise, and what programs rely on. */
#include <errno.h>
#include <malloc.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include "lumalloc.h"

/* Keep the compiler from treating these as the builtins it knows (and folding them). */
static void *(*volatile p_malloc)(size_t) = malloc;
static void *(*volatile p_calloc)(size_t, size_t) = calloc;
static void *(*volatile p_realloc)(void *, size_t) = realloc;

static void malloc_zero_is_unique(void **state)
{
    (void)state;
    void *a = p_malloc(0), *b = p_malloc(0);
    assert_non_null(a);
    assert_non_null(b);
    assert_ptr_not_equal(a, b);
    free(a);
    free(b);
}

static void results_are_16_aligned(void **state)
{
    (void)state;
    for (size_t n = 0; n < 70000; n += (n < 2048 ? 1 : 997)) {
        void *p = p_malloc(n);
        assert_non_null(p);
        assert_int_equal((uintptr_t)p % 16, 0);
        assert_true(malloc_usable_size(p) >= n);
        memset(p, 0xab, n);
        free(p);
    }
}

static void impossible_sizes_fail_with_enomem(void **state)
{
    (void)state;
    errno = 0;
    assert_null(p_malloc(SIZE_MAX));
    assert_int_equal(errno, ENOMEM);
    errno = 0;
    assert_null(p_malloc((size_t)PTRDIFF_MAX + 1));
    assert_int_equal(errno, ENOMEM);
    errno = 0;
    size_t volatile big = SIZE_MAX / 2;
    assert_null(p_calloc(big, 3));
    assert_int_equal(errno, ENOMEM);
    errno = 0;
    assert_null(reallocarray(NULL, big, 3));
    assert_int_equal(errno, ENOMEM);
    void *p = p_malloc(10);
    errno = 0;
    assert_null(p_realloc(p, SIZE_MAX - 4096));
    assert_int_equal(errno, ENOMEM);
    free(p); /* the old block survives a failed realloc */
    /* exhausted address space: far more than this machine can map */
    errno = 0;
    assert_null(p_malloc((size_t)1 << 62));
    assert_int_equal(errno, ENOMEM);
}

static void alignment_rules(void **state)
{
    (void)state;
    void *p = NULL;
    assert_int_equal(posix_memalign(&p, 3, 8), EINVAL);
    assert_int_equal(posix_memalign(&p, 4, 8), EINVAL); /* not a multiple of sizeof(void *) */
    assert_int_equal(posix_memalign(&p, 0, 8), EINVAL);
    errno = 0;
    assert_null(aligned_alloc(24, 48));
    assert_int_equal(errno, EINVAL);
    for (size_t align = 8; align <= ((size_t)1 << 30); align <<= 1) {
        size_t sizes[] = { 0, 1, 24, align - 1, align, align + 1, 3 * align + 5, 300000 };
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            if (align >= ((size_t)1 << 26) && sizes[i] > (1 << 20)) continue;
            assert_int_equal(posix_memalign(&p, align, sizes[i]), 0);
            assert_int_equal((uintptr_t)p % align, 0);
            size_t usable = malloc_usable_size(p);
            assert_true(usable >= sizes[i]);
            memset(p, 1, sizes[i]);
            free(p);
            void *q = aligned_alloc(align, sizes[i]);
            assert_non_null(q);
            assert_int_equal((uintptr_t)q % align, 0);
            free(q);
            q = memalign(align, sizes[i]);
            assert_non_null(q);
            assert_int_equal((uintptr_t)q % align, 0);
            free(q);
        }
    }
    long page = sysconf(_SC_PAGESIZE);
    void *v = valloc(10);
    assert_int_equal((uintptr_t)v % (uintptr_t)page, 0);
    free(v);
    v = pvalloc(10);
    assert_int_equal((uintptr_t)v % (uintptr_t)page, 0);
    assert_true(malloc_usable_size(v) >= (size_t)page);
    free(v);
}

static void usable_size_is_exact_and_writable(void **state)
{
    (void)state;
    for (size_t n = 1; n < 3000000; n = n * 3 / 2 + 1) {
        unsigned char *p = p_malloc(n);
        size_t u = malloc_usable_size(p);
        assert_true(u >= n);
        memset(p, 0x5a, u); /* every usable byte is ours to write */
        unsigned char *q = p_malloc(n);
        memset(q, 0xa5, malloc_usable_size(q));
        for (size_t i = 0; i < u; i += 61) assert_int_equal(p[i], 0x5a);
        free(q);
        free(p);
    }
    assert_int_equal(malloc_usable_size(NULL), 0);
}

static void free_null_and_realloc_null(void **state)
{
    (void)state;
    free(NULL);
    char *p = p_realloc(NULL, 100);
    assert_non_null(p);
    strcpy(p, "hello");
    assert_null(p_realloc(p, 0)); /* glibc: frees and returns NULL */
    free_sized(p_malloc(10), 10);
    void *a = aligned_alloc(64, 128);
    free_aligned_sized(a, 64, 128);
}

static void calloc_zeroes_recycled_memory(void **state)
{
    (void)state;
    size_t sizes[] = { 16, 100, 4000, 100000, 300000, 5u << 20 };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        for (int round = 0; round < 3; round++) {
            unsigned char *p = p_malloc(sizes[i]);
            memset(p, 0xff, sizes[i]);
            free(p);
            unsigned char *z = p_calloc(1, sizes[i]);
            for (size_t j = 0; j < sizes[i]; j++)
                if (z[j]) fail_msg("calloc(%zu) byte %zu not zero", sizes[i], j);
            free(z);
        }
    }
}

static void realloc_keeps_contents_on_every_path(void **state)
{
    (void)state;
    /* small->small (in place and moved), small->large, large->large (in place, mremap), and
     * shrinking back down, with a pattern checked at each step */
    size_t steps[] = { 1, 8, 24, 100, 1000, 1024, 1025, 5000, 70000, 262144, 262145, 300000,
                       1u << 20, 3u << 20, 64u << 20, 1u << 20, 100000, 3000, 40, 1 };
    unsigned char *p = NULL;
    size_t have = 0;
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        size_t n = steps[i];
        p = p_realloc(p, n);
        assert_non_null(p);
        size_t keep = have < n ? have : n;
        for (size_t j = 0; j < keep; j++)
            if (p[j] != (unsigned char)(j * 7 + 3)) fail_msg("byte %zu lost growing to %zu", j, n);
        for (size_t j = keep; j < n; j++) p[j] = (unsigned char)(j * 7 + 3);
        have = n;
    }
    free(p);
    /* a big buffer grown in 1 MiB steps, the case mremap makes O(1) */
    unsigned char *b = NULL;
    for (size_t n = 1u << 20; n <= (256u << 20); n += 1u << 20) {
        b = p_realloc(b, n);
        assert_non_null(b);
        b[n - 1] = (unsigned char)(n >> 20);
        b[n - (1u << 20)] = (unsigned char)(n >> 20);
    }
    for (size_t n = 1u << 20; n <= (256u << 20); n += 1u << 20)
        assert_int_equal(b[n - 1], (unsigned char)(n >> 20));
    free(b);
}

static void realloc_small_steps_get_room_to_grow(void **state)
{
    (void)state;
    /* A buffer grown by an eighth at a time (CPython's lists) crossed a size class, and was
     * copied, at every step: it is now given room for the next few. */
    size_t n = 4096;
    unsigned char *p = lum_malloc(n);
    assert_non_null(p);
    for (size_t j = 0; j < n; j++) p[j] = (unsigned char)(j * 5 + 1);
    unsigned moves = 0;
    for (int i = 0; i < 16; i++) {
        size_t m = n + n / 8;
        unsigned char *q = lum_realloc(p, m);
        assert_non_null(q);
        if (q != p) moves++;
        for (size_t j = 0; j < n; j++)
            if (q[j] != (unsigned char)(j * 5 + 1)) fail_msg("byte %zu lost growing to %zu", j, m);
        for (size_t j = n; j < m; j++) q[j] = (unsigned char)(j * 5 + 1);
        p = q;
        n = m;
    }
    assert_true(moves <= 8);
    lum_free(p);
    /* growth by doubling already leaves room: no padding on top */
    p = lum_malloc(4096);
    p = lum_realloc(p, 8192);
    assert_non_null(p);
    assert_true(lum_malloc_usable_size(p) < 8192 + 4096);
    lum_free(p);
}

static void lum_prefix_twins_work(void **state)
{
    (void)state;
    void *p = lum_malloc(40);
    assert_non_null(p);
    assert_true(lum_malloc_usable_size(p) >= 40);
    p = lum_realloc(p, 4000);
    lum_free(p);
    void *q = NULL;
    assert_int_equal(lum_posix_memalign(&q, 256, 10), 0);
    lum_free(q);
    struct mallinfo2 mi = lum_mallinfo2();
    assert_true(mi.arena > 0);
    /* glibc's other introspection entry points answer with lumalloc's figures */
    assert_int_equal(mallopt(M_ARENA_MAX, 2), 1);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations" /* still called by old programs */
    assert_true(mallinfo().arena > 0);
#pragma GCC diagnostic pop
    char *xml = NULL;
    size_t xlen = 0;
    FILE *f = open_memstream(&xml, &xlen);
    assert_int_equal(malloc_info(0, f), 0);
    fclose(f);
    assert_non_null(strstr(xml, "<malloc version=\"lumalloc"));
    free(xml);
    assert_int_equal(malloc_info(1, stdout), -1);
    assert_true(lum_malloc_trim(0) >= 0);
    assert_int_equal(lum_heap_check(1), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(malloc_zero_is_unique),
        cmocka_unit_test(results_are_16_aligned),
        cmocka_unit_test(impossible_sizes_fail_with_enomem),
        cmocka_unit_test(alignment_rules),
        cmocka_unit_test(usable_size_is_exact_and_writable),
        cmocka_unit_test(free_null_and_realloc_null),
        cmocka_unit_test(calloc_zeroes_recycled_memory),
        cmocka_unit_test(realloc_keeps_contents_on_every_path),
        cmocka_unit_test(realloc_small_steps_get_room_to_grow),
        cmocka_unit_test(lum_prefix_twins_work),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
