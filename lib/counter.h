/* Fields with one writer at a time and readers anywhere: a thread's exact counters (struct
 * lum_thread_counters_v1), its caches' cache_room, and its pages' used / in_full / park_bias /
 * carved.  The owner (or
 * whoever holds the lock that stands in for it, as on sampled pages) updates them on the fast
 * paths; statistics, mallinfo2, the profiler's reports, the heap check and out-of-process tools
 * read them from other threads with no lock, for figures that are exact when the owners are
 * quiet and never torn.
 *
 * Writers: LUM_OWN_ADD / LUM_OWN_SUB / LUM_OWN_SET.  In ordinary builds they are the plain
 * `+=`, `-=`, `=`: with a single writer no update can be lost, and an aligned store of up to 8
 * bytes is atomic on x86-64 (what a reader needs: an old value or the new one), so a relaxed
 * atomic store would be the same instruction; but GCC turns an atomic load + add + store into
 * three instructions where `+=` is one add to memory, and malloc's and free's fast paths are
 * made of such adds (checked: their disassembly must not change with this header).
 * Under ThreadSanitizer (gcc defines __SANITIZE_THREAD__ with -fsanitize=thread) they become a
 * relaxed atomic load and store: the same single-writer protocol, now visible to TSan, which
 * would otherwise report every reader against every update.
 *
 * Readers in another thread: LUM_PEEK, a relaxed atomic load (a plain mov on x86-64).
 * The owner reads its own fields plainly. */
#ifndef LUM_COUNTER_H
#define LUM_COUNTER_H

#include "lumalloc_probes.h"

#ifdef __SANITIZE_THREAD__
#define LUM_OWN_ADD(lv, d)                                                                      \
    ({                                                                                          \
        __typeof__(&(lv)) own_p_ = &(lv);                                                       \
        __typeof__(lv) own_v_ = (__typeof__(lv))(__atomic_load_n(own_p_, __ATOMIC_RELAXED) + (d)); \
        __atomic_store_n(own_p_, own_v_, __ATOMIC_RELAXED);                                     \
        own_v_;                                                                                 \
    })
#define LUM_OWN_SUB(lv, d)                                                                      \
    ({                                                                                          \
        __typeof__(&(lv)) own_p_ = &(lv);                                                       \
        __typeof__(lv) own_v_ = (__typeof__(lv))(__atomic_load_n(own_p_, __ATOMIC_RELAXED) - (d)); \
        __atomic_store_n(own_p_, own_v_, __ATOMIC_RELAXED);                                     \
        own_v_;                                                                                 \
    })
#define LUM_OWN_SET(lv, v) __atomic_store_n(&(lv), (v), __ATOMIC_RELAXED)
#else
/* the value after the update, as `+=` gives it (free's `--used == 0` test) */
#define LUM_OWN_ADD(lv, d) ((lv) += (d))
#define LUM_OWN_SUB(lv, d) ((lv) -= (d))
#define LUM_OWN_SET(lv, v) ((void)((lv) = (v)))
#endif

#define LUM_PEEK(lv) __atomic_load_n(&(lv), __ATOMIC_RELAXED)

/* Every field of a thread's counters block but its link (`next`, which leads): the fields its
 * owner writes through LUM_OWN_*.  One list for the readers and the record's reset (heap.c),
 * checked against the struct's size there. */
#define LUM_TC_FIELDS(X)                                                                          \
    X(tid) X(state) X(alloc_count) X(alloc_bytes) X(free_count) X(free_bytes) X(large_count)     \
    X(large_bytes) X(failures) X(sampled_count) X(sampled_bytes)

/* A thread's counters as another thread reads them: field by field (each one whole; together
 * they are as consistent as the owner's progress between two loads allows). */
static inline struct lum_thread_counters_v1 lum_tc_peek(const struct lum_thread_counters_v1 *tc)
{
    struct lum_thread_counters_v1 c;
    c.next = LUM_PEEK(tc->next);
#define LUM_TC_PEEK_FIELD(f) c.f = LUM_PEEK(tc->f);
    LUM_TC_FIELDS(LUM_TC_PEEK_FIELD)
#undef LUM_TC_PEEK_FIELD
    return c;
}

#endif
