/* The sampler's common case, inline for the core's sampling path and its sampled free, under
 * the sampled pages' lock the core holds for the block: a sample from the same stack as this
 * thread's last one (the unwinder's memo holds and names the stack the thread last recorded),
 * no tracer attached, the record in the block's slot.  Out of line, lum_on_sample_at and
 * lum_on_sample_free_rec were a call, a second frame of saved registers, the same checks again
 * and a second lock (~60 instructions a sample).  Anything else goes through them. */
#ifndef LUM_SAMPLER_FAST_H
#define LUM_SAMPLER_FAST_H
#include "counter.h"
#include "obs_internal.h"
#include "options.h"
#include "probes.h"
#include "prof_records.h"
#include "unwind_memo.h"

/* The rest of a sample whose frames are unwound (sampler.c). */
void lum_sample_commit(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested, size_t usable, uint64_t wb,
                       double objects, const uint64_t *frames, uint32_t depth, uint64_t same,
                       struct lum_sample_rec *rec);
/* lum_on_sample_at into the caller's frames[LUM_MAX_FRAMES], trying the memo only when
 * lum_sample_locked has not.  The sampling path lends the buffer lum_sample_locked had: a
 * second one here put a thread's sample 8.5 KiB below its stack's top, a page deeper than a
 * thread that never samples (glibc keeps a cached stack's top 20 KiB resident). */
void lum_sample_walk(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested, size_t usable,
                     const uintptr_t *at, double factor, struct lum_sample_rec *rec, bool try_memo,
                     uint64_t *frames);

/* A sample's weight in bytes: factor (weight / usable, see sampler.c) times its requested size,
 * rounded; well below 2^63, so a signed conversion does. */
static inline uint64_t lum_sample_bytes(double factor, uint64_t s)
{
    return (uint64_t)(int64_t)(factor * (double)(int64_t)s + lum_double_imm(0x3fe0000000000000ULL) /* 0.5 */);
}

/* Under lum_sampled_lock (see obs_internal.h). */
static inline void lum_stack_add_sample(struct lum_stack *st, uint64_t wb, double objects)
{
    st->samples++;
    st->alloc_bytes += wb;
    st->alloc_objects += objects;
    st->live_samples++;
    st->live_bytes += (int64_t)wb;
    st->live_objects += objects;
}

static inline void lum_sample_rec_fill(struct lum_sample_rec *rec, uint64_t s, uint64_t usable, uint64_t wb,
                                       double objects, struct lum_stack *st, uint64_t id)
{
    rec->requested = s;
    rec->usable = usable ? usable : 1; /* never 0: that is an empty slot */
    rec->weight = wb;
    rec->objects = objects;
    rec->stack = st;
    rec->stack_id = id;
}

/* Drops a record's share of its stack's live figures; under lum_sampled_lock. */
static inline void lum_sample_rec_release(const struct lum_sample_rec *r)
{
    struct lum_stack *st = r->stack;
    if (st) {
        st->live_samples--;
        st->live_bytes -= (int64_t)r->weight;
        st->live_objects -= r->objects;
    }
    __atomic_store_n(&lum_prof_sample_frees, lum_prof_sample_frees + 1, __ATOMIC_RELAXED);
}

/* What lum_sample_locked left for lum_sample_rest. */
struct lum_sample_rest {
    int d;              /* frames from the memo; -1: to walk (the memo missed); -2: the whole
                         * sample to lum_on_sample_at */
    uint64_t same, wb;
    uint64_t frames[LUM_MAX_FRAMES];
};

/* The core's sample of block ptr (slot rec), under lum_sampled_lock, taken for the block: when
 * no tracer is attached and the memo's frames are the thread's last stack's (see commit in
 * sampler.c), records it all under that lock and returns true.  The memo's check reads only
 * this thread's stack and its own state, a few dozen instructions: anything longer (a walk, a
 * new stack) is left in *r for lum_sample_rest, after the lock.  at: the sampling path's frame
 * (see observe.h); factor > 0. */
static inline __attribute__((always_inline)) bool lum_sample_locked(struct lum_thread_counters_v1 *tc,
                                                                    const uintptr_t *at, size_t requested,
                                                                    size_t usable, double factor,
                                                                    struct lum_sample_rec *rec,
                                                                    struct lum_sample_rest *r)
{
    r->d = -2;
#if defined(__x86_64__) && !defined(LUM_UNWIND_VERIFY)
    struct lum_stack *st = lum_memo.last_stack;
    /* Tests or-ed where both sides are plain loads: this check is a sixteenth of a sample. */
    if (__builtin_expect(st == NULL || !at || lum_obs_busy, 0) || LUM_PROBE_EITHER_ON(sample, sample_batch) ||
        __builtin_expect(!lum_opt.prof | !lum_opt.prof_depth, 0))
        return false;
    uint64_t same = 0, last = lum_memo.last_same;
    /* No lum_obs_busy around it: the check allocates nothing, and a signal handler's sample
     * meanwhile would wait for the lock held here whatever it said.  The memo's own busy
     * keeps a handler's walk from rewriting it.  The frames are copied out only when they are
     * not the last stack's (last). */
    int d = lum_unwind_memo_at(r->frames, lum_opt.prof_depth, at, &same, last, true);
    uint64_t s = requested ? requested : 1;
    uint64_t wb = lum_sample_bytes(factor, s);
    if (__builtin_expect(d <= 0 || same != last, 0)) {
        r->d = d, r->same = same, r->wb = wb;
        return false;
    }
    LUM_OWN_ADD(tc->sampled_bytes, wb);
    __atomic_store_n(&lum_prof_samples, lum_prof_samples + 1, __ATOMIC_RELAXED);
    lum_stack_add_sample(st, wb, factor);
    lum_records.slot_live++;
    lum_sample_rec_fill(rec, s, usable, wb, factor, st, st->id);
    return true;
#else
    (void)tc, (void)at, (void)requested, (void)usable, (void)factor, (void)rec;
    return false;
#endif
}

/* After the lock, the sample lum_sample_locked did not record. */
static inline __attribute__((always_inline)) void lum_sample_rest(struct lum_sample_rest *r,
                                                                  struct lum_thread_counters_v1 *tc, void *ptr,
                                                                  size_t requested, size_t usable,
                                                                  const uintptr_t *at, double factor,
                                                                  struct lum_sample_rec *rec)
{
    if (r->d >= 0) {
        LUM_OWN_ADD(tc->sampled_bytes, r->wb);
        lum_sample_commit(tc, ptr, requested, usable, r->wb, factor, r->frames, (uint32_t)r->d, r->same, rec);
    } else if (r->d == -1 || at) {
        lum_sample_walk(tc, ptr, requested, usable, at, factor, rec, r->d != -1, r->frames);
    } else {
        lum_on_sample_rec(tc, ptr, requested, usable, rec);
    }
}

/* lum_on_sample_free_rec, for the core's sampled free, under lum_sampled_lock: a traced free
 * (probe fields kept past the lock) is out of line, before the lock (lum_sample_free_traced). */
static inline __attribute__((always_inline)) void lum_sample_free_locked(struct lum_sample_rec *rec)
{
    if (!rec->usable)
        return;
    lum_sample_rec_release(rec);
    rec->usable = 0;
    lum_records.slot_live--;
}
#endif
