/* Failure tools through the real allocator: the injector (per thread and process-wide), the
 * with_allocation_failures sweep over a function that cleans up, critical scopes and the
 * diagnostics report with the application's producer, abort-on-failure, suppression. */
#define _GNU_SOURCE 1
#include <errno.h>
#include <malloc.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
#include <pthread.h>
#include <cmocka.h>
#include "observe.h"
#include "options.h"
#include "lumalloc_failure.h"
#include "lumalloc_options.h"
#include "lumalloc_stats.h"

/* Opaque to the optimiser: malloc/free pairs must really happen. */
static void *volatile sink;

struct node {
    struct node *next;
    int value;
};

struct list_run {
    int runs, failures, successes;
    int allocs_at_failure[32];
    int leaked;
};

static int live_nodes;

/* Builds a 10-node list; on a failed allocation frees what it built (the behaviour the sweep
 * is meant to check) and returns. */
static void build_list(void *arg)
{
    struct list_run *r = arg;
    struct node *head = NULL;
    r->runs++;
    for (int i = 0; i < 10; i++) {
        struct node *n = malloc(sizeof *n);
        if (!n) {
            assert_int_equal(errno, ENOMEM);
            r->allocs_at_failure[r->failures++] = i;
            while (head) {
                struct node *next = head->next;
                free(head);
                live_nodes--;
                head = next;
            }
            return;
        }
        live_nodes++;
        n->value = i;
        n->next = head;
        head = n;
    }
    r->successes++;
    while (head) {
        struct node *next = head->next;
        free(head);
        live_nodes--;
        head = next;
    }
}

static void test_with_allocation_failures_list(void **state)
{
    (void)state;
    struct list_run r;
    memset(&r, 0, sizeof r);
    unsigned long runs = lum_with_allocation_failures(build_list, &r);
    assert_int_equal(runs, 11);
    assert_int_equal(r.runs, 11);
    assert_int_equal(r.failures, 10);
    assert_int_equal(r.successes, 1);
    for (int i = 0; i < 10; i++)
        assert_int_equal(r.allocs_at_failure[i], i); /* one allocation later each time */
    assert_int_equal(live_nodes, 0);
    assert_int_equal(lum_fail_armed, 0);
    /* Allocation works normally afterwards. */
    sink = malloc(100);
    assert_non_null(sink);
    free(sink);
}

static void test_fail_after(void **state)
{
    (void)state;
    lum_fail_after(3);
    void *a = malloc(16), *b = malloc(5000), *c = calloc(4, 8);
    errno = 0;
    void *d = malloc(32);
    int err = errno;
    void *e = malloc(32);
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(c);
    assert_null(d);
    assert_int_equal(err, ENOMEM);
    assert_non_null(e); /* one-shot */
    assert_true(lum_fail_fired());
    assert_int_equal(lum_fail_armed, 0);
    free(a);
    free(b);
    free(c);
    free(e);
    /* Cancel disarms before firing. */
    lum_fail_after(0);
    lum_fail_cancel();
    sink = malloc(8);
    assert_non_null(sink);
    free(sink);
    assert_int_equal(lum_fail_armed, 0);
}

/* A large block grown by realloc is an allocation to the injector: mremap may move it or map
 * more, and a program's realloc error path must be reachable.  Shrinking asks for nothing. */
static void test_fail_large_realloc(void **state)
{
    (void)state;
    char *p = malloc(1 << 20);
    assert_non_null(p);
    memset(p, 7, 1 << 20);
    lum_fail_after(0);
    errno = 0;
    char *q = realloc(p, 4 << 20);
    assert_null(q);
    assert_int_equal(errno, ENOMEM);
    assert_true(lum_fail_fired());
    if (!q) q = p; /* the old block, untouched */
    assert_int_equal(q[(1 << 20) - 1], 7);
    lum_fail_after(0);
    q = realloc(q, 512 << 10);
    assert_ptr_not_equal(q, NULL);
    assert_int_equal(lum_fail_armed, 1); /* not counted */
    lum_fail_cancel();
    q = realloc(q, 4 << 20);
    assert_non_null(q);
    assert_int_equal(q[(512 << 10) - 1], 7);
    free(q);
}

