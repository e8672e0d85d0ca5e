/* Under an address-space limit (ulimit -v, RLIMIT_AS; overcommit off behaves alike), memory the
 * program freed serves what it asks for next, whatever the size: a mapping that fails gives
 * back everything free (wholly free segments unmapped, the large cache emptied) and is tried
 * once more.  Decay kept them mapped: 200 MB freed, then malloc(3 MiB) failed with ENOMEM where
 * glibc's succeeded.  Each case runs in a child, under its own limit. */
#define _GNU_SOURCE
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#define MAX_BLOCKS 20000

static void *blocks[MAX_BLOCKS];

static size_t mapped_now(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long pages = 0;
    if (f) {
        if (fscanf(f, "%lu", &pages) != 1) pages = 0;
        fclose(f);
    }
    return pages * (size_t)sysconf(_SC_PAGESIZE);
}

/* Fills the space left under the limit with blocks of `fill` bytes, frees them all, then asks
 * for `after` bytes `count` times; exits 0 when every one of those succeeded, errno intact. */
static void child(size_t fill, size_t after, int count)
{
    alarm(60);
    struct rlimit rl = {mapped_now() + ((size_t)192 << 20), RLIM_INFINITY};
    rl.rlim_max = rl.rlim_cur;
    if (setrlimit(RLIMIT_AS, &rl) != 0) _exit(3);
    int n = 0;
    while (n < MAX_BLOCKS && (blocks[n] = malloc(fill)) != NULL) memset(blocks[n++], 1, 64);
    if (n < 8 || n == MAX_BLOCKS) _exit(4); /* the limit was not what it is meant to be */
    for (int i = 0; i < n; i++) free(blocks[i]);
    for (int i = 0; i < count; i++) {
        errno = 0;
        void *p = malloc(after);
        if (!p) _exit(1);
        if (errno) _exit(2);
        memset(p, 2, 64);
        blocks[i] = p;
    }
    _exit(0);
}

static void in_child(size_t fill, size_t after, int count)
{
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) child(fill, after, count);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

/* pages of 200000-byte blocks, freed and kept for decay: a large block needs their space */
static void small_freed_serves_large(void **state)
{
    (void)state;
    in_child(200000, 3 << 20, 4);
}

/* large blocks freed into the large cache: new pages need that space (this direction held
 * before the retry too: mapping a segment trims the cache) */
static void large_freed_serves_small(void **state)
{
    (void)state;
    in_child(3 << 20, 100000, 600);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(small_freed_serves_large),
        cmocka_unit_test(large_freed_serves_small),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
