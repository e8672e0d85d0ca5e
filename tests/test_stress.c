/* Stress: multi-threaded random workloads in which every byte of every block is verified.
 *
 *  - mixed_workload: 4 threads, each with a table of live blocks, doing malloc / calloc (zeroed?)
 *    / realloc grow and shrink (prefix kept?) / aligned_alloc / posix_memalign / memalign
 *    (aligned?) / free / free_sized / free_aligned_sized, sizes 0 B .. 6 MiB, every usable byte
 *    (malloc_usable_size) written and checked at free, and blocks handed to other threads through
 *    shared slots so that about a third of the frees are cross-thread;
 *  - producers_consumers: 2 producers pass blocks through a bounded queue to 2 consumers, which
 *    check them, realloc some of them and free them;
 *  - thread_churn_handoff: 600 short-lived threads, each leaving blocks behind for threads that
 *    start after it exits (frees into the pages of dead threads);
 *  - fork_under_load: a child forked while 3 threads run the mixed workload checks and frees the
 *    forking thread's blocks, runs a workload of its own and checks the heap (no deadlock: alarm).
 * lum_heap_check(1) must find nothing at every quiescent point.  Everything goes through the lum_*
 * API, so the test is also meaningful under ThreadSanitizer (tests/integration/core_sanitizers.sh)
 * where the process malloc is the sanitizer's.  About 10 s in all. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
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


static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* LUM_STRESS_SCALE=N (scripts/soak.sh) multiplies every phase's duration and bounds. */
static uint64_t scale = 1;

static _Atomic long errors;
static char first_error[256];
static _Atomic int first_error_taken;

static void error_at(const char *what, const void *p, size_t n, size_t at)
{
    if (atomic_fetch_add(&errors, 1) == 0 && !atomic_exchange(&first_error_taken, 1))
        snprintf(first_error, sizeof first_error, "%s: block %p size %zu at byte %zu", what, p, n, at);
}

/* ---- blocks: how they were made, filled with a pattern derived from a seed ---- */

enum kind { K_MALLOC, K_CALLOC, K_ALIGNED_ALLOC, K_POSIX_MEMALIGN, K_MEMALIGN, K_REALLOC };

struct blk {
    unsigned char *p;
    size_t n;       /* requested size */
    size_t filled;  /* bytes written with the pattern (the usable size) */
    size_t align;
    uint64_t seed;
    enum kind kind;
};

static inline uint64_t pat(uint64_t seed, size_t i) { return (seed ^ (i * 0x9e3779b97f4a7c15ULL)) * 0xff51afd7ed558ccdULL; }

static void fill(struct blk *b, size_t from)
{
    size_t i = from;
    for (; i < b->filled && (i & 7); i++) b->p[i] = (unsigned char)pat(b->seed, i >> 3);
    for (; i + 8 <= b->filled; i += 8) { uint64_t w = pat(b->seed, i >> 3); memcpy(b->p + i, &w, 8); }
    for (; i < b->filled; i++) b->p[i] = (unsigned char)(pat(b->seed, i >> 3) >> (8 * (i & 7)));
}

static int verify(const struct blk *b, size_t upto)
{
    size_t i = 0;
    for (; i + 8 <= upto; i += 8) {
        uint64_t w;
        memcpy(&w, b->p + i, 8);
        if (w != pat(b->seed, i >> 3)) { error_at("pattern broken", b->p, b->n, i); return 0; }
    }
    for (; i < upto; i++)
        if (b->p[i] != (unsigned char)(pat(b->seed, i >> 3) >> (8 * (i & 7)))) {
            error_at("pattern broken", b->p, b->n, i);
            return 0;
        }
    return 1;
}

static size_t pick_size(uint64_t r, int allow_huge)
{
    unsigned c = (unsigned)(r % 1000);
    r >>= 10;
    if (c < 400) return r % 129;                       /* 0 .. 128 */
    if (c < 750) return 129 + r % 4000;                /* small */
    if (c < 930) return 4096 + r % 60000;              /* medium */
    if (c < 995 || !allow_huge) return 65536 + r % 400000; /* around the large threshold */
    return 512 * 1024 + r % (6 * 1024 * 1024);         /* large, up to 6.5 MiB */
}

