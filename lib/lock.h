/* The futex lock of lock.c, for the core's rare global paths and the profiler's tables (which
 * every sample and sampled free takes: at ~100 samples/s per 50 MB/s allocated, pthread_mutex's
 * ~55 instructions a lock/unlock pair were a tenth of a sample's cost). */
#ifndef LUM_LOCK_H
#define LUM_LOCK_H
#include <stdatomic.h>
#include <stdbool.h>

typedef struct { _Atomic int state; } lum_lock_t;
#define LUM_LOCK_INIT {0}
void lum_lock_slow(lum_lock_t *l);
static inline void lum_lock(lum_lock_t *l)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong_explicit(&l->state, &expected, 1, memory_order_acquire,
                                                 memory_order_relaxed))
        lum_lock_slow(l);
}
static inline bool lum_trylock(lum_lock_t *l)
{
    int expected = 0;
    return atomic_compare_exchange_strong_explicit(&l->state, &expected, 1, memory_order_acquire,
                                                   memory_order_relaxed);
}
void lum_unlock_wake(lum_lock_t *l);
/* Inline too: a sample and its free let go of two locks each. */
static inline void lum_unlock(lum_lock_t *l)
{
    if (atomic_exchange_explicit(&l->state, 0, memory_order_release) == 2)
        lum_unlock_wake(l);
}
/* In a fork child, for a lock the parent's other threads may have held. */
static inline void lum_lock_reset(lum_lock_t *l)
{
    atomic_store_explicit(&l->state, 0, memory_order_relaxed);
}
#endif
