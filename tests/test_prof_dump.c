/* Profile dumps outside user calls: at exit (prof_dump option) and on a signal (prof_signal,
 * written by the dumper thread).  The signal case re-executes the test with the variables set,
 * because the dumper thread is started at load time. */
#define _GNU_SOURCE 1
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <cmocka.h>
#include "options.h"
#include "lumalloc_prof.h"

static void *volatile sink;

__attribute__((noinline)) void dump_site(void)
{
    for (int i = 0; i < 2000; i++) {
        sink = malloc(1000);
        if (i % 2)
            free(sink); /* half stay live */
    }
    __asm__ volatile("" ::: "memory");
}

/* After a change of interval the thread's current countdown still has the old mean: spend it
 * so that the measured site sees only the new one. */
static void spend_countdown(void)
{
    for (int i = 0; i < 64; i++) {
        sink = malloc(64 << 10);
        free(sink);
    }
}

static char *slurp(const char *path)
{
    static char buf[1 << 20];
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return NULL;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    buf[n > 0 ? n : 0] = 0;
    return buf;
}

static void test_dump_at_exit(void **state)
{
    (void)state;
    char path[64];
    snprintf(path, sizeof path, "/tmp/lum_exit_%d.folded", (int)getpid());
    unlink(path);
    pid_t pid = fork();
    if (pid == 0) {
        lum_options_set("sample_interval", "4k");
        lum_options_set("prof_dump", path);
        spend_countdown();
        dump_site();
        exit(0); /* the destructor writes the profile */
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    char *s = slurp(path);
    assert_non_null(s);
    unlink(path);
    /* Live heap, folded: the site with ~1 MB live (1000 x 1000 bytes). */
    char *line = strstr(s, "dump_site");
    assert_non_null(line);
    char *eol = strchr(line, '\n');
    assert_non_null(eol);
    char *sp = eol;
    while (sp[-1] != ' ')
        sp--;
    double v = strtod(sp, NULL);
    printf("live estimate at exit: %.0f bytes (truth ~1000000)\n", v);
    assert_true(v > 700000 && v < 1300000); /* ~250 samples: sd ~6%, 5 sd */
}

static void test_dump_on_signal(void **state)
{
    (void)state;
    assert_int_equal(lum_opt.prof_signal, SIGUSR2);
    assert_non_null(lum_opt.prof_dump);
    lum_options_set("sample_interval", "4k");
    dump_site();
    struct lum_prof_stats before, after;
    lum_prof_get_stats(&before);
    kill(getpid(), SIGUSR2);
    char path[128];
    /* prof.txt -> prof.1.txt */
    snprintf(path, sizeof path, "/tmp/lum_sig_%d.1.txt", (int)getppid());
    char *s = NULL;
    for (int i = 0; i < 500; i++) {
        lum_prof_get_stats(&after);
        if (after.dumps > before.dumps)
            break;
        usleep(10000);
    }
    assert_int_equal(after.dumps - before.dumps, 1);
    s = slurp(path);
    assert_non_null(s);
    unlink(path);
    assert_non_null(strstr(s, "lumalloc heap profile"));
    if (!strstr(s, "dump_site"))
        printf("# the dump:\n%s\n", s); /* what it named instead */
    assert_non_null(strstr(s, "dump_site"));
    lum_options_set("sample_interval", "512k");
}

int main(int argc, char **argv)
{
    (void)argc;
    if (!getenv("LUM_TEST_SIGNAL_CHILD")) {
        const struct CMUnitTest tests[] = {cmocka_unit_test(test_dump_at_exit)};
        int rc = cmocka_run_group_tests_name("exit", tests, NULL, NULL);
        /* The signal case, in a fresh process with the variables set at start-up. */
        char path[64];
        snprintf(path, sizeof path, "/tmp/lum_sig_%d.txt", (int)getpid());
        pid_t pid = fork();
        if (pid == 0) {
            setenv("LUM_TEST_SIGNAL_CHILD", "1", 1);
            setenv("LUMALLOC_PROF_SIGNAL", "USR2", 1);
            setenv("LUMALLOC_PROF_DUMP", path, 1);
            execv("/proc/self/exe", argv);
            _exit(127);
        }
        int st;
        waitpid(pid, &st, 0);
        unlink(path); /* the exit dump of the child */
        return rc || !WIFEXITED(st) || WEXITSTATUS(st);
    }
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_dump_on_signal)};
    return cmocka_run_group_tests_name("signal", tests, NULL, NULL);
}
