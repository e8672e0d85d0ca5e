/* Poisson sampling by bytes.  Each thread counts down a random number of bytes drawn from an
 * exponential distribution with mean T = sample_interval; the allocation that crosses zero is
 * sampled.  Sampling is then memoryless in bytes, so an allocation of s bytes is sampled with
 * probability p(s) = 1 - exp(-s/T), and weighting each sample by s / p(s) makes the summed
 * weights an unbiased estimate of the bytes allocated at a site (and weight / s of its objects),
 * whatever the mix of sizes. */
#include "batch.h"
#include "lmath.h"
#include "obs_internal.h"
#include "observe.h"
#include "options.h"
#include "probes.h"
#include "prof_records.h"
#include "sampler_fast.h"
#include "unwind_memo.h"

LUM_SAMPLE_DATA uint64_t lum_prof_samples, lum_prof_sample_frees;

int64_t lum_sampler_next_interval(uint64_t *rng)
{
    return lum_sampler_draw(rng);
}

/* Inline for lum_on_sample, which calls it on every sample. */
static inline double sample_weight(uint64_t size, uint64_t interval)
{
    if (!size)
        size = 1;
    if (!interval)
        return (double)size;
    double x = (double)size / (double)interval;
    /* w = T x / (1 - e^-x).  Below x = 1/2 (every small block at the default interval) its
     * series T (1 + x/2 + x^2/12 - x^4/720 + x^6/30240) is within 4e-9 of it relatively, a
     * thousandth of a byte at 512 KiB, for ~10 instructions instead of an expm1. */
    if (x < 0.5) {
        double x2 = x * x;
        return (double)interval *
               (1 + x * 0.5 + x2 * (1.0 / 12 + x2 * (-1.0 / 720 + x2 * (1.0 / 30240))));
    }
    /* -expm1 keeps precision when s << T (p ~ s/T, w ~ T + s/2). */
    double p = -lum_expm1_neg(x);
    return p > 0 ? (double)size / p : (double)interval;
}

double lum_sample_weight(uint64_t size, uint64_t interval)
{
    return sample_weight(size, interval);
}

static inline bool same_frames(const uint64_t *a, const uint64_t *b, uint32_t depth)
{
    for (uint32_t i = 0; i < depth; i++)
        if (a[i] != b[i])
            return false;
    return true;
}

double lum_sample_factor(uint64_t usable, uint64_t interval)
{
    uint64_t u = usable ? usable : 1;
    return sample_weight(u, interval) / (double)u;
}

/* A sample once unwound: its stack's figures, its record, the batch and the probe. */
static inline __attribute__((always_inline)) void commit(void *ptr, size_t requested, size_t usable, uint64_t wb,
                                                         double objects, const uint64_t *frames, uint32_t depth,
                                                         uint64_t same, struct lum_sample_rec *rec, bool probe,
                                                         bool batch, struct lum_thread_counters_v1 *tc)
{
    uint64_t s = requested ? requested : 1, id;
    bool start = false;
    /* A thread's samples often come from the same stack (a hot loop): comparing the frames
     * with the last stack it recorded skips hashing them and the table lookup.  Table
     * entries never change or go away, so reading one without the lock is fine. */
    struct lum_stack *st = lum_memo.last_stack;
    if (st && depth && same && same == lum_memo.last_same)
        id = st->id; /* the unwinder vouches that these are lum_memo.last_stack's frames */
    else if (st && depth && st->depth == depth && same_frames(st->frames, frames, depth))
        id = st->id;
    else /* no stack taken: stack_id 0, as the probe contract says */
        st = NULL, id = depth ? lum_stack_hash(frames, depth) : 0;

    lum_lock(&lum_prof_lock);
    if (lum_opt.prof) {
        /* depth 0 (nested or failed unwind) still gets a site, shown as [unknown], so totals
         * over sites add up to the process total. */
        if (!st)
            lum_memo.last_stack = st = lum_stacktab_get(frames, depth, depth ? id : 1);
        lum_memo.last_same = st ? same : 0;
    } else {
        st = NULL;
    }
    bool slot = rec != NULL;
    if (!slot) {
        struct lum_rec *r = lum_records_add((uintptr_t)ptr);
        rec = r ? &r->s : NULL;
    }
    /* The figures a sample changes are the sampled pages' lock's (see obs_internal.h), so
     * that the core's sampling path records under the lock it takes anyway. */
    lum_lock(&lum_sampled_lock);
    __atomic_store_n(&lum_prof_samples, lum_prof_samples + 1, __ATOMIC_RELAXED);
    if (st)
        lum_stack_add_sample(st, wb, objects);
    if (slot)
        lum_records.slot_live++;
    if (rec)
        lum_sample_rec_fill(rec, s, usable, wb, objects, st, id);
    lum_unlock(&lum_sampled_lock);
    if (batch)
        start = lum_batch_add_sample((uintptr_t)ptr, requested, usable, wb, id, frames, depth);
    lum_unlock(&lum_prof_lock);
    if (start)
        lum_batch_start_flusher();

    if (probe)
        STAP_PROBE8(lumalloc, sample, LUM_U64(ptr), LUM_U64(requested), LUM_U64(usable),
                    LUM_U64(wb), LUM_U64(frames), LUM_U32(depth), LUM_U64(id), LUM_U64(tc));
}

