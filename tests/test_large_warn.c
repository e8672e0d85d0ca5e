/* Large-allocation warning: printed once per call site, with the site's symbolised stack, only
 * at or above the threshold. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
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
#include "lumalloc_probes.h"
#include "lumalloc_prof.h"
#include "lumalloc_stats.h"

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

/* Runs run() with stderr captured into out; returns the warnings it printed. */
static int captured_warnings(void (*run)(void), char *out, size_t cap)
{
    char path[] = "/tmp/lum_warnXXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    fflush(stderr);
    int saved = dup(2);
    dup2(fd, 2);
    run();
    dup2(saved, 2);
    close(saved);
    ssize_t n = pread(fd, out, cap - 1, 0);
    out[n > 0 ? n : 0] = 0;
    close(fd);
    return count(out, "lumalloc: large allocation of");
}

static void two_sites_over_one_under(void)
{
    static volatile int reps = 3;
    for (int i = 0; i < reps; i++)
        big_site_one(2 << 20);
    big_site_two(3 << 20);
    big_site_two(512 << 10); /* below the warning threshold */
}

static void test_warn_once_per_site(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("large_warn", "1m"), 0);
    struct lum_prof_stats before, after;
    static char out[65536];
    lum_prof_get_stats(&before);
    assert_int_equal(captured_warnings(two_sites_over_one_under, out, sizeof out), 2);
    lum_prof_get_stats(&after);
    assert_int_equal(after.large_warnings - before.large_warnings, 2);
    assert_int_equal(count(out, "large allocation of 2097152 bytes (warning threshold 1048576)"), 1);
    assert_int_equal(count(out, "large allocation of 3145728 bytes"), 1);
    assert_int_equal(count(out, "524288"), 0);
    /* Each warning carries its stack; the executable's symbols are not exported, so frames
     * name the module and offset (dladdr only inside malloc), at least one frame per line. */
    assert_true(count(out, "  #0 ") == 2);
    assert_true(count(out, "  #1 ") == 2);
    assert_int_equal(lum_options_set("large_warn", "off"), 0);
}

/* One call site per size: a site warns once, the first time it allocates at or above the
 * threshold. */
#define SITE(name)                                  \
    __attribute__((noinline)) void name(size_t n)   \
    {                                               \
        sink = malloc(n);                           \
        assert_non_null(sink);                      \
        ((volatile char *)sink)[n - 1] = 1;         \
        free(sink);                                 \
        __asm__ volatile("" ::: "memory");          \
    }
SITE(site_100k)
SITE(site_2000)
SITE(site_600)
SITE(site_256)
SITE(site_700_after)
SITE(thread_site_first)
SITE(thread_site_second)

/* In a thread started with the threshold set (its heap made then): the first site takes the
 * slow path anyway (the class's first block), the second finds the class's page. */
static void *warn_in_new_thread(void *arg)
{
    (void)arg;
    thread_site_first(600);
    thread_site_second(600);
    return NULL;
}

static void run_thread(size_t unused)
{
    (void)unused;
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, warn_in_new_thread, NULL), 0);
    assert_int_equal(pthread_join(t, NULL), 0);
}

/* Calls fn(size) reps times with stderr captured; returns the warnings printed. */
static void (*site_fn)(size_t);
static size_t site_size;
static int site_reps;

static void run_site(void)
{
    for (int i = 0; i < site_reps; i++) site_fn(site_size);
}

static int warnings_from(void (*fn)(size_t), size_t size, int reps, char *out, size_t cap)
{
    site_fn = fn;
    site_size = size;
    site_reps = reps;
    return captured_warnings(run_site, out, cap);
}

/* The threshold set while the program runs reaches sizes malloc's fast path serves from its
 * cache and current pages: below 1 KiB (its size slots) and up to the largest class (its size
 * limit).  Each site has allocated its size many times before, with the warning off. */
