/* fork() from one thread while the others run every path that takes an allocator or profiler
 * lock: the atfork handlers take those locks in one fixed order, so a path that takes two of
 * them in the other order deadlocks only when a fork lands between its two acquisitions.  Such
 * an inversion was once caught by a CI timeout alone; here hundreds of forks land at random
 * points of small and cross-thread churn, sampling at a tiny interval, the large cache, thread
 * exits (pooled heap records), purges, memory pressure, reports, large-allocation warnings and
 * failure injection.  Each child must then allocate, sample, create a thread and exit; a child
 * that hangs is killed and the iteration named.  The outcome does not depend on timing: every
 * fork must succeed and every child exit 0, however few or many forks the time allows (at least
 * MIN_FORKS are made).  LUM_FORK_STORM_SECONDS lengthens a run; LUM_FORK_STORM_GDB prints a hung
 * child's threads before it is killed. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
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
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_failure.h"
#include "lumalloc_options.h"
#include "lumalloc_prof.h"
#include "lumalloc_stats.h"
#include "test_support.h"

/* TSan's fork handler makes a fork some 100 times slower */
#define MIN_FORKS (UNDER_TSAN ? 20 : 150)
#define MAX_FORKS 2000
/* Far above what a child needs even on a loaded 2-core machine (a few ms): only a deadlock
 * gets here, so the verdict is not a timing one. */
#define CHILD_DEADLINE_MS 15000
/* over every size a child allocates: each child would warn again for its own call sites */
#define LARGE_WARN "4m"

static atomic_int stop;
static atomic_int fork_iteration;
static int devnull = -1;

static uint64_t now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

static void nap_us(long us)
{
    struct timespec t = {0, us * 1000};
    nanosleep(&t, NULL);
}

/* Sizes across the small classes, mostly small, now and then up to the large threshold. */
static size_t small_size(uint64_t *s)
{
    uint64_t r = xorshift(s);
    switch (r & 7) {
    case 0: return 1 + (r >> 8) % 65536;
    case 1: case 2: return 1 + (r >> 8) % 4096;
    default: return 1 + (r >> 8) % 256;
    }
}

static void *small_churn(void *arg)
{
    uint64_t s = 0x9e3779b97f4a7c15ULL ^ (uintptr_t)arg;
    void *ring[256] = {0};
    for (unsigned i = 0; !atomic_load_explicit(&stop, memory_order_relaxed); i++) {
        unsigned k = (unsigned)(xorshift(&s) & 255);
        switch (i % 16) {
        case 0:
            ring[k] = lum_realloc(ring[k], small_size(&s));
            break;
        case 1:
            lum_free(ring[k]);
            ring[k] = lum_calloc(1 + (i & 31), 1 + (i & 127));
            break;
        case 2:
            lum_free(ring[k]);
            ring[k] = lum_memalign((size_t)16 << (i >> 4) % 9, small_size(&s));
            break;
        default:
            lum_free(ring[k]);
            ring[k] = lum_malloc(small_size(&s));
        }
        if (ring[k])
            memset(ring[k], (int)i, 1);
    }
    for (int i = 0; i < 256; i++)
        lum_free(ring[i]);
    return NULL;
}

/* Blocks one thread allocates and another frees: remote frees into a live owner's pages. */
#define XQ 1024
static void *_Atomic xq[XQ];
static atomic_uint xq_head, xq_tail;

static void *xproducer(void *arg)
{
    (void)arg;
    uint64_t s = 7;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        unsigned h = atomic_load_explicit(&xq_head, memory_order_relaxed);
        if (h - atomic_load_explicit(&xq_tail, memory_order_acquire) == XQ) {
            sched_yield();
            continue;
        }
        atomic_store_explicit(&xq[h % XQ], lum_malloc(small_size(&s)), memory_order_relaxed);
        atomic_store_explicit(&xq_head, h + 1, memory_order_release);
    }
    return NULL;
}

static void *xconsumer(void *arg)
{
    (void)arg;
    for (;;) {
        unsigned t = atomic_load_explicit(&xq_tail, memory_order_relaxed);
        if (t == atomic_load_explicit(&xq_head, memory_order_acquire)) {
            if (atomic_load_explicit(&stop, memory_order_relaxed))
                break;
            sched_yield();
            continue;
        }
        lum_free(atomic_load_explicit(&xq[t % XQ], memory_order_relaxed));
        atomic_store_explicit(&xq_tail, t + 1, memory_order_release);
    }
    return NULL;
}