/* try_memo: the unwinder's memo is still to be tried (lum_sample_locked has not). */
static inline __attribute__((always_inline)) void on_sample(struct lum_thread_counters_v1 *tc, void *ptr,
                                                            size_t requested, size_t usable, const uintptr_t *at,
                                                            double factor, struct lum_sample_rec *rec, bool try_memo,
                                                            uint64_t *frames)
{
    uint64_t s = requested ? requested : 1;
    /* The allocator samples by usable bytes (its exact byte counter is the sampling clock), so
     * the chance of this sample is p(usable); s / p(usable) keeps the estimate of requested
     * bytes unbiased (Horvitz-Thompson): w = s * (weight(usable) / usable), the factor, which
     * the core keeps per class. */
    if (factor <= 0) {
        uint64_t u = usable ? usable : s;
        factor = sample_weight(u, lum_opt.sample_interval) / (double)u;
    }
    uint64_t wb = lum_sample_bytes(factor, s);
    if (tc)
        LUM_OWN_ADD(tc->sampled_bytes, wb);

    uint32_t depth = 0;
    uint64_t same = 0;
    bool probe = LUM_PROBE_ON(sample), batch = LUM_PROBE_ON(sample_batch);
    /* Unwinding only for someone who will read the stack: the in-process profiler or an
     * attached tracer.  Never while already inside profiler code (a nested allocation from
     * a report writer's stdio): that is the recursion guard. */
    if ((lum_opt.prof || probe || batch) && !lum_obs_busy && lum_opt.prof_depth) {
        lum_obs_busy = 1;
#if defined(__x86_64__)
        /* From the frame `at` names (see observe.h): no context capture, and none of the
         * frames in between walked.  hook_ret 0: no frame to drop up to, the walk starts
         * outside the hooks already. */
        if (at) {
            int d = try_memo ? lum_unwind_memo_at(frames, lum_opt.prof_depth, at, &same, 0, false) : -1;
            depth = d >= 0 ? (uint32_t)d
                           : lum_unwind_from(frames, lum_opt.prof_depth, at[1], (uintptr_t)(at + 2), at[0], 0, &same);
        } else
#endif
            depth = lum_unwind(frames, lum_opt.prof_depth, (uintptr_t)__builtin_return_address(0));
        lum_obs_busy = 0;
    }
    commit(ptr, requested, usable, wb, factor /* w / s */, frames, depth, same, rec, probe, batch, tc);
}

void lum_on_sample_at(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested, size_t usable,
                      const uintptr_t *at, double factor, struct lum_sample_rec *rec)
{
    uint64_t frames[LUM_MAX_FRAMES];
    on_sample(tc, ptr, requested, usable, at, factor, rec, true, frames);
}

void lum_sample_walk(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested, size_t usable,
                     const uintptr_t *at, double factor, struct lum_sample_rec *rec, bool try_memo)
{
    uint64_t frames[LUM_MAX_FRAMES];
    on_sample(tc, ptr, requested, usable, at, factor, rec, try_memo, frames);
}