static int made(struct blk *b)
{
    if (b->p == NULL) {
        if (b->n == 0 && b->kind != K_MALLOC) return 0; /* allowed for zero sizes */
        error_at("allocation failed", NULL, b->n, 0);
        return 0;
    }
    if (((uintptr_t)b->p & 15) || (b->align && ((uintptr_t)b->p & (b->align - 1)))) {
        error_at("misaligned", b->p, b->n, b->align);
    }
    size_t u = lum_malloc_usable_size(b->p);
    if (u < b->n) error_at("usable size below the request", b->p, b->n, u);
    b->filled = u;
    if (b->kind == K_CALLOC)
        for (size_t i = 0; i < b->n; i++)
            if (b->p[i]) { error_at("calloc block not zeroed", b->p, b->n, i); break; }
    fill(b, 0);
    return 1;
}

static int make(struct blk *b, uint64_t *rng, int allow_huge)
{
    uint64_t r = xorshift(rng);
    memset(b, 0, sizeof *b);
    b->n = pick_size(xorshift(rng), allow_huge);
    b->seed = xorshift(rng);
    static const size_t aligns[] = {16, 32, 64, 128, 256, 4096, 8192, 65536, 1u << 20};
    switch (r % 8) {
    case 0: case 1: case 2:
        b->kind = K_MALLOC; b->p = lum_malloc(b->n); break;
    case 3: {
        b->kind = K_CALLOC;
        size_t m = 1 + (r >> 8) % 16;
        b->n = (b->n / m) * m;
        b->p = lum_calloc(b->n / m, m);
        break; }
    case 4: {
        b->kind = K_ALIGNED_ALLOC;
        b->align = aligns[(r >> 8) % ((r >> 20) % 16 ? 6 : 9)];
        b->p = lum_aligned_alloc(b->align, b->n); break; }
    case 5: {
        b->kind = K_POSIX_MEMALIGN;
        b->align = aligns[(r >> 8) % ((r >> 20) % 16 ? 6 : 9)];
        void *p = NULL;
        int rc = lum_posix_memalign(&p, b->align, b->n);
        if (rc) error_at("posix_memalign failed", NULL, b->n, (size_t)rc);
        b->p = p; break; }
    case 6:
        b->kind = K_MEMALIGN; b->align = aligns[(r >> 8) % 6];
        b->p = lum_memalign(b->align, b->n); break;
    default:
        b->kind = K_REALLOC; b->p = lum_realloc(NULL, b->n); break;
    }
    return made(b);
}

/* Checks every written byte, then frees with the kind's sized free where there is one. */
static void release(struct blk *b, uint64_t r)
{
    if (!b->p) return;
    verify(b, b->filled);
    if ((r & 3) == 0 && (b->kind == K_MALLOC || b->kind == K_CALLOC))
        lum_free_sized(b->p, b->n);
    else if ((r & 3) == 0 && b->kind == K_ALIGNED_ALLOC)
        lum_free_aligned_sized(b->p, b->align, b->n);
    else
        lum_free(b->p);
    b->p = NULL;
}

/* realloc to a new size: the old prefix must survive; then the block is refilled. */
static void resize(struct blk *b, uint64_t *rng, int allow_huge)
{
    uint64_t r = xorshift(rng);
    size_t n2 = (r & 1) ? b->n + (r >> 8) % (b->n + 64) : b->n / (2 + (r >> 8) % 4); /* grow / shrink */
    if ((r & 0x70) == 0x70) n2 = pick_size(xorshift(rng), allow_huge);
    if (n2 == 0) n2 = 1;
    if (b->align > 16) { release(b, r); make(b, rng, allow_huge); return; } /* realloc keeps only 16 */
    verify(b, b->filled);
    unsigned char *q = lum_realloc(b->p, n2);
    if (!q) { error_at("realloc failed", b->p, n2, 0); return; }
    b->p = q;
    size_t keep = b->n < n2 ? b->n : n2;
    verify(b, keep);
    b->n = n2;
    b->kind = K_REALLOC;
    b->align = 0;
    b->filled = lum_malloc_usable_size(q);
    if (b->filled < n2) error_at("usable size below the realloc request", q, n2, b->filled);
    b->seed = xorshift(rng);
    fill(b, 0);
}

