/* Out of memory under RLIMIT_AS (each case in a forked child with its own limit, so the test
 * process keeps its address space):
 *  - small, medium, large and huge blocks, calloc, aligned_alloc and realloc growth: allocation
 *    returns NULL with errno ENOMEM (posix_memalign returns ENOMEM), the blocks already held are
 *    intact, realloc's failure leaves its block untouched, and after freeing everything (and
 *    lum_purge) as much can be allocated again as the first time: the memory comes back;
 *  - three threads reach the limit together: every thread sees clean failures, no deadlock
 *    (alarm), heap consistent afterwards;
 *  - the diagnostics report (mode "all") is written on a real failure, with the application's
 *    section, to the fd set for it.
 * Children that hang are killed by alarm(); the parent reports how each ended. */
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
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_failure.h"

#define HEADROOM (96u << 20)
/* enough that even 48-byte blocks with no per-block header (91.5 MiB per 2M) reach the limit */
#define MAXBLOCKS 4000000

static size_t vm_size(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    size_t kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmSize: %zu kB", &kb) == 1) break;
    if (f) fclose(f);
    return kb * 1024;
}

static void limit_as(size_t headroom)
{
    struct rlimit rl = {vm_size() + headroom, vm_size() + headroom};
    if (setrlimit(RLIMIT_AS, &rl)) _exit(90);
}

#define CHILD_CHECK(cond, code) do { if (!(cond)) { fprintf(stderr, "child: %s failed (line %d)\n", #cond, __LINE__); _exit(code); } } while (0)

static unsigned char tag(void *p, size_t i) { return (unsigned char)(((uintptr_t)p >> 4) * 31 + i); }

static void mark(unsigned char *p, size_t n)
{
    /* first and last bytes, and one per page between: enough to see blocks overlap */
    for (size_t i = 0; i < n; i += (i < 64 || n - i <= 64) ? 1 : 4096) p[i] = tag(p, i);
}

static int marked(unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i += (i < 64 || n - i <= 64) ? 1 : 4096)
        if (p[i] != tag(p, i)) return 0;
    return 1;
}

static void **blocks;

/* Allocates blocks of n bytes (kind 0 malloc, 1 calloc, 2 aligned_alloc 64 KiB) until NULL. */
static size_t fill_until_failure(size_t n, int kind, size_t max)
{
    size_t count = 0;
    for (; count < max; count++) {
        errno = 0;
        void *p = kind == 0 ? lum_malloc(n) : kind == 1 ? lum_calloc(1, n) : lum_aligned_alloc(65536, n);
        if (!p) {
            CHILD_CHECK(errno == ENOMEM, 10);
            break;
        }
        if (kind == 2) CHILD_CHECK(((uintptr_t)p & 65535) == 0, 11);
        if (kind == 1) CHILD_CHECK(((unsigned char *)p)[n - 1] == 0 && ((unsigned char *)p)[0] == 0, 12);
        mark(p, n);
        blocks[count] = p;
    }
    if (count == max) { /* the limit must be reached */
        fprintf(stderr, "child: %zu blocks of %zu bytes and no failure (VmSize %zu)\n", count, n, vm_size());
        _exit(13);
    }
    return count;
}

