/* resident_bytes follows what lumalloc touched, to 4 KiB, not whole slices: a page of a size
 * class carves 4 KiB at a time, and only what it carved counts.  Eight threads holding one block
 * in each of 40 classes used to count 320 pages' slices whole (~20 MiB) while the process's RSS
 * grew by ~1-2 MiB; now resident grows by about what RSS does.  A big class carving a page
 * of several slices counts the blocks it carved, and everything goes again with the purge. */
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
#include "internal.h"
#include "lumalloc.h"
#include "lumalloc_stats.h"

#define THREADS 8
#define NCLASSES 40

static void *(*volatile p_malloc)(size_t) = malloc;
static struct lum_stats s0, s1;
static unsigned classes[NCLASSES];
static void *blocks[THREADS][NCLASSES];
static pthread_barrier_t filled, measured;

static size_t rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long size = 0, res = 0;
    assert_non_null(f);
    assert_int_equal(fscanf(f, "%lu %lu", &size, &res), 2);
    fclose(f);
    return (size_t)res * (size_t)sysconf(_SC_PAGESIZE);
}

static void check_invariants(const struct lum_stats *s)
{
    assert_true(s->mapped >= s->resident);
    assert_true(s->resident >= s->active);
    assert_true(s->active >= s->allocated);
    assert_int_equal(s->mapped, s->resident + s->retained);
}

static void *holder(void *arg)
{
    void **mine = arg;
    for (unsigned i = 0; i < NCLASSES; i++) {
        size_t size = lum_class_size[classes[i]];
        mine[i] = p_malloc(size);
        if (!mine[i]) abort(); /* no cmocka asserts off the main thread */
        memset(mine[i], 0x5a, size); /* the program uses its blocks: RSS sees them */
    }
    pthread_barrier_wait(&filled);
    pthread_barrier_wait(&measured); /* alive (its pages its own) until the main thread looked */
    return NULL;
}

/* 8 threads x 40 classes, one block each: each class's page carves its first 4 KiB (or one
 * block of a class over 4 KiB), not its slices. */
static void many_classes_few_blocks(void **state)
{
    (void)state;
    /* 40 classes from 16 B to ~14 KiB, every other one past the first 16 */
    size_t per_thread_bound = 0, whole_slices = 0;
    for (unsigned i = 0; i < NCLASSES; i++) {
        classes[i] = i < 16 ? i : 16 + 2 * (i - 16);
        size_t bs = lum_class_size[classes[i]];
        per_thread_bound += bs <= 4096 ? 4096 : (bs + 4095) / 4096 * 4096;
        whole_slices += (size_t)lum_class_slices[classes[i]] * LUM_SLICE_SIZE;
    }
    assert_true(lum_class_size[classes[NCLASSES - 1]] < 16384);

    lum_purge();
    lum_stats_snapshot(&s0);
    check_invariants(&s0);
    size_t rss0 = rss_bytes();
    pthread_barrier_init(&filled, NULL, THREADS + 1);
    pthread_barrier_init(&measured, NULL, THREADS + 1);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) assert_int_equal(pthread_create(&t[i], NULL, holder, blocks[i]), 0);
    pthread_barrier_wait(&filled);
    lum_stats_snapshot(&s1);
    size_t rss1 = rss_bytes();
    check_invariants(&s1);
    int64_t grew = (int64_t)(s1.resident - s0.resident), rss_grew = (int64_t)rss1 - (int64_t)rss0;
    int64_t meta = (int64_t)(s1.metadata - s0.metadata) +
                   (int64_t)(s1.segments - s0.segments) * (int64_t)lum_seg_header_bytes(LUM_SEG_COLOURS - 1);
    int64_t bound = 2 * THREADS * (int64_t)per_thread_bound + meta;
    printf("# resident +%lld KiB (bound %lld KiB, metadata and headers %lld KiB; whole slices: %zu KiB), "
           "RSS +%lld KiB, active +%lld KiB, allocated +%lld KiB, %llu new segments\n",
           (long long)grew >> 10, (long long)bound >> 10, (long long)meta >> 10, THREADS * whole_slices >> 10,
           (long long)rss_grew >> 10, (long long)(s1.active - s0.active) >> 10,
           (long long)(s1.allocated - s0.allocated) >> 10, (unsigned long long)(s1.segments - s0.segments));
    assert_true(grew > 0);
    assert_true(grew <= bound);
    assert_true((size_t)grew * 8 < THREADS * whole_slices); /* far below the old figure */
    /* what lumalloc counts resident, the process has in RSS (thread stacks and all else on top) */
    assert_true(grew <= rss_grew + (256 << 10));
    assert_true(s1.active - s0.active <= (uint64_t)grew + (s0.resident - s0.active));
    pthread_barrier_wait(&measured);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    pthread_barrier_destroy(&filled);
    pthread_barrier_destroy(&measured);

    /* everything back: the exited threads' pages are reclaimed and purged */
    for (int i = 0; i < THREADS; i++)
        for (unsigned j = 0; j < NCLASSES; j++) free(blocks[i][j]);
    lum_purge();
    lum_stats_snapshot(&s1);
    check_invariants(&s1);
    printf("# after the frees and the purge: resident %+lld KiB from the start\n",
           (long long)(int64_t)(s1.resident - s0.resident) / 1024);
    assert_true((int64_t)(s1.resident - s0.resident) <= grew / 8);
}

