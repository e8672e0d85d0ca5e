/* Threads: cross-thread frees with every block's contents checked, thread churn with bounded
 * RSS, fork while other threads allocate, and exact per-thread counters. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include "test_support.h"
#include "lumalloc.h"
#include "lumalloc_probes.h"
#include "lumalloc_stats.h"
#include "internal.h" /* lum_page_of: which blocks are sampled */

extern struct lum_registry_v1 lumalloc_registry;

static void *(*volatile p_malloc)(size_t) = malloc;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- 8 threads, random cross-thread frees through shared slots ---- */

#define THREADS 8
#define SLOTS 4096

struct slot { _Atomic(unsigned char *) p; };
static struct slot slots[SLOTS];
static _Atomic int stop_flag;
static _Atomic long corrupt, ops_total;

/* A block carries its own size and a pattern derived from its address: any overlap between
 * two live blocks, or a block handed out twice, breaks the pattern. */
static unsigned char *make_block(size_t n)
{
    unsigned char *p = p_malloc(n);
    if (!p) return NULL;
    memcpy(p, &n, sizeof n);
    for (size_t i = sizeof n; i < n; i++) p[i] = (unsigned char)(((uintptr_t)p >> 4) + i);
    return p;
}

static void check_and_free(unsigned char *p)
{
    size_t n;
    memcpy(&n, p, sizeof n);
    for (size_t i = sizeof n; i < n; i++)
        if (p[i] != (unsigned char)(((uintptr_t)p >> 4) + i)) { corrupt++; break; }
    free(p);
}

static void *churn(void *arg)
{
    uint64_t rng = (uintptr_t)arg * 0x9e3779b97f4a7c15ULL + 1;
    long ops = 0;
    while (!stop_flag) {
        uint64_t r = xorshift(&rng);
        size_t n = 8 + (r >> 40) % (r & 1 ? 200 : 9000);
        if ((r & 0xff) == 7) n = 300000 + (r >> 20) % 200000; /* an occasional large block */
        unsigned char *mine = make_block(n);
        unsigned char *old = atomic_exchange(&slots[(r >> 8) % SLOTS].p, mine);
        if (old) check_and_free(old); /* usually another thread's block */
        ops++;
    }
    ops_total += ops;
    return NULL;
}

static void cross_thread_frees_keep_contents(void **state)
{
    (void)state;
    pthread_t t[THREADS];
    stop_flag = 0;
    for (long i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, churn, (void *)(i + 1));
    uint64_t end = now_ns() + 3000000000ull;
    while (now_ns() < end) usleep(20000);
    stop_flag = 1;
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < SLOTS; i++) {
        unsigned char *p = atomic_exchange(&slots[i].p, NULL);
        if (p) check_and_free(p);
    }
    printf("# %ld operations, %ld corrupt blocks\n", (long)ops_total, (long)corrupt);
    assert_int_equal(corrupt, 0);
    assert_true(ops_total > 10000);
    assert_int_equal(lum_heap_check(1), 0);
}

/* ---- 10,000 short-lived threads: RSS stays bounded ---- */

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld", &kib) == 1) break;
    if (f) fclose(f);
    return kib;
}

static void *short_lived(void *arg)
{
    /* leaves some blocks alive for the next thread to free: pages get abandoned and adopted */
    void **keep = arg;
    void *mine[64];
    for (int i = 0; i < 64; i++) mine[i] = p_malloc(16 + (size_t)i * 40);
    for (int i = 0; i < 64; i += 2) free(mine[i]);
    free(*keep);
    *keep = mine[1];
    for (int i = 3; i < 64; i += 2) free(mine[i]);
    return NULL;
}

static void thread_churn_keeps_rss_bounded(void **state)
{
    (void)state;
    void *keep = NULL;
    long before = rss_kib(), peak = before;
    for (int i = 0; i < 10000; i++) {
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, short_lived, &keep), 0);
        pthread_join(t, NULL);
        if (i % 500 == 0) {
            long r = rss_kib();
            if (r > peak) peak = r;
        }
    }
    free(keep);
    long after = rss_kib();
    printf("# RSS before %ld KiB, peak %ld KiB, after %ld KiB over 10000 threads\n", before, peak, after);
    /* the bound: 16 MiB over the starting RSS, whatever the number of threads */
    assert_true(peak - before < 16 * 1024);
    assert_int_equal(lum_heap_check(1), 0);
}

/* ---- pages of exited threads serve the next thread of the same class ---- */

/* the first size: a class the other tests here never use (they leave pages of theirs about) */
#define HANDOVER_CLASSES 12
#define HANDOVER_BLOCKS 4
#define HANDOVER_THREADS 400
static const size_t handover_sizes[HANDOVER_CLASSES] = {12288, 48, 112, 208, 416, 832, 1664, 2560, 64, 160, 320, 640};

struct handover {
    uint64_t rng;
    void *keep[HANDOVER_CLASSES];
    uintptr_t slices[HANDOVER_THREADS * HANDOVER_BLOCKS]; /* those the first class's blocks used */
    int nslices;
};

/* Sampled blocks live on the sampled pages, shared by every thread (sampled.c), not the
 * handed-over pages: not counted. */
static void note_slice(struct handover *h, void *p)
{
    if (lum_page_of(p)->kind == LUM_PAGE_SAMPLED) return;
    uintptr_t s = (uintptr_t)p >> 16;
    for (int i = 0; i < h->nslices; i++)
        if (h->slices[i] == s) return;
    h->slices[h->nslices++] = s;
}

