/* A fork child of a process big enough for the background thread stays single-threaded until
 * it has grown by the thresholds itself: the parent's figures started a thread in every child
 * at its first slow-path allocation, and a child with two threads cannot unshare a user
 * namespace (EINVAL) or count on being alone (the fork, unshare, exec pattern of sandboxes). */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include "lumalloc.h"

static void *(*volatile p_malloc)(size_t) = malloc;

static int threads_now(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/task");
    if (!d) return -1;
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n;
}

/* In the child: 1 when it behaved (no thread after ordinary allocations, one after growing). */
static int child(void)
{
    alarm(30);
    void *keep[512];
    for (int i = 0; i < 512; i++) keep[i] = p_malloc((size_t)(i % 64 + 1) * 100); /* slow paths too */
    void *big = p_malloc(4 << 20);
    free(big);
    for (int i = 0; i < 512; i++) free(keep[i]);
    if (threads_now() != 1 || lum_background_running()) return 2;
    /* grown by the large threshold on its own: now it gets one */
    char *grown = p_malloc(24 << 20);
    if (!grown) return 3;
    memset(grown, 1, 24 << 20);
    for (int i = 0; i < 100 && !lum_background_running(); i++) usleep(10 * 1000);
    free(grown);
    return lum_background_running() & 1 ? 1 : 4;
}

static void fork_child_stays_single_threaded(void **state)
{
    (void)state;
    char *p = p_malloc(24 << 20);
    assert_non_null(p);
    memset(p, 1, 24 << 20);
    for (int i = 0; i < 100 && !lum_background_running(); i++) usleep(10 * 1000);
    assert_true(lum_background_running() & 1); /* the parent is over the thresholds */
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) _exit(child());
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 1);
    free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(fork_child_stays_single_threaded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