static void test_threshold_set_at_run_time_reaches_the_fast_path(void **state)
{
    (void)state;
    static char out[65536];
    assert_int_equal(lum_options_set("large_warn", "off"), 0);
    void (*sites[])(size_t) = {site_100k, site_2000, site_600, site_256};
    size_t sizes[] = {100000, 2000, 600, 256};
    for (int s = 0; s < 4; s++) assert_int_equal(warnings_from(sites[s], sizes[s], 200, out, sizeof out), 0);

    assert_int_equal(lum_options_set("large_warn", "64k"), 0);
    assert_int_equal(warnings_from(site_100k, 100000, 3, out, sizeof out), 1);
    assert_int_equal(count(out, "large allocation of 100000 bytes (warning threshold 65536)"), 1);
    assert_int_equal(warnings_from(site_2000, 2000, 3, out, sizeof out), 0);

    assert_int_equal(lum_options_set("large_warn", "512"), 0);
    assert_int_equal(warnings_from(site_2000, 2000, 3, out, sizeof out), 1);
    assert_int_equal(warnings_from(site_600, 600, 3, out, sizeof out), 1);
    assert_int_equal(count(out, "large allocation of 600 bytes (warning threshold 512)"), 1);
    assert_int_equal(warnings_from(site_256, 256, 3, out, sizeof out), 0);
    warnings_from(run_thread, 0, 1, out, sizeof out); /* (glibc's thread set-up may warn too) */
    assert_int_equal(count(out, "large allocation of 600 bytes"), 2);

    /* off again: the slots are the size classes again, and nothing warns */
    assert_int_equal(lum_options_set("large_warn", "off"), 0);
    assert_int_equal(warnings_from(site_700_after, 700, 200, out, sizeof out), 0);
}

SITE(site_threshold)

/* Large allocations this thread has made. */
static uint64_t large_count(void)
{
    static struct lum_stats st;
    lum_stats_snapshot(&st);
    for (uint32_t i = 0; i < st.nthreads; i++)
        if (st.threads[i].tid == (uint32_t)gettid() && st.threads[i].live) return st.threads[i].large_count;
    fail_msg("this thread is not in the statistics");
    return 0;
}

/* LUMALLOC_LARGE_THRESHOLD set at run time is clamped as at start-up (to the sizes pages
 * serve) and published for the tools. */
static void test_large_threshold_set_at_run_time_is_clamped_and_published(void **state)
{
    (void)state;
    extern struct lum_registry_v1 lumalloc_registry;
    uint64_t large = large_count();
    for (int i = 0; i < 50; i++) site_threshold(100000);
    assert_int_equal(large_count() - large, 0);
    assert_int_equal(lum_options_set("large_threshold", "1g"), 0);
    assert_int_equal(lum_opt.large_threshold, 256 << 10);
    assert_int_equal(lumalloc_registry.large_threshold, 256 << 10);
    assert_int_equal(lum_options_set("large_threshold", "100"), 0);
    assert_int_equal(lum_opt.large_threshold, 1024);
    assert_int_equal(lumalloc_registry.large_threshold, 1024);
    assert_int_equal(lum_options_set("large_threshold", "64k"), 0);
    assert_int_equal(lumalloc_registry.large_threshold, 64 << 10);
    for (int i = 0; i < 50; i++) site_threshold(100000);
    assert_int_equal(large_count() - large, 50); /* over 64 KiB: every one on the large path */
    assert_int_equal(lum_options_set("large_threshold", "256k"), 0);
    assert_int_equal(lumalloc_registry.large_threshold, 256 << 10);
    for (int i = 0; i < 50; i++) site_threshold(100000);
    assert_int_equal(large_count() - large, 50); /* served from pages again */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_warn_once_per_site),
        cmocka_unit_test(test_threshold_set_at_run_time_reaches_the_fast_path),
        cmocka_unit_test(test_large_threshold_set_at_run_time_is_clamped_and_published),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
