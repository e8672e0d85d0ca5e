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

/* The exit dump of a fork child that inherited the path goes to path.<pid>.ext, not over its
 * parent's; %p in the path is the process ID.  (Every process wrote the one file, the last
 * to exit winning: a short-lived child replaced its parent's profile.) */
static void test_dump_paths_per_process(void **state)
{
    (void)state;
    char path[64], child_path[80], pct[64], pct_path[80];
    snprintf(path, sizeof path, "/tmp/lum_fork_%d.folded", (int)getpid());
    snprintf(pct, sizeof pct, "/tmp/lum_pct_%%p_%d.txt", (int)getpid());
    assert_int_equal(lum_options_set("prof_dump", path), 0);
    pid_t pid = fork();
    if (pid == 0)
        exit(0); /* inherited path: its own file */
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    snprintf(child_path, sizeof child_path, "/tmp/lum_fork_%d.%d.folded", (int)getpid(), (int)pid);
    assert_int_equal(access(child_path, F_OK), 0);
    assert_int_equal(access(path, F_OK), -1); /* the parent's, written at its exit only */
    unlink(child_path);
    pid = fork();
    if (pid == 0) {
        lum_options_set("prof_dump", pct); /* set in the child: %p only */
        exit(0);
    }
    assert_int_equal(waitpid(pid, &st, 0), pid);
    snprintf(pct_path, sizeof pct_path, "/tmp/lum_pct_%d_%d.txt", (int)pid, (int)getpid());
    assert_int_equal(access(pct_path, F_OK), 0);
    unlink(pct_path);
    assert_int_equal(lum_options_set("prof_dump", ""), 0);
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
    /* A fork child answers the signal too, to a path of its own (it had no dumper thread: the
     * signal posted to nobody and no dump came). */
    pid_t pid = fork();
    if (pid == 0) {
        lum_prof_get_stats(&before);
        kill(getpid(), SIGUSR2);
        for (int i = 0; i < 500; i++) {
            lum_prof_get_stats(&after);
            if (after.dumps > before.dumps)
                break;
            usleep(10000);
        }
        _exit(after.dumps > before.dumps ? 0 : 3);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    snprintf(path, sizeof path, "/tmp/lum_sig_%d.%d.2.txt", (int)getppid(), (int)pid);
    assert_int_equal(access(path, F_OK), 0);
    unlink(path);
    lum_options_set("sample_interval", "512k");
}

int main(int argc, char **argv)
{
    (void)argc;
    if (!getenv("LUM_TEST_SIGNAL_CHILD")) {
        const struct CMUnitTest tests[] = {cmocka_unit_test(test_dump_at_exit),
                                           cmocka_unit_test(test_dump_paths_per_process)};
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