/* With the 2nd allocation from now armed to fail: only it fails, with ENOMEM, and the
 * injection disarms itself. */
static void assert_second_allocation_fails(void)
{
    void *a = malloc(64);
    errno = 0;
    void *b = malloc(64);
    int err = errno;
    void *c = malloc(64);
    assert_non_null(a);
    assert_null(b);
    assert_int_equal(err, ENOMEM);
    assert_non_null(c);
    free(a);
    free(c);
    assert_int_equal(lum_fail_armed, 0);
}

static void test_fail_nth_process_wide(void **state)
{
    (void)state;
    lum_fail_nth(2);
    assert_second_allocation_fails();
}

/* LUMALLOC_FAIL_NTH set while the program runs arms the injection as lum_fail_nth does. */
static void test_fail_nth_option_set_at_run_time(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("fail_nth", "2"), 0);
    assert_second_allocation_fails();
    /* and off disarms it before it fires */
    assert_int_equal(lum_options_set("fail_nth", "1"), 0);
    assert_int_equal(lum_options_set("fail_nth", "off"), 0);
    sink = malloc(64);
    assert_non_null(sink);
    free(sink);
    assert_int_equal(lum_fail_armed, 0);
}

static void test_suppress(void **state)
{
    (void)state;
    lum_fail_after(0);
    lum_fail_suppress_enter();
    sink = malloc(10);
    assert_non_null(sink);
    free(sink);
    lum_fail_suppress_leave();
    sink = malloc(10);
    assert_null(sink);
}

static int capture_fd(void)
{
    char path[] = "/tmp/lum_diagXXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    return fd;
}

static void reset_fd(int fd)
{
    assert_int_equal(ftruncate(fd, 0), 0);
    lseek(fd, 0, SEEK_SET);
}

static char *read_fd(int fd)
{
    static char buf[65536];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    buf[n > 0 ? n : 0] = 0;
    return buf;
}

static void producer(lum_diagnostics_writer w, void *arg)
{
    const char *tag = arg;
    w("APP-DIAG: ", 10);
    w(tag, strlen(tag));
    w("\n", 1);
}

static void test_diagnostics_critical_scope(void **state)
{
    (void)state;
    int fd = capture_fd();
    lum_set_diagnostics_fd(fd);
    lum_set_diagnostics_producer(producer, "cache sizes: 42 entries");
    lum_set_diagnostics_mode(LUM_DIAGNOSTICS_CRITICAL);

    /* Outside a critical scope: no report in "critical" mode. */
    lum_fail_after(0);
    assert_null(malloc(123));
    assert_string_equal(read_fd(fd), "");

    lum_critical_scope_enter();
    assert_true(lum_in_critical_scope());
    lum_fail_after(0);
    assert_null(malloc(4321));
    lum_critical_scope_leave();
    assert_false(lum_in_critical_scope());
    char *rep = read_fd(fd);
    assert_non_null(strstr(rep, "allocation of 4321 bytes failed: ENOMEM (injected)"));
    assert_non_null(strstr(rep, "critical allocation scope"));
    assert_non_null(strstr(rep, "thread:"));
    assert_non_null(strstr(rep, "stack:"));
    assert_non_null(strstr(rep, "APP-DIAG: cache sizes: 42 entries\n"));
    /* The producer's section comes after lumalloc's. */
    assert_true(strstr(rep, "APP-DIAG") > strstr(rep, "thread:"));

    /* "all": every failure reports; "none": never. */
    reset_fd(fd);
    lum_set_diagnostics_mode(LUM_DIAGNOSTICS_ALL);
    lum_fail_after(0);
    assert_null(malloc(77));
    assert_non_null(strstr(read_fd(fd), "allocation of 77 bytes failed"));
    reset_fd(fd);
    lum_set_diagnostics_mode(LUM_DIAGNOSTICS_NONE);
    lum_critical_scope_enter();
    lum_fail_after(0);
    assert_null(malloc(78));
    lum_critical_scope_leave();
    assert_string_equal(read_fd(fd), "");

    /* On demand: the whole report, but not a failure's first line (it read "allocation of 999
     * bytes failed", with neither stack nor thread figures) */
    lum_diagnostics_report(999);
    rep = read_fd(fd);
    assert_non_null(strstr(rep, "lumalloc: diagnostics report requested in thread"));
    assert_non_null(strstr(rep, "size given: 999"));
    assert_null(strstr(rep, "failed:"));
    assert_non_null(strstr(rep, "stack:"));
    assert_non_null(strstr(rep, "thread:"));
    assert_non_null(strstr(rep, "process:"));
    lum_set_diagnostics_mode(LUM_DIAGNOSTICS_CRITICAL);
    lum_set_diagnostics_producer(NULL, NULL);
    lum_set_diagnostics_fd(2);
    close(fd);
}

