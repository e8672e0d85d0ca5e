/* The statistics snapshot: figures that follow what the program did, and outputs that parse. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>
#include <malloc.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "lumalloc.h"
#include "lumalloc_stats.h"

static void *(*volatile p_malloc)(size_t) = malloc;
static struct lum_stats a, b;

static void snapshot_follows_allocations(void **state)
{
    (void)state;
    /* The first samples come before the window whose allocations must add up exactly (the
     * unwinder allocates nothing through malloc, but the window should hold only the test's own
     * allocations whatever a first sample does).  16 MiB at the default 512 KiB interval misses
     * a sample with probability e^-32. */
    for (int i = 0; i < 256; i++)
        free(p_malloc(64 << 10));
    lum_stats_snapshot(&a);
    enum { N = 20000 };
    static void *v[N];
    uint64_t expect = 0;
    for (int i = 0; i < N; i++) {
        v[i] = p_malloc(100); /* class 112; sampled ones live in the 256-byte class (sampled.c) */
        expect += malloc_usable_size(v[i]);
    }
    void *big = p_malloc(8u << 20);
    expect += malloc_usable_size(big);
    lum_stats_snapshot(&b);
    assert_true(b.epoch > a.epoch);
    /* only this thread allocates: the difference is exact */
    assert_int_equal(b.allocated - a.allocated, expect);
    assert_true(b.large_live - a.large_live == malloc_usable_size(big));
    assert_true(b.mapped >= b.resident && b.resident >= b.active && b.active >= b.allocated);
    /* every mapped byte is either resident (handed out) or retained (address space only) */
    assert_int_equal(b.mapped, b.resident + b.retained);
    unsigned c112 = 0;
    while (b.classes[c112].block_size != 112) c112++;
    unsigned c256 = c112;
    while (b.classes[c256].block_size != 256) c256++;
    assert_true(b.classes[c112].live_blocks - a.classes[c112].live_blocks +
                b.classes[c256].live_blocks - a.classes[c256].live_blocks == N);
    assert_true(b.classes[c112].pages >= N * 112 / 65536);
    assert_true(b.nthreads >= 1 && b.threads[0].live);
    for (int i = 0; i < N; i++) free(v[i]);
    free(big);
    lum_purge();
    lum_stats_snapshot(&b);
    assert_int_equal(b.allocated, a.allocated);
    assert_int_equal(b.mapped, b.resident + b.retained);
}

/* LUMALLOC_LARGE_THRESHOLD (256k by default) is the largest size served from pages: 256 KiB
 * buffers are common, and as mappings of their own they could not share freed memory with the
 * pages of the 16-224 KiB buffers around them (bench buffers: 45 MiB of peak RSS, 39 now). */
static void largest_class_is_on_pages_one_byte_more_is_large(void **state)
{
    (void)state;
    lum_stats_snapshot(&a);
    void *on_page = p_malloc(256 << 10);
    lum_stats_snapshot(&b);
    assert_int_equal(b.large_live, a.large_live);
    assert_int_equal(malloc_usable_size(on_page), 256 << 10);
    void *large = p_malloc((256 << 10) + 1);
    lum_stats_snapshot(&a);
    assert_int_equal(a.large_live - b.large_live, malloc_usable_size(large));
    free(large);
    free(on_page);
}

/* A pthread-key destructor created after lumalloc's runs when the thread's heap is gone: its
 * frees still count (in the exited threads' total), or every such thread left its bytes "live"
 * in mallinfo2 and lum_stats for good (1000 threads freeing 1000 B each: +1 MB). */
static pthread_key_t late_key;
static void late_free(void *p) { free(p); }
static void *set_late_block(void *arg)
{
    (void)arg;
    pthread_setspecific(late_key, p_malloc(1000));
    return NULL;
}

