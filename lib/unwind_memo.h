/* The unwinder's per-thread memo of its last walk (unwind.c), and its hit, inline for the
 * sampler: most samples repeat the stack before them, and a hit then costs a few dozen
 * instructions with no call.  Only unwind.c records into it. */
#ifndef LUM_UNWIND_MEMO_H
#define LUM_UNWIND_MEMO_H
#include "obs_internal.h"

/* Frames walked beyond the requested depth, for lumalloc's own (this function, the hook, the
 * core's slow path and entry point, possibly a few more when the core's call chain is deep). */
#define LUM_UNWIND_SLACK 12
/* Unwinding cost is timed on one unwind in LUM_TIME_EVERY per thread (and scaled): a
 * clock_gettime pair cost more than a cached walk. */
#define LUM_TIME_EVERY 16
/* One unwind in LUM_UNLOAD_EVERY per thread, a timed one, looks whether the objects rules came
 * from are still loaded (see rules_generation_look in unwind.c): a look is a _dl_find_object and
 * a hash per such object, ~320 instructions on ring (callgrind; dl_iterate_phdr's look was
 * ~230 there), ~5 a sample at one in 64; the objects' bytes it hashes are read with a system
 * call, which callgrind does not count, at most once in 10 ms (cfi.c, PRINTS_EVERY_MS).  A
 * multiple of LUM_TIME_EVERY. */
#define LUM_UNLOAD_EVERY 64

/* The last cached walk of this thread from its first stored frame on: a sample's stack is
 * mostly the one before it (a hot loop), and re-reading the words that walk read costs a
 * fraction of walking again.  The walk is a function of its key frame (ip, sp; bp only when a
 * rule reads it before a slot restores it), the generation, max, the rules (never changed once
 * learnt, for a generation) and the words it read: when those are all as they were, and the
 * checked stack run still reaches as high, the walk would store the same frames.  So a hit
 * compares every word the walk read (each return address and each saved rbp, at its offset
 * from the key's sp) and copies the frames out; any difference walks again.  A stack that
 * differs only deep down differs in a return address that the walk read, or in none that it
 * read, and then the walk's frames are the same. */
#define MEMO_FRAMES (LUM_MAX_FRAMES + LUM_UNWIND_SLACK) /* the deepest walk */
#define MEMO_RBP 32 /* bits of a mask */
struct lum_walk_memo {
    /* The thread's unwinding state, with the memo: one thread-local block, so that the
     * sampling path reaches all of it from one address (each thread-local of its own cost a
     * load of its offset).  Laid out for a hit (lum_unwind_memo_at), whose lines are out of
     * cache at every sample: what it reads and writes in the first two lines (the block is
     * 64-aligned, see unwind.c), roff[] from there on, so that a stack of up to 11 return
     * addresses reads its offsets there too, and frames[1..6] on one line; what only a walk
     * reads (stack_lo, stack_hi, top) last.  Five lines a hit before, three now. */
    uint64_t seq;                   /* bumped at each recording: names the memo's frames */
    /* The sampler's: the stack this thread last recorded, and the unwinder's name for its
     * frames (seq when they were the memo's, else 0); read and written by this thread only. */
    struct lum_stack *last_stack;
    uint64_t last_same;
    uintptr_t ip, sp, bp;      /* the key frame */
    uint64_t key;              /* lum_memo_key of the walk's generation and max; 0: no memo */
    uint32_t unwinds;          /* walks so far: one in LUM_TIME_EVERY is timed */
    uint32_t d;                /* d frames */
    uint64_t hits;             /* walks taken from the memo (for tests) */
    uint32_t nret, nb;         /* nret return-address and nb rbp slots read */
    uint8_t busy, uses_bp;
    uint32_t roff[MEMO_FRAMES];      /* frames[i + 1] (0 for i + 1 == d) was read at sp + roff[i] */
    uint64_t frames[MEMO_FRAMES + 1];
    uint32_t boff[MEMO_RBP];         /* a saved rbp bval[i] was read at sp + boff[i] */
    uintptr_t bval[MEMO_RBP];
    uintptr_t stack_lo, stack_hi;   /* the part of the thread's own stack found readable, up to
                                     * its top (stack_from); never anything else */
    uintptr_t top;                  /* the highest CFA the walk reached */
    uintptr_t home_lo, home_hi;     /* the thread's own stack (home_find); 0, 0: not known */
    uint8_t home_known;             /* home_find has looked */
};

/* A walk's generation, max and kind (self: lumalloc's own leading frames skipped, which only
 * a separate lumalloc, lum_self_state 1 for good, does) in one word, for one compare; never 0
 * (max > 0, below 2^31). */
static inline uint64_t lum_memo_key(uint32_t gen, uint32_t max, bool self)
{
    return (uint64_t)gen << 32 | (uint64_t)self << 31 | max;
}

/* Whether every word m's walk read from the key frame at sp on still holds its value; stores
 * the frames into out[] as it checks them. */
static inline __attribute__((always_inline)) bool lum_memo_holds(const struct lum_walk_memo *m, uintptr_t sp, uint64_t *out)
{
    out[0] = m->frames[0];
    for (uint32_t i = 0; i < m->nret; i++) {
        uintptr_t v = *(const uintptr_t *)(sp + m->roff[i]);
        if (v != m->frames[i + 1])
            return false;
        out[i + 1] = v; /* out[d] = 0 when the walk read it: within max, then */
    }
    for (uint32_t i = 0; i < m->nb; i++)
        if (*(const uintptr_t *)(sp + m->boff[i]) != m->bval[i])
            return false;
    return true;
}