static void *hand_over(void *arg)
{
    struct handover *h = arg;
    int order[HANDOVER_CLASSES];
    for (int i = 0; i < HANDOVER_CLASSES; i++) order[i] = i;
    for (int i = HANDOVER_CLASSES - 1; i > 0; i--) { /* a new order of first use every time */
        int j = (int)(xorshift(&h->rng) % (uint64_t)(i + 1)), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    for (int k = 0; k < HANDOVER_CLASSES; k++) {
        int c = order[k];
        void *mine[HANDOVER_BLOCKS];
        for (int i = 0; i < HANDOVER_BLOCKS; i++) {
            mine[i] = p_malloc(handover_sizes[c]);
            memset(mine[i], c, handover_sizes[c]);
            if (c == 0) note_slice(h, mine[i]);
        }
        /* one block of the others outlives the thread (the main thread frees it); the first
         * class's page is empty when the thread exits */
        h->keep[c] = c ? mine[0] : NULL;
        for (int i = c ? 1 : 0; i < HANDOVER_BLOCKS; i++) free(mine[i]);
    }
    return NULL;
}

/* Each thread's pages are abandoned at its exit, empty or with one live block that the main
 * thread then frees (adopting the page and, as it does not allocate from that class, handing
 * it back empty).  The next thread must find those pages again, whatever order it uses its
 * classes in: if an empty page went back to its segment instead, the next thread's first class
 * would take its slice, and over many threads every class would touch every slice (RSS
 * creeping over whole segments). */
static void exited_threads_pages_serve_the_next_thread(void **state)
{
    (void)state;
    static struct handover h = { .rng = 0x9e3779b97f4a7c15ULL };
    for (int i = 0; i < HANDOVER_THREADS; i++) {
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, hand_over, &h), 0);
        pthread_join(t, NULL);
        for (int c = 1; c < HANDOVER_CLASSES; c++) {
            assert_int_equal(((unsigned char *)h.keep[c])[1], c);
            free(h.keep[c]);
        }
    }
    printf("# %d threads: blocks of %zu B were in %d distinct 64 KiB slices\n", HANDOVER_THREADS,
           handover_sizes[0], h.nslices);
    /* one page serves them all */
    assert_true(h.nslices <= 1);
    assert_int_equal(lum_heap_check(1), 0);
}

/* ---- fork while other threads allocate ---- */

static void *allocate_forever(void *arg)
{
    (void)arg;
    uint64_t rng = 42;
    void *ring[128] = { 0 };
    while (!stop_flag) {
        uint64_t r = xorshift(&rng);
        free(ring[r % 128]);
        ring[r % 128] = p_malloc(r & 1 ? r % 5000 : 9000 + r % 60000); /* pages of 1-16 slices */
    }
    for (int i = 0; i < 128; i++) free(ring[i]);
    return NULL;
}

static void fork_under_load(void **state)
{
    (void)state;
    pthread_t t[4];
    stop_flag = 0;
    for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, allocate_forever, NULL);
    for (int round = 0; round < 200; round++) { /* a child once met a torn list 1 fork in ~500 */
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            /* the child: allocate, free, check, and exit cleanly */
            void *v[1000];
            for (int i = 0; i < 1000; i++) v[i] = make_block(8 + (size_t)i * 13);
            for (int i = 0; i < 1000; i++) check_and_free(v[i]);
            v[0] = NULL; /* short_lived frees what it is handed: not a block freed already */
            pthread_t ct;
            pthread_create(&ct, NULL, short_lived, &v[0]);
            pthread_join(ct, NULL);
            if (corrupt) _exit(3);
            if (lum_heap_check(1)) _exit(4);
            _exit(0);
        }
        int status = 0;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fail_msg("fork child %d: %s %d", round, WIFEXITED(status) ? "exit" : "signal",
                     WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
    }
    stop_flag = 1;
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
}

/* ---- exact per-thread counters ---- */

struct counted { struct lum_thread_counters_v1 *tc; uint64_t bytes; };

static void *count_me(void *arg)
{
    struct counted *c = arg;
    uint32_t tid = (uint32_t)gettid();
    void *v[100];
    for (int i = 0; i < 100; i++) {
        v[i] = p_malloc(100);
        c->bytes += malloc_usable_size(v[i]);
    }
    for (int i = 0; i < 100; i++) free(v[i]);
    for (struct lum_thread_counters_v1 *tc = (void *)(uintptr_t)lumalloc_registry.threads_head; tc;
         tc = (void *)(uintptr_t)tc->next)
        if (tc->tid == tid && tc->state == LUM_THREAD_LIVE) c->tc = tc;
    return NULL;
}

static void per_thread_counters_are_exact(void **state)
{
    (void)state;
    struct counted c = { 0 };
    pthread_t t;
    pthread_create(&t, NULL, count_me, &c);
    pthread_join(t, NULL);
    assert_non_null(c.tc);
    assert_int_equal(lumalloc_registry.magic, LUM_REGISTRY_MAGIC);
    /* after exit the record holds the thread's final figures (until a new thread reuses it) */
    assert_int_equal(c.tc->state, LUM_THREAD_EXITED);
    assert_int_equal(c.tc->alloc_count, 100);
    assert_int_equal(c.tc->free_count, 100);
    assert_int_equal(c.tc->alloc_bytes, c.bytes);
    assert_int_equal(c.tc->free_bytes, c.bytes);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(per_thread_counters_are_exact),
        cmocka_unit_test(cross_thread_frees_keep_contents),
        cmocka_unit_test(thread_churn_keeps_rss_bounded),
        cmocka_unit_test(exited_threads_pages_serve_the_next_thread),
        cmocka_unit_test(fork_under_load),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