/* A producer that allocates: allowed, and never recursively reported or failed. */
static void allocating_producer(lum_diagnostics_writer w, void *arg)
{
    (void)arg;
    char *s = strdup("allocated in producer\n");
    w(s ? s : "strdup failed\n", strlen(s ? s : "strdup failed\n"));
    free(s);
}

static void test_producer_may_allocate(void **state)
{
    (void)state;
    int fd = capture_fd();
    lum_set_diagnostics_fd(fd);
    lum_set_diagnostics_producer(allocating_producer, NULL);
    lum_set_diagnostics_mode(LUM_DIAGNOSTICS_ALL);
    lum_fail_after(0);
    assert_null(malloc(50));
    assert_non_null(strstr(read_fd(fd), "allocated in producer"));
    lum_set_diagnostics_mode(LUM_DIAGNOSTICS_CRITICAL);
    lum_set_diagnostics_producer(NULL, NULL);
    lum_set_diagnostics_fd(2);
    close(fd);
}

static void test_abort_on_failure(void **state)
{
    (void)state;
    /* A real failure aborts; an injected one does not. */
    pid_t pid = fork();
    if (pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, 2);
        lum_set_abort_on_failure(true);
        lum_fail_after(0);
        if (malloc(10) != NULL)
            _exit(3);
        sink = malloc((size_t)1 << 62); /* beyond the address space: the mapping fails */
        _exit(sink ? 4 : 5);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFSIGNALED(st));
    assert_int_equal(WTERMSIG(st), SIGABRT);
    assert_false(lum_get_abort_on_failure());

    /* Without the option, the same real failure returns NULL. */
    errno = 0;
    sink = malloc((size_t)1 << 62);
    assert_null(sink);
    assert_int_equal(errno, ENOMEM);
}

/* Abort on failure says what was asked when calloc's count x size overflowed, as the report
 * does ("allocation of 18446744073709551615 bytes" before). */
static void test_abort_message_of_an_overflow(void **state)
{
    (void)state;
    int pipefd[2];
    assert_int_equal(pipe(pipefd), 0);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(pipefd[1], 2);
        lum_set_abort_on_failure(true);
        volatile size_t count = SIZE_MAX / 2;
        sink = calloc(count, 4);
        _exit(3);
    }
    close(pipefd[1]);
    char buf[1024] = {0};
    size_t got = 0;
    for (ssize_t n; got < sizeof buf - 1 && (n = read(pipefd[0], buf + got, sizeof buf - 1 - got)) > 0;)
        got += (size_t)n;
    close(pipefd[0]);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFSIGNALED(st));
    assert_non_null(strstr(buf, "allocation of 9223372036854775807 x 4 bytes (more than SIZE_MAX) failed (errno 12): aborting"));
}

/* An injector armed by a thread that exits without cancelling it dies with the thread: left
 * armed, every other thread's allocations took the slow path, unsampled, for good. */
static void *arm_and_exit(void *arg)
{
    (void)arg;
    lum_fail_after(1000);
    sink = malloc(16);
    free(sink);
    return NULL;
}

static void test_thread_exit_disarms(void **state)
{
    (void)state;
    pthread_t t;
    pthread_create(&t, NULL, arm_and_exit, NULL);
    pthread_join(t, NULL);
    assert_int_equal(lum_fail_armed, 0);
}

/* In a fork child, the surviving thread's injector stays armed: the child ends the records of
 * the threads that did not survive, and that once cancelled the injector of the one that did. */
