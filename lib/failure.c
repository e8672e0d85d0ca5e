/* Seastar-style failure tools: an allocation-failure injector (process-wide N-th allocation, or
 * per thread for lum_with_allocation_failures), critical allocation scopes, abort-on-failure and
 * the alloc_failure probe.  Injection state is per thread, like Seastar's per shard: a sweep in
 * one thread is not disturbed by allocations in others. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include "batch.h"
#include "obs_internal.h"
#include "observe.h"
#include "options.h"
#include "probes.h"
#include "lumalloc_failure.h"

/* Core: makes the calling thread's next allocation take the slow path (heap.c). */
void lum_heap_force_slow(void);

/* Number of armed injectors (process-wide one + per-thread ones); the core routes every
 * allocation through lum_fail_should_inject while it is non-zero. */
LUM_SAMPLE_DATA4 volatile int lum_fail_armed;

static uint64_t global_nth;   /* fail when global_count reaches this (0: disarmed) */
static uint64_t global_count;

struct fail_tls {
    uint64_t count;     /* allocation points seen while armed */
    uint64_t fail_at;   /* 0-based index of the allocation to fail */
    bool armed;
    bool fired;         /* an injection happened since the last arm */
    bool pending;       /* the next lum_on_alloc_failure is the injected one */
    int critical;       /* critical scope depth */
    int suppress;       /* lum_fail_suppress depth */
    int reporting;      /* inside the failure report: no nested reports */
};
static __thread struct fail_tls ft LUM_TLS;

static void arm_inc(void)
{
    __atomic_fetch_add(&lum_fail_armed, 1, __ATOMIC_SEQ_CST);
}

static void arm_dec(void)
{
    __atomic_fetch_sub(&lum_fail_armed, 1, __ATOMIC_SEQ_CST);
}

/* The injectors' arming and reading: cold text, as is the injection itself
 * (lum_fail_should_inject), which only a program testing its failure paths runs. */
LUM_EXPORT LUM_COLD_TEXT void lum_fail_nth(uint64_t n)
{
    /* One exchange, its result deciding the count: as disarm, reset and re-arm, two callers at
     * once could both arm and leave lum_fail_armed up for good (every allocation on the slow
     * path, no sample taken, for the rest of the process).  An injection that fires meanwhile
     * takes the old nth by compare-and-swap: either it or this exchange disarms it, not both. */
    __atomic_store_n(&global_count, 0, __ATOMIC_SEQ_CST);
    uint64_t old = __atomic_exchange_n(&global_nth, n, __ATOMIC_SEQ_CST);
    if (old && !n)
        arm_dec();
    else if (!old && n)
        arm_inc();
    if (n)
        lum_heap_force_slow();
}

LUM_EXPORT LUM_COLD_TEXT void lum_fail_after(uint64_t n)
{
    if (ft.armed)
        arm_dec();
    ft.count = 0;
    ft.fail_at = n;
    ft.armed = true;
    ft.fired = false;
    arm_inc();
    /* The countdown of this thread may be far from zero: send the next allocation down the
     * slow path now, where it will meet the injector. */
    lum_heap_force_slow();
}

LUM_EXPORT LUM_COLD_TEXT void lum_fail_cancel(void)
{
    if (ft.armed) {
        ft.armed = false;
        arm_dec();
    }
}

LUM_EXPORT LUM_COLD_TEXT bool lum_fail_fired(void)
{
    return ft.fired;
}

LUM_EXPORT LUM_COLD_TEXT uint64_t lum_fail_count(void)
{
    return ft.count;
}

LUM_EXPORT void lum_fail_suppress_enter(void)
{
    ft.suppress++;
}

LUM_EXPORT void lum_fail_suppress_leave(void)
{
    if (ft.suppress > 0)
        ft.suppress--;
}

LUM_COLD_TEXT bool lum_fail_should_inject(size_t size)
{
    (void)size;
    /* Our own metadata never goes through malloc, but report writers' stdio does: those and
     * explicitly suppressed regions are never failed. */
    if (lum_obs_busy || ft.suppress)
        return false;
    if (ft.armed) {
        if (ft.count++ == ft.fail_at) {
            ft.armed = false;
            ft.fired = true;
            ft.pending = true;
            arm_dec();
            return true;
        }
    }
    uint64_t nth = __atomic_load_n(&global_nth, __ATOMIC_RELAXED);
    if (nth) {
        uint64_t c = __atomic_add_fetch(&global_count, 1, __ATOMIC_RELAXED);
        if (c == nth && __atomic_compare_exchange_n(&global_nth, &nth, 0, false, __ATOMIC_SEQ_CST,
                                                    __ATOMIC_RELAXED)) {
            arm_dec();
            ft.fired = true;
            ft.pending = true;
            return true;
        }
    }
    return false;
}