/* Large blocks through the cache: grown and shrunk in place or moved, freed into the cache,
 * taken again; some over the warning size (unwinding, the warn lock, the symboliser: a warning
 * on stderr for each of this function's call sites, once). */
static void *large_churn(void *arg)
{
    (void)arg;
    uint64_t s = 11;
    void *held[6] = {0};
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        unsigned k = (unsigned)(xorshift(&s) % 6);
        size_t size = ((size_t)256 << 10) + xorshift(&s) % ((size_t)5 << 20);
        if (held[k] && (xorshift(&s) & 1)) {
            void *q = lum_realloc(held[k], size);
            if (q) {
                held[k] = q;
                memset(q, 1, 64);
            }
        } else {
            lum_free(held[k]);
            held[k] = lum_malloc(size);
            if (held[k])
                memset(held[k], 2, 64);
        }
        if ((xorshift(&s) & 15) == 0)
            lum_free(lum_aligned_alloc((size_t)1 << 21, (size_t)3 << 20));
    }
    for (int i = 0; i < 6; i++)
        lum_free(held[i]);
    return NULL;
}

/* Short-lived threads: heap records made, pooled at exit and reused, pages abandoned; what a
 * thread leaves allocated is freed by its creator into those abandoned pages. */
static void *short_thread(void *arg)
{
    uint64_t s = (uintptr_t)arg | 1;
    void **keep = lum_malloc(64 * sizeof *keep);
    if (!keep)
        return NULL;
    for (int i = 0; i < 64; i++)
        keep[i] = lum_malloc(small_size(&s));
    for (int i = 0; i < 64; i += 2) {
        lum_free(keep[i]);
        keep[i] = NULL;
    }
    return keep;
}

static void *spawner(void *arg)
{
    (void)arg;
    for (uintptr_t n = 1; !atomic_load_explicit(&stop, memory_order_relaxed); n++) {
        pthread_t t;
        void *ret = NULL;
        if (pthread_create(&t, NULL, short_thread, (void *)n) != 0) {
            nap_us(1000);
            continue;
        }
        pthread_join(t, &ret);
        void **keep = ret;
        if (keep) {
            for (int i = 0; i < 64; i++)
                lum_free(keep[i]);
            lum_free(keep);
        }
    }
    return NULL;
}

static int count_site(const struct lum_prof_site *site, void *arg)
{
    (void)site;
    (*(unsigned *)arg)++;
    return 0;
}

/* Purges, pressure, reports, statistics and injected failures (with a diagnostic report),
 * each a few times a millisecond: every one takes some of the locks fork takes. */
static void *maintenance(void *arg)
{
    (void)arg;
    FILE *null = fdopen(dup(devnull), "w");
    struct lum_stats *st = lum_malloc(sizeof *st);
    for (unsigned i = 0; !atomic_load_explicit(&stop, memory_order_relaxed); i++) {
        switch (i % 10) {
        case 0: lum_purge(); break;
        case 1: lum_malloc_trim(0); break;
        case 2: lum_memory_pressure(); break;
        case 3: if (null) lum_prof_write_folded(null, LUM_PROF_LIVE); break;
        case 4: lum_prof_write_pprof(devnull); break;
        case 5: {
            unsigned n = 0;
            lum_prof_foreach_site(count_site, &n);
            struct lum_prof_stats ps;
            lum_prof_get_stats(&ps);
            break;
        }
        case 6: if (st) lum_stats_snapshot(st); break;
        case 7: (void)lum_mallinfo2(); break;
        case 8:
            /* armed and fired at once: the next allocation fails and is diagnosed */
            lum_fail_after(0);
            lum_free(lum_malloc(200));
            lum_fail_cancel();
            break;
        case 9:
            /* armed for a while: forks land while this thread's injector is armed */
            lum_fail_after(1u << 30);
            for (int k = 0; k < 32; k++)
                lum_free(lum_malloc(64 + (size_t)k * 32));
            lum_fail_cancel();
            break;
        }
        nap_us(200);
    }
    lum_free(st);
    if (null)
        fclose(null);
    return NULL;
}

