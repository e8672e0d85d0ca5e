/* The futex lock of lock.c, for the core's rare global paths and the profiler's tables (which
 * every sample and sampled free takes: at ~100 samples/s per 50 MB/s allocated, pthread_mutex's
 * ~55 instructions a lock/unlock pair were a tenth of a sample's cost). */
#ifndef LUM_LOCK_H
#define LUM_LOCK_H
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

typedef struct { _Atomic int state; } lum_lock_t;
#define LUM_LOCK_INIT {0}
void lum_lock_slow(lum_lock_t *l);

/* fork()'s prepare handlers take the locks they know in one order (lock.c's rank table); any
 * other path that waits for one of them while holding a later one deadlocks, but only when a
 * fork lands in between, so tests rarely see it.  A -DLUM_LOCK_DEBUG build checks every
 * acquisition against that order and aborts at the first inversion, fork or not; other builds
 * compile these to nothing.  acquired: after the lock is held (a trylock never waits, so it is
 * recorded but not checked); check: before a wait on a lock that is not recorded (the unwinder's
 * read lock, which nests); forget: in a fork child, whose locks are all reset. */
#ifdef LUM_LOCK_DEBUG
void lum_lock_order_acquired(const void *lock, bool waited);
void lum_lock_order_released(const void *lock);
void lum_lock_order_check(const void *lock);
void lum_lock_order_forget(void);
#else
static inline void lum_lock_order_acquired(const void *lock, bool waited) { (void)lock, (void)waited; }
static inline void lum_lock_order_released(const void *lock) { (void)lock; }
static inline void lum_lock_order_check(const void *lock) { (void)lock; }
static inline void lum_lock_order_forget(void) {}
#endif

/* The observability side's pthread mutexes that fork's prepare handlers take, with the same
 * order check. */
static inline void lum_mutex_lock(pthread_mutex_t *m)
{
    pthread_mutex_lock(m);
    lum_lock_order_acquired(m, true);
}
static inline void lum_mutex_unlock(pthread_mutex_t *m)
{
    lum_lock_order_released(m);
    pthread_mutex_unlock(m);
}

static inline void lum_lock(lum_lock_t *l)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong_explicit(&l->state, &expected, 1, memory_order_acquire,
                                                 memory_order_relaxed))
        lum_lock_slow(l);
    lum_lock_order_acquired(l, true);
}
static inline bool lum_trylock(lum_lock_t *l)
{
    int expected = 0;
    bool got = atomic_compare_exchange_strong_explicit(&l->state, &expected, 1, memory_order_acquire,
                                                       memory_order_relaxed);
    if (got)
        lum_lock_order_acquired(l, false);
    return got;
}
void lum_unlock_wake(lum_lock_t *l);
/* Inline too: a sample and its free let go of two locks each. */
static inline void lum_unlock(lum_lock_t *l)
{
    lum_lock_order_released(l);
    if (atomic_exchange_explicit(&l->state, 0, memory_order_release) == 2)
        lum_unlock_wake(l);
}
/* In a fork child, for a lock the parent's other threads may have held. */
static inline void lum_lock_reset(lum_lock_t *l)
{
    atomic_store_explicit(&l->state, 0, memory_order_relaxed);
}
#endif