/* __builtin_frame_address makes gcc give this function a standard frame (push rbp; mov rsp,
 * rbp): the caller's rbp is saved at fp[0], the return address at fp[1], and the caller's rsp at
 * the call is fp + 2, so the unwind can start in the caller.  The return address check guards
 * against a compiler that lays the frame out otherwise. */
__attribute__((noinline)) void lum_on_sample(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested,
                                             size_t usable)
{
    const uintptr_t *fp = __builtin_frame_address(0);
    if (fp[1] != (uintptr_t)__builtin_return_address(0))
        fp = NULL;
    lum_on_sample_at(tc, ptr, requested, usable, fp, 0, NULL);
    /* not a tail call: the walk reads this frame's return address */
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void lum_on_sample_rec(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested,
                                                 size_t usable, struct lum_sample_rec *rec)
{
    const uintptr_t *fp = __builtin_frame_address(0);
    if (fp[1] != (uintptr_t)__builtin_return_address(0))
        fp = NULL;
    lum_on_sample_at(tc, ptr, requested, usable, fp, 0, rec);
    __asm__ volatile("" ::: "memory");
}

/* A sampled free with a tracer attached (batch or sample_free probe): the record's fields are
 * kept for the probe past the lock.  slot: the block's own record (lum_on_sample_free_rec), or
 * NULL: the table's. */
static LUM_COLD_TEXT void sample_free_traced(void *ptr, struct lum_sample_rec *slot)
{
    struct lum_sample_rec r = {0};
    struct lum_rec *n = NULL;
    bool start = false, found;
    lum_lock(&lum_prof_lock);
    if (slot) {
        /* the block's slot: only whoever frees the block writes it now */
        if ((found = slot->usable != 0))
            r = *slot;
    } else if ((found = (n = lum_records_take((uintptr_t)ptr)) != NULL)) {
        r = n->s;
    }
    if (found) {
        lum_lock(&lum_sampled_lock);
        lum_sample_rec_release(&r);
        if (slot) {
            slot->usable = 0;
            lum_records.slot_live--;
        }
        lum_unlock(&lum_sampled_lock);
        if (n)
            lum_records_put(n);
        if (LUM_PROBE_ON(sample_batch))
            start = lum_batch_add_free((uintptr_t)ptr, r.requested, r.usable, r.weight, r.stack_id);
    }
    lum_unlock(&lum_prof_lock);
    if (start)
        lum_batch_start_flusher();
    if (!found)
        return;
    if (LUM_PROBE_ON(sample_free))
        STAP_PROBE5(lumalloc, sample_free, LUM_U64(ptr), LUM_U64(r.requested), LUM_U64(r.usable),
                    LUM_U64(r.weight), LUM_U64(r.stack_id));
}

void lum_on_sample_free(void *ptr, size_t usable)
{
    (void)usable;
    /* Unlocked peek: the core may route every free of a sampled page here. */
    if (!__atomic_load_n(&lum_prof_samples, __ATOMIC_RELAXED))
        return;
    if (LUM_PROBE_ON(sample_batch) || LUM_PROBE_ON(sample_free)) {
        sample_free_traced(ptr, NULL);
        return;
    }
    lum_lock(&lum_prof_lock);
    struct lum_rec *r = lum_records_take((uintptr_t)ptr);
    if (r) {
        lum_lock(&lum_sampled_lock);
        lum_sample_rec_release(&r->s);
        lum_unlock(&lum_sampled_lock);
        lum_records_put(r);
    }
    lum_unlock(&lum_prof_lock);
}

void lum_on_sample_free_rec(void *ptr, struct lum_sample_rec *rec)
{
    /* The slot is the block's: whoever frees the block reads it, no other thread writes it. */
    if (!rec->usable)
        return;
    if (LUM_PROBE_ON(sample_batch) || LUM_PROBE_ON(sample_free)) {
        sample_free_traced(ptr, rec);
        return;
    }
    lum_lock(&lum_sampled_lock);
    lum_sample_free_locked(rec);
    lum_unlock(&lum_sampled_lock);
}