static void *child_thread(void *arg)
{
    /* a block of the forking thread freed here: a remote free in the child */
    lum_free(arg);
    uint64_t s = 3;
    for (int i = 0; i < 500; i++)
        lum_free(lum_malloc(small_size(&s)));
    return lum_malloc(100);
}

/* The child, single-threaded now: everything below takes the locks the handlers released or
 * reset.  Exit codes name the step that failed; none uses cmocka (the child's exit is _exit). */
static void child_main(void)
{
    /* a backstop only: the parent kills a hung child long before (see CHILD_DEADLINE_MS) */
    alarm(60);
    struct lum_prof_stats before, after;
    lum_prof_get_stats(&before);
    uint64_t s = 5;
    void *ring[64] = {0};
    for (int i = 0; i < 4000; i++) {
        unsigned k = (unsigned)(xorshift(&s) & 63);
        if (i & 1) {
            ring[k] = lum_realloc(ring[k], small_size(&s));
        } else {
            lum_free(ring[k]);
            ring[k] = lum_malloc(small_size(&s));
        }
        if (!ring[k])
            _exit(10);
        memset(ring[k], 3, 1);
    }
    /* large: fresh, grown, shrunk, freed into the cache and taken from it again */
    void *big = lum_malloc((size_t)1 << 20);
    if (!big || !(big = lum_realloc(big, (size_t)3 << 20)) || !(big = lum_realloc(big, (size_t)300 << 10)))
        _exit(11);
    memset(big, 4, (size_t)300 << 10);
    lum_free(big);
    if (!(big = lum_malloc((size_t)2 << 20)))
        _exit(12);
    lum_free(big);
    /* TSan cannot create threads in the child of a threaded process ("dup thread with used
     * id"): the thread's work is done inline there */
    pthread_t t;
    void *ret = NULL, *gift = lum_malloc(48);
    if (UNDER_TSAN)
        ret = child_thread(gift);
    else if (pthread_create(&t, NULL, child_thread, gift) != 0 || pthread_join(t, &ret) != 0)
        _exit(13);
    if (!ret)
        _exit(13);
    lum_free(ret);
    for (int i = 0; i < 64; i++)
        lum_free(ring[i]);
    lum_prof_get_stats(&after);
    /* ~2 MB allocated at a 256-byte mean interval: thousands of samples expected, so none means
     * sampling is off in the child */
    if (!UNDER_TSAN && after.samples <= before.samples)
        _exit(14);
    FILE *null = fdopen(dup(devnull), "w");
    if (!null || lum_prof_write_folded(null, LUM_PROF_CUMULATIVE) != 0)
        _exit(15);
    fclose(null);
    lum_fail_after(0);
    if (lum_malloc(10) != NULL)
        _exit(16);
    lum_purge();
    if (lum_heap_check(0) != 0)
        _exit(17);
    _exit(0);
}

static void dump_threads(pid_t pid)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "gdb -p %d -batch -ex 'thread apply all bt' 2>&1", (int)pid);
    fflush(stdout);
    if (system(cmd) == -1)
        perror("system");
}

/* Waits for the child of iteration k; false (after saying why) if it hung or failed. */
static bool wait_child(pid_t pid, int k)
{
    uint64_t deadline = now_ms() + CHILD_DEADLINE_MS;
    int st;
    for (;;) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            break;
        if (r < 0 && errno != EINTR) {
            printf("fork %d: waitpid: %s\n", k, strerror(errno));
            return false;
        }
        if (now_ms() > deadline) {
            printf("fork %d: child %d still running after %d ms: deadlocked at fork?\n", k, (int)pid,
                   CHILD_DEADLINE_MS);
            if (getenv("LUM_FORK_STORM_GDB"))
                dump_threads(pid);
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            return false;
        }
        nap_us(500);
    }
    if (WIFSIGNALED(st)) {
        printf("fork %d: child killed by signal %d (%s)\n", k, WTERMSIG(st), strsignal(WTERMSIG(st)));
        return false;
    }
    if (WEXITSTATUS(st) != 0) {
        printf("fork %d: child exited with status %d (see child_main)\n", k, WEXITSTATUS(st));
        return false;
    }
    return true;
}

/* The parent's own hang (inside fork's prepare handlers) ends here, naming the iteration,
 * before ctest's timeout would. */
static void parent_alarm(int sig)
{
    char msg[96];
    int n = snprintf(msg, sizeof msg, "test_fork_storm: parent hung at fork %d\n",
                     atomic_load(&fork_iteration));
    if (n > 0 && write(2, msg, (size_t)n) < 0) {}
    signal(sig, SIG_DFL);
    raise(sig);
}

