/*
 * Workload with a known allocation pattern for the alloctop/allocsnoop integration tests.
 * Built with -O2 -fomit-frame-pointer on purpose: the tools must get stacks right without
 * frame pointers (the library unwinds in-process).
 *
 *   thread "wl-heavy" allocates 3x the bytes of thread "wl-light";
 *   in both, the sites site_a / site_b / site_c get exactly 50% / 30% / 20% of the small bytes;
 *   the main thread leaks from leak_site, fails F allocations in fail_site, and the workers make
 *   large allocations in large_site.
 *
 * At the end it prints its own exact truth as one JSON line on stdout (per-thread usable bytes
 * from malloc_usable_size, per-site requested bytes), then lingers so a tracer can take a last
 * look at the live process before it exits.
 *
 * usage: tools_workload [-m MiB per light unit] [-d start_delay_ms] [-l linger_ms] [-f failures]
 *                       [-L leak_MiB] [-g large_count] [-o truth_file] [-p pace_ms] [-G large_leaks]
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define NOINL __attribute__((noinline, noipa))

struct truth {
    const char *name;
    uint64_t units;
    pid_t tid;
    uint64_t alloc_bytes, alloc_count, free_bytes, free_count;
    uint64_t site_bytes[3];
    uint64_t large;
};

static uint64_t unit_bytes = 64ull << 20;
static int large_per_thread = 2;
static long pace_ms; /* sleep between tenths of the work, so tools see the workers running */
static volatile uint64_t sink;