static void frees_after_the_heap_is_gone_count(void **state)
{
    (void)state;
    free(p_malloc(1)); /* lumalloc's key first */
    assert_int_equal(pthread_key_create(&late_key, late_free), 0);
    for (int i = 0; i < 8; i++) { /* the first threads' own start-up allocations */
        pthread_t t;
        pthread_create(&t, NULL, set_late_block, NULL);
        pthread_join(t, NULL);
    }
    lum_stats_snapshot(&a);
    struct mallinfo2 m0 = mallinfo2();
    for (int i = 0; i < 200; i++) {
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, set_late_block, NULL), 0);
        pthread_join(t, NULL);
    }
    struct mallinfo2 m1 = mallinfo2();
    lum_stats_snapshot(&b);
    /* each block was freed by its destructor: nothing of the 200 KB may remain live */
    assert_true(m1.uordblks - m0.uordblks < 4096);
    assert_true(b.allocated - a.allocated < 4096);
    pthread_key_delete(late_key);
}

/* A late destructor that grows a large block: realloc moves it with no heap to count in, and
 * the free after counts its new size, so allocated wrapped to ~2^64 (1 MiB -> 8 MiB: -7 MiB)
 * unless the move counts in the exited threads' totals as frees there do. */
static void *volatile late_block;
static void late_grow(void *p)
{
    (void)p;
    late_block = realloc(late_block, 8 << 20);
}
static void *set_late_grow(void *arg)
{
    (void)arg;
    pthread_setspecific(late_key, (void *)1);
    free(p_malloc(10));
    return NULL;
}

static void large_realloc_after_the_heap_is_gone_counts(void **state)
{
    (void)state;
    free(p_malloc(1)); /* lumalloc's key first */
    assert_int_equal(pthread_key_create(&late_key, late_grow), 0);
    lum_stats_snapshot(&a);
    late_block = p_malloc(1 << 20);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, set_late_grow, NULL), 0);
    pthread_join(t, NULL);
    assert_non_null(late_block);
    assert_true(malloc_usable_size(late_block) >= 8 << 20);
    lum_stats_snapshot(&b);
    int64_t grown = (int64_t)(b.allocated - a.allocated);
    assert_true(grown >= (int64_t)malloc_usable_size(late_block));
    assert_true(grown < (int64_t)malloc_usable_size(late_block) + 4096);
    free(late_block);
    lum_stats_snapshot(&b);
    assert_true((int64_t)(b.allocated - a.allocated) < 4096);
    assert_true((int64_t)(b.allocated - a.allocated) > -4096);
    pthread_key_delete(late_key);
}

/* More heap records than threads[] holds, all but this thread's exited: the live ones are
 * the ones kept (cut in list order, newest first, 300 exited threads filled all 256 entries
 * and this thread was missing). */
static pthread_barrier_t many_barrier;
static void *touch_and_wait(void *arg)
{
    (void)arg;
    free(p_malloc(100));
    pthread_barrier_wait(&many_barrier);
    return NULL;
}

static void live_threads_are_kept_past_the_cap(void **state)
{
    (void)state;
    enum { N = LUM_STATS_MAX_THREADS + 44 };
    static pthread_t t[N];
    free(p_malloc(1));
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 << 10);
    pthread_barrier_init(&many_barrier, NULL, N + 1);
    for (int i = 0; i < N; i++) assert_int_equal(pthread_create(&t[i], &attr, touch_and_wait, NULL), 0);
    pthread_barrier_wait(&many_barrier);
    for (int i = 0; i < N; i++) pthread_join(t[i], NULL);
    pthread_barrier_destroy(&many_barrier);
    pthread_attr_destroy(&attr);
    lum_stats_snapshot(&a);
    assert_int_equal(a.nthreads, LUM_STATS_MAX_THREADS);
    uint32_t me = (uint32_t)syscall(SYS_gettid);
    bool found = false, exited_seen = false;
    for (uint32_t i = 0; i < a.nthreads; i++) {
        if (a.threads[i].live) {
            assert_false(exited_seen); /* live first */
            found |= a.threads[i].tid == me;
        } else {
            exited_seen = true;
        }
    }
    assert_true(found);
    assert_true(exited_seen);
}

/* Blocks freed by another thread than their page's owner wait on the page (or in the owner's
 * inbox) until the owner collects them, which an idle owner never does: the snapshot counts
 * them freed (an idle owner's 5000 blocks of 1000 B, all freed by this thread, stayed 4995
 * "live" in their class and 5 MB in active, while allocated said 288 bytes). */