static void test_fork_storm(void **state)
{
    (void)state;
    double seconds = 6;
    const char *env = getenv("LUM_FORK_STORM_SECONDS");
    if (env && atof(env) > 0)
        seconds = atof(env);
    devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    assert_true(devnull >= 0);
    assert_int_equal(lum_options_set("sample_interval", UNDER_TSAN ? "off" : "256"), 0);
    assert_int_equal(lum_options_set("large_warn", LARGE_WARN), 0);
    assert_int_equal(lum_options_set("decay_ms", "5"), 0);
    assert_int_equal(lum_options_set("background_purge", "on"), 0);
    lum_set_diagnostics_fd(devnull);
    lum_set_diagnostics_mode(LUM_DIAGNOSTICS_ALL);
    void *(*const fns[])(void *) = {small_churn, small_churn, xproducer, xconsumer,
                                    large_churn, spawner, maintenance};
    enum { NT = sizeof fns / sizeof fns[0] };
    pthread_t t[NT];
    for (uintptr_t i = 0; i < NT; i++)
        assert_int_equal(pthread_create(&t[i], NULL, fns[i], (void *)i), 0);

    signal(SIGALRM, parent_alarm);
    uint64_t end = now_ms() + (uint64_t)(seconds * 1000);
    int forks = 0, failed = 0;
    while (forks < MAX_FORKS && (forks < MIN_FORKS || now_ms() < end)) {
        atomic_store(&fork_iteration, forks);
        alarm(30);
        pid_t pid = fork();
        alarm(0);
        if (pid == 0) {
            signal(SIGALRM, SIG_DFL);
            child_main();
        }
        if (pid < 0) {
            printf("fork %d: fork failed: %s\n", forks, strerror(errno));
            failed++;
            break;
        }
        if (!wait_child(pid, forks))
            failed++;
        forks++;
        if (failed >= 3)
            break;
        /* let the workers move on to other paths between forks */
        nap_us(1000 + (forks % 7) * 300);
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < NT; i++)
        pthread_join(t[i], NULL);
    signal(SIGALRM, SIG_DFL);
    printf("fork storm: %d forks in %.1f s budget, %d failed\n", forks, seconds, failed);
    assert_int_equal(failed, 0);
    assert_true(forks >= MIN_FORKS);
    /* the parent is whole too */
    assert_int_equal(lum_heap_check(0), 0);
    lum_set_diagnostics_mode(LUM_DIAGNOSTICS_CRITICAL);
    lum_set_diagnostics_fd(2);
    assert_int_equal(lum_options_set("sample_interval", "512k"), 0);
    assert_int_equal(lum_options_set("large_warn", "off"), 0);
    close(devnull);
}

/* The storm's finding, made deterministic: a fork while another thread's failure injector is
 * armed.  The child must sample (the count of armed injectors counted the vanished thread's,
 * which kept every allocation of the child on the unsampled slow path). */
static atomic_int armed_state; /* 1 armed, 2 may disarm */

static void *arm_and_wait(void *arg)
{
    (void)arg;
    lum_fail_after(1u << 30);
    atomic_store(&armed_state, 1);
    while (atomic_load(&armed_state) != 2)
        nap_us(100);
    lum_fail_cancel();
    return NULL;
}

static void test_fork_while_other_thread_armed(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", UNDER_TSAN ? "off" : "256"), 0);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, arm_and_wait, NULL), 0);
    while (atomic_load(&armed_state) != 1)
        nap_us(100);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(60);
        struct lum_prof_stats before, after;
        lum_prof_get_stats(&before);
        for (int i = 0; i < 4000; i++)
            lum_free(lum_malloc(100 + (size_t)(i & 1023)));
        lum_prof_get_stats(&after);
        /* and the child's own injector still works */
        lum_fail_after(0);
        bool injected = lum_malloc(10) == NULL;
        _exit(UNDER_TSAN || after.samples > before.samples ? (injected ? 0 : 2) : 1);
    }
    atomic_store(&armed_state, 2);
    pthread_join(t, NULL);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    assert_int_equal(lum_options_set("sample_interval", "512k"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_fork_while_other_thread_armed),
                                       cmocka_unit_test(test_fork_storm)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