/* For lum_unwind_memo_at's timed unwinds (one in LUM_TIME_EVERY): the start time; the time
 * taken, scaled. */
uint64_t lum_unwind_timed_begin(void);
void lum_unwind_timed_end(uint64_t t0);
/* lum_memo_holds without the copy, out of line, for lum_unwind_memo_at: inlined into the
 * sampling path, where every register is taken, its loops spilled and reloaded each word (~15
 * instructions more a sample than the call).  This thread's lum_memo, addressed off %fs in
 * there: passing its address made the caller read the thread pointer (%fs:0, the TCB's line,
 * which nothing else on malloc's paths reads: a cache miss a sample). */
bool lum_memo_holds_at(uintptr_t sp);

extern __thread struct lum_walk_memo lum_memo LUM_TLS;
extern LUM_HIDDEN uint32_t lum_rules_gen;
extern LUM_HIDDEN int lum_self_state;

/* The walk from the frame at (at[0] its caller's rbp, at[1] the return address, at + 2 the
 * caller's rsp) when this thread's memo still holds for it: its depth, the frames in out[]
 * (unless *same comes out as want, 0: always) and *same as lum_unwind_from sets it, counted (and one in LUM_TIME_EVERY timed) as an unwind.
 * -1 when the memo does not hold: lum_unwind_from then does it all.  out NULL: only a hit on
 * want's frames (and more than none) is taken; any other hit is -2, not counted.  Only for a memo of a
 * walk that skipped lumalloc's own frames (its key says so: lumalloc a separate object, whose
 * memo's frames are the stored ones) and for a key frame outside lumalloc.  Busy first, as in rules_walk: a signal handler's walk must not
 * rewrite the memo under the checks.  locked: the caller holds lum_sampled_lock, and the hit is
 * counted in lum_unwind_hits_locked with plain additions: the two atomic ones were half the
 * locked instructions of a sample (each also keeps the loads after it from starting before the
 * stores before it are out). */
static inline __attribute__((always_inline)) int lum_unwind_memo_at(uint64_t *out, uint32_t max, const uintptr_t *at,
                                                                    uint64_t *same, uint64_t want, bool locked)
{
#if defined(__x86_64__) && !defined(LUM_UNWIND_VERIFY)
    uint32_t n = lum_memo.unwinds;
    struct lum_walk_memo *m = &lum_memo;
    /* The walk that looks at unloads (one in LUM_UNLOAD_EVERY) is left to lum_unwind_from,
     * which times it.  (Without _dl_find_object the look waits for the loader's lock, which a
     * dlclose holds while it frees: never from here, should this be called under a lock a
     * free takes.) */
    if (m->busy || __builtin_expect(n % LUM_UNLOAD_EVERY == 0, 0))
        return -1;
    uint64_t t0 = 0;
    if (__builtin_expect(n % LUM_TIME_EVERY == 0, 0))
        t0 = lum_unwind_timed_begin();
    m->busy = 1;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    uintptr_t sp = (uintptr_t)(at + 2);
    int d = -1;
    /* The words the walk read lie in this thread's own stack, which stays mapped while the
     * thread runs: only walks on it are recorded (rules_walk starts only in the stack run, which
     * never leaves it, see stack_from). */
    if (m->key == lum_memo_key(__atomic_load_n(&lum_rules_gen, __ATOMIC_ACQUIRE), max, true) && m->ip == at[1] &&
        m->sp == sp && (!m->uses_bp || m->bp == at[0]) && lum_memo_holds_at(sp)) {
        d = (int)m->d;
        /* The frames are copied out only for a caller that will read them: not when they are
         * those it names by want (the sampler's last stack, see commit in sampler.c), the
         * common case.  Before busy is cleared: a signal handler's walk may record the memo
         * again after. */
        if (!out) {
            if (m->seq != want || d == 0)
                d = -2; /* not counted: the caller tries again with a buffer */
        } else if (m->seq != want) {
            for (uint32_t i = 0; i <= m->nret; i++)
                out[i] = m->frames[i];
        }
    }
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    m->busy = 0;
    if (d < 0)
        return d; /* -1: lum_unwind_from walks (and, for a timed one, looks and times again) */
    if (__builtin_expect(t0 != 0, 0))
        lum_unwind_timed_end(t0);
    lum_memo.unwinds = n + 1;
    lum_memo.hits++;
    if (locked) {
        __atomic_store_n(&lum_unwind_hits_locked, lum_unwind_hits_locked + 1, __ATOMIC_RELAXED);
        __atomic_store_n(&lum_unwind_hit_frames_locked, lum_unwind_hit_frames_locked + (uint32_t)d,
                         __ATOMIC_RELAXED);
    } else {
        __atomic_fetch_add(&lum_unwind_count, 1, __ATOMIC_RELAXED);
        __atomic_fetch_add(&lum_unwind_frames, (uint32_t)d, __ATOMIC_RELAXED);
    }
    *same = lum_memo.seq;
    return d;
#else
    (void)out, (void)max, (void)at, (void)same, (void)want, (void)locked;
    return -1;
#endif
}
#endif
