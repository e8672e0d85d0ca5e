/* The futex lock of lock.h.  pthread_mutex would do, but this one has no dependency on
 * libpthread's initialisation, is trivially reset in a fork child, and costs ~10 instructions. */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdint.h>
#include "lock.h"

/* state: 0 free, else locked; 2 set: maybe waiters; LUM_LOCK_FORK set: held for a fork */
void lum_lock_slow(lum_lock_t *l)
{
    int s = atomic_load_explicit(&l->state, memory_order_relaxed);
    /* a lock held for a fork only ever becomes this thread's in its own prepare handler: once
     * here (not holding it), it never becomes ours while we wait */
    if ((s & LUM_LOCK_FORK) && lum_fork_holds(l))
        return;
    for (int spin = 0; spin < 100; spin++) {
        int expected = 0;
        if (atomic_compare_exchange_weak_explicit(&l->state, &expected, 1, memory_order_acquire,
                                                  memory_order_relaxed))
            return;
        __builtin_ia32_pause();
    }
    /* Marks waiters without clearing LUM_LOCK_FORK (the exchange with 2 this replaced would:
     * the forking thread's nested unlock would then have let go of the lock). */
    for (;;) {
        s = atomic_load_explicit(&l->state, memory_order_relaxed);
        if (s == 0) {
            if (atomic_compare_exchange_weak_explicit(&l->state, &s, 2, memory_order_acquire,
                                                      memory_order_relaxed))
                return;
            continue;
        }
        if (!(s & 2) && !atomic_compare_exchange_weak_explicit(&l->state, &s, s | 2, memory_order_relaxed,
                                                               memory_order_relaxed))
            continue;
        syscall(SYS_futex, &l->state, FUTEX_WAIT_PRIVATE, s | 2, NULL, NULL, 0);
    }
}