/* ---- mixed workload with cross-thread hand-offs ---- */

#define SHARED 1024
static struct blk *_Atomic shared_slots[SHARED];
static _Atomic int stop_flag;

static struct blk *box(const struct blk *b)
{
    /* the descriptor itself travels with the block: allocated by lumalloc too */
    struct blk *d = lum_malloc(sizeof *d);
    if (!d) { error_at("descriptor allocation failed", NULL, sizeof *d, 0); return NULL; }
    *d = *b;
    return d;
}

struct worker { int id; int table; int allow_huge; long ops; uint64_t deadline; };

static void *mixed_worker(void *arg)
{
    struct worker *w = arg;
    uint64_t rng = 0x1234567ULL * (uint64_t)(w->id + 1) + (uint64_t)now_ns();
    struct blk *tab = lum_calloc((size_t)w->table, sizeof *tab);
    if (!tab) { error_at("table allocation failed", NULL, 0, 0); return NULL; }
    long ops = 0;
    while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
        if ((ops & 255) == 0 && w->deadline && now_ns() > w->deadline) break;
        uint64_t r = xorshift(&rng);
        struct blk *b = &tab[(r >> 16) % (size_t)w->table];
        unsigned op = (unsigned)(r % 16);
        ops++;
        if (!b->p) { make(b, &rng, w->allow_huge); continue; }
        if (op < 6) { release(b, r >> 8); make(b, &rng, w->allow_huge); }
        else if (op < 9) resize(b, &rng, w->allow_huge);
        else if (op < 13) {
            /* hand our block to a shared slot; free whatever was there (usually another thread's) */
            struct blk *d = box(b);
            if (!d) continue;
            b->p = NULL;
            struct blk *old = atomic_exchange(&shared_slots[(r >> 24) % SHARED], d);
            if (old) { release(old, r >> 40); lum_free(old); }
        } else if (op < 15) {
            /* adopt a block from a shared slot: it lives on in this thread */
            struct blk *d = atomic_exchange(&shared_slots[(r >> 24) % SHARED], NULL);
            if (d) { release(b, r >> 8); *b = *d; lum_free(d); if ((r >> 50) & 1) resize(b, &rng, w->allow_huge); }
        } else {
            if (!verify(b, b->filled)) b->p = NULL; /* do not free a broken block */
        }
    }
    for (int i = 0; i < w->table; i++) release(&tab[i], (uint64_t)i);
    lum_free(tab);
    w->ops = ops;
    return NULL;
}

static void drain_shared(void)
{
    for (int i = 0; i < SHARED; i++) {
        struct blk *d = atomic_exchange(&shared_slots[i], NULL);
        if (d) { release(d, (uint64_t)i); lum_free(d); }
    }
}

static void check_errors(const char *phase)
{
    if (errors) fail_msg("%s: %ld errors, first: %s", phase, (long)errors, first_error);
    int problems = lum_heap_check(1);
    if (problems) fail_msg("%s: lum_heap_check found %d problems", phase, problems);
}

static void mixed_workload(void **state)
{
    (void)state;
    enum { T = 4 };
    pthread_t th[T];
    struct worker w[T];
    uint64_t deadline = now_ns() + 2500000000ULL * scale;
    atomic_store(&stop_flag, 0);
    for (int i = 0; i < T; i++) {
        w[i] = (struct worker){.id = i, .table = 400, .allow_huge = 1, .deadline = deadline};
        assert_int_equal(pthread_create(&th[i], NULL, mixed_worker, &w[i]), 0);
    }
    long total = 0;
    for (int i = 0; i < T; i++) { pthread_join(th[i], NULL); total += w[i].ops; }
    check_errors("mixed workload, threads joined");
    drain_shared();
    check_errors("mixed workload, shared slots drained");
    lum_purge();
    check_errors("mixed workload, after lum_purge");
    printf("# mixed workload: %ld operations over %d threads\n", total, T);
    assert_true(total > 1000);
}

