/* The futex lock of lock.h.  pthread_mutex would do, but this one has no dependency on
 * libpthread's initialisation, is trivially reset in a fork child, and costs ~10 instructions. */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "lock.h"

/* states: 0 free, 1 locked, 2 locked with waiters */
void lum_lock_slow(lum_lock_t *l)
{
    for (int spin = 0; spin < 100; spin++) {
        int expected = 0;
        if (atomic_compare_exchange_weak_explicit(&l->state, &expected, 1, memory_order_acquire,
                                                  memory_order_relaxed))
            return;
        __builtin_ia32_pause();
    }
    while (atomic_exchange_explicit(&l->state, 2, memory_order_acquire) != 0)
        syscall(SYS_futex, &l->state, FUTEX_WAIT_PRIVATE, 2, NULL, NULL, 0);
}

/* lum_unlock found waiters */
void lum_unlock_wake(lum_lock_t *l)
{
    syscall(SYS_futex, &l->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
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

void lum_lock_order_check(const void *lock)
{
    unsigned r;
    if (rank_of(lock, &r) && (held >> r))
        inversion(r);
}

void lum_lock_order_acquired(const void *lock, bool waited)
{
    unsigned r;
    if (!rank_of(lock, &r))
        return;
    if (waited && (held >> r))
        inversion(r);
    held |= 1u << r;
}

void lum_lock_order_released(const void *lock)
{
    unsigned r;
    if (rank_of(lock, &r))
        held &= ~(1u << r);
}

void lum_lock_order_forget(void)
{
    held = 0;
}
#endif