static void *wait_forever(void *arg)
{
    (void)arg;
    sink = malloc(16); /* a heap of its own, whose record the child tears down */
    free(sink);
    for (;;) pause();
    return NULL;
}

static void test_fork_keeps_the_forking_threads_injector(void **state)
{
    (void)state;
    pthread_t t;
    pthread_create(&t, NULL, wait_forever, NULL);
    usleep(20000);
    lum_fail_after(0);
    pid_t pid = fork();
    if (pid == 0)
        _exit(malloc(24) == NULL && lum_fail_fired() ? 0 : 3);
    lum_fail_cancel();
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    pthread_cancel(t);
    pthread_join(t, NULL);
}

/* Bad alignments are failures like any other (probe, count, report): aligned_alloc(3, 64)
 * returned NULL past them. */
static void test_bad_alignment_is_a_failure(void **state)
{
    (void)state;
    static struct lum_stats a, b;
    uint32_t me = (uint32_t)gettid();
    lum_stats_snapshot(&a);
    void *(*volatile p_aligned_alloc)(size_t, size_t) = aligned_alloc;
    errno = 0;
    assert_null(p_aligned_alloc(3, 64));
    assert_int_equal(errno, EINVAL);
    lum_stats_snapshot(&b);
    uint64_t fa = 0, fb = 0;
    for (unsigned i = 0; i < a.nthreads; i++) if (a.threads[i].tid == me) fa = a.threads[i].failures;
    for (unsigned i = 0; i < b.nthreads; i++) if (b.threads[i].tid == me) fb = b.threads[i].failures;
    assert_int_equal(fb - fa, 1);
}

/* posix_memalign's bad alignment is one too (it returned EINVAL past probe, count and report,
 * where aligned_alloc had all three), errno left alone as glibc does. */
static void test_posix_memalign_bad_alignment_is_a_failure(void **state)
{
    (void)state;
    static struct lum_stats a, b;
    uint32_t me = (uint32_t)gettid();
    int fd = capture_fd();
    lum_set_diagnostics_fd(fd);
    lum_set_diagnostics_mode(LUM_DIAGNOSTICS_ALL);
    lum_stats_snapshot(&a);
    int (*volatile p_posix_memalign)(void **, size_t, size_t) = posix_memalign;
    void *p = &p;
    errno = ERANGE;
    assert_int_equal(p_posix_memalign(&p, 24, 100), EINVAL);
    assert_int_equal(errno, ERANGE);
    assert_ptr_equal(p, &p); /* untouched */
    lum_stats_snapshot(&b);
    lum_set_diagnostics_mode(LUM_DIAGNOSTICS_CRITICAL);
    lum_set_diagnostics_fd(2);
    uint64_t fa = 0, fb = 0;
    for (unsigned i = 0; i < a.nthreads; i++) if (a.threads[i].tid == me) fa = a.threads[i].failures;
    for (unsigned i = 0; i < b.nthreads; i++) if (b.threads[i].tid == me) fb = b.threads[i].failures;
    assert_int_equal(fb - fa, 1);
    assert_non_null(strstr(read_fd(fd), "allocation of 100 bytes (alignment 24) failed: EINVAL"));
    close(fd);
}

/* An overflowing count * size is reported as asked (it read "allocation of
 * 18446744073709551615 bytes", a size nobody asked for). */
static void test_overflow_report_names_the_request(void **state)
{
    (void)state;
    void *(*volatile p_calloc)(size_t, size_t) = calloc;
    void *(*volatile p_reallocarray)(void *, size_t, size_t) = reallocarray;
    int fd = capture_fd();
    lum_set_diagnostics_fd(fd);
    lum_set_diagnostics_mode(LUM_DIAGNOSTICS_ALL);
    errno = 0;
    assert_null(p_calloc((size_t)1 << 40, (size_t)3 << 30));
    assert_int_equal(errno, ENOMEM);
    char *rep = read_fd(fd);
    assert_non_null(strstr(rep, "allocation of 1099511627776 x 3221225472 bytes (more than SIZE_MAX) failed: ENOMEM"));
    assert_null(strstr(rep, "18446744073709551615"));
    reset_fd(fd);
    assert_null(p_reallocarray(NULL, SIZE_MAX / 2, 4));
    assert_non_null(strstr(read_fd(fd), "allocation of 9223372036854775807 x 4 bytes (more than SIZE_MAX)"));
    /* the next failure is reported with its own size */
    reset_fd(fd);
    lum_fail_after(0);
    assert_null(malloc(77));
    assert_non_null(strstr(read_fd(fd), "allocation of 77 bytes failed"));
    lum_set_diagnostics_mode(LUM_DIAGNOSTICS_CRITICAL);
    lum_set_diagnostics_fd(2);
    close(fd);
}

