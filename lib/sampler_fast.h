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

/* lum_on_sample_at, trying the memo only when lum_sample_locked has not, into a frames buffer
 * of its own.  The sampling path has none: lum_sample_locked leaves no frames for it (a memo
 * hit on another stack than the last goes to the memo again here, one sample in very many),
 * and with frames[LUM_MAX_FRAMES] in its frame the sampling path's locals and spills lay 600
 * bytes below its caller's stack pointer, on two stack lines the program does not touch between
 * samples (~1.4 D1 misses a sample on bench ring under callgrind). */
void lum_sample_walk(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested, size_t usable,
                     const uintptr_t *at, double factor, struct lum_sample_rec *rec, bool try_memo);

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
    int d;              /* -1: to walk (the memo missed); -2: the whole sample to
                         * lum_on_sample_at (the memo to try again, when there is a frame) */
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
#if defined(__x86_64__) && !defined(LUM_UNWIND_VERIFY)
    struct lum_stack *st = lum_memo.last_stack;
    /* Tests or-ed where both sides are plain loads: this check is a sixteenth of a sample.
     * *r is written only on the ways out that leave it something: it lies deep in the caller's
     * frame (frames[] is 512 bytes), on a stack line the program does not touch between two
     * samples (~0.7 D1 misses a sample on bench ring when the hit set r->d too). */
    if (__builtin_expect(st == NULL || !at || lum_obs_busy, 0) || LUM_PROBE_EITHER_ON(sample, sample_batch) ||
        __builtin_expect(!lum_opt.prof | !lum_opt.prof_depth, 0)) {
        r->d = -2;
        return false;
    }
    uint64_t same = 0, last = lum_memo.last_same;
    /* No lum_obs_busy around it: the check allocates nothing, and a signal handler's sample
     * meanwhile would wait for the lock held here whatever it said.  The memo's own busy
     * keeps a handler's walk from rewriting it.  The frames are copied out only when they are
     * not the last stack's (last): never here, where they are not kept (out is only written
     * then; lum_sample_walk tries the memo again for them). */
    uint64_t *no_frames = NULL;
    int d = lum_unwind_memo_at(no_frames, lum_opt.prof_depth, at, &same, last, true);
    if (__builtin_expect(d < 0, 0)) {
        r->d = d; /* -1: the memo does not hold; -2: it holds another stack than last's */
        return false;
    }
    uint64_t s = requested ? requested : 1;
    uint64_t wb = lum_sample_bytes(factor, s);
    LUM_OWN_ADD(tc->sampled_bytes, wb);
    __atomic_store_n(&lum_prof_samples, lum_prof_samples + 1, __ATOMIC_RELAXED);
    lum_stack_add_sample(st, wb, factor);
    lum_records.slot_live++;
    lum_sample_rec_fill(rec, s, usable, wb, factor, st, st->id);
    return true;
#else
    (void)tc, (void)at, (void)requested, (void)usable, (void)factor, (void)rec;
    r->d = -2;
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
    if (r->d == -1 || at) {
        lum_sample_walk(tc, ptr, requested, usable, at, factor, rec, r->d != -1);
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
