/* The background thread starts in a program with a lot of static TLS: glibc puts static TLS
 * inside a thread's stack, and the thread's 64 KiB stack could not hold this program's 64 KiB
 * (pthread_create: EINVAL): the thread never started, without a word, and freed memory stayed
 * resident for good in an idle program. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "lumalloc.h"

static __thread char big_tls[64 << 10];

static void background_thread_starts_with_64k_of_static_tls(void **state)
{
    (void)state;
    big_tls[0] = 1; /* the program's own use of it */
    enum { N = 48 };
    void *v[N];
    /* the thread starts once 64 MiB are mapped */
    for (int i = 0; i < N; i++) {
        v[i] = malloc(2 << 20);
        assert_non_null(v[i]);
        memset(v[i], 1, 2 << 20);
    }
    for (int i = 0; i < N; i++) free(v[i]);
    void *p = malloc(100); /* a slow-path call or two after the mark */
    free(p);
    for (int i = 0; i < 64 && !lum_background_running(); i++) {
        p = malloc(3 << 20);
        free(p);
    }
    assert_true(lum_background_running() & 1);
    assert_int_equal(big_tls[0], 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(background_thread_starts_with_64k_of_static_tls),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