/* Two threads arming the process-wide injector at once leave one injector armed, and its
 * cancel none (each once armed its own count). */
static void *arm_nth_many(void *arg)
{
    for (int i = 0; i < 20000; i++)
        lum_fail_nth((uint64_t)(uintptr_t)arg + (uint64_t)i * 1000000u);
    return NULL;
}

static void test_fail_nth_concurrent(void **state)
{
    (void)state;
    pthread_t a, b;
    pthread_create(&a, NULL, arm_nth_many, (void *)(uintptr_t)1000000001u);
    pthread_create(&b, NULL, arm_nth_many, (void *)(uintptr_t)1000000002u);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    assert_int_equal(lum_fail_armed, 1);
    lum_fail_nth(0);
    assert_int_equal(lum_fail_armed, 0);
}

/* lum_set_abort_on_failure and the option are one setting, whichever came last. */
static void test_abort_on_failure_one_setting(void **state)
{
    (void)state;
    lum_set_abort_on_failure(false);
    assert_int_equal(lum_options_set("abort_on_failure", "on"), 0);
    assert_true(lum_get_abort_on_failure());
    lum_set_abort_on_failure(false);
    char v[16];
    assert_int_equal(lum_options_get("abort_on_failure", v, sizeof v), 0);
    assert_string_equal(v, "off");
}

/* Every impossible size is a failure: reported, and aborting with abort-on-failure (reallocarray
 * and pvalloc returned NULL past both). */
static void test_overflow_is_a_failure(void **state)
{
    (void)state;
    void *(*volatile p_reallocarray)(void *, size_t, size_t) = reallocarray;
    void *(*volatile p_pvalloc)(size_t) = pvalloc;
    for (int which = 0; which < 2; which++) {
        pid_t pid = fork();
        if (pid == 0) {
            int devnull = open("/dev/null", O_WRONLY);
            dup2(devnull, 2);
            lum_set_abort_on_failure(true);
            sink = which ? p_pvalloc(SIZE_MAX - 100) : p_reallocarray(NULL, SIZE_MAX / 2, 4);
            _exit(sink ? 4 : 5);
        }
        int st;
        assert_int_equal(waitpid(pid, &st, 0), pid);
        assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT);
    }
    errno = 0;
    assert_null(p_reallocarray(NULL, SIZE_MAX / 2, 4));
    assert_int_equal(errno, ENOMEM);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_with_allocation_failures_list),
        cmocka_unit_test(test_fail_after),
        cmocka_unit_test(test_fail_large_realloc),
        cmocka_unit_test(test_fail_nth_process_wide),
        cmocka_unit_test(test_fail_nth_option_set_at_run_time),
        cmocka_unit_test(test_suppress),
        cmocka_unit_test(test_diagnostics_critical_scope),
        cmocka_unit_test(test_producer_may_allocate),
        cmocka_unit_test(test_abort_on_failure),
        cmocka_unit_test(test_abort_message_of_an_overflow),
        cmocka_unit_test(test_thread_exit_disarms),
        cmocka_unit_test(test_fail_nth_concurrent),
        cmocka_unit_test(test_fork_keeps_the_forking_threads_injector),
        cmocka_unit_test(test_bad_alignment_is_a_failure),
        cmocka_unit_test(test_posix_memalign_bad_alignment_is_a_failure),
        cmocka_unit_test(test_overflow_report_names_the_request),
        cmocka_unit_test(test_abort_on_failure_one_setting),
        cmocka_unit_test(test_overflow_is_a_failure),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
