/* fork() with atfork handlers registered before lumalloc's (another library's constructor that
 * ran first: under LD_PRELOAD, or a library linked before): glibc runs their prepare handler
 * after ours has taken every lock, and their parent and child handlers before ours let go of
 * them.  Handlers that allocated hung there (a small malloc on lum_heaps_lock, a large free on
 * lum_large_lock; gRPC's handlers do both).  Here the test's handlers, registered by a
 * constructor that runs before lumalloc's, allocate and free small and large blocks in
 * prepare, parent and child, with sampling on and other threads allocating; a deadlock ends as
 * SIGALRM.  lumalloc's own names throughout: the TSan build (core_sanitizers.sh) links a copy
 * whose standard names are TSan's. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include "internal.h"
#include "lumalloc.h"
#include "options.h"
#include "test_support.h"

static atomic_int armed;
/* Two sets of handlers: A registered before lumalloc is initialised (its handlers all come
 * first: prepare runs after every lumalloc lock is taken), B after the core's handlers but
 * before the profiler's (prepare runs with the profiler's locks held, not the core's yet).  A
 * runtime that allocates before constructors (UBSan's) makes A a second B. */
enum { A, B, SETS };
static int lum_was_initialized; /* when A registered */
static atomic_int ran_prepare[SETS], ran_parent[SETS], saw_held[SETS];
static int ran_child[SETS];
static void *kept_small[SETS], *kept_large[SETS], *before_small, *before_large;
extern lum_lock_t lum_prof_lock;

/* small, large, and a realloc across the two, each written to */
static void churn_once(void)
{
    char *s = lum_malloc(100), *l = lum_malloc(1 << 20), *c = lum_calloc(3, 200);
    assert_non_null(s), assert_non_null(l), assert_non_null(c);
    memset(s, 1, 100), memset(l, 2, 4096), l[(1 << 20) - 1] = 3;
    s = lum_realloc(s, 300000);
    assert_non_null(s);
    lum_free(c), lum_free(l), lum_free(s);
}

static bool held_for_fork(lum_lock_t *l)
{
    return (atomic_load(&l->state) & LUM_LOCK_FORK) && lum_fork_holds(l);
}

static void prep(int set)
{
    if (!atomic_load(&armed))
        return;
    /* that this runs where the set is meant to (the case being tested) */
    bool core = held_for_fork(&lum_heaps_lock) && held_for_fork(&lum_large_lock);
    bool prof = held_for_fork(&lum_prof_lock);
    if (set == A && !lum_was_initialized ? core && prof : !core && prof)
        atomic_store(&saw_held[set], 1);
    churn_once();
    if (set == A) /* the large one into the cache: lum_large_lock */
        lum_free(before_small), lum_free(before_large);
    kept_small[set] = lum_malloc(64);
    kept_large[set] = lum_malloc(3 << 20);
    memset(kept_large[set], 4, 8192);
    atomic_fetch_add(&ran_prepare[set], 1);
}

static void parent(int set)
{
    if (!atomic_load(&armed))
        return;
    churn_once();
    lum_free(kept_small[set]), lum_free(kept_large[set]);
    atomic_fetch_add(&ran_parent[set], 1);
}

static void child(int set)
{
    if (!atomic_load(&armed))
        return;
    alarm(20);
    churn_once();
    lum_free(kept_small[set]), lum_free(kept_large[set]);
    ran_child[set] = 1;
}

static void prep_a(void) { prep(A); }
static void parent_a(void) { parent(A); }
static void child_a(void) { child(A); }
static void prep_b(void) { prep(B); }
static void parent_b(void) { parent(B); }
static void child_b(void) { child(B); }

/* Before lumalloc's constructor (default priority), which initialises it if nothing has and
 * registers the profiler's handlers; glibc's first registrations take no memory, so this one
 * does not initialise it. */