/* One big class (48 KiB blocks, pages of several slices): resident follows the blocks carved,
 * into the second and third slice, and not the page's whole span.  A thread of its own carves
 * them, one at a time, and the main thread looks in between; once it freed them and exited,
 * the purge takes the page back. */
enum { BIG_N = 3 };
static size_t big_size;
static void *big[BIG_N];

static void *big_carver(void *arg)
{
    (void)arg;
    for (int i = 0; i < BIG_N; i++) {
        big[i] = p_malloc(big_size);
        if (big[i]) memset(big[i], 0xa5, big_size);
        pthread_barrier_wait(&filled);
        pthread_barrier_wait(&measured);
    }
    for (int i = 0; i < BIG_N; i++) free(big[i]);
    return NULL;
}

static void big_class_multi_slice_page(void **state)
{
    (void)state;
    unsigned cls = 0;
    while (lum_class_size[cls] < 48 << 10) cls++;
    size_t bs = big_size = lum_class_size[cls];
    assert_true(lum_class_slices[cls] > 1);
    lum_purge();
    lum_stats_snapshot(&s0);
    size_t rss0 = rss_bytes();
    pthread_barrier_init(&filled, NULL, 2);
    pthread_barrier_init(&measured, NULL, 2);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, big_carver, NULL), 0);
    int64_t prev = 0;
    size_t rss1 = 0, recorded = 0, end = 0;
    unsigned slices = 0;
    for (int i = 0; i < BIG_N; i++) {
        pthread_barrier_wait(&filled);
        assert_non_null(big[i]);
        lum_stats_snapshot(&s1);
        check_invariants(&s1);
        int64_t grew = (int64_t)(s1.resident - s0.resident);
        printf("# block %d: resident +%lld KiB, metadata +%lld KiB, %llu new segments\n", i, (long long)grew >> 10,
               (long long)(s1.metadata - s0.metadata) >> 10, (unsigned long long)(s1.segments - s0.segments));
        /* each block carved adds its own 4 KiB pages (the first, a segment's header too, maybe,
         * and the new thread's own few blocks from glibc and lumalloc: 64 KiB) */
        assert_true(grew >= prev + (int64_t)bs);
        assert_true(grew <= (int64_t)((i + 1) * ((bs + 4095) / 4096 * 4096)) + (int64_t)(s1.metadata - s0.metadata) +
                                (int64_t)(s1.segments - s0.segments) * (int64_t)lum_seg_header_bytes(LUM_SEG_COLOURS - 1) +
                                (64 << 10));
        prev = grew;
        if (i == BIG_N - 1) {
            rss1 = rss_bytes();
            /* the slices record the carve: whole slices up to the last block's end, then its part */
            struct lum_page *page = lum_page_of(big[0]);
            struct lum_segment *seg = lum_segment_of(page->start);
            unsigned idx = (unsigned)(((uintptr_t)page->start - (uintptr_t)lum_seg_base(seg)) >> LUM_SLICE_SHIFT);
            slices = page->slices;
            end = (size_t)page->carved * bs;
            for (unsigned j = 0; j < slices; j++) recorded += (size_t)seg->slice_touched[idx + j] * 4096;
        }
        pthread_barrier_wait(&measured);
    }
    pthread_join(t, NULL);
    pthread_barrier_destroy(&filled);
    pthread_barrier_destroy(&measured);
    printf("# %d blocks of %zu B on a page of %u slices: resident +%lld KiB (the slices: %zu KiB; carved %zu, "
           "recorded %zu), RSS +%lld KiB\n", BIG_N, bs, slices, (long long)prev >> 10,
           (size_t)slices * LUM_SLICE_SIZE >> 10, end, recorded, ((long long)rss1 - (long long)rss0) >> 10);
    assert_true(end >= BIG_N * bs && end > LUM_SLICE_SIZE * 2);
    assert_true(recorded >= end && recorded < end + 4096);
    assert_true(prev < (int64_t)slices * (int64_t)LUM_SLICE_SIZE);
    assert_true(prev <= (int64_t)rss1 - (int64_t)rss0 + (64 << 10));
    lum_purge();
    lum_stats_snapshot(&s1);
    check_invariants(&s1);
    printf("# after the frees and the purge: resident %+lld KiB from the start\n",
           (long long)(int64_t)(s1.resident - s0.resident) / 1024);
    assert_true((int64_t)(s1.resident - s0.resident) <= 16 << 10);
}

