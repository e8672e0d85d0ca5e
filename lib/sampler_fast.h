/* The sampler's common case, inline for the core's sampling path and its sampled free: a sample
 * from the same stack as this thread's last one (the unwinder's memo holds and names the stack
 * the thread last recorded), no tracer attached, the record in the block's slot.  Out of line,
 * lum_on_sample_at and lum_on_sample_free_rec were a call, a second frame of saved registers
 * and the same checks again (~40 instructions a sample).  Anything else goes through them. */
#ifndef LUM_SAMPLER_FAST_H
#define LUM_SAMPLER_FAST_H
#include "obs_internal.h"
#include "options.h"
#include "probes.h"
#include "prof_records.h"
#include "unwind_memo.h"

/* The stack this thread last recorded, and the unwinder's name for its frames (lum_memo.seq
 * when they were the memo's, else 0).  Written by the sampler only, read by this thread only. */
extern __thread struct lum_stack *lum_last_stack LUM_TLS;
extern __thread uint64_t lum_last_same LUM_TLS;

/* The rest of a sample whose frames are unwound (sampler.c). */
void lum_sample_commit(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested, size_t usable, uint64_t wb,
                       double objects, const uint64_t *frames, uint32_t depth, uint64_t same,
                       struct lum_sample_rec *rec);
/* lum_on_sample_at without trying the memo (lum_sample_fast did). */
void lum_sample_walk(struct lum_thread_counters_v1 *tc, void *ptr, size_t requested, size_t usable,
                     const uintptr_t *at, double factor, struct lum_sample_rec *rec);

/* A sample's weight in bytes: factor (weight / usable, see sampler.c) times its requested size,
 * rounded; well below 2^63, so a signed conversion does. */
static inline uint64_t lum_sample_bytes(double factor, uint64_t s)
{
    return (uint64_t)(int64_t)(factor * (double)(int64_t)s + 0.5);
}

/* Under lum_prof_lock. */
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

/* Drops a record's share of its stack's live figures; under lum_prof_lock. */
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

/* lum_on_sample_at(tc, ptr, requested, usable, at, factor, rec) for the core's sampling path:
 * at its frame (non-NULL), factor > 0, rec the block's slot. */
static inline __attribute__((always_inline)) void lum_sample_fast(struct lum_thread_counters_v1 *tc, void *ptr,
                                                                  size_t requested, size_t usable,
                                                                  const uintptr_t *at, double factor,
                                                                  struct lum_sample_rec *rec)
{
#if defined(__x86_64__) && !defined(LUM_UNWIND_VERIFY)
    struct lum_stack *st = lum_last_stack;
    if (__builtin_expect(st != NULL, 1) && lum_opt.prof && !LUM_PROBE_ON(sample) && !LUM_PROBE_ON(sample_batch) &&
        !lum_obs_busy && lum_opt.prof_depth) {
        uint64_t frames[LUM_MAX_FRAMES], same = 0;
        lum_obs_busy = 1;
        int d = lum_unwind_memo_at(frames, lum_opt.prof_depth, at, &same);
        lum_obs_busy = 0;
        if (d < 0) {
            lum_sample_walk(tc, ptr, requested, usable, at, factor, rec);
            return;
        }
        uint64_t s = requested ? requested : 1;
        uint64_t wb = lum_sample_bytes(factor, s);
        tc->sampled_bytes += wb;
        if (__builtin_expect(!d || same != lum_last_same, 0)) {
            lum_sample_commit(tc, ptr, requested, usable, wb, factor, frames, (uint32_t)d, same, rec);
            return;
        }
        /* the memo's frames are lum_last_stack's (see commit in sampler.c) */
        lum_lock(&lum_prof_lock);
        __atomic_store_n(&lum_prof_samples, lum_prof_samples + 1, __ATOMIC_RELAXED);
        lum_stack_add_sample(st, wb, factor);
        lum_records.slot_live++;
        lum_sample_rec_fill(rec, s, usable, wb, factor, st, st->id);
        lum_unlock(&lum_prof_lock);
        return;
    }
#endif
    lum_on_sample_at(tc, ptr, requested, usable, at, factor, rec);
}

/* lum_on_sample_free_rec, for the core's sampled free. */
static inline __attribute__((always_inline)) void lum_sample_free_fast(void *ptr, struct lum_sample_rec *rec)
{
    if (!rec->usable)
        return;
    if (LUM_PROBE_ON(sample_batch) || LUM_PROBE_ON(sample_free)) {
        lum_on_sample_free_rec(ptr, rec);
        return;
    }
    lum_lock(&lum_prof_lock);
    lum_sample_rec_release(rec);
    rec->usable = 0;
    lum_records.slot_live--;
    lum_unlock(&lum_prof_lock);
}
#endif
