/* Which page a thread takes blocks from when its current page runs out: blocks that came back
 * to its other pages (by its own frees or by other threads') before memory it never touched;
 * and what an emptied page keeps resident.
 * Its own process: the tests count on the classes they use having no pages from elsewhere. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>
#include <cmocka.h>
#include "internal.h"
#include "lumalloc.h"
#include "lumalloc_options.h"
#include "test_support.h"

static void *(*volatile p_malloc)(size_t) = malloc;

#define MAXB 4096
static void *blocks[MAXB];

/* Allocates size-byte blocks until one lands on a new page; returns how many were allocated
 * (blocks[0..n)), the last being the first block of the new page. */
static int fill_until_new_page(size_t size)
{
    return fill_until_new_page_in(blocks, MAXB, p_malloc, size, 0);
}

struct frees { void **list; int n; };

static void *free_them(void *arg)
{
    struct frees *f = arg;
    for (int i = 0; i < f->n; i++) free(f->list[i]);
    return NULL;
}

/* Another thread frees half of a full page's blocks (remote frees: they wait on the page's own
 * list until the owner collects it).  When the owner's current page runs out of carved blocks,
 * it takes those before carving further into the current page. */
static void remote_frees_are_reused_before_fresh_carving(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0); /* no block on a sampled page */
    const size_t size = 240;
    int n = fill_until_new_page(size);
    struct lum_page *full = lum_page_of(blocks[0]), *cur = lum_page_of(blocks[n - 1]);
    assert_ptr_not_equal(full, cur);
    static void *freed[MAXB];
    int nf = 0;
    for (int i = 0; i < n - 1; i += 2) freed[nf++] = blocks[i];
    assert_true(nf >= 64);
    struct frees f = { freed, nf };
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, free_them, &f), 0);
    pthread_join(t, NULL);
    /* one carve of the current page (4 KiB), then the freed blocks */
    int on_full = 0;
    static void *again[128];
    for (int i = 0; i < 128; i++) {
        again[i] = p_malloc(size);
        if (lum_page_of(again[i]) == full) on_full++;
    }
    printf("# %d of 128 allocations reused the %d blocks freed by another thread; the current page "
           "carved %u of %u\n", on_full, nf, cur->carved, cur->capacity);
    assert_true(on_full >= 64);
    assert_true(cur->carved < cur->capacity / 2);
    for (int i = 0; i < 128; i++) free(again[i]);
    for (int i = 1; i < n; i += 2) free(blocks[i]);
    if (!((n - 1) & 1)) free(blocks[n - 1]);
    lum_options_set("sample_interval", "512k");
}

/* A block of the size that the sampler took (the interval is set to 1 byte: the next one is). */
static char *sampled_block(size_t size)
{
    for (int i = 0; i < 100; i++) {
        char *p = p_malloc(size);
        assert_non_null(p);
        if (lum_page_of(p)->kind == LUM_PAGE_SAMPLED) return p;
        free(p);
    }
    fail_msg("no sampled block of %zu B", size);
    return NULL;
}

/* A sampled block over 64 KiB (a page of its own) goes back to its segment at its free, its
 * memory left resident for the next page to take its slices (span_kept): kept as the class's
 * empty sampled page and uncarved 20 ms later, it held its slices out of the ordinary pages'
 * reach and came back faulted in at the next sample (python3: 14% more page faults with default
 * sampling).  A purge gives it back.  A smaller one's page keeps its carved blocks. */