LUM_EXPORT LUM_COLD_TEXT unsigned long lum_with_allocation_failures(void (*fn)(void *), void *arg)
{
    unsigned long runs = 0;
    for (uint64_t i = 0;; i++) {
        lum_fail_after(i);
        fn(arg);
        runs++;
        bool fired = ft.fired;
        lum_fail_cancel();
        ft.fired = false;
        /* A run in which the i-th allocation was never reached ran clean: every allocation
         * point before it has now been failed once. */
        if (!fired)
            return runs;
    }
}

LUM_EXPORT void lum_critical_scope_enter(void)
{
    ft.critical++;
}

LUM_EXPORT void lum_critical_scope_leave(void)
{
    if (ft.critical > 0)
        ft.critical--;
}

LUM_EXPORT bool lum_in_critical_scope(void)
{
    return ft.critical > 0;
}

bool lum_fail_in_critical(void)
{
    return ft.critical > 0;
}

/* One setting, the option's: lum_options_set("abort_on_failure", ...) and this agree whichever
 * came last (a shadow copy here once won over the option for good). */
LUM_EXPORT void lum_set_abort_on_failure(bool on)
{
    lum_opt.abort_on_failure = on;
}

LUM_EXPORT bool lum_get_abort_on_failure(void)
{
    return lum_opt.abort_on_failure;
}

LUM_COLD_TEXT void lum_on_alloc_failure(struct lum_thread_counters_v1 *tc, size_t size, size_t alignment, int err)
{
    bool injected = ft.pending;
    ft.pending = false;
    bool probe = LUM_PROBE_ON(alloc_failure);
    enum lum_diag_mode mode = lum_opt.diag;
    bool diag = !ft.reporting &&
                (mode == LUM_DIAG_ALL || (mode == LUM_DIAG_CRITICAL && ft.critical > 0));
    uint64_t frames[LUM_MAX_FRAMES];
    uint32_t depth = 0;
    uint64_t id = 0;
    if ((probe || diag) && !lum_obs_busy && lum_opt.prof_depth) {
        lum_obs_busy = 1;
        depth = lum_unwind(frames, lum_opt.prof_depth, (uintptr_t)__builtin_return_address(0));
        lum_obs_busy = 0;
        id = depth ? lum_stack_hash(frames, depth) : 0; /* no stack: 0, as the contract says */
    }
    if (probe) {
        lum_batch_before_probe();
        STAP_PROBE7(lumalloc, alloc_failure, LUM_U64(size), LUM_U64(alignment), LUM_U32(err),
                    LUM_U64(frames), LUM_U32(depth), LUM_U64(id), LUM_U64(tc));
    }
    if (diag) {
        ft.reporting = 1;
        lum_diag_report(tc, size, alignment, err, injected, frames, depth);
        ft.reporting = 0;
    }
    /* Injected failures are the test's own doing: aborting on them would end every sweep. */
    if (lum_get_abort_on_failure() && !injected) {
        char msg[200];
        size_t count, each;
        int n = lum_diag_overflow(&count, &each)
                    ? snprintf(msg, sizeof msg,
                               "lumalloc: allocation of %zu x %zu bytes (more than SIZE_MAX) failed (errno %d): "
                               "aborting (abort_on_failure)\n", count, each, err)
                    : snprintf(msg, sizeof msg,
                               "lumalloc: allocation of %zu bytes failed (errno %d): aborting "
                               "(abort_on_failure)\n", size, err);
        if (n > 0)
            lum_write_all(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
        abort();
    }
}

/* lum_fail_armed counted every thread's armed injector, and only the forking thread lives on
 * in the child: left as it was, it stayed non-zero for good, and every allocation of the child
 * went down the slow path unsampled (test_fork_storm: 3 children in 119 had no sample).  The
 * global injector and this thread's are all that remain; no other thread can arm or disarm
 * meanwhile, the child being single-threaded while its fork handlers run. */
void lum_failure_after_fork_child(void)
{
    int armed = (__atomic_load_n(&global_nth, __ATOMIC_RELAXED) != 0) + ft.armed;
    __atomic_store_n(&lum_fail_armed, armed, __ATOMIC_SEQ_CST);
}

void lum_failure_init(void)
{
    if (lum_opt.fail_nth)
        lum_fail_nth(lum_opt.fail_nth);
}
