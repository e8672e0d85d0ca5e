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

/* fork() and other libraries' atfork handlers.  glibc runs prepare handlers in reverse order of
 * registration and parent/child handlers in order, and a library whose constructor registered
 * before ours (under LD_PRELOAD, or whose constructor ran first) has its prepare handler run
 * after ours has taken every lock, and its parent/child handlers before ours let go of them:
 * any malloc or free of theirs (gRPC's handlers, for one) then waited for a lock its own thread
 * held.  So a lock our prepare handlers take is marked held for the fork (LUM_LOCK_FORK in its
 * state, or the forking thread's list in lock.c for the pthread locks): the forking thread's
 * own acquisitions of it go through until our parent/child handler lets go of it or resets it,
 * and their unlocks do nothing.  That thread holds it exclusively, every other thread waits,
 * and it took it from a clean state (fork() is never called with one of ours held), so a
 * nested critical section starts from whole structures.  Only lum_lock's slow path and
 * lum_unlock's (a state other than plain "locked") look at it; trylock never goes through: its
 * callers tolerate a busy lock and some use it where they may already be inside the critical
 * section (lum_batch_sync under a purge).  The pthread rwlock is not passed through: observe.c's
 * prepare sets lum_obs_busy, so the forking thread's allocations do not unwind. */
#define LUM_LOCK_FORK 4
/* The count of locks held for a fork in progress (0 outside one). */
extern unsigned lum_fork_nheld __attribute__((visibility("hidden")));
/* Whether this thread holds lock (a lum_lock_t, pthread mutex or rwlock) for a fork. */
bool lum_fork_holds(const void *lock);
/* Prepare: takes the lock and marks it held for the fork.  Parent: lets go of it.  Child:
 * resets it (free, as it is in no other thread).  The _mutex and _rwlock forms likewise (the
 * rwlock for writing). */
void lum_fork_lock(lum_lock_t *l);
void lum_fork_unlock(lum_lock_t *l);
void lum_fork_reset(lum_lock_t *l);
void lum_fork_mutex_lock(pthread_mutex_t *m);
void lum_fork_mutex_unlock(pthread_mutex_t *m);
void lum_fork_mutex_reset(pthread_mutex_t *m);
void lum_fork_wrlock(pthread_rwlock_t *rw);
void lum_fork_rwlock_unlock(pthread_rwlock_t *rw);
void lum_fork_rwlock_reset(pthread_rwlock_t *rw);
/* A lock another file resets in the child (lum_cfi_lock): only forgotten here. */
void lum_fork_forget(const void *lock);

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
    if (__builtin_expect(__atomic_load_n(&lum_fork_nheld, __ATOMIC_RELAXED) != 0, 0) && lum_fork_holds(m))
        return; /* the forking thread, from another library's handler: see above */
    pthread_mutex_lock(m);
    lum_lock_order_acquired(m, true);
}
static inline void lum_mutex_unlock(pthread_mutex_t *m)
{
    if (__builtin_expect(__atomic_load_n(&lum_fork_nheld, __ATOMIC_RELAXED) != 0, 0) && lum_fork_holds(m))
        return;
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
void lum_unlock_slow(lum_lock_t *l, int state);
/* Inline too: a sample and its free let go of two locks each.  A compare-exchange from plain
 * "locked" (as cheap as the exchange it replaced): waiters, or a lock held for a fork (whose
 * nested unlock does nothing), go to the slow path. */
static inline void lum_unlock(lum_lock_t *l)
{
    lum_lock_order_released(l);
    int expected = 1;
    if (!atomic_compare_exchange_strong_explicit(&l->state, &expected, 0, memory_order_release,
                                                 memory_order_relaxed))
        lum_unlock_slow(l, expected);
}
/* In a fork child, for a lock the parent's other threads may have held. */
static inline void lum_lock_reset(lum_lock_t *l)
{
    atomic_store_explicit(&l->state, 0, memory_order_relaxed);
}
#endif
