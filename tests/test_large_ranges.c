/* The large-block cache of freed address ranges under a randomized load: 4 threads malloc /
 * calloc / realloc (grow and shrink) / posix_memalign / aligned_alloc / memalign / free large
 * blocks (256 KiB .. 12 MiB, alignments up to 8 MiB), about two frees in five on another thread
 * (blocks handed over through shared slots).  Every page of every block carries a stamp of its
 * block and page, checked before each realloc and free: two blocks that share a range, a range
 * cached twice, or a grown block that lost its pages would show as a wrong stamp; every calloc
 * is checked for zeroes (recycled ranges are dirty: every byte handed out is written).  Once
 * everything is freed and lum_purge() has emptied the cache, the global figures (mapped,
 * resident, live large bytes) and the cache's byte count are back at their baseline.  A second
 * run does the same with address space limited (RLIMIT_AS), so that mmap and mremap fail on the
 * way (moves into the cache, growth, fresh blocks): the failures must leave the cache and the
 * accounting consistent.  And a second free of a large block is still caught (harden on) when
 * its range was cut off by realloc, left by a copying realloc, or cut up by a neighbour's
 * growth.  Everything goes through the lum_* API, so the test also runs under
 * ThreadSanitizer (tests/integration/core_sanitizers.sh). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include "test_support.h"
#include "lumalloc.h"
#include "lumalloc_options.h"
#include "lumalloc_stats.h"


extern size_t lum_large_cached; /* lib/large.c: bytes of freed ranges held */

#define THREADS 4
#define SLOTS 12
#define SHARED 8
#define PAGE 4096u

struct blk {
    unsigned char *p;
    size_t n;        /* requested */
    size_t align;    /* 0: not an aligned allocation */
    uint64_t tag;
};

static _Atomic(struct blk *) shared[SHARED];

/* Records of handed-over blocks: from a pool, so that the load allocates large blocks only
 * (the accounting checked is the large path's). */
static struct blk records[THREADS + SHARED], *spare_records[THREADS + SHARED];
static int nspare;
static pthread_mutex_t records_lock = PTHREAD_MUTEX_INITIALIZER;

static struct blk *record_get(void)
{
    pthread_mutex_lock(&records_lock);
    struct blk *d = nspare ? spare_records[--nspare] : NULL;
    pthread_mutex_unlock(&records_lock);
    return d;
}

static void record_put(struct blk *d)
{
    pthread_mutex_lock(&records_lock);
    spare_records[nspare++] = d;
    pthread_mutex_unlock(&records_lock);
}
static _Atomic long errors, refusals;
static char first_error[256];
static pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;

static void error(const char *fmt, ...)
{
    if (atomic_fetch_add(&errors, 1) == 0) {
        va_list ap;
        va_start(ap, fmt);
        pthread_mutex_lock(&err_lock);
        vsnprintf(first_error, sizeof first_error, fmt, ap);
        pthread_mutex_unlock(&err_lock);
        va_end(ap);
    }
}

static uint64_t stamp(uint64_t tag, size_t page) { return tag * 0x9e3779b97f4a7c15ULL ^ page; }

/* Fills bytes [from, n) of the block: a byte of its tag everywhere, the stamp at each page. */
static void fill(struct blk *b, size_t from)
{
    if (from >= b->n) return;
    memset(b->p + from, (int)(b->tag & 0xff) | 1, b->n - from);
    /* a page whose stamp did not fit below from gets it now */
    for (size_t off = from > 8 ? (from - 8) / PAGE * PAGE + PAGE : 0; off + 8 <= b->n; off += PAGE)
        memcpy(b->p + off, &(uint64_t){ stamp(b->tag, off / PAGE) }, 8);
}

/* Checks bytes [0, n) as fill left them (n <= b->n). */
static void check(const struct blk *b, size_t n, const char *when)
{
    unsigned char byte = (unsigned char)((b->tag & 0xff) | 1);
    for (size_t off = 0; off < n; off += PAGE) {
        if (off + 8 <= n) {
            uint64_t v;
            memcpy(&v, b->p + off, 8);
            if (v != stamp(b->tag, off / PAGE)) {
                error("%s: block %p (%zu B) page %zu stamped %#llx", when, (void *)b->p, b->n,
                      off / PAGE, (unsigned long long)v);
                return;
            }
        }
        size_t last = off + PAGE - 1 < n ? off + PAGE - 1 : n - 1;
        if (last >= off + 8 && b->p[last] != byte) {
            error("%s: block %p (%zu B) byte %zu is %#x", when, (void *)b->p, b->n, last, b->p[last]);
            return;
        }
    }
}

