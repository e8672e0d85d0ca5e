/* fork() in a multi-threaded process: every allocator lock is taken before the fork so the
 * child never inherits one held by a thread that no longer exists.  Held for the fork
 * (lock.h): another library's handlers that run after this prepare handler or before these
 * parent/child handlers (registered before ours) allocate and free through them. */
#include <pthread.h>
#include "internal.h"

extern lum_lock_t lum_meta_lock;
void lum_heaps_after_fork_child(void);

/* Order matters: the same order as the nesting used elsewhere (segment inside the others). */
static lum_lock_t *const fork_locks[] = {
    &lum_heaps_lock, &lum_abandoned_lock, &lum_sampled_lock, &lum_large_lock,
    &lum_segment_lock, &lum_meta_lock,
};
#define NLOCKS (sizeof fork_locks / sizeof fork_locks[0])

static void prepare(void)
{
    for (size_t i = 0; i < NLOCKS; i++) lum_fork_lock(fork_locks[i]);
    /* under the locks: a fork of another thread, waiting for them, finds it set in its turn
     * (cleared before the first fork's parent handler released them, it would not be) */
    __atomic_fetch_or(&lum_zero_distrust, LUM_DISTRUST_FORK, __ATOMIC_SEQ_CST);
}

static void parent(void)
{
    __atomic_fetch_and(&lum_zero_distrust, (uint8_t)~LUM_DISTRUST_FORK, __ATOMIC_RELAXED);
    for (size_t i = NLOCKS; i-- > 0;) lum_fork_unlock(fork_locks[i]);
}

static void child(void)
{
    for (size_t i = 0; i < NLOCKS; i++) lum_fork_reset(fork_locks[i]);
    lum_lock_order_forget(); /* observe.c's child handler, next, resets the rest */
    lum_background_after_fork_child(); /* first: releases below must not wake the parent's */
    lum_heaps_after_fork_child();
    /* after the releases above, which trim records, before the child's own allocations */
    __atomic_fetch_or(&lum_zero_distrust, LUM_DISTRUST_KEPT, __ATOMIC_RELAXED);
}

void lum_fork_install(void)
{
    pthread_atfork(prepare, parent, child);
}