/* lum_unlock found waiters, or a lock held for a fork (state: what it found) */
void lum_unlock_slow(lum_lock_t *l, int state)
{
    if (state & LUM_LOCK_FORK)
        return; /* the forking thread's nested unlock: fork's parent or child handler lets go */
    /* ours: other threads can only have marked themselves waiting meanwhile */
    atomic_store_explicit(&l->state, 0, memory_order_release);
    syscall(SYS_futex, &l->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* The locks held for a fork, at most the prepare handlers' dozen, and the thread holding them.
 * Process-wide, not thread-local: one fork's handlers hold every lock, so a second forking
 * thread waits in its prepare until the first is done; and the library's static TLS is what a
 * late dlopen of it has to fit in glibc's surplus (these 132 bytes of TLS made it fail). */
unsigned lum_fork_nheld;
static const void *fork_held[16];
static uintptr_t fork_holder;

bool lum_fork_holds(const void *lock)
{
    unsigned n = __atomic_load_n(&lum_fork_nheld, __ATOMIC_ACQUIRE);
    if (!n || __atomic_load_n(&fork_holder, __ATOMIC_RELAXED) != (uintptr_t)pthread_self())
        return false;
    for (unsigned i = 0; i < n; i++)
        if (fork_held[i] == lock)
            return true;
    return false;
}

static void hold(const void *lock)
{
    unsigned n = lum_fork_nheld;
    if (n >= sizeof fork_held / sizeof fork_held[0])
        return;
    if (!n)
        __atomic_store_n(&fork_holder, (uintptr_t)pthread_self(), __ATOMIC_RELAXED);
    fork_held[n] = lock;
    __atomic_store_n(&lum_fork_nheld, n + 1, __ATOMIC_RELEASE);
}

void lum_fork_forget(const void *lock)
{
    unsigned n = lum_fork_nheld;
    for (unsigned i = 0; i < n; i++)
        if (fork_held[i] == lock) {
            fork_held[i] = fork_held[n - 1];
            if (n == 1)
                __atomic_store_n(&fork_holder, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&lum_fork_nheld, n - 1, __ATOMIC_RELEASE);
            return;
        }
}

void lum_fork_lock(lum_lock_t *l)
{
    lum_lock(l);
    atomic_fetch_or_explicit(&l->state, LUM_LOCK_FORK, memory_order_relaxed);
    hold(l);
}

void lum_fork_unlock(lum_lock_t *l)
{
    lum_fork_forget(l);
    lum_lock_order_released(l);
    if (atomic_exchange_explicit(&l->state, 0, memory_order_release) & 2)
        syscall(SYS_futex, &l->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

void lum_fork_reset(lum_lock_t *l)
{
    lum_fork_forget(l);
    lum_lock_reset(l);
}

void lum_fork_mutex_lock(pthread_mutex_t *m)
{
    lum_mutex_lock(m);
    hold(m);
}

void lum_fork_mutex_unlock(pthread_mutex_t *m)
{
    lum_fork_forget(m);
    lum_mutex_unlock(m);
}

void lum_fork_mutex_reset(pthread_mutex_t *m)
{
    lum_fork_forget(m);
    pthread_mutex_init(m, NULL);
}

void lum_fork_wrlock(pthread_rwlock_t *rw)
{
    lum_lock_order_check(rw);
    pthread_rwlock_wrlock(rw);
    hold(rw);
}

void lum_fork_rwlock_unlock(pthread_rwlock_t *rw)
{
    lum_fork_forget(rw);
    pthread_rwlock_unlock(rw);
}

void lum_fork_rwlock_reset(pthread_rwlock_t *rw)
{
    lum_fork_forget(rw);
    pthread_rwlock_init(rw, NULL);
}

#ifdef LUM_LOCK_DEBUG
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

/* Weak: the observability side's unit tests link without the core, and the core's without
 * the profiler. */
#define W __attribute__((weak, visibility("hidden")))
extern pthread_rwlock_t lum_unwind_fork_lock W;
extern lum_lock_t lum_cfi_lock W, lum_prof_lock W, lum_heaps_lock W, lum_abandoned_lock W, lum_sampled_lock W,
    lum_large_lock W, lum_segment_lock W, lum_meta_lock W;
extern pthread_mutex_t lum_warn_lock W, lum_obs_arena_lock W;

/* The order of fork's prepare handlers: observe.c's (which run first), then fork.c's. */
static const void *rank_of(const void *lock, unsigned *rank)
{
    const void *const order[] = {
        &lum_unwind_fork_lock, &lum_cfi_lock, &lum_prof_lock, &lum_warn_lock, &lum_obs_arena_lock,
        &lum_heaps_lock, &lum_abandoned_lock, &lum_sampled_lock, &lum_large_lock,
        &lum_segment_lock, &lum_meta_lock,
    };
    for (unsigned i = 0; i < sizeof order / sizeof order[0]; i++)
        if (order[i] && order[i] == lock) {
            *rank = i;
            return lock;
        }
    return NULL; /* a lock fork does not take (init, the unwinder's caches): any order */
}

static __thread unsigned held __attribute__((tls_model("initial-exec")));

static void inversion(unsigned rank)
{
    char msg[160];
    int n = snprintf(msg, sizeof msg,
                     "lumalloc: lock order inversion: waiting for the lock of rank %u while holding "
                     "ranks 0x%x (lock.c's table, fork's order)\n", rank, held);
    if (n > 0 && write(2, msg, (size_t)n) < 0) {}
    abort();
}

/* A lock this thread holds for a fork is passed through (lock.h), not recorded. */
void lum_lock_order_check(const void *lock)
{
    unsigned r;
    if (lum_fork_holds(lock)) {
        /* only ever before a wait for the unwinder's read lock: the forking thread holds it
         * for writing, and glibc would fail the read lock (EDEADLK), the unlock after it then
         * letting go of fork's write lock.  observe.c's prepare handler sets lum_obs_busy so
         * that the thread's allocations meanwhile do not unwind. */
        static const char msg[] = "lumalloc: a read lock of the unwind lock by the thread in fork()\n";
        if (write(2, msg, sizeof msg - 1) < 0) {}
        abort();
    }
    if (rank_of(lock, &r) && (held >> r))
        inversion(r);
}

void lum_lock_order_acquired(const void *lock, bool waited)
{
    unsigned r;
    if (lum_fork_holds(lock) || !rank_of(lock, &r))
        return;
    if (waited && (held >> r))
        inversion(r);
    held |= 1u << r;
}

void lum_lock_order_released(const void *lock)
{
    unsigned r;
    if (!lum_fork_holds(lock) && rank_of(lock, &r))
        held &= ~(1u << r);
}

void lum_lock_order_forget(void)
{
    held = 0;
}
#endif