/* ---- producers and consumers through a bounded queue ---- */

#define QCAP 256
static struct {
    pthread_mutex_t m;
    pthread_cond_t not_empty, not_full;
    struct blk q[QCAP];
    int head, count, producers_left;
} queue = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, {{0}}, 0, 0, 0};

static _Atomic long produced, consumed;

static void *producer(void *arg)
{
    uint64_t rng = 0xabcdef12345ULL + (uintptr_t)arg;
    uint64_t deadline = now_ns() + 2000000000ULL * scale;
    /* The deadline keeps a sanitizer build short; the floor keeps a slow (loaded, TSan) run
     * from passing too few blocks across to prove anything. */
    long mine = 0;
    for (long i = 0; (mine < 1000 && i < 100000) || (i < 200000 * (long)scale && now_ns() < deadline);
         i++) {
        struct blk b;
        if (!make(&b, &rng, (i & 63) == 0)) continue;
        mine++;
        pthread_mutex_lock(&queue.m);
        while (queue.count == QCAP) pthread_cond_wait(&queue.not_full, &queue.m);
        queue.q[(queue.head + queue.count++) % QCAP] = b;
        pthread_cond_signal(&queue.not_empty);
        pthread_mutex_unlock(&queue.m);
        produced++;
    }
    pthread_mutex_lock(&queue.m);
    queue.producers_left--;
    pthread_cond_broadcast(&queue.not_empty);
    pthread_mutex_unlock(&queue.m);
    return NULL;
}

static void *consumer(void *arg)
{
    uint64_t rng = 0x55aa55aa1ULL + (uintptr_t)arg;
    for (;;) {
        pthread_mutex_lock(&queue.m);
        while (queue.count == 0 && queue.producers_left > 0) pthread_cond_wait(&queue.not_empty, &queue.m);
        if (queue.count == 0) { pthread_mutex_unlock(&queue.m); break; }
        struct blk b = queue.q[queue.head];
        queue.head = (queue.head + 1) % QCAP;
        queue.count--;
        pthread_cond_signal(&queue.not_full);
        pthread_mutex_unlock(&queue.m);
        uint64_t r = xorshift(&rng);
        if ((r & 7) == 0) resize(&b, &rng, 0); /* realloc a block another thread allocated */
        release(&b, r >> 8);
        consumed++;
    }
    return NULL;
}

static void producers_consumers(void **state)
{
    (void)state;
    pthread_t p[2], c[2];
    queue.producers_left = 2;
    for (long i = 0; i < 2; i++) {
        assert_int_equal(pthread_create(&p[i], NULL, producer, (void *)i), 0);
        assert_int_equal(pthread_create(&c[i], NULL, consumer, (void *)i), 0);
    }
    for (int i = 0; i < 2; i++) { pthread_join(p[i], NULL); pthread_join(c[i], NULL); }
    printf("# producers/consumers: %ld blocks passed\n", (long)consumed);
    assert_int_equal(produced, consumed);
    assert_true(consumed >= 2000);
    check_errors("producers/consumers");
}

/* ---- thread churn: blocks outlive the threads that allocated them ---- */

static void *short_lived(void *arg)
{
    struct worker *w = arg;
    uint64_t rng = 0x777ULL * (uint64_t)(w->id + 1);
    struct blk local[16];
    for (int i = 0; i < 16; i++) make(&local[i], &rng, 0);
    for (int round = 0; round < 40; round++) {
        uint64_t r = xorshift(&rng);
        struct blk *b = &local[r % 16];
        if (r & 0x100) resize(b, &rng, 0); else { release(b, r); make(b, &rng, 0); }
    }
    /* leave half behind (freed later by other threads), free the other half */
    for (int i = 0; i < 16; i++) {
        uint64_t r = xorshift(&rng);
        if (i & 1) {
            struct blk *d = box(&local[i]);
            if (!d) continue;
            struct blk *old = atomic_exchange(&shared_slots[r % SHARED], d);
            if (old) { release(old, r >> 8); lum_free(old); }
        } else release(&local[i], r);
    }
    return NULL;
}