static size_t pick_size(uint64_t *rng)
{
    /* 256 KiB .. 12 MiB, about as many of each power of two */
    unsigned shift = 18 + (unsigned)(xorshift(rng) % 6);
    size_t n = ((size_t)1 << shift) + xorshift(rng) % ((size_t)1 << shift);
    return n > (12u << 20) ? 12u << 20 : n;
}

static void release(struct blk *b)
{
    check(b, b->n, "free");
    lum_free(b->p);
    b->p = NULL;
}

/* One allocation into b; false when the allocator said no (allowed under a limit). */
static bool allocate(struct blk *b, uint64_t *rng, uint64_t tag)
{
    static const size_t aligns[] = { 4096, 8192, 65536, 1 << 20, 4 << 20, 8 << 20 };
    b->n = pick_size(rng);
    b->align = 0;
    b->tag = tag;
    unsigned op = (unsigned)(xorshift(rng) % 10);
    if (op < 5) {
        b->p = lum_malloc(b->n);
    } else if (op < 7) {
        size_t m = 1 + xorshift(rng) % 64;
        b->n = b->n / m * m;
        b->p = lum_calloc(b->n / m, m);
        if (b->p)
            for (size_t off = 0; off < b->n; off += 64)
                if (b->p[off] || b->p[b->n - 1]) {
                    error("calloc: block %p (%zu B) byte %zu not zero", (void *)b->p, b->n, off);
                    break;
                }
    } else {
        b->align = aligns[xorshift(rng) % (sizeof aligns / sizeof aligns[0])];
        void *p = NULL;
        if (op == 7) {
            if (lum_posix_memalign(&p, b->align, b->n) != 0) p = NULL;
        } else if (op == 8) {
            b->n = (b->n + b->align - 1) / b->align * b->align;
            p = lum_aligned_alloc(b->align, b->n);
        } else {
            p = lum_memalign(b->align, b->n);
        }
        b->p = p;
        if (p && ((uintptr_t)p & (b->align - 1)))
            error("aligned: %p not aligned to %zu", p, b->align);
    }
    if (!b->p) {
        atomic_fetch_add(&refusals, 1);
        return false;
    }
    fill(b, 0);
    return true;
}

static void resize(struct blk *b, uint64_t *rng)
{
    check(b, b->n, "realloc");
    /* 0.3x .. 2.5x: shrinks that cut tails off, growths by less and more than a quarter */
    size_t n = b->n * (3 + xorshift(rng) % 23) / 10;
    if (n < (256u << 10)) n = 256u << 10;
    unsigned char *q = lum_realloc(b->p, n);
    if (!q) { /* refused under a limit: the block is as it was */
        atomic_fetch_add(&refusals, 1);
        return;
    }
    if (b->align && n > b->n && ((uintptr_t)q & (PAGE - 1)))
        error("realloc of an aligned block: %p", (void *)q);
    size_t kept = n < b->n ? n : b->n;
    b->p = q;
    check(b, kept, "realloc kept");
    size_t old = b->n;
    b->n = n;
    b->align = 0;
    if (n > old) fill(b, old);
}

struct worker {
    int id;
    long ops;
    long iters;
    struct blk tab[SLOTS];
};

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    uint64_t rng = 0x1234567ULL * (uint64_t)(w->id + 1) + (uint64_t)w->iters;
    uint64_t tag = (uint64_t)w->id << 48;
    for (long i = 0; i < w->iters && !atomic_load(&errors); i++) {
        struct blk *b = &w->tab[xorshift(&rng) % SLOTS];
        unsigned op = (unsigned)(xorshift(&rng) % 8);
        if (!b->p) {
            allocate(b, &rng, ++tag);
        } else if (op < 3) {
            resize(b, &rng);
        } else if (op < 5) {
            /* hand it over: whoever takes the slot's block frees it on this thread */
            struct blk *d = record_get();
            if (!d) continue;
            *d = *b;
            b->p = NULL;
            struct blk *old = atomic_exchange(&shared[xorshift(&rng) % SHARED], d);
            if (old) {
                release(old);
                record_put(old);
            }
        } else {
            release(b);
        }
        w->ops++;
    }
    for (int i = 0; i < SLOTS; i++)
        if (w->tab[i].p) release(&w->tab[i]);
    return NULL;
}

static void drain_shared(void)
{
    for (int i = 0; i < SHARED; i++) {
        struct blk *d = atomic_exchange(&shared[i], NULL);
        if (d) {
            release(d);
            record_put(d);
        }
    }
}

