/*
 * libfakelum.so: a stand-in for liblumalloc.so's observability surface, so the tools can be
 * developed and tested while the real allocator is being written.  LD_PRELOAD it: it forwards
 * every allocation to glibc (__libc_*), keeps exact per-thread counters in a registry laid out
 * per include/lumalloc_probes.h, samples allocations by bytes (Poisson, mean
 * LUMALLOC_SAMPLE_INTERVAL, default 512k), unwinds in-process with _Unwind_Backtrace (works
 * without frame pointers), and fires the lumalloc USDT probes behind semaphores.
 *
 * It is deliberately simple (a global spinlock around the sampled-pointer table); it only has
 * to be faithful to the contract, not fast.
 */
#define _GNU_SOURCE
#define _SDT_HAS_SEMAPHORES 1
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sdt.h>
#include <unistd.h>
#include <unwind.h>

#include "lumalloc_probes.h"

#define EXPORT __attribute__((visibility("default")))

/* One semaphore per probe; the sdt.h macros reference lumalloc_<probe>_semaphore. */
#define SEM(n) EXPORT volatile unsigned short lumalloc_##n##_semaphore __attribute__((section(".probes")))
SEM(sample);
SEM(sample_free);
SEM(large_alloc);
SEM(large_free);
SEM(alloc_failure);
SEM(thread_start);
SEM(thread_exit);
SEM(purge);
SEM(pressure);

EXPORT struct lum_registry_v1 lumalloc_registry = {
    .magic = LUM_REGISTRY_MAGIC,
    .version = LUM_PROBES_VERSION,
    .counters_size = sizeof(struct lum_thread_counters_v1),
};

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern size_t malloc_usable_size(void *);

static uint64_t sample_interval = 512 * 1024;
static uint64_t large_threshold = 1 << 20;
static pthread_key_t exit_key;
static int initialised;

struct tstate {
    struct lum_thread_counters_v1 *tc;
    int64_t countdown;
    uint64_t rng;
    int busy; /* re-entrancy guard: unwinding and pthread calls must not recurse into us */
    uint64_t frames[LUM_MAX_FRAMES];
};
static __thread struct tstate ts __attribute__((tls_model("initial-exec")));

/* Sampled pointers, open addressing; sample_free needs the original sample's figures. */
struct sampled {
    uint64_t ptr, req, usable, weight, stack_id;
};
#define STAB_SIZE (1u << 16)
static struct sampled *stab;
static volatile int stab_lock;

static uint64_t parse_size(const char *s, uint64_t dflt)
{
    if (!s || !*s)
        return dflt;
    char *end;
    uint64_t v = strtoull(s, &end, 0);
    switch (*end) {
    case 'k': case 'K': v <<= 10; break;
    case 'm': case 'M': v <<= 20; break;
    case 'g': case 'G': v <<= 30; break;
    }
    return v;
}

static void thread_gone(void *arg);

