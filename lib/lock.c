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
