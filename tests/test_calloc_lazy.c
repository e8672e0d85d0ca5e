/* A large calloc touches nothing of a fresh mapping (the kernel's pages are zero already), even
 * as a thread's first allocation (the slow path then mapped the block and calloc's memset
 * faulted all of it in: 2 GiB resident for calloc(1, 2 GiB) where glibc had 1 MiB), and even
 * with failure injection armed (the same way). */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
#include <cmocka.h>
#include "lumalloc_failure.h"

#define BIG ((size_t)256 << 20)

/* Pages of [p, p + len) resident. */
static size_t resident_pages(const void *p, size_t len)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = (uintptr_t)p & ~(page - 1), hi = ((uintptr_t)p + len + page - 1) & ~(page - 1);
    size_t n = (hi - lo) / page, in = 0;
    unsigned char *vec = malloc(n);
    assert_non_null(vec);
    assert_int_equal(mincore((void *)lo, hi - lo, vec), 0);
    for (size_t i = 0; i < n; i++) in += vec[i] & 1;
    free(vec);
    return in;
}

static void *first_allocation(void *arg)
{
    (void)arg;
    return calloc(1, BIG);
}

static void first_allocation_of_a_thread(void **state)
{
    (void)state;
    pthread_t th;
    void *p;
    assert_int_equal(pthread_create(&th, NULL, first_allocation, NULL), 0);
    assert_int_equal(pthread_join(th, &p), 0);
    assert_non_null(p);
    assert_true(resident_pages(p, BIG) < 64); /* of 65536 */
    assert_int_equal(((char *)p)[BIG - 1], 0);
    free(p);
}

static void with_failure_injection_armed(void **state)
{
    (void)state;
    lum_fail_after(1000);
    char *p = calloc(1, BIG);
    lum_fail_cancel();
    assert_non_null(p);
    assert_true(resident_pages(p, BIG) < 64);
    assert_int_equal(p[BIG / 2], 0);
    free(p);
}

static void injected_failure_still_fails(void **state)
{
    (void)state;
    lum_fail_after(0);
    assert_null(calloc(1, BIG));
    assert_true(lum_fail_fired());
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(first_allocation_of_a_thread),
        cmocka_unit_test(with_failure_injection_armed),
        cmocka_unit_test(injected_failure_still_fails),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
