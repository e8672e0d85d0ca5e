/* The seam between the allocator core and observability (sampling profiler, probes, failure
 * tools).  The core calls these only on slow paths; none of them may allocate through the
 * public malloc API (use lum_meta_alloc from the core for internal memory). */
#ifndef LUM_OBSERVE_H
#define LUM_OBSERVE_H
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "lumalloc_probes.h"
#include "lmath.h"
#include "options.h"

/* Once, at bootstrap, after lum_options_init(). */
void lum_observe_init(void);

/* Next sampling interval in bytes: exponential with mean lum_opt.sample_interval; INT64_MAX when
 * sampling is off.  rng is the calling thread's state (seeded by the core, never 0). */
int64_t lum_sampler_next_interval(uint64_t *rng);
/* The same, inline for the core's sampling path (a call and its checks were ~20 of a sample's
 * instructions). */
static inline int64_t lum_sampler_draw(uint64_t *rng)
{
    uint64_t t = lum_opt.sample_interval;
    if (!t)
        return INT64_MAX;
    double v = lum_exp_variate(rng) * (double)t;
    /* keeps the countdown far from overflow when a tiny uniform draw gives a huge interval
     * (v >= 2^62, whose bits are 0x43d0000000000000: lum_double_imm) */
    if (v >= lum_double_imm(0x43d0000000000000ULL))
        return (int64_t)1 << 62;
    return (int64_t)v;
}

/* The record of a sampled block kept in its block's slot on a sampled page (sampled.c keeps one
 * a slot), so that neither the sample nor its free hashes, links or unlinks it: the core finds
 * it from the block's address, whichever thread frees it.  usable is 0 while the slot holds no
 * live sample (a slot's block freed, or handed out unsampled), which the core keeps true by
 * giving back a slot array only when all its blocks are free. */
struct lum_stack;
struct lum_sample_rec {
    uint64_t requested, usable, weight;
    double objects;
    struct lum_stack *stack; /* NULL when no stack was recorded */
    uint64_t stack_id;
};

/* A sampled allocation: the core has already allocated ptr (from a sampled page, recognisable
 * at free) and counted it.  Computes the unbiased weight, unwinds, records, fires `sample`.
 * The record goes to a table keyed by ptr (found again by lum_on_sample_free). */
void lum_on_sample(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested, size_t usable);
/* The same, the record into rec (found again by lum_on_sample_free_rec). */
void lum_on_sample_rec(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested, size_t usable,
                       struct lum_sample_rec *rec);
/* The same, unwinding from the frame whose rbp-chain slot is `at` (at[0] its caller's rbp, at[1]
 * the return address, at + 2 the caller's rsp): the sampling path passes its own frame, so the
 * walk starts in the caller of the allocator's entry point instead of walking the allocator's
 * frames.  NULL: from the caller of lum_on_sample_at, unwound. */
void lum_on_sample_at(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested, size_t usable,
                      const uintptr_t *at, double factor, struct lum_sample_rec *rec);
/* A sample's weight is its requested size times lum_sample_factor(usable, interval): the core
 * keeps the factor per class (lum_on_sample_at's factor; 0: computed there). */
double lum_sample_factor(uint64_t usable, uint64_t interval);
/* A sampled block is being freed (before the core reuses it). */
void lum_on_sample_free(void *ptr, size_t usable);
/* The same for a block whose record is rec (lum_on_sample_rec, lum_on_sample_at): nothing when
 * rec holds no sample. */
void lum_on_sample_free_rec(void *ptr, struct lum_sample_rec *rec);

/* Large path (own mapping).  Fires probes, large-allocation warning. */
void lum_on_large_alloc(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested, size_t usable);
void lum_on_large_free(void *ptr, size_t usable);
/* An allocation at or above lum_opt.large_warn that does NOT take the large path (the large path
 * calls lum_on_large_alloc, which warns itself): prints the once-per-site warning. */
void lum_on_large_warn(size_t requested);

/* Failure injection: true when this allocation must fail.  Called by the core on the slow path
 * only while lum_fail_armed is non-zero (the core then sends every allocation down it).
 * Changed by any thread (failure.c, atomic read-modify-writes); read with lum_fail_is_armed: an
 * allocation racing with an arm or a disarm may go either way, which the injector's contract
 * allows (other threads join at their next slow-path allocation).  The read is the volatile
 * one, an aligned 4-byte load (atomic on x86-64), in ordinary builds: GCC keeps other loads
 * from moving across a relaxed atomic load, and in calloc that reloaded the TLS heap pointer
 * after it (a longer calloc).  Under ThreadSanitizer it is the relaxed atomic load, so that
 * TSan sees the protocol (see counter.h for the same reasoning on counters). */
extern LUM_HIDDEN volatile int lum_fail_armed;
static inline int lum_fail_is_armed(void)
{
#ifdef __SANITIZE_THREAD__
    return __atomic_load_n(&lum_fail_armed, __ATOMIC_RELAXED);
#else
    return lum_fail_armed;
#endif
}
bool lum_fail_should_inject(size_t size);

/* An allocation is about to return NULL with errno = err.  Probe, diagnostics, abort. */
void lum_on_alloc_failure(struct lum_thread_counters_v1 *tc, size_t size, size_t alignment, int err);
/* Set (count, size) before the lum_on_alloc_failure of a count * size that overflowed, (0, 0)
 * after: the report then says what was asked, not SIZE_MAX (which the probe still gets). */
void lum_diag_note_overflow(size_t count, size_t size);
/* The (count, size) noted for the failure being reported, if any. */
bool lum_diag_overflow(size_t *count, size_t *size);

void lum_on_thread_start(struct lum_thread_counters_v1 *tc);
void lum_on_thread_exit(struct lum_thread_counters_v1 *tc);

/* Kernel-assisted memory return events (issue 7). */
void lum_on_purge(uint64_t bytes, uint32_t reason);
void lum_on_pressure(uint64_t stall_us, uint64_t bytes_released);

#endif
