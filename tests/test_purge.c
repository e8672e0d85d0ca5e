/* Giving memory back: RSS after a 1 GiB burst returns to baseline within the decay time with
 * the program idle, at once on memory pressure and on lum_purge(); mappings are named; figures
 * are counted. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <unistd.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_options.h"
#include "lumalloc_stats.h"

#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif

static void *(*volatile p_malloc)(size_t) = malloc;

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, resident = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
        fclose(f);
    }
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#define BURST ((size_t)1 << 30)
static void *blocks[1 << 20];

/* 1 GiB of mixed blocks (16 B .. 64 KiB, plus large ones), every byte touched, freed in a
 * shuffled order so no segment empties neatly on its own. */
static void burst(void)
{
    size_t total = 0, n = 0;
    uint64_t r = 88172645463325252ull;
    while (total < BURST && n < sizeof blocks / sizeof blocks[0]) {
        r ^= r << 13; r ^= r >> 7; r ^= r << 17;
        size_t size = (r % 100 < 2) ? (size_t)(300000 + r % 3000000) : (size_t)(16 + (r >> 8) % (r % 3 ? 512 : 65536));
        char *p = p_malloc(size);
        assert_non_null(p);
        memset(p, 0x5c, size);
        blocks[n++] = p;
        total += size;
    }
    for (size_t i = n - 1; i > 0; i--) {
        r ^= r << 13; r ^= r >> 7; r ^= r << 17;
        size_t j = r % (i + 1);
        void *t = blocks[i]; blocks[i] = blocks[j]; blocks[j] = t;
    }
    for (size_t i = 0; i < n; i++) free(blocks[i]);
}

static long baseline;

static int setup(void **state)
{
    (void)state;
    baseline = rss_kib();
    return 0;
}

/* Margin over the starting RSS allowed once memory has been returned: a few segments' headers
 * and metadata, the heap's current pages and up to 1 MiB of kept empty ones (2.2-2.3 MiB over
 * it, measured).  24 MiB until session 26: the first blocks each class's run of frees cached
 * kept ~400 pages whole, until a run of frees with no malloc turned the caches off
 * (heap.c: heap_caches_off). */
#define MARGIN_KIB (8 * 1024)

/* LUMALLOC_DECAY_MS=0 is "at once", as its description says: freed pages go back as the
 * program goes on (it turned the allocator's own purging off; only the background thread,
 * which starts once 64 MiB are mapped, purged).  First of the tests: nothing mapped that
 * would start that thread. */
static void decay_zero_purges_at_once(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("decay_ms", "0"), 0);
    static struct lum_stats a, b;
    enum { N = 30000 };
    static void *v[N];
    for (int i = 0; i < N; i++) {
        v[i] = p_malloc(1000);
        memset(v[i], 1, 1000);
    }
    lum_stats_snapshot(&a);
    for (int i = 0; i < N; i++) free(v[i]);
    lum_stats_snapshot(&b);
    /* at once: by the frees themselves, with nothing after them (a purge a millisecond, on a
     * clock of 4 ms ticks, left what was freed after a tick's first release) */
    printf("# decay 0: %llu KiB purged by the frees of 29 MiB\n",
           (unsigned long long)(b.purged_total - a.purged_total) / 1024);
    assert_true(b.purged_total - a.purged_total > (24 << 20));
    lum_stats_snapshot(&a);
    for (int i = 0; i < N; i++) {
        v[i] = p_malloc(1000);
        memset(v[i], 1, 1000);
    }
    for (int i = 0; i < N; i++) free(v[i]);
    /* The program goes on, releasing pages (what runs the purge) after the 10 ms in which
     * freed memory stays for reuse (LUM_DIRTY_HOT_MS); a second at most on a busy machine. */
    for (int i = 0; i < 500; i++) {
        usleep(2000);
        void *w[64];
        for (int k = 0; k < 64; k++) w[k] = p_malloc(70000);
        for (int k = 0; k < 64; k++) free(w[k]);
        lum_stats_snapshot(&b);
        if (b.purged_total - a.purged_total > (16 << 20)) break;
    }
    printf("# decay 0: %llu KiB purged as 29 MiB were freed\n",
           (unsigned long long)(b.purged_total - a.purged_total) / 1024);
    assert_true(b.purged_total - a.purged_total > (16 << 20));
    /* a large block's mapping too (it waited in the cache of freed mappings for the decay
     * pass of a background thread that a program this small never starts) */
    void *big = p_malloc(8 << 20);
    memset(big, 1, 8 << 20);
    lum_stats_snapshot(&a);
    free(big);
    lum_stats_snapshot(&b);
    assert_true(a.mapped - b.mapped >= (8 << 20));
    assert_int_equal(lum_options_set("decay_ms", "1000"), 0);
}

static void *leave_empty_pages(void *arg)
{
    (void)arg;
    enum { N = 40 };
    static __thread void *p[N][64];
    for (int c = 0; c < N; c++)
        for (int i = 0; i < 64; i++) {
            p[c][i] = p_malloc(1024 + (size_t)c * 512);
            memset(p[c][i], 1, 1024 + (size_t)c * 512);
        }
    for (int c = 0; c < N; c++)
        for (int i = 0; i < 64; i++) free(p[c][i]);
    return NULL;
}