/* Every transition moves resident by what the slices' records gain or lose, and committed
 * (the old figure, for the heuristics) by whole slices: with the threads quiet, committed -
 * resident is exactly what the segments' slices not purged hold beyond their records.  A churn
 * of mixed sizes across threads (pages taken, spans inherited and trimmed, pages uncarved,
 * released, purged by decay) must leave it so, and the purge too. */
struct gap { int64_t whole, touched; };

static void add_gap(struct lum_segment *seg, void *arg)
{
    struct gap *g = arg;
    g->whole += (int64_t)__builtin_popcountll(~seg->purged_slices & ~(uint64_t)1) * (int64_t)LUM_SLICE_SIZE;
    for (unsigned i = 1; i < LUM_SLICES; i++) g->touched += (int64_t)seg->slice_touched[i] * 4096;
}

static void check_gap(const char *when)
{
    struct gap g = {0, 0};
    lum_segments_for_each(add_gap, &g);
    int64_t committed = (int64_t)__atomic_load_n(&lum_committed_bytes, __ATOMIC_RELAXED);
    int64_t resident = (int64_t)__atomic_load_n(&lumalloc_registry.global.resident_bytes, __ATOMIC_RELAXED);
    printf("# %s: resident %lld KiB, committed %lld KiB, slices not purged %lld KiB, recorded %lld KiB\n", when,
           (long long)resident >> 10, (long long)committed >> 10, (long long)g.whole >> 10, (long long)g.touched >> 10);
    assert_true(g.touched <= g.whole);
    assert_int_equal(committed - resident, g.whole - g.touched);
}

#define CHURN_THREADS 4
#define CHURN_SLOTS 2048
static void *churn_slots[CHURN_THREADS][CHURN_SLOTS];

static void *churner(void *arg)
{
    void **slots = arg;
    uint64_t x = (uintptr_t)arg * 2654435761u | 1;
    for (int round = 0; round < 60000; round++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        unsigned i = (unsigned)(x % CHURN_SLOTS);
        /* now and then a block of the next thread's, freed from here */
        void **at = (x >> 40) % 16 == 0 ? &churn_slots[((void **)arg - churn_slots[0]) / CHURN_SLOTS == CHURN_THREADS - 1 ? 0 : ((void **)arg - churn_slots[0]) / CHURN_SLOTS + 1][i] : &slots[i];
        void *old = __atomic_exchange_n(at, NULL, __ATOMIC_ACQ_REL);
        free(old);
        unsigned kind = (unsigned)(x >> 20) % 16;
        size_t size = kind < 10 ? 16 + (x >> 24) % 1024 : kind < 15 ? 1024 + (x >> 24) % 30000 : 32768 + (x >> 24) % 200000;
        void *p = p_malloc(size);
        if (!p) abort();
        memset(p, 1, size < 256 ? size : 256);
        old = __atomic_exchange_n(&slots[i], p, __ATOMIC_ACQ_REL);
        free(old);
        if (round % 20000 == 19999) {
            /* a phase dropping half its blocks */
            for (unsigned j = 0; j < CHURN_SLOTS; j += 2) free(__atomic_exchange_n(&slots[j], NULL, __ATOMIC_ACQ_REL));
        }
    }
    return NULL;
}

static void accounting_stays_exact(void **state)
{
    (void)state;
    check_gap("at the start");
    pthread_t t[CHURN_THREADS];
    for (int i = 0; i < CHURN_THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, churner, churn_slots[i]), 0);
    for (int i = 0; i < CHURN_THREADS; i++) pthread_join(t[i], NULL);
    check_gap("after the churn");
    lum_stats_snapshot(&s1);
    check_invariants(&s1);
    for (int i = 0; i < CHURN_THREADS; i++)
        for (unsigned j = 0; j < CHURN_SLOTS; j++) {
            free(churn_slots[i][j]);
            churn_slots[i][j] = NULL;
        }
    check_gap("after the frees");
    lum_purge();
    check_gap("after the purge");
    lum_stats_snapshot(&s1);
    check_invariants(&s1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(many_classes_few_blocks),
        cmocka_unit_test(big_class_multi_slice_page),
        cmocka_unit_test(accounting_stays_exact),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
