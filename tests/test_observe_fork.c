/* fork() while other threads sample: the child must find the profiler's locks free (atfork
 * handlers) and be able to sample, report and inject failures. */
#include <pthread.h>
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
#include "options.h"
#include "lumalloc_failure.h"
#include "lumalloc_prof.h"

static volatile int stop;
static void *volatile sink;

static void *churn(void *arg)
{
    (void)arg;
    void *ring[64] = {0};
    for (unsigned i = 0; !stop; i++) {
        free(ring[i & 63]);
        ring[i & 63] = malloc(64 + (i & 2047));
    }
    for (int i = 0; i < 64; i++)
        free(ring[i]);
    return NULL;
}

static void test_fork_while_sampling(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("sample_interval", "4k"), 0);
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&t[i], NULL, churn, NULL), 0);
    int ok = 0;
    for (int k = 0; k < 40; k++) {
        pid_t pid = fork();
        if (pid == 0) {
            alarm(20); /* a deadlock ends as SIGALRM, which the parent reports */
            for (int i = 0; i < 20000; i++) {
                sink = malloc(100 + (i & 1023));
                free(sink);
            }
            FILE *f = fopen("/dev/null", "w");
            if (!f || lum_prof_write_folded(f, LUM_PROF_CUMULATIVE) != 0)
                _exit(2);
            fclose(f);
            lum_fail_after(0);
            if (malloc(10) != NULL)
                _exit(3);
            struct lum_prof_stats st;
            lum_prof_get_stats(&st);
            _exit(st.samples > 0 ? 0 : 4);
        }
        int st;
        assert_int_equal(waitpid(pid, &st, 0), pid);
        if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
            ok++;
        else
            printf("child %d: %s %d\n", k, WIFEXITED(st) ? "exit" : "signal",
                   WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
    }
    stop = 1;
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    assert_int_equal(ok, 40);
    assert_int_equal(lum_options_set("sample_interval", "512k"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_fork_while_sampling)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