enum { REMOTE_N = 5000 };
static void *remote_blocks[REMOTE_N];
static sem_t remote_allocated, remote_done;
static void *allocate_and_idle(void *arg)
{
    (void)arg;
    for (int i = 0; i < REMOTE_N; i++) remote_blocks[i] = p_malloc(1000);
    sem_post(&remote_allocated);
    sem_wait(&remote_done);
    return NULL;
}

static unsigned class_of(const struct lum_stats *s, uint32_t size)
{
    unsigned c = 0;
    while (s->classes[c].block_size < size) c++;
    return c;
}

static void frees_by_other_threads_count_while_the_owner_idles(void **state)
{
    (void)state;
    sem_init(&remote_allocated, 0, 0);
    sem_init(&remote_done, 0, 0);
    lum_stats_snapshot(&a);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, allocate_and_idle, NULL), 0);
    sem_wait(&remote_allocated);
    lum_stats_snapshot(&b);
    unsigned c = class_of(&b, 1000);
    assert_true(b.classes[c].live_blocks - a.classes[c].live_blocks >= REMOTE_N - 300); /* sampled ones elsewhere */
    for (int i = 0; i < REMOTE_N; i++) free(remote_blocks[i]);
    lum_stats_snapshot(&b);
    printf("# class %u: live %llu before, %llu after; active %llu before, %llu after\n", b.classes[c].block_size,
           (unsigned long long)a.classes[c].live_blocks, (unsigned long long)b.classes[c].live_blocks,
           (unsigned long long)a.active, (unsigned long long)b.active);
    assert_true(b.classes[c].live_blocks <= a.classes[c].live_blocks + 16);
    assert_true(b.active < a.active + (256 << 10));
    assert_true((int64_t)(b.allocated - a.allocated) < 64 << 10);
    /* taken off their lists and put back: the owner still collects them */
    sem_post(&remote_done);
    pthread_join(t, NULL);
    lum_stats_snapshot(&b);
    assert_true(b.classes[c].live_blocks <= a.classes[c].live_blocks + 16);
    assert_int_equal(lum_heap_check(1), 0);
    sem_destroy(&remote_allocated);
    sem_destroy(&remote_done);
}

/* A class never holds more live blocks than its pages have: a page's used, in_full and
 * park_bias are read apart while the owner parks and unparks it, and a page caught in between
 * counted park_bias twice (48 KiB blocks, one thread reallocating 64 of them: ~1 snapshot in
 * 1000 had a class over its blocks). */
static atomic_int churn_stop;
static void *churn_48k(void *arg)
{
    void *v[64] = {0};
    unsigned r = (unsigned)(uintptr_t)arg;
    while (!atomic_load_explicit(&churn_stop, memory_order_relaxed)) {
        r = r * 1103515245 + 12345;
        unsigned i = (r >> 8) % 64;
        free(v[i]);
        v[i] = p_malloc(49152);
    }
    for (int i = 0; i < 64; i++) free(v[i]);
    return NULL;
}

static void classes_hold_no_more_than_their_blocks_under_churn(void **state)
{
    (void)state;
    atomic_store(&churn_stop, 0);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, churn_48k, (void *)1), 0);
    unsigned long n = 0, over = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {
        lum_stats_snapshot(&a);
        n++;
        for (unsigned c = 0; c < LUM_STATS_CLASSES; c++) over += a.classes[c].live_blocks > a.classes[c].blocks;
        clock_gettime(CLOCK_MONOTONIC, &t1);
    } while ((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000 < 1000);
    atomic_store(&churn_stop, 1);
    pthread_join(t, NULL);
    printf("# %lu snapshots, %lu classes over their blocks\n", n, over);
    assert_int_equal(over, 0);
}