static void emptied_sampled_page_keeps_memory_under_128k(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "1"), 0); /* every allocation sampled */
    const size_t big = 100000, small = 2000;
    char *p = sampled_block(big), *q = sampled_block(small);
    struct lum_page *sp = lum_page_of(q);
    memset(p, 1, big);
    memset(q, 1, small);
    assert_true(resident_bytes(p, big) >= big);
    uintptr_t pa = (uintptr_t)p;
    struct lum_segment *seg = lum_segment_of(p);
    unsigned slice = (unsigned)((pa - (uintptr_t)lum_seg_base(seg)) >> LUM_SLICE_SHIFT);
    free(p);
    free(q);
    size_t at_once = resident_bytes((void *)(pa + 4096), big - 4096);
    /* past the delay that empty pages of several blocks wait, at the next sampled free */
    usleep(50 * 1000);
    free(sampled_block(small));
    lum_options_set("sample_interval", "0");
    size_t left = resident_bytes((void *)(pa + 4096), big - 4096);
    bool slice_free = seg->free_slices >> slice & 1;
    printf("# after the free: %zu bytes of the %zu B block resident at once, %zu 50 ms later (its "
           "first slice %s), small block's page carved %u\n", at_once, big, left,
           slice_free ? "free" : "taken again", sp->carved);
    assert_true(at_once >= big - 8192);
    assert_true(left >= big - 8192);
    /* and gone on a purge */
    assert_int_equal(lum_options_set("sample_interval", "1"), 0);
    char *r = sampled_block(big);
    memset(r, 1, big);
    lum_options_set("sample_interval", "0");
    volatile uintptr_t ra = (uintptr_t)r;
    free(r);
    lum_purge();
    size_t purged_left = resident_bytes((void *)(ra + 4096), big - 4096);
    printf("# a second one, after lum_purge(): %zu bytes resident\n", purged_left);
    assert_int_equal(purged_left, 0);
    assert_true(sp->carved > 0);
    /* under 128 KiB the page keeps the block's memory for the class's next sample: a ring of
     * 16-64 KiB buffers otherwise faulted a sampled page in again every few samples */
    assert_int_equal(lum_options_set("sample_interval", "1"), 0);
    const size_t mid = 20000;
    char *m = sampled_block(mid);
    memset(m, 1, mid);
    lum_options_set("sample_interval", "0");
    volatile uintptr_t ma = (uintptr_t)m; /* an address to look at, not a pointer to use */
    free(m);
    size_t kept = resident_bytes((void *)ma, mid);
    printf("# a sampled block of %zu B: %zu bytes resident after its free\n", mid, kept);
    assert_true(kept >= mid);
    lum_options_set("sample_interval", "512k");
}

/* A thread's empty spare page of blocks over 16 KiB keeps what its blocks touched, and the
 * class's next blocks reuse it without faulting it in again: these pages were uncarved once,
 * and a FIFO ring of 32 KiB blocks then faulted at every page (1.56M faults in 2M steps). */
static long minor_faults(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_minflt;
}

static void emptied_big_spare_page_keeps_its_memory(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    const size_t size = 40000;
    int n = fill_until_new_page(size);
    for (int i = 0; i < n; i++) memset(blocks[i], 1, size);
    struct lum_page *first = lum_page_of(blocks[0]), *cur = lum_page_of(blocks[n - 1]);
    assert_ptr_not_equal(first, cur);
    uintptr_t a[MAXB];
    for (int i = 0; i < n; i++) a[i] = (uintptr_t)blocks[i];
    size_t before = 0, after_first = 0, on_first = 0;
    for (int i = 0; i < n; i++) before += resident_bytes((void *)a[i], size);
    for (int i = 0; i < n - 1; i++) on_first += resident_bytes((void *)a[i], size);
    for (int i = 0; i < n - 1; i++) free(blocks[i]); /* the first page empties: kept as a spare */
    for (int i = 0; i < n - 1; i++) after_first += resident_bytes((void *)a[i], size);
    printf("# %d blocks of %zu B: %zu KiB resident, %zu KiB of the first page's %zu KiB once it "
           "emptied (%s)\n", n, size, before >> 10, after_first >> 10, on_first >> 10,
           first->slices ? "kept" : "released");
    assert_true(before >= (size_t)n * size);
    assert_int_equal(after_first, on_first);
    free(blocks[n - 1]);
    /* A ring of such blocks, oldest freed first, written whole: its pages empty and fill in
     * turn, and no step faults memory in again once the ring has gone round. */
    enum { RING = 24, STEPS = 2000 };
    static char *ring[RING];
    for (int i = 0; i < RING; i++) memset(ring[i] = p_malloc(size), 1, size);
    for (int i = 0; i < 2 * RING; i++) {
        free(ring[i % RING]);
        memset(ring[i % RING] = p_malloc(size), 2, size);
    }
    long f0 = minor_faults();
    for (int i = 0; i < STEPS; i++) {
        free(ring[i % RING]);
        memset(ring[i % RING] = p_malloc(size), 3, size);
    }
    long faults = minor_faults() - f0;
    printf("# a ring of %d blocks of %zu B: %ld page faults in %d steps\n", RING, size, faults, STEPS);
    assert_true(faults < STEPS / 20);
    for (int i = 0; i < RING; i++) free(ring[i]);
    lum_options_set("sample_interval", "512k");
}

