/* The unwinder must not wait for the loader's lock (dl_load_write_lock, which dl_iterate_phdr,
 * dlopen and dlclose hold) inside malloc.  glibc does not reset that lock in a fork child: a
 * child forked while another thread was inside dl_iterate_phdr hung at its first sample that
 * derived a rule.  And a program's dl_iterate_phdr callback that takes a mutex deadlocked with a
 * thread sampling while it held that mutex.  Nor may the large-allocation warning wait for the
 * loader's other lock (dladdr's), which dlopen holds across constructors.  Each case runs in a child of its own with an alarm,
 * so that a hang fails the test instead of hanging it. */
#define _GNU_SOURCE 1
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <semaphore.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>
#include <cmocka.h>
#include "obs_internal.h"
#include "options.h"
#include "lumalloc_prof.h"

static void *volatile sink;
static sem_t inside, release;
static pthread_mutex_t app_mutex = PTHREAD_MUTEX_INITIALIZER;

/* Walks (rules for this code are derived at the first walk through it) and allocates, sampled. */
static __attribute__((noinline)) uint32_t sample_here(int k)
{
    uint64_t frames[LUM_MAX_FRAMES];
    lum_obs_busy = 1;
    uint32_t d = lum_unwind(frames, LUM_MAX_FRAMES, 0);
    lum_obs_busy = 0;
    for (int i = 0; i < 2000; i++) {
        sink = malloc(64 + (size_t)((i + k) & 511));
        free(sink);
    }
    return d;
}

/* O0, one call site each: return addresses no earlier walk learnt a rule for */
static __attribute__((noinline, optimize("O0"))) uint32_t fresh_a(void) { return sample_here(1) + 0; }
static __attribute__((noinline, optimize("O0"))) uint32_t fresh_b(void) { return sample_here(2) + 0; }

/* A dl_iterate_phdr callback that stays inside, the loader's lock held, until told. */
static int hold_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)info, (void)size, (void)arg;
    sem_post(&inside);
    sem_wait(&release);
    return 1;
}

static void *hold_loader(void *arg)
{
    (void)arg;
    dl_iterate_phdr(hold_cb, NULL);
    return NULL;
}

/* The child's status: 0 when it exited 0, else reported. */
static int child_status(pid_t pid)
{
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
        return 0;
    printf("# child: %s %d%s\n", WIFEXITED(st) ? "exit" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st),
           WIFSIGNALED(st) && WTERMSIG(st) == SIGALRM ? " (hung)" : "");
    return 1;
}

static void fork_while_in_dl_iterate_phdr(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "1k"), 0);
    sem_init(&inside, 0, 0);
    sem_init(&release, 0, 0);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, hold_loader, NULL), 0);
    sem_wait(&inside);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(20); /* a hang ends as SIGALRM */
        struct lum_prof_stats before, after;
        lum_prof_get_stats(&before);
        uint32_t d = fresh_a();
        lum_prof_get_stats(&after);
        /* the walk went on past the fresh frame: rules were derived in the child */
        if (d < 3)
            _exit(2);
        _exit(after.samples > before.samples ? 0 : 3);
    }
    sem_post(&release);
    pthread_join(t, NULL);
    assert_int_equal(child_status(pid), 0);
    assert_int_equal(lum_options_set("sample_interval", "512k"), 0);
}

static int mutex_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)info, (void)size, (void)arg;
    sem_post(&inside);
    pthread_mutex_lock(&app_mutex);
    pthread_mutex_unlock(&app_mutex);
    return 1;
}

static void *iterate_taking_mutex(void *arg)
{
    (void)arg;
    dl_iterate_phdr(mutex_cb, NULL);
    return NULL;
}

/* Thread P in dl_iterate_phdr waits for the program's mutex; this thread holds it and samples. */
static void sample_holding_what_a_callback_waits_for(void **state)
{
    (void)state;
    pid_t pid = fork();
    if (pid == 0) {
        alarm(20);
        assert_int_equal(lum_options_set("sample_interval", "1k"), 0);
        sem_init(&inside, 0, 0);
        pthread_mutex_lock(&app_mutex);
        pthread_t p;
        if (pthread_create(&p, NULL, iterate_taking_mutex, NULL))
            _exit(4);
        sem_wait(&inside);
        uint32_t d = fresh_b();
        pthread_mutex_unlock(&app_mutex);
        pthread_join(p, NULL);
        _exit(d >= 3 ? 0 : 2);
    }
    assert_int_equal(child_status(pid), 0);
}

static int go_pipe[2], ready_pipe[2];

static void *open_ctor_wait(void *arg)
{
    (void)arg;
    return dlopen(CTOR_WAIT_PATH, RTLD_NOW | RTLD_LOCAL);
}

static __attribute__((noinline)) void *large_here(void)
{
    void *p = malloc(8u << 20);
    __asm__ volatile("" ::"r"(p) : "memory");
    return p;
}

/* A dlopen runs a constructor that waits for this thread, which warns about a large allocation
 * first: the warning's names must not wait for the loader. */
static void warning_while_a_constructor_waits(void **state)
{
    (void)state;
    pid_t pid = fork();
    if (pid == 0) {
        alarm(20);
        char ready[16], go[16];
        if (pipe(go_pipe) || pipe(ready_pipe))
            _exit(4);
        snprintf(ready, sizeof ready, "%d", ready_pipe[1]);
        snprintf(go, sizeof go, "%d", go_pipe[0]);
        setenv("LUM_TEST_CTOR_READY", ready, 1);
        setenv("LUM_TEST_CTOR_GO", go, 1);
        assert_int_equal(lum_options_set("large_warn", "1m"), 0);
        pthread_t b;
        if (pthread_create(&b, NULL, open_ctor_wait, NULL))
            _exit(4);
        char c;
        if (read(ready_pipe[0], &c, 1) != 1)
            _exit(5);
        void *p = large_here();
        if (write(go_pipe[1], &c, 1) != 1)
            _exit(6);
        void *h = NULL;
        pthread_join(b, &h);
        free(p);
        struct lum_prof_stats st;
        lum_prof_get_stats(&st);
        _exit(h && st.large_warnings > 0 ? 0 : 2);
    }
    assert_int_equal(child_status(pid), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(fork_while_in_dl_iterate_phdr),
        cmocka_unit_test(sample_holding_what_a_callback_waits_for),
        cmocka_unit_test(warning_while_a_constructor_waits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