/* What lum_memory_pressure() says it released is what the statistics count as purged (the
 * pages exited threads left were counted twice: once given back to their segments, once
 * purged).  Before the background thread starts: the call does the work itself. */
static void pressure_counts_what_it_releases(void **state)
{
    (void)state;
    assert_int_equal(lum_background_running(), 0);
    for (int k = 0; k < 4; k++) {
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, leave_empty_pages, NULL), 0);
        pthread_join(t, NULL);
    }
    static struct lum_stats a, b;
    lum_stats_snapshot(&a);
    size_t released = lum_memory_pressure();
    lum_stats_snapshot(&b);
    printf("# pressure: %zu bytes released, %llu purged\n", released,
           (unsigned long long)(b.purged_total - a.purged_total));
    assert_true(released > (1 << 20));
    assert_int_equal(released, b.purged_total - a.purged_total);
}

static void idle_rss_returns_within_decay(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("decay_ms", "1000"), 0);
    burst();
    long after_free = rss_kib();
    double start = now_s();
    long rss = after_free;
    while (now_s() - start < 5.0 && rss > baseline + MARGIN_KIB) {
        usleep(50000);
        rss = rss_kib();
    }
    double took = now_s() - start;
    printf("# baseline %ld KiB, right after free %ld KiB, %ld KiB after %.2f s idle (decay 1 s)\n",
           baseline, after_free, rss, took);
    int bg = lum_background_running();
    assert_true(bg & 1);
    if (access("/proc/pressure/memory", W_OK) == 0) assert_true(bg & 2); /* PSI trigger armed */
    assert_true(rss <= baseline + MARGIN_KIB);
    /* within the decay time plus the thread's wake-up period (decay / 2), with slack for a
     * loaded CI machine */
    assert_true(took <= 2.5);
}

static void pressure_releases_at_once(void **state)
{
    (void)state;
    /* a decay so long that only pressure can explain the drop */
    assert_int_equal(lum_options_set("decay_ms", "600000"), 0);
    struct lum_stats *s = malloc(sizeof *s);
    lum_stats_snapshot(s);
    uint64_t events = s->pressure_events;
    burst();
    long before = rss_kib();
    double start = now_s();
    lum_memory_pressure();
    long rss = before;
    /* the background thread releases, then counts the event: wait for both */
    lum_stats_snapshot(s);
    while (now_s() - start < 3.0 && (rss > baseline + MARGIN_KIB || s->pressure_events == events)) {
        usleep(5000);
        rss = rss_kib();
        lum_stats_snapshot(s);
    }
    double took = now_s() - start;
    printf("# pressure: %ld KiB -> %ld KiB in %.3f s\n", before, rss, took);
    assert_true(rss <= baseline + MARGIN_KIB);
    assert_true(took < 1.0); /* "at once": one wake-up of the background thread, not a decay period */
    assert_true(s->pressure_events > events);
    assert_true(s->purged_total > 0);
    free(s);
}

static void purge_on_demand(void **state)
{
    (void)state;
    assert_int_equal(lum_options_set("decay_ms", "600000"), 0);
    burst();
    size_t released = lum_purge();
    /* nothing left to release (asked at once: reading the RSS below allocates, and frees, a
     * FILE whose page a purge would give back) */
    int again = malloc_trim(0);
    long rss = rss_kib();
    printf("# lum_purge released %zu KiB, RSS %ld KiB\n", released / 1024, rss);
    assert_true(rss <= baseline + MARGIN_KIB);
    assert_int_equal(again, 0);
    assert_int_equal(lum_options_set("decay_ms", "1000"), 0);
}

/* "Every free page": the caller's own empty pages too, its current ones and those it keeps for
 * its next pages, which held ~0.5 MiB resident after a program freed everything and purged. */
static void purge_gives_back_the_callers_empty_pages(void **state)
{
    (void)state;
    static struct lum_stats s;
    static void *v[2000];
    for (int i = 0; i < 2000; i++) {
        v[i] = p_malloc((size_t)(16 + (i % 50) * 83 + (i % 9) * 9000));
        memset(v[i], 1, 16);
    }
    for (int i = 0; i < 2000; i++) free(v[i]);
    lum_purge();
    lum_stats_snapshot(&s);
    /* One thread: a class without a live block (stdio's buffers are live) has no page left.
     * Not the classes of sampled blocks (powers of two from 256 B): a class keeps an empty
     * sampled page or two for its next samples (sampled.c, keep_empty). */
    unsigned kept = 0;
    for (unsigned c = 0; c < LUM_STATS_CLASSES; c++) {
        uint32_t bs = s.classes[c].block_size;
        if (bs && !(bs >= 256 && !(bs & (bs - 1))) && !s.classes[c].live_blocks)
            kept += s.classes[c].pages;
    }
    printf("# pages without a live block left after lum_purge: %u\n", kept);
    assert_int_equal(kept, 0);
}

