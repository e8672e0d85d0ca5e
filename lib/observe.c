/* Glue of the observability side: start-up, thread and purge events, the per-thread list used
 * by reports, and fork safety of our locks. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include "batch.h"
#include "internal.h"
#include "obs_internal.h"
#include "observe.h"
#include "options.h"
#include "probes.h"

/* In .tdata, after lum_tls_heap (the only initialised thread-local): on the line of the TLS
 * block that malloc's fast path keeps in cache, not on .tbss's first line, which the sampling
 * path would touch for it alone (lum_memo, 64-aligned, starts .tbss on a line of its own). */
__thread int lum_obs_busy LUM_TLS __attribute__((section(".tdata.lum_obs_busy")));

/* The core's registry (heap.c): thread counters blocks are chained from threads_head.  Weak so
 * that unit tests of this side link without the core. */
extern struct lum_registry_v1 lumalloc_registry __attribute__((weak));

void lum_observe_init(void)
{
    /* for tools reading the profile from outside: fixed at start-up, as these options are */
    lumalloc_profile.enabled = lum_opt.prof;
    lumalloc_profile.max_depth = lum_opt.prof_depth;
    lum_failure_init();
    lum_prof_dump_init();
}

void lum_on_thread_start(struct lum_thread_counters_v1 *tc)
{
    if (LUM_PROBE_ON(thread_start)) {
        lum_batch_before_probe();
        STAP_PROBE2(lumalloc, thread_start, LUM_U32(tc ? tc->tid : 0), LUM_U64(tc));
    }
}

void lum_on_thread_exit(struct lum_thread_counters_v1 *tc)
{

    /* Whatever thread_exit's semaphore: a thread pool winding down may be the last activity
     * for a while, and its samples should not wait for the flusher. */
    lum_batch_before_probe();
    if (LUM_PROBE_ON(thread_exit))
        STAP_PROBE2(lumalloc, thread_exit, LUM_U32(tc ? tc->tid : 0), LUM_U64(tc));
}

void lum_on_purge(uint64_t bytes, uint32_t reason)
{
    if (LUM_PROBE_ON(purge)) {
        lum_batch_before_probe();
        STAP_PROBE2(lumalloc, purge, LUM_U64(bytes), LUM_U32(reason));
    }
}

void lum_on_pressure(uint64_t stall_us, uint64_t bytes_released)
{
    if (LUM_PROBE_ON(pressure)) {
        lum_batch_before_probe();
        STAP_PROBE2(lumalloc, pressure, LUM_U64(stall_us), LUM_U64(bytes_released));
    }
}

void lum_threads_foreach(void (*fn)(const struct lum_thread_counters_v1 *, void *), void *arg)
{
    if (!&lumalloc_registry)
        return;
    /* Blocks are never unmapped (exited threads' records are pooled), so walking the list
     * without the core's lock reads possibly stale but always valid memory. */
    uint64_t a = __atomic_load_n(&lumalloc_registry.threads_head, __ATOMIC_ACQUIRE);
    for (unsigned guard = 0; a && guard < (1u << 20); guard++) {
        const struct lum_thread_counters_v1 *tc = (const void *)(uintptr_t)a;
        fn(tc, arg);
        a = __atomic_load_n(&tc->next, __ATOMIC_ACQUIRE);
    }
}

/* The profiler's own threads (flusher, dumper): detached, small, and born with every signal
 * blocked, so they never run the application's handlers nor take a signal meant for another
 * thread.  0 or pthread_create's error. */
int lum_obs_thread_start(void *(*fn)(void *), size_t stack, const char *name)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, stack);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pthread_t t;
    int r = pthread_create(&t, &attr, fn, NULL);
    if (r == 0)
        pthread_setname_np(t, name);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return r;
}

/* fork(): a child must not inherit our locks held by threads that do not exist there.  Our
 * locks are never held while calling into the core, and the core never holds its locks while
 * calling our hooks, so these handlers are independent of the core's own.  Held for the fork
 * (lock.h): handlers of other libraries that run between our prepare and our parent/child
 * handlers may allocate, and a sample of theirs goes through these locks. */
extern pthread_mutex_t lum_obs_arena_lock, lum_warn_lock;
extern lum_lock_t lum_unwind_rules_lock;
/* The forking thread's lum_obs_busy before fork. */
static int fork_was_busy;

static void fork_prepare(void)
{
    /* A thread deriving rules holds the unwind lock (see lum_unwind_fork_lock): it comes
     * first, before any lock such a thread could go on to take; the unwinder's object cache
     * next (a walk's look at unloads takes it without the unwind lock). */
    lum_fork_wrlock(&lum_unwind_fork_lock);
    /* The forking thread does not unwind (nor inject failures) until our parent/child handler:
     * a sample or large warning of another library's handler meanwhile would read-lock the
     * unwind lock this thread holds for writing (glibc fails that with EDEADLK, and the unlock
     * after it would let go of the write lock).  Its samples are recorded without a stack, as
     * in profiler code.  Saved under the write lock: one forking thread at a time. */
    fork_was_busy = lum_obs_busy;
    lum_obs_busy = 1;
    lum_fork_lock(&lum_cfi_lock);
    lum_fork_lock(&lum_prof_lock);
    lum_fork_mutex_lock(&lum_warn_lock);
    lum_fork_mutex_lock(&lum_obs_arena_lock);
}

static void fork_parent(void)
{
    lum_fork_mutex_unlock(&lum_obs_arena_lock);
    lum_fork_mutex_unlock(&lum_warn_lock);
    lum_fork_unlock(&lum_prof_lock);
    lum_fork_unlock(&lum_cfi_lock);
    /* read before the write lock goes: another thread's fork may then save its own */
    int was_busy = fork_was_busy;
    lum_fork_rwlock_unlock(&lum_unwind_fork_lock);
    lum_obs_busy = was_busy;
}

static void fork_child(void)
{
    lum_fork_mutex_reset(&lum_obs_arena_lock);
    lum_fork_mutex_reset(&lum_warn_lock);
    lum_fork_rwlock_reset(&lum_unwind_fork_lock);
    lum_cfi_after_fork_child();
    lum_fork_forget(&lum_cfi_lock); /* reset just now */
    lum_fork_reset(&lum_prof_lock);
    /* only ever trylocked (a busy lock skips learning), so not taken in fork_prepare */
    lum_lock_reset(&lum_unwind_rules_lock);
    lum_obs_busy = fork_was_busy;
    lum_failure_after_fork_child();
    lum_prof_dump_after_fork_child();
}

/* A constructor, not lum_observe_init: pthread_atfork may allocate, and lum_observe_init runs
 * inside the allocator's bootstrap. */
__attribute__((constructor)) static void observe_ctor(void)
{
    /* The allocator's handlers first: prepare handlers run in reverse order, so ours run before
     * the allocator's locks are taken, as a thread holding the unwind lock may be allocating. */
    if (atomic_load_explicit(&lum_initialized, memory_order_acquire) != 2)
        lum_global_init();
    pthread_atfork(fork_prepare, fork_parent, fork_child);
    if (lum_opt.sample_interval)
        lum_unwind_preload();
}