static void size_class_child(size_t n, int kind)
{
    alarm(60);
    blocks = lum_calloc(MAXBLOCKS, sizeof *blocks);
    CHILD_CHECK(blocks != NULL, 20);
    limit_as(HEADROOM);
    size_t first = fill_until_failure(n, kind, MAXBLOCKS);
    CHILD_CHECK(first > 0, 21);
    /* a second failure right away, in other sizes too: still clean */
    errno = 0;
    CHILD_CHECK(lum_malloc(64u << 20) == NULL && errno == ENOMEM, 22);
    void *pm = (void *)1;
    CHILD_CHECK(lum_posix_memalign(&pm, 4096, 64u << 20) == ENOMEM, 23);
    for (size_t i = 0; i < first; i++) CHILD_CHECK(marked(blocks[i], n), 24);
    /* free every other block: that much can be allocated again */
    size_t freed = 0;
    for (size_t i = 0; i < first; i += 2) { lum_free(blocks[i]); blocks[i] = NULL; freed++; }
    size_t again = 0;
    for (size_t i = 0; i < first; i += 2) {
        void *p = kind == 0 ? lum_malloc(n) : kind == 1 ? lum_calloc(1, n) : lum_aligned_alloc(65536, n);
        if (!p) break;
        mark(p, n);
        blocks[i] = p;
        again++;
    }
    if (again < freed * 9 / 10) {
        fprintf(stderr, "child: %zu-byte blocks: freed %zu, could allocate only %zu again\n", n, freed, again);
        _exit(25);
    }
    for (size_t i = 0; i < first; i++) {
        if (blocks[i]) { CHILD_CHECK(marked(blocks[i], n), 26); lum_free(blocks[i]); }
    }
    lum_purge();
    CHILD_CHECK(lum_heap_check(1) == 0, 27);
    /* everything freed: as much as the first time, in another size */
    size_t other = n > 4096 ? 48 : 300000;
    size_t second = fill_until_failure(other, 0, MAXBLOCKS);
    CHILD_CHECK(second * other >= first * n / 2, 28);
    for (size_t i = 0; i < second; i++) { CHILD_CHECK(marked(blocks[i], other), 29); lum_free(blocks[i]); }
    lum_purge();
    CHILD_CHECK(lum_heap_check(1) == 0, 30);
    printf("# %zu-byte blocks (kind %d): %zu before the limit, %zu again after freeing half; %zu x %zu B after\n",
           n, kind, first, again, second, other);
    fflush(stdout);
    _exit(0);
}

static void in_child(void (*fn)(void *), void *arg)
{
    fflush(stdout);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) { fn(arg); _exit(0); }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    if (!WIFEXITED(status) || WEXITSTATUS(status))
        fail_msg("child %s %d%s", WIFEXITED(status) ? "exited with" : "killed by signal",
                 WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status),
                 WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM ? " (SIGALRM: hang or deadlock)" : "");
}

struct sc { size_t n; int kind; };
static void run_sc(void *arg) { struct sc *s = arg; size_class_child(s->n, s->kind); }

static void small_blocks(void **state) { (void)state; struct sc s = {64, 0}; in_child(run_sc, &s); }
static void medium_blocks(void **state) { (void)state; struct sc s = {3000, 1}; in_child(run_sc, &s); }
static void near_large_blocks(void **state) { (void)state; struct sc s = {200000, 0}; in_child(run_sc, &s); }
static void large_blocks(void **state) { (void)state; struct sc s = {3u << 20, 0}; in_child(run_sc, &s); }
static void aligned_blocks(void **state) { (void)state; struct sc s = {100000, 2}; in_child(run_sc, &s); }

/* realloc growth until failure: the block is untouched by the failed realloc */
static void realloc_child(void *arg)
{
    (void)arg;
    alarm(60);
    limit_as(HEADROOM);
    size_t n = 1000;
    unsigned char *p = lum_malloc(n);
    CHILD_CHECK(p != NULL, 40);
    memset(p, 0x5a, n);
    for (;;) {
        size_t n2 = n + n / 2 + 4096;
        errno = 0;
        unsigned char *q = lum_realloc(p, n2);
        if (!q) {
            CHILD_CHECK(errno == ENOMEM, 41);
            for (size_t i = 0; i < n; i += 997) CHILD_CHECK(p[i] == 0x5a, 42);
            CHILD_CHECK(p[n - 1] == 0x5a, 43);
            break;
        }
        memset(q + n, 0x5a, n2 - n);
        p = q;
        n = n2;
    }
    CHILD_CHECK(n > (HEADROOM / 4), 44);
    /* shrink: must work even now, and then growth works again */
    unsigned char *q = lum_realloc(p, n / 4);
    CHILD_CHECK(q != NULL && q[n / 4 - 1] == 0x5a, 45);
    lum_purge();
    void *r = lum_malloc(n / 2);
    CHILD_CHECK(r != NULL, 46);
    lum_free(r);
    lum_free(q);
    CHILD_CHECK(lum_heap_check(1) == 0, 47);
    printf("# realloc grew to %zu bytes before failing cleanly\n", n);
    fflush(stdout);
}
static void realloc_growth(void **state) { (void)state; in_child(realloc_child, NULL); }