static void sleep_ms(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static NOINL void *counted_malloc(struct truth *t, size_t n)
{
    void *p = malloc(n);
    if (p) {
        t->alloc_bytes += malloc_usable_size(p);
        t->alloc_count++;
        memset(p, 1, n < 64 ? n : 64);
    }
    return p;
}

static NOINL void counted_free(struct truth *t, void *p)
{
    t->free_bytes += malloc_usable_size(p);
    t->free_count++;
    free(p);
}

/* Each site is its own function so the stacks name it; the body is what matters for truth. */
static NOINL void site_a(struct truth *t, size_t n)
{
    void *p = malloc(n);
    t->alloc_bytes += malloc_usable_size(p), t->alloc_count++;
    sink += ((volatile char *)p)[0];
    t->free_bytes += malloc_usable_size(p), t->free_count++;
    free(p);
    t->site_bytes[0] += n;
}

static NOINL void site_b(struct truth *t, size_t n)
{
    void *p = malloc(n);
    t->alloc_bytes += malloc_usable_size(p), t->alloc_count++;
    sink += ((volatile char *)p)[0];
    t->free_bytes += malloc_usable_size(p), t->free_count++;
    free(p);
    t->site_bytes[1] += n;
}

static NOINL void site_c(struct truth *t, size_t n)
{
    void *p = malloc(n);
    t->alloc_bytes += malloc_usable_size(p), t->alloc_count++;
    sink += ((volatile char *)p)[0];
    t->free_bytes += malloc_usable_size(p), t->free_count++;
    free(p);
    t->site_bytes[2] += n;
}

static NOINL void large_site(struct truth *t)
{
    void *p = counted_malloc(t, 2u << 20);
    counted_free(t, p);
    t->large++;
}

static pthread_barrier_t start_barrier;

static void *worker(void *arg)
{
    struct truth *t = arg;
    t->tid = gettid();
    pthread_setname_np(pthread_self(), t->name);
    /* Both workers have their allocator state before either finishes: an allocator may reuse
     * an exited thread's counters record for a thread that starts later (folding the old
     * figures into process totals), and the tests compare per-thread figures. */
    counted_free(t, counted_malloc(t, 64));
    pthread_barrier_wait(&start_barrier);
    uint64_t budget = t->units * unit_bytes, done = 0, rng = 88172645463325252ull ^ t->units;
    for (int i = 0; i < large_per_thread; i++)
        large_site(t);
    uint64_t next_pause = budget / 10;
    while (done < budget) {
        if (pace_ms && done >= next_pause) {
            sleep_ms(pace_ms);
            next_pause += budget / 10;
        }
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        size_t n = 64 + (rng % 4033); /* 64..4096 */
        /* 5:3:2 calls of the same size: exact 50/30/20 byte shares. */
        for (int i = 0; i < 5; i++)
            site_a(t, n);
        for (int i = 0; i < 3; i++)
            site_b(t, n);
        for (int i = 0; i < 2; i++)
            site_c(t, n);
        done += 10 * n;
    }
    return NULL;
}

static void *leaked[1 << 16];

static NOINL uint64_t leak_site(struct truth *t, uint64_t bytes)
{
    uint64_t total = 0;
    for (unsigned i = 0; total < bytes && i < sizeof(leaked) / sizeof(leaked[0]); i++) {
        leaked[i] = counted_malloc(t, 4096);
        total += 4096;
    }
    return total;
}

static NOINL uint64_t large_leak_site(struct truth *t, int count)
{
    uint64_t bytes = 0;
    for (int i = 0; i < count; i++) {
        void *p = counted_malloc(t, 3u << 20);
        bytes += malloc_usable_size(p);
        sink += (uintptr_t)p & 1; /* never freed */
    }
    return bytes;
}

static NOINL int fail_site(struct truth *t, int count)
{
    volatile size_t huge = (size_t)1 << 62;
    int failed = 0;
    for (int i = 0; i < count; i++) {
        void *p = malloc(huge);
        if (!p)
            failed++;
        else
            counted_free(t, p);
    }
    return failed;
}

int main(int argc, char **argv)
{
    long delay_ms = 0, linger_ms = 0;
    int failures = 3, large_leaks = 0;
    uint64_t leak_mib = 8;
    const char *truth_path = NULL;
    int c;
    while ((c = getopt(argc, argv, "m:d:l:f:L:g:o:p:G:")) != -1) {
        switch (c) {
        case 'm': unit_bytes = strtoull(optarg, NULL, 0) << 20; break;
        case 'd': delay_ms = atol(optarg); break;
        case 'l': linger_ms = atol(optarg); break;
        case 'f': failures = atoi(optarg); break;
        case 'L': leak_mib = strtoull(optarg, NULL, 0); break;
        case 'g': large_per_thread = atoi(optarg); break;
        case 'o': truth_path = optarg; break;
        case 'p': pace_ms = atol(optarg); break;
        case 'G': large_leaks = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: %s [-m MiB] [-d delay_ms] [-l linger_ms] [-f failures] [-L leak_MiB] [-g large] [-o truth] [-p pace_ms] [-G large_leaks]\n",
                    argv[0]);
            return 2;
        }
    }
    if (delay_ms)
        sleep_ms(delay_ms);

    struct truth main_t = {.name = "main"};
    struct truth w[2] = {{.name = "wl-heavy", .units = 3}, {.name = "wl-light", .units = 1}};
    pthread_t th[2];
    pthread_barrier_init(&start_barrier, NULL, 2);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < 2; i++)
        pthread_create(&th[i], NULL, worker, &w[i]);
    uint64_t leaked_bytes = leak_site(&main_t, leak_mib << 20);
    int failed = fail_site(&main_t, failures);
    uint64_t large_leaked = large_leak_site(&main_t, large_leaks);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double elapsed_ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) * 1e-6;
    /* CPU time (user+sys, whole process): on a shared, oversubscribed machine a steadier
     * measure of a tracer's cost than wall time; uprobe traps show up as sys time. */
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu_ms = (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e3 + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-3;

    FILE *out = stdout;
    if (truth_path && !(out = fopen(truth_path, "w"))) {
        perror(truth_path);
        return 1;
    }
    fprintf(out, "{\"pid\":%d,\"threads\":[", (int)getpid());
    for (int i = 0; i < 2; i++)
        fprintf(out, "%s{\"name\":\"%s\",\"tid\":%d,\"alloc_bytes\":%llu,\"alloc_count\":%llu,\"free_bytes\":%llu,"
               "\"free_count\":%llu,\"large\":%llu}",
               i ? "," : "", w[i].name, (int)w[i].tid, (unsigned long long)w[i].alloc_bytes,
               (unsigned long long)w[i].alloc_count, (unsigned long long)w[i].free_bytes,
               (unsigned long long)w[i].free_count, (unsigned long long)w[i].large);
    uint64_t s[3] = {0};
    for (int i = 0; i < 2; i++)
        for (int k = 0; k < 3; k++)
            s[k] += w[i].site_bytes[k];
    fprintf(out, "],\"sites\":{\"site_a\":%llu,\"site_b\":%llu,\"site_c\":%llu,\"leak_site\":%llu},"
           "\"leak_bytes\":%llu,\"failures\":%d,\"large\":%llu,\"elapsed_ms\":%.1f,\"cpu_ms\":%.1f,\"large_leaks\":%d,\"large_leak_bytes\":%llu}\n",
           (unsigned long long)s[0], (unsigned long long)s[1], (unsigned long long)s[2],
           (unsigned long long)leaked_bytes, (unsigned long long)leaked_bytes, failed,
           (unsigned long long)(w[0].large + w[1].large), elapsed_ms, cpu_ms, large_leaks,
           (unsigned long long)large_leaked);
    fclose(out);
    if (linger_ms)
        sleep_ms(linger_ms);
    return (int)(sink & 0);
}