__attribute__((constructor)) static void fake_init(void)
{
    sample_interval = parse_size(getenv("LUMALLOC_SAMPLE_INTERVAL"), sample_interval);
    large_threshold = parse_size(getenv("LUMALLOC_LARGE_THRESHOLD"), large_threshold);
    lumalloc_registry.sample_interval = sample_interval;
    lumalloc_registry.large_threshold = large_threshold;
    stab = mmap(NULL, STAB_SIZE * sizeof(*stab), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    pthread_key_create(&exit_key, thread_gone);
    initialised = 1;
}

static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static int64_t next_interval(void)
{
    if (!sample_interval)
        return INT64_MAX;
    double u = ((rng_next(&ts.rng) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    return (int64_t)(-log(u) * (double)sample_interval) + 1;
}

static struct lum_thread_counters_v1 *thread_counters(void)
{
    if (ts.tc)
        return ts.tc;
    ts.busy++;
    struct lum_thread_counters_v1 *tc = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    tc->tid = (uint32_t)gettid();
    tc->state = LUM_THREAD_LIVE;
    uint64_t head;
    do {
        head = __atomic_load_n(&lumalloc_registry.threads_head, __ATOMIC_ACQUIRE);
        tc->next = head;
    } while (!__atomic_compare_exchange_n(&lumalloc_registry.threads_head, &head, (uint64_t)(uintptr_t)tc, 0,
                                          __ATOMIC_RELEASE, __ATOMIC_RELAXED));
    __atomic_fetch_add(&lumalloc_registry.generation, 1, __ATOMIC_RELAXED);
    ts.tc = tc;
    ts.rng = 0x9e3779b97f4a7c15ULL ^ ((uint64_t)tc->tid << 17);
    ts.countdown = next_interval();
    if (initialised)
        pthread_setspecific(exit_key, tc);
    if (lumalloc_thread_start_semaphore)
        DTRACE_PROBE2(lumalloc, thread_start, tc->tid, (uint64_t)(uintptr_t)tc);
    ts.busy--;
    return tc;
}

static void thread_gone(void *arg)
{
    struct lum_thread_counters_v1 *tc = arg;
    tc->state = LUM_THREAD_EXITED;
    __atomic_fetch_add(&lumalloc_registry.generation, 1, __ATOMIC_RELAXED);
    if (lumalloc_thread_exit_semaphore)
        DTRACE_PROBE2(lumalloc, thread_exit, tc->tid, (uint64_t)(uintptr_t)tc);
}

struct unwind_state {
    uint64_t *frames;
    unsigned n;
};

static _Unwind_Reason_Code unwind_cb(struct _Unwind_Context *ctx, void *arg)
{
    struct unwind_state *st = arg;
    if (st->n >= LUM_MAX_FRAMES)
        return _URC_END_OF_STACK;
    uintptr_t ip = _Unwind_GetIP(ctx);
    if (!ip)
        return _URC_END_OF_STACK;
    st->frames[st->n++] = ip;
    return _URC_NO_REASON;
}

static unsigned unwind(uint64_t *hash)
{
    struct unwind_state st = {ts.frames, 0};
    _Unwind_Backtrace(unwind_cb, &st);
    uint64_t h = 0xcbf29ce484222325ULL;
    for (unsigned i = 0; i < st.n; i++) {
        h ^= ts.frames[i];
        h *= 0x100000001b3ULL;
    }
    *hash = st.n ? (h ? h : 1) : 0;
    return st.n;
}

static void stab_lock_acquire(void)
{
    while (__atomic_exchange_n(&stab_lock, 1, __ATOMIC_ACQUIRE))
        ;
}
static void stab_lock_release(void) { __atomic_store_n(&stab_lock, 0, __ATOMIC_RELEASE); }

static void stab_insert(struct sampled s)
{
    if (!stab)
        return;
    stab_lock_acquire();
    uint32_t i = (uint32_t)((s.ptr >> 4) * 0x9e3779b1u) & (STAB_SIZE - 1);
    for (uint32_t n = 0; n < STAB_SIZE; n++, i = (i + 1) & (STAB_SIZE - 1))
        if (stab[i].ptr == 0 || stab[i].ptr == 1) {
            stab[i] = s;
            break;
        }
    stab_lock_release();
}

static int stab_remove(uint64_t ptr, struct sampled *out)
{
    if (!stab)
        return 0;
    int found = 0;
    stab_lock_acquire();
    uint32_t i = (uint32_t)((ptr >> 4) * 0x9e3779b1u) & (STAB_SIZE - 1);
    for (uint32_t n = 0; n < STAB_SIZE && stab[i].ptr; n++, i = (i + 1) & (STAB_SIZE - 1))
        if (stab[i].ptr == ptr) {
            *out = stab[i];
            stab[i].ptr = 1; /* tombstone keeps probe chains intact */
            found = 1;
            break;
        }
    stab_lock_release();
    return found;
}

static void on_alloc(void *p, size_t req, size_t align)
{
    if (ts.busy)
        return;
    struct lum_thread_counters_v1 *tc = thread_counters();
    if (!p) {
        tc->failures++;
        if (lumalloc_alloc_failure_semaphore) {
            ts.busy++;
            uint64_t h;
            unsigned d = unwind(&h);
            DTRACE_PROBE7(lumalloc, alloc_failure, (uint64_t)req, (uint64_t)align, (uint32_t)ENOMEM,
                          (uint64_t)(uintptr_t)ts.frames, d, h, (uint64_t)(uintptr_t)tc);
            ts.busy--;
        }
        return;
    }
    size_t usable = malloc_usable_size(p);
    tc->alloc_count++;
    tc->alloc_bytes += usable;
    __atomic_fetch_add(&lumalloc_registry.global.resident_bytes, usable, __ATOMIC_RELAXED);
    __atomic_fetch_add(&lumalloc_registry.global.mapped_bytes, usable, __ATOMIC_RELAXED);
    if (usable > large_threshold) {
        tc->large_count++;
        tc->large_bytes += usable;
        __atomic_fetch_add(&lumalloc_registry.global.large_live_bytes, usable, __ATOMIC_RELAXED);
        if (lumalloc_large_alloc_semaphore) {
            ts.busy++;
            uint64_t h;
            unsigned d = unwind(&h);
            DTRACE_PROBE7(lumalloc, large_alloc, (uint64_t)(uintptr_t)p, (uint64_t)req, (uint64_t)usable,
                          (uint64_t)(uintptr_t)ts.frames, d, h, (uint64_t)(uintptr_t)tc);
            ts.busy--;
        }
    }
    ts.countdown -= (int64_t)req;
    if (ts.countdown > 0)
        return;
    ts.countdown = next_interval();
    /* Unbiased weight of a byte-Poisson sample: size / P(sampled). */
    double r = (double)req / (double)sample_interval;
    uint64_t weight = r > 1e-9 ? (uint64_t)((double)req / (1.0 - exp(-r)) + 0.5) : sample_interval;
    tc->sampled_count++;
    tc->sampled_bytes += weight;
    ts.busy++;
    uint64_t h = 0;
    unsigned d = 0;
    if (lumalloc_sample_semaphore)
        d = unwind(&h);
    stab_insert((struct sampled){(uint64_t)(uintptr_t)p, req, usable, weight, h});
    if (lumalloc_sample_semaphore)
        DTRACE_PROBE8(lumalloc, sample, (uint64_t)(uintptr_t)p, (uint64_t)req, (uint64_t)usable, weight,
                      (uint64_t)(uintptr_t)ts.frames, d, h, (uint64_t)(uintptr_t)tc);
    ts.busy--;
}

static void on_free(void *p)
{
    if (!p || ts.busy)
        return;
    struct lum_thread_counters_v1 *tc = thread_counters();
    size_t usable = malloc_usable_size(p);
    tc->free_count++;
    tc->free_bytes += usable;
    __atomic_fetch_sub(&lumalloc_registry.global.resident_bytes, usable, __ATOMIC_RELAXED);
    __atomic_fetch_sub(&lumalloc_registry.global.mapped_bytes, usable, __ATOMIC_RELAXED);
    if (usable > large_threshold) {
        __atomic_fetch_sub(&lumalloc_registry.global.large_live_bytes, usable, __ATOMIC_RELAXED);
        if (lumalloc_large_free_semaphore)
            DTRACE_PROBE2(lumalloc, large_free, (uint64_t)(uintptr_t)p, (uint64_t)usable);
    }
    struct sampled s;
    if (stab_remove((uint64_t)(uintptr_t)p, &s) && lumalloc_sample_free_semaphore)
        DTRACE_PROBE5(lumalloc, sample_free, s.ptr, s.req, s.usable, s.weight, s.stack_id);
}

EXPORT void *malloc(size_t n)
{
    void *p = __libc_malloc(n);
    on_alloc(p, n, 0);
    return p;
}

EXPORT void free(void *p)
{
    on_free(p);
    __libc_free(p);
}

EXPORT void *calloc(size_t a, size_t b)
{
    void *p = __libc_calloc(a, b);
    size_t n;
    on_alloc(p, __builtin_mul_overflow(a, b, &n) ? SIZE_MAX : n, 0);
    return p;
}

EXPORT void *realloc(void *old, size_t n)
{
    if (!old)
        return malloc(n);
    if (n == 0) {
        free(old);
        return NULL;
    }
    /* Counted as free + alloc, as an allocator that moves the block would. */
    size_t old_usable = malloc_usable_size(old);
    struct lum_thread_counters_v1 *tc = ts.busy ? NULL : thread_counters();
    void *p = __libc_realloc(old, n);
    if (!p) {
        on_alloc(NULL, n, 0);
        return NULL;
    }
    if (tc) {
        tc->free_count++;
        tc->free_bytes += old_usable;
        __atomic_fetch_sub(&lumalloc_registry.global.resident_bytes, old_usable, __ATOMIC_RELAXED);
        __atomic_fetch_sub(&lumalloc_registry.global.mapped_bytes, old_usable, __ATOMIC_RELAXED);
        struct sampled s;
        if (stab_remove((uint64_t)(uintptr_t)old, &s) && lumalloc_sample_free_semaphore)
            DTRACE_PROBE5(lumalloc, sample_free, s.ptr, s.req, s.usable, s.weight, s.stack_id);
    }
    on_alloc(p, n, 0);
    return p;
}

EXPORT int posix_memalign(void **out, size_t align, size_t n)
{
    if (align < sizeof(void *) || (align & (align - 1)))
        return EINVAL;
    void *p = __libc_memalign(align, n);
    on_alloc(p, n, align);
    if (!p)
        return ENOMEM;
    *out = p;
    return 0;
}

EXPORT void *aligned_alloc(size_t align, size_t n)
{
    void *p = __libc_memalign(align, n);
    on_alloc(p, n, align);
    return p;
}

EXPORT void *memalign(size_t align, size_t n)
{
    void *p = __libc_memalign(align, n);
    on_alloc(p, n, align);
    return p;
}