static long run(long iters)
{
    pthread_t th[THREADS];
    static struct worker w[THREADS];
    long ops = 0;
    nspare = 0;
    for (size_t i = 0; i < sizeof records / sizeof records[0]; i++) spare_records[nspare++] = &records[i];
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256u << 10); /* address space goes to the blocks */
    for (int i = 0; i < THREADS; i++) {
        w[i] = (struct worker){ .id = i, .iters = iters };
        assert_int_equal(pthread_create(&th[i], &attr, worker_main, &w[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        ops += w[i].ops;
    }
    drain_shared();
    if (errors) fail_msg("%ld errors, first: %s", (long)errors, first_error);
    return ops;
}

struct figures {
    uint64_t mapped, resident, large_live;
    size_t cached;
};

static struct figures figures_now(void)
{
    static struct lum_stats s;
    lum_stats_snapshot(&s);
    return (struct figures){ s.mapped, s.resident, s.large_live, __atomic_load_n(&lum_large_cached, __ATOMIC_RELAXED) };
}

static void assert_back_at(const struct figures *base, const char *phase)
{
    struct figures now = figures_now();
    if (now.cached || now.large_live != base->large_live || now.mapped != base->mapped ||
        now.resident != base->resident)
        fail_msg("%s: cached %zu, large_live %llu (was %llu), mapped %+lld, resident %+lld",
                 phase, now.cached, (unsigned long long)now.large_live,
                 (unsigned long long)base->large_live,
                 (long long)(now.mapped - base->mapped), (long long)(now.resident - base->resident));
    assert_int_equal(lum_heap_check(1), 0);
}

static const long iters = UNDER_TSAN ? 300 : 3000;

static void randomized_load_returns_to_baseline(void **state)
{
    (void)state;
    run(50); /* the threads' heaps and the table records exist from here on */
    lum_purge();
    struct figures base = figures_now();
    assert_int_equal(base.cached, 0);
    long ops = run(iters);
    printf("# %ld operations over %d threads\n", ops, THREADS);
    lum_purge();
    assert_back_at(&base, "after the load and lum_purge");
}

static void failures_under_an_address_space_limit_leave_it_consistent(void **state)
{
    (void)state;
    if (UNDER_TSAN) skip(); /* TSan's shadow memory wants the address space */
    /* what the process has now and ~128 MiB more: the load wants more than that at times
     * (read before the baseline: stdio allocates) */
    FILE *f = fopen("/proc/self/statm", "r");
    assert_non_null(f);
    unsigned long pages = 0;
    assert_int_equal(fscanf(f, "%lu", &pages), 1);
    fclose(f);
    struct rlimit old;
    assert_int_equal(getrlimit(RLIMIT_AS, &old), 0);
    run(50);
    lum_purge();
    struct figures base = figures_now();
    struct rlimit lim = { (rlim_t)pages * 4096 + (128u << 20), old.rlim_max };
    assert_int_equal(setrlimit(RLIMIT_AS, &lim), 0);
    long ops = run(iters);
    assert_int_equal(setrlimit(RLIMIT_AS, &old), 0);
    printf("# %ld operations over %d threads under a limit, %ld refused\n", ops, THREADS, (long)refusals);
    assert_true(refusals > 0);
    lum_purge();
    assert_back_at(&base, "after the limited load and lum_purge");
}

/* ---- calloc ---- */

/* Pages of [p, p + len) that are resident (len a multiple of 4 KiB, p page-aligned). */
static size_t resident_pages(const void *p, size_t len)
{
    static unsigned char vec[(64 << 20) / 4096];
    size_t n = len / 4096, count = 0;
    assert_true(n <= sizeof vec);
    assert_int_equal(mincore((void *)p, len, vec), 0);
    for (size_t i = 0; i < n; i++) count += vec[i] & 1;
    return count;
}

/* A calloc served by growing a smaller cached range (nothing cached fits): the range's pages
 * were written and are zeroed, the part grown on is new memory, zero already, and stays
 * untouched: a calloc'ed block is not necessarily written whole. */
static void calloc_zeroes_the_reused_part_only(void **state)
{
    (void)state;
    lum_purge();
    unsigned char *a = lum_malloc(1 << 20);
    assert_non_null(a);
    memset(a, 0xa5, 1 << 20);
    lum_free(a); /* cached, dirty */
    unsigned char *c = lum_calloc(1, 32 << 20);
    assert_non_null(c);
    for (size_t i = 0; i < (size_t)32 << 20; i += 512) assert_int_equal(c[i], 0);
    lum_free(c);
    lum_purge();
    c = lum_malloc(1 << 20);
    assert_non_null(c);
    memset(c, 0xa5, 1 << 20);
    lum_free(c);
    c = lum_calloc(1, 32 << 20);
    assert_non_null(c);
    /* the reused MiB (and a page or two around it), not the 31 MiB grown on */
    assert_true(resident_pages(c, 32 << 20) <= 258);
    assert_true(c[(32 << 20) - 1] == 0 && c[(1 << 20) - 4096] == 0);
    lum_free(c);
}

/* ---- double frees of large blocks whose ranges the cache cut up (harden on) ---- */

/* The double free to catch, run by hardened() in a child. */
static void (*harden_target)(void);

static void hardened(void)
{
    lum_purge(); /* nothing cached: the ranges below are the only ones */
    if (lum_options_set("harden", "1") != 0) _exit(3);
    harden_target();
}

static void expect_double_free(void (*fn)(void))
{
    if (UNDER_TSAN) skip(); /* fork of a threaded TSan process: not this test's business */
    char err[1024];
    harden_target = fn;
    int got = run_child(hardened, err, sizeof err);
    printf("# signal %d: %s", got, err[0] ? err : "(nothing)\n");
    assert_int_equal(got, SIGABRT);
    assert_non_null(strstr(err, "double free of a large block"));
}

#define MIB ((size_t)1 << 20)

/* the tail realloc cut off stays cached next to the block's own head */
static void do_free_twice_after_shrink(void)
{
    unsigned char *p = lum_malloc(4 * MIB);
    memset(p, 1, 4 * MIB);
    unsigned char *q = lum_realloc(p, 512 << 10);
    if (q != p) _exit(4);
    lum_free(q);
    lum_free(q);
}

/* a block grown by copying into a cached range: its old range went to the cache */
static void do_free_old_after_growth_copied(void)
{
    unsigned char *c = lum_malloc(4 * MIB), *a = lum_malloc(MIB);
    memset(c, 1, 4 * MIB);
    memset(a, 2, MIB);
    lum_free(c);
    unsigned char *b = lum_realloc(a, 3 * MIB);
    if (!b || b == a) _exit(4);
    lum_free(a);
}

/* A 12 MiB range serves two 4 MiB blocks in place from its head (c, then d, whose header sits
 * inside the range); d freed, c grows into the front half of d's range: the rest of d's range
 * stays cached, and a second free of d must still be caught, while c lives on undisturbed. */
static void do_free_twice_inside_a_cut_range(void)
{
    unsigned char *a = lum_malloc(12 * MIB);
    memset(a, 1, 12 * MIB);
    lum_free(a);
    unsigned char *c = lum_malloc(4 * MIB - 4096), *d = lum_malloc(4 * MIB - 4096);
    if (c != a || d != a + 4 * MIB) _exit(4);
    memset(c, 2, 4 * MIB - 4096);
    memset(d, 3, 4 * MIB - 4096);
    lum_free(d);
    c = lum_realloc(c, 6 * MIB - 4096);
    if (c != a) _exit(5);
    for (size_t i = 0; i < 4 * MIB - 4096; i += 4093)
        if (c[i] != 2) _exit(6);
    if (lum_heap_check(1) != 0) _exit(7);
    lum_free(d);
}

static void double_free_after_shrink_is_caught(void **s) { (void)s; expect_double_free(do_free_twice_after_shrink); }
static void double_free_after_growth_copied_is_caught(void **s) { (void)s; expect_double_free(do_free_old_after_growth_copied); }
static void double_free_inside_a_cut_range_is_caught(void **s) { (void)s; expect_double_free(do_free_twice_inside_a_cut_range); }

static int setup(void **state)
{
    (void)state;
    /* a sampled block is counted differently; none here.  Nor may the background thread
     * unmap decayed ranges, or purge on pressure, while a baseline is read: the ranges it has
     * taken out of the cache are still mapped until it is done (under TSan, whose munmap
     * clears shadow memory, the baseline read 60 MiB high that way). */
    if (lum_options_set("decay_ms", "600000") != 0 || lum_options_set("psi", "off") != 0) return -1;
    return lum_options_set("sample_interval", "0");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(randomized_load_returns_to_baseline),
        cmocka_unit_test(failures_under_an_address_space_limit_leave_it_consistent),
        cmocka_unit_test(calloc_zeroes_the_reused_part_only),
        cmocka_unit_test(double_free_after_shrink_is_caught),
        cmocka_unit_test(double_free_after_growth_copied_is_caught),
        cmocka_unit_test(double_free_inside_a_cut_range_is_caught),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