static void thread_churn_handoff(void **state)
{
    (void)state;
    enum { WAVE = 4, THREADS = 600 };
    uint64_t deadline = now_ns() + 3000000000ULL * scale;
    int done = 0;
    for (int t = 0; t < THREADS * (int)scale && now_ns() < deadline; t += WAVE) {
        pthread_t th[WAVE];
        struct worker w[WAVE];
        for (int i = 0; i < WAVE; i++) {
            w[i] = (struct worker){.id = t + i};
            assert_int_equal(pthread_create(&th[i], NULL, short_lived, &w[i]), 0);
        }
        for (int i = 0; i < WAVE; i++) pthread_join(th[i], NULL);
        done += WAVE;
        if (done % 200 == 0) check_errors("thread churn, between waves");
    }
    printf("# thread churn: %d threads\n", done);
    assert_true(done >= (UNDER_TSAN ? 20 : 100));
    check_errors("thread churn");
    drain_shared();
    check_errors("thread churn, drained");
}

/* ---- fork while other threads run the mixed workload ---- */

static void fork_under_load(void **state)
{
    (void)state;
    if (UNDER_TSAN) { skip(); return; } /* TSan does not support threads after a multi-threaded fork */
    enum { T = 3 };
    pthread_t th[T];
    struct worker w[T];
    atomic_store(&stop_flag, 0);
    for (int i = 0; i < T; i++) {
        w[i] = (struct worker){.id = 10 + i, .table = 200, .allow_huge = 0};
        assert_int_equal(pthread_create(&th[i], NULL, mixed_worker, &w[i]), 0);
    }
    uint64_t rng = 99;
    struct blk mine[64];
    for (int i = 0; i < 64; i++) make(&mine[i], &rng, 1);
    int forks = 0;
    uint64_t deadline = now_ns() + 2500000000ULL * scale;
    for (int round = 0; round < 40 * (int)scale && now_ns() < deadline; round++) {
        usleep(10000);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            alarm(20); /* a deadlock in the child shows as SIGALRM */
            /* the forking thread's blocks are intact and can be freed and replaced */
            for (int i = 0; i < 64; i++) {
                if (!verify(&mine[i], mine[i].filled)) _exit(2);
                release(&mine[i], (uint64_t)i);
                if (!make(&mine[i], &rng, 1)) _exit(3);
            }
            /* a workload of its own, with threads */
            pthread_t ct[2];
            struct worker cw[2];
            atomic_store(&stop_flag, 0);
            for (int i = 0; i < 2; i++) {
                cw[i] = (struct worker){.id = 100 + i, .table = 100, .deadline = now_ns() + 50000000ULL};
                if (pthread_create(&ct[i], NULL, mixed_worker, &cw[i])) _exit(4);
            }
            for (int i = 0; i < 2; i++) pthread_join(ct[i], NULL);
            for (int i = 0; i < 64; i++) release(&mine[i], (uint64_t)i);
            if (errors) { fprintf(stderr, "child: %s\n", first_error); _exit(5); }
            if (lum_heap_check(1)) _exit(6);
            _exit(0);
        }
        int status;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fail_msg("fork child %d: %s %d", round, WIFEXITED(status) ? "exit" : "signal",
                     WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
        forks++;
        /* the parent goes on using its blocks */
        uint64_t r = xorshift(&rng);
        resize(&mine[r % 64], &rng, 1);
    }
    atomic_store(&stop_flag, 1);
    for (int i = 0; i < T; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 64; i++) release(&mine[i], (uint64_t)i);
    drain_shared();
    printf("# fork under load: %d forks\n", forks);
    assert_true(forks >= 5);
    check_errors("fork under load");
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const char *sc = getenv("LUM_STRESS_SCALE");
    if (sc && atoi(sc) > 0) scale = (uint64_t)atoi(sc);
    /* the allocator's first use happens in one thread, as in any real program (where the C
     * library and ld.so allocate first); see core_sanitizers.sh for concurrent first use */
    lum_free(lum_malloc(1));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(mixed_workload),
        cmocka_unit_test(producers_consumers),
        cmocka_unit_test(thread_churn_handoff),
        cmocka_unit_test(fork_under_load),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
