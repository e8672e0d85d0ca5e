/* free() keeps the program's errno.  A free that finds the background thread's memory clean
 * wakes it, and checks first that the wake-up descriptor is still its own by its fdinfo: at
 * the program's descriptor limit that open failed, free() returned with errno EMFILE, and the
 * wake-up was dropped for good (the thread then only polled).  Now errno is the program's and
 * a check that cannot be made only skips that one wake. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_stats.h"

static void *(*volatile p_malloc)(size_t) = malloc;

/* The thread started (16 MiB of large blocks) and its decay has emptied the large cache, which
 * leaves its memory clean: the next free that gives memory back wakes it. */
static void start_and_settle(void)
{
    static struct lum_stats a, b;
    char *p = p_malloc(24 << 20);
    assert_non_null(p);
    memset(p, 1, 24 << 20);
    free(p);
    assert_true(lum_background_running() & 1);
    lum_stats_snapshot(&a);
    for (int i = 0; i < 100; i++) {
        usleep(50 * 1000);
        lum_stats_snapshot(&b);
        if (a.resident - b.resident >= (20 << 20)) break;
    }
    assert_true(a.resident - b.resident >= (20 << 20));
    usleep(300 * 1000); /* a decay round with nothing left: clean */
}

static void free_at_the_descriptor_limit_keeps_errno(void **state)
{
    (void)state;
    start_and_settle();
    char *p = p_malloc(8 << 20);
    assert_non_null(p);
    memset(p, 1, 8 << 20);
    struct rlimit old, low;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &old), 0);
    low = old;
    low.rlim_cur = 64;
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &low), 0);
    int fds[64], n = 0;
    while (n < 64 && (fds[n] = open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0) n++;
    assert_true(n < 64); /* the limit is reached */
    errno = 0;
    free(p);
    int after = errno;
    for (int i = 0; i < n; i++) close(fds[i]);
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &old), 0);
    assert_int_equal(after, 0);
    assert_true(lum_background_running() & 1);
    /* and memory still comes back by the decay */
    start_and_settle();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(free_at_the_descriptor_limit_keeps_errno),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