/* A ring of 150 KB buffers, written whole, under default sampling (a 512 KiB mean interval:
 * about a quarter of blocks this big are sampled).  A sampled block lives on a sampled page,
 * so the ring's ordinary pages (six blocks each) empty and are taken again as the count of
 * live sampled blocks swings, and the sampled pages likewise.  The spans of pages of blocks
 * over 16 KiB stay resident for the class's next page while it takes them back (segment.c,
 * keep_big_span): 0.05-0.5 faults a step.  Returned at once, as they were, 5.2-5.5 of the 37
 * pages written a step faulted in again (at 250 KB, 2.2x the time of sampling off). */
static void ring_of_big_blocks_under_sampling_keeps_its_spans(void **state)
{
    (void)state;
    enum { RING = 128, WARM = 20 * RING, STEPS = 6000 };
    const size_t size = 150000;
    static char *ring[RING];
    assert_int_equal(lum_options_set("sample_interval", "512k"), 0);
    for (int i = 0; i < WARM; i++) {
        if (i >= RING) free(ring[i % RING]);
        assert_non_null(ring[i % RING] = p_malloc(size));
        memset(ring[i % RING], 1, size);
    }
    long f0 = minor_faults();
    int sampled = 0;
    for (int i = 0; i < STEPS; i++) {
        free(ring[i % RING]);
        assert_non_null(ring[i % RING] = p_malloc(size));
        sampled += lum_page_of(ring[i % RING])->kind == LUM_PAGE_SAMPLED;
        memset(ring[i % RING], 2, size);
    }
    long faults = minor_faults() - f0;
    printf("# a ring of %d blocks of %zu B, %d of %d steps sampled: %ld page faults (%.2f a step, "
           "of %zu pages written)\n", RING, size, sampled, STEPS, faults, (double)faults / STEPS,
           (size + 4095) / 4096);
    assert_true(sampled > STEPS / 8);
    assert_true(faults < 2 * STEPS);
    for (int i = 0; i < RING; i++) free(ring[i]);
}

/* A ring of I/O buffers of 64-256 KiB, each written whole, under default sampling (the loop of
 * bench/src/buffers.c).  Blocks over 64 KiB have a page each, and a freed one's span serves
 * the next page of any big class as it is: once the ring has gone round, what a step writes
 * was written before: 0.01-0.03 faults a step.  On pages of 4-6 blocks, each class held the
 * pages its count of live blocks had swung up to, and their 0.5-1 MiB spans fitted no other
 * class's page, nor did the 256 KiB blocks' own mappings: 0.45-1.15 faults a step. */
static void ring_of_mixed_buffers_reuses_freed_spans(void **state)
{
    (void)state;
    enum { RING = 64, WARM = 20 * RING, STEPS = 4000 };
    static const size_t sizes[] = {65537, 100000, 131072, 200000, 262144};
    static char *ring[RING];
    assert_int_equal(lum_options_set("sample_interval", "512k"), 0);
    uint64_t x = 88172645463325252ull;
    long f0 = 0, pages = 0;
    for (int i = 0; i < WARM + STEPS; i++) {
        if (i == WARM) f0 = minor_faults();
        if (i >= RING) free(ring[i % RING]);
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        size_t size = sizes[x % (sizeof sizes / sizeof sizes[0])];
        assert_non_null(ring[i % RING] = p_malloc(size));
        memset(ring[i % RING], i, size);
        if (i >= WARM) pages += (long)((size + 4095) / 4096);
    }
    long faults = minor_faults() - f0;
    printf("# a ring of %d buffers of 64-256 KiB: %ld page faults in %d steps (%.2f a step, of "
           "%.1f pages written)\n", RING, faults, STEPS, (double)faults / STEPS, (double)pages / STEPS);
    assert_true(faults < STEPS / 8);
    for (int i = 0; i < RING; i++) free(ring[i]);
}