__attribute__((constructor(101))) static void register_a(void)
{
    lum_was_initialized = atomic_load(&lum_initialized) != 0;
    pthread_atfork(prep_a, parent_a, child_a);
}

/* An allocation initialises lumalloc (the core's handlers), then B. */
__attribute__((constructor(102))) static void register_b(void)
{
    lum_free(lum_malloc(10));
    pthread_atfork(prep_b, parent_b, child_b);
}

static atomic_int stop;

static void *worker(void *arg)
{
    (void)arg;
    void *ring[32] = {0};
    for (unsigned i = 0; !atomic_load(&stop); i++) {
        lum_free(ring[i & 31]);
        /* mostly small; now and then a large block, whose free takes lum_large_lock */
        ring[i & 31] = lum_malloc((i & 63) == 0 ? (size_t)(300000 + (i & 4095)) : 32 + (i & 1023));
    }
    for (int i = 0; i < 32; i++)
        lum_free(ring[i]);
    return NULL;
}

static void fork_rounds(int rounds)
{
    for (int k = 0; k < rounds; k++) {
        before_small = lum_malloc(200);
        before_large = lum_malloc(2 << 20);
        memset(before_large, 5, 4096);
        int prep0 = atomic_load(&ran_prepare[A]), parent0 = atomic_load(&ran_parent[B]);
        alarm(UNDER_TSAN ? 120 : 20); /* the parent's handlers, and the child's run */
        pid_t pid = fork();
        if (pid == 0) {
            alarm(20);
            /* TSan does not see the child's re-initialised unwind lock as free (a sample's read
             * lock in the child is reported, with or without handlers like these) */
            if (UNDER_TSAN)
                lum_options_set("sample_interval", "off");
            /* the child's own allocations after every handler */
            for (int i = 0; i < 1000; i++) {
                void *p = lum_malloc(16 + (i & 2047));
                lum_free(p);
            }
            churn_once();
            if (!ran_child[A] || !ran_child[B])
                _exit(3);
            if (!atomic_load(&saw_held[A]) || !atomic_load(&saw_held[B]))
                _exit(4);
            _exit(lum_fork_nheld ? 5 : 0);
        }
        assert_true(pid > 0);
        int st;
        assert_int_equal(waitpid(pid, &st, 0), pid);
        alarm(0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            fail_msg("child %d: status 0x%x (%s)", k, st,
                     WIFSIGNALED(st) ? strsignal(WTERMSIG(st)) : "exit");
        assert_int_equal(atomic_load(&ran_prepare[A]), prep0 + 1);
        assert_int_equal(atomic_load(&ran_parent[B]), parent0 + 1);
        assert_int_equal(lum_fork_nheld, 0); /* every lock let go of, none left passing through */
        churn_once(); /* the parent's locks were let go of */
    }
    assert_true(atomic_load(&saw_held[A]) && atomic_load(&saw_held[B]));
}

static void test_single_thread(void **state)
{
    (void)state;
    atomic_store(&armed, 1);
    fork_rounds(5);
    atomic_store(&armed, 0);
}

static void test_threads_sampling(void **state)
{
    (void)state;
    /* samples in the handlers: the profiler's locks, held for the fork, too */
    assert_int_equal(lum_options_set("sample_interval", UNDER_TSAN ? "64k" : "1k"), 0);
    atomic_store(&stop, 0);
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&t[i], NULL, worker, NULL), 0);
    atomic_store(&armed, 1);
    fork_rounds(UNDER_TSAN ? 10 : 60);
    atomic_store(&armed, 0);
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    assert_int_equal(lum_options_set("sample_interval", "off"), 0);
}

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "test_fork_handlers_first: deadlock (alarm)\n";
    if (write(2, msg, sizeof msg - 1) < 0) {}
    _exit(124);
}

int main(void)
{
    signal(SIGALRM, on_alarm);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_single_thread),
        cmocka_unit_test(test_threads_sampling),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