/* ---- threads reach the limit together ---- */

static pthread_barrier_t barrier;
static _Atomic long bad_errno, got;

static void *oom_thread(void *arg)
{
    size_t n = (size_t)(uintptr_t)arg;
    void **mine = lum_calloc(50000, sizeof *mine);
    if (!mine) { bad_errno++; return NULL; }
    pthread_barrier_wait(&barrier);
    size_t count = 0;
    int failures = 0;
    while (count < 50000 && failures < 100) {
        errno = 0;
        void *p = lum_malloc(n + count % 7 * 16);
        if (!p) { if (errno != ENOMEM) bad_errno++; failures++; continue; }
        mark(p, n);
        mine[count++] = p;
    }
    got += (long)count;
    for (size_t i = 0; i < count; i++) {
        if (!marked(mine[i], n)) bad_errno += 1000;
        lum_free(mine[i]);
    }
    lum_free(mine);
    return NULL;
}

static void threads_child(void *arg)
{
    (void)arg;
    alarm(60);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    limit_as(HEADROOM);
    pthread_barrier_init(&barrier, NULL, 3);
    pthread_t t[3];
    size_t sizes[3] = {40, 5000, 400000};
    for (int i = 0; i < 3; i++) CHILD_CHECK(pthread_create(&t[i], &attr, oom_thread, (void *)(uintptr_t)sizes[i]) == 0, 50);
    for (int i = 0; i < 3; i++) pthread_join(t[i], NULL);
    CHILD_CHECK(bad_errno == 0, 51);
    lum_purge();
    CHILD_CHECK(lum_heap_check(1) == 0, 52);
    void *p = lum_malloc(HEADROOM / 2);
    CHILD_CHECK(p != NULL, 53); /* everything came back */
    lum_free(p);
    printf("# three threads: %ld blocks before the limit, all failures ENOMEM\n", (long)got);
    fflush(stdout);
}
static void threads_at_the_limit(void **state) { (void)state; in_child(threads_child, NULL); }

/* ---- diagnostics report on a real failure ---- */

static void app_section(lum_diagnostics_writer write, void *arg)
{
    (void)arg;
    write("APP-SECTION: 3 caches\n", 22);
}

static void diag_child(void *arg)
{
    const char *path = arg;
    alarm(60);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    CHILD_CHECK(fd >= 0, 60);
    lum_set_diagnostics_fd(fd);
    lum_set_diagnostics_mode(LUM_DIAGNOSTICS_ALL);
    lum_set_diagnostics_producer(app_section, NULL);
    limit_as(HEADROOM);
    void *held[64];
    int n = 0, failed = 0;
    while (n < 64) {
        void *p = lum_malloc(16u << 20);
        if (!p) { failed = 1; break; }
        held[n++] = p;
    }
    CHILD_CHECK(failed, 61);
    for (int i = 0; i < n; i++) lum_free(held[i]);
    close(fd);
}

static void diagnostics_report(void **state)
{
    (void)state;
    char path[] = "/tmp/lum_oom_diag_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    in_child(diag_child, path);
    char buf[16384];
    fd = open(path, O_RDONLY);
    ssize_t len = read(fd, buf, sizeof buf - 1);
    close(fd);
    unlink(path);
    assert_true(len > 0);
    buf[len] = 0;
    printf("# report (%zd bytes), first line: %.*s\n", len, (int)strcspn(buf, "\n"), buf);
    assert_non_null(strstr(buf, "lumalloc: allocation of 16777216 bytes failed: ENOMEM"));
    assert_null(strstr(buf, "(injected)"));
    assert_non_null(strstr(buf, "APP-SECTION: 3 caches"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(small_blocks),
        cmocka_unit_test(medium_blocks),
        cmocka_unit_test(near_large_blocks),
        cmocka_unit_test(large_blocks),
        cmocka_unit_test(aligned_blocks),
        cmocka_unit_test(realloc_growth),
        cmocka_unit_test(threads_at_the_limit),
        cmocka_unit_test(diagnostics_report),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