/* A page of one block (over 64 KiB) is full once its block is out, and parks with nothing to
 * wait for: its block's free empties it, and it is kept for the class's next block like any
 * emptied page, not sent back to its segment at every free (a trip through the segment lock
 * and a walk over the segments, a third of lumalloc's own instructions in bench buffers). */
static void emptied_one_block_page_is_kept_for_its_class(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    lum_purge(); /* the heap's budget for kept pages (LUM_RETAIN_EMPTY_BYTES) free again */
    const size_t size = 120000;
    char *a = p_malloc(size), *b = p_malloc(size);
    struct lum_page *pa = lum_page_of(a);
    assert_int_equal(pa->capacity, 1);
    assert_ptr_not_equal(pa, lum_page_of(b));
    free(a);
    printf("# an emptied page of one %zu B block: %s\n", size,
           !pa->slices ? "back to its segment" : pa->retained ? "kept by its heap" : "on its heap's lists");
    assert_true(pa->slices && pa->retained);
    char *c = p_malloc(size);
    assert_ptr_equal(c, a);
    free(b);
    free(c);
    lum_options_set("sample_interval", "512k");
}

/* Pages of one class emptied by another thread's frees go back to their segment when the
 * owner needs a page for another class (the scan runs once the owner has collected a slice's
 * worth of such frees), instead of staying resident for a class that may not need them. */
static void remotely_emptied_pages_go_back_for_other_classes(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "0"), 0);
    const size_t a = 1100, b = 1150; /* classes 1120 and 1184, unused so far */
    struct lum_page *pages[4];
    int first[5], n = 0, np = 0;
    while (np < 4 && n < MAXB) {
        blocks[n] = p_malloc(a);
        struct lum_page *pg = lum_page_of(blocks[n]);
        if (np == 0 || pg != pages[np - 1]) {
            first[np] = n;
            pages[np++] = pg;
        }
        n++;
    }
    assert_int_equal(np, 4);
    first[4] = n;
    /* another thread frees every block of the first three pages */
    struct frees f = { blocks, first[3] };
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, free_them, &f), 0);
    pthread_join(t, NULL);
    /* the owner takes the freed blocks of two of them back (collecting two slices' worth)... */
    static void *again[MAXB];
    int m = first[2] - first[0]; /* the fourth page's carved blocks, then the first two pages */
    for (int i = 0; i < m; i++) again[i] = p_malloc(a);
    /* one of the three still holds the other thread's frees, uncollected: empty once they are */
    int idle = -1;
    for (int k = 0; k < 3; k++)
        if (lum_tls_heap->current[pages[k]->cls] != pages[k] && (lum_page_collect(pages[k]), pages[k]->used == 0))
            idle = k;
    assert_true(idle >= 0);
    struct lum_page *page = pages[idle];
    /* ...and needs a page for another class: the empty one is given back */
    void *other = p_malloc(b);
    struct lum_page *now = lum_page_of(blocks[first[idle]]);
    printf("# after a page of %zu B was needed, the emptied page of %zu B blocks is %s\n", b, a,
           now != page ? "free" : now->cls != lum_size_class(a) ? "reused by another class" : "still kept");
    assert_false(now == page && page->slices && page->cls == lum_size_class(a));
    free(other);
    for (int i = 0; i < m; i++) free(again[i]);
    for (int i = first[3]; i < n; i++) free(blocks[i]);
    lum_options_set("sample_interval", "512k");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(remote_frees_are_reused_before_fresh_carving),
        cmocka_unit_test(emptied_sampled_page_keeps_memory_under_128k),
        cmocka_unit_test(emptied_big_spare_page_keeps_its_memory),
        cmocka_unit_test(ring_of_big_blocks_under_sampling_keeps_its_spans),
        cmocka_unit_test(ring_of_mixed_buffers_reuses_freed_spans),
        cmocka_unit_test(emptied_one_block_page_is_kept_for_its_class),
        cmocka_unit_test(remotely_emptied_pages_go_back_for_other_classes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
