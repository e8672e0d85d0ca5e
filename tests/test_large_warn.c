/* Large-allocation warning: printed once per call site, with the site's symbolised stack, only
 * at or above the threshold. */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include "options.h"
#include "lumalloc_prof.h"

static void *volatile sink;

__attribute__((noinline)) void big_site_one(size_t n)
{
    sink = malloc(n);
    free(sink);
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void big_site_two(size_t n)
{
    sink = malloc(n);
    free(sink);
    __asm__ volatile("" ::: "memory");
}

static int count(const char *s, const char *needle)
{
    int n = 0;
    for (const char *p = s; (p = strstr(p, needle)); p++)
        n++;
    return n;
}

static void test_warn_once_per_site(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("large_warn", "1m"), 0);
    char path[] = "/tmp/lum_warnXXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    fflush(stderr);
    int saved = dup(2);
    dup2(fd, 2);
    struct lum_prof_stats before, after;
    lum_prof_get_stats(&before);
    static volatile int reps = 3;
    for (int i = 0; i < reps; i++)
        big_site_one(2 << 20);
    big_site_two(3 << 20);
    big_site_two(512 << 10); /* below the warning threshold */
    lum_prof_get_stats(&after);
    dup2(saved, 2);
    close(saved);
    static char out[65536];
    ssize_t n = pread(fd, out, sizeof out - 1, 0);
    out[n > 0 ? n : 0] = 0;
    close(fd);
    assert_int_equal(after.large_warnings - before.large_warnings, 2);
    assert_int_equal(count(out, "lumalloc: large allocation of"), 2);
    assert_int_equal(count(out, "large allocation of 2097152 bytes (warning threshold 1048576)"), 1);
    assert_int_equal(count(out, "large allocation of 3145728 bytes"), 1);
    assert_int_equal(count(out, "524288"), 0);
    /* Each warning carries its stack; the executable's symbols are not exported, so frames
     * name the module and offset (dladdr only inside malloc), at least one frame per line. */
    assert_true(count(out, "  #0 ") == 2);
    assert_true(count(out, "  #1 ") == 2);
    assert_int_equal(lum_options_set("large_warn", "off"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_warn_once_per_site),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