/* The background thread's descriptors stay out of the program's way: a program that closes
 * descriptors it does not own (a closefrom(3)-style sweep) and opens a file got that file
 * written to by the thread's wake-ups, polled (it spun) and closed in fork children. */
static void background_fds_stay_out_of_the_way(void **state)
{
    (void)state;
    if (!(lum_background_running() & 1)) skip(); /* started by the bursts above */
    DIR *d = opendir("/proc/self/fd");
    assert_non_null(d);
    struct dirent *e;
    int low = 0;
    while ((e = readdir(d))) {
        char path[300], link[64];
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(path, link, sizeof link - 1);
        if (n <= 0) continue;
        link[n] = 0;
        if ((strstr(link, "eventfd") || strstr(link, "pressure")) && atoi(e->d_name) < 1000) low++;
    }
    closedir(d);
    assert_int_equal(low, 0);
    for (int fd = 3; fd < 64; fd++) close(fd); /* the sweep */
    char name[] = "/tmp/test_purge.XXXXXX";
    int fd = mkstemp(name);
    assert_true(fd >= 0);
    unlink(name);
    free(p_malloc(3 << 20)); /* a large block to the cache: wakes the thread */
    lum_memory_pressure();
    usleep(100 * 1000);
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    assert_int_equal(st.st_size, 0);
    close(fd);
    /* A sweep that closes the thread's own descriptors too (closefrom(3)), then the program's
     * descriptors at the same numbers: a socket where the eventfd was, a file where the
     * pressure trigger was.  The thread wrote its counters into them, read the socket's data
     * away and closed the file when it saw the socket's peer go. */
    for (int i = 3; i < 4096; i++) close(i);
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    char fname[] = "/tmp/test_purge.XXXXXX";
    int file = mkstemp(fname);
    assert_true(file >= 0);
    unlink(fname);
    assert_int_equal(dup2(sv[0], 1000), 1000);
    assert_int_equal(dup2(file, 1001), 1001);
    close(sv[0]);
    close(file);
    long sent = 0, got = 0;
    char buf[4096];
    for (int r = 0; r < 20; r++) {
        sent += write(sv[1], "0123456789abcdef", 16);
        void *v[40];
        for (int i = 0; i < 40; i++) v[i] = p_malloc(1 << 20);
        for (int i = 0; i < 40; i++) free(v[i]); /* dirty memory: wakes the thread */
        usleep(10 * 1000);
        ssize_t m;
        while ((m = recv(1000, buf, sizeof buf, MSG_DONTWAIT)) > 0) got += m;
    }
    lum_memory_pressure();
    usleep(50 * 1000);
    printf("# descriptors reused after a sweep: %ld bytes sent, %ld received\n", sent, got);
    assert_int_equal(got, sent);
    assert_int_equal(recv(sv[1], buf, sizeof buf, MSG_DONTWAIT), -1); /* nothing came back */
    assert_int_equal(fstat(1001, &st), 0);
    assert_int_equal(st.st_size, 0);
    close(sv[1]); /* the peer goes */
    usleep(50 * 1000);
    assert_int_equal(fcntl(1001, F_GETFD) >= 0, 1);
    close(1000);
    close(1001);
}

static void madv_free_mode_works(void **state)
{
    (void)state;
    /* MADV_FREE leaves pages resident until the kernel needs them: only check correctness */
    assert_int_equal(lum_options_set("purge", "free"), 0);
    burst();
    lum_purge();
    char *p = p_malloc(100000);
    memset(p, 1, 100000);
    free(p);
    assert_int_equal(lum_heap_check(1), 0);
    assert_int_equal(lum_options_set("purge", "dontneed"), 0);
}

static void mappings_are_named(void **state)
{
    (void)state;
    void *p = p_malloc(100);
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    int named = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, "[anon:lumalloc")) named++;
    fclose(f);
    free(p);
    /* Anonymous VMA names need CONFIG_ANON_VMA_NAME (5.17+); where the kernel lacks it the
     * allocator must carry on silently, so ask the kernel directly which case this is. */
    void *scratch = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int supported = prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, (unsigned long)scratch, 4096,
                          (unsigned long)"probe") == 0;
    munmap(scratch, 4096);
    printf("# kernel %s anonymous VMA names; %d lumalloc mappings named\n",
           supported ? "supports" : "lacks (CONFIG_ANON_VMA_NAME)", named);
    if (supported)
        assert_true(named > 0);
    else
        assert_int_equal(named, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(pressure_counts_what_it_releases),
        cmocka_unit_test(decay_zero_purges_at_once),
        cmocka_unit_test(mappings_are_named),
        cmocka_unit_test(idle_rss_returns_within_decay),
        cmocka_unit_test(pressure_releases_at_once),
        cmocka_unit_test(purge_on_demand),
        cmocka_unit_test(purge_gives_back_the_callers_empty_pages),
        cmocka_unit_test(madv_free_mode_works),
        cmocka_unit_test(background_fds_stay_out_of_the_way),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