static void text_and_json_outputs(void **state)
{
    (void)state;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    lum_stats_snapshot(&a);
    lum_stats_print_json(f, &a);
    fclose(f);
    /* one line, balanced, with the jemalloc-style keys */
    assert_int_equal(buf[len - 1], '\n');
    assert_null(memchr(buf, '\n', len - 1));
    int depth = 0;
    for (size_t i = 0; i < len; i++) {
        depth += buf[i] == '{' || buf[i] == '[';
        depth -= buf[i] == '}' || buf[i] == ']';
        assert_true(depth >= 0);
    }
    assert_int_equal(depth, 0);
    const char *keys[] = { "\"allocated\":", "\"active\":", "\"resident\":", "\"mapped\":",
                           "\"retained\":", "\"metadata\":", "\"classes\":", "\"threads\":" };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) assert_non_null(strstr(buf, keys[i]));
    free(buf);
    f = open_memstream(&buf, &len);
    lum_stats_print(f, &a);
    fclose(f);
    assert_non_null(strstr(buf, "allocated"));
    assert_non_null(strstr(buf, "tid"));
    free(buf);
}

/* mallinfo2 with glibc's meanings: large blocks (glibc's mmapped chunks) in hblkhd alone, so
 * that uordblks + hblkhd, the figure programs add up, counts them once (it counted 100 MiB of
 * large blocks as 200). */
static void mallinfo2_counts_large_blocks_once(void **state)
{
    (void)state;
    /* blocks taken from cached ranges (earlier tests' large blocks) would move the cache's
     * mapped bytes out of arena: arena would shrink, not stay */
    lum_purge();
    struct mallinfo2 m0 = mallinfo2();
    enum { N = 8 };
    void *big[N];
    for (int i = 0; i < N; i++) {
        big[i] = p_malloc(2 << 20);
        assert_non_null(big[i]);
        memset(big[i], 1, 2 << 20);
    }
    struct mallinfo2 m1 = mallinfo2();
    size_t added = (size_t)N << 21;
    assert_true(m1.hblkhd - m0.hblkhd >= added);
    assert_true(m1.hblkhd - m0.hblkhd < added + (N << 16));
    assert_true(m1.uordblks - m0.uordblks < (64 << 10)); /* the small blocks' own figure */
    assert_true(m1.arena - m0.arena < (1 << 20));
    assert_int_equal(m1.hblks - m0.hblks, N); /* glibc's count of mmapped chunks (was 0) */
    for (int i = 0; i < N; i++) free(big[i]);
    assert_int_equal(mallinfo2().hblks, m0.hblks);
}

/* The XML "allocated" is every live block, large ones too (it printed uordblks, which leaves
 * them to hblkhd: 5120 bytes with a 10 MiB block live). */
static unsigned long long info_total(const char *type, const char *attr)
{
    char *xml = NULL, key[64];
    size_t len = 0;
    FILE *f = open_memstream(&xml, &len);
    assert_int_equal(malloc_info(0, f), 0);
    fclose(f);
    snprintf(key, sizeof key, "<total type=\"%s\"", type);
    const char *e = strstr(xml, key);
    assert_non_null(e);
    snprintf(key, sizeof key, " %s=\"", attr);
    const char *v = strstr(e, key);
    assert_non_null(v);
    assert_true(v < strchr(e, '\n'));
    unsigned long long n = strtoull(v + strlen(key), NULL, 10);
    free(xml);
    return n;
}

static void malloc_info_counts_large_blocks(void **state)
{
    (void)state;
    unsigned long long before = info_total("allocated", "size");
    void *big = p_malloc(10 << 20);
    assert_non_null(big);
    unsigned long long after = info_total("allocated", "size");
    assert_true(after - before >= malloc_usable_size(big));
    assert_true(after - before < malloc_usable_size(big) + (64 << 10));
    unsigned long long count = info_total("large", "count");
    free(big);
    assert_int_equal(count - info_total("large", "count"), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(snapshot_follows_allocations),
        cmocka_unit_test(largest_class_is_on_pages_one_byte_more_is_large),
        cmocka_unit_test(frees_after_the_heap_is_gone_count),
        cmocka_unit_test(large_realloc_after_the_heap_is_gone_counts),
        cmocka_unit_test(live_threads_are_kept_past_the_cap),
        cmocka_unit_test(frees_by_other_threads_count_while_the_owner_idles),
        cmocka_unit_test(classes_hold_no_more_than_their_blocks_under_churn),
        cmocka_unit_test(text_and_json_outputs),
        cmocka_unit_test(mallinfo2_counts_large_blocks_once),
        cmocka_unit_test(malloc_info_counts_large_blocks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
