/*
 * Process shapes the tools must follow, for tools_targets.sh:
 *   tools_shapes mainexit DELAY_MS SECS  two workers allocate for SECS s; the main thread leaves
 *                                        with pthread_exit after DELAY_MS (the leader a zombie)
 *   tools_shapes exec DELAY_MS SECS      two workers allocate; after DELAY_MS the process keeps
 *                                        8 MiB, then execs itself as `plain SECS`
 *   tools_shapes plain SECS              two workers allocate for SECS s
 *   tools_shapes badname SECS            like plain, a worker's name cut inside a UTF-8 character
 *   tools_shapes stacks N                allocations from N distinct stacks (N <= 4096), then exit
 *   tools_shapes many N SECS             N threads allocate and keep 64 KiB each, and are all
 *                                        alive when the process exits after SECS s
 *   tools_shapes final N SECS FILE       N threads: thread i allocates i % 100 + 1 blocks of 100 bytes,
 *                                        SECS s later as many more, then the process exits at once
 *                                        (all alive); FILE gets "tid allocs bytes" per thread, as
 *                                        its registry record had them after its last allocation
 *   tools_shapes execbatch N PATH [MS]   N allocations of 4321 bytes (kept), then at once
 *                                        execv(PATH); if that fails, a normal exit.  MS (100):
 *                                        how long after its first allocation it starts
 *   tools_shapes aging SECS              old_site keeps 8 MiB in 4 KiB blocks and one 3 MiB block,
 *                                        SECS s later young_site as much, and 0.2 s later the
 *                                        process exits
 *   tools_shapes idle SECS [leader]      old_site keeps its blocks, then the process does nothing
 *                                        for SECS s and exits; with `leader` the main thread
 *                                        leaves first (pthread_exit) and another thread exits the
 *                                        process SECS s later
 *   tools_shapes relay SECS              the main thread leaves (pthread_exit) once "sh-a" and
 *                                        "sh-w0" run and their TIDs are on stdout ("A W0\n");
 *                                        sh-a exits when a byte comes on stdin, sh-w0 starts a
 *                                        short-lived allocating thread every 20 ms for SECS s
 * Workers are named "sh-w0", "sh-w1" (after exec: "sh-x0", "sh-x1").
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "lumalloc_probes.h"

/* Defined by a statically linked lumalloc; else looked up in the preloaded library. */
extern struct lum_registry_v1 lumalloc_registry __attribute__((weak));

static double secs;
static const char *prefix = "sh-w";
static int bad_name;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_ms(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static void *worker(void *arg)
{
    char name[16];
    int i = (int)(long)arg;
    if (bad_name && i == 0)
        /* 14 bytes of ASCII, then a 3-byte character the 15-byte comm cuts after its first byte */
        memcpy(name, "sh-namexxxxxxx\xe2", 16);
    else
        snprintf(name, sizeof(name), "%s%d", prefix, i);
    pthread_setname_np(pthread_self(), name);
    double end = now() + secs;
    while (now() < end) {
        for (int k = 0; k < 400; k++) {
            void *volatile p = malloc(1000 + (size_t)k * 8);
            memset(p, 1, 64);
            free(p);
        }
        sleep_ms(20);
    }
    return NULL;
}

static void *volatile sink_a, *volatile sink_b;

/* A path of d calls from one of two call sites each, chosen by the bits of k: 2^d stacks. */
__attribute__((noinline)) static void *path(int d, unsigned k)
{
    void *p;
    if (d == 0)
        return malloc(3000);
    /* distinct code around each call keeps the two call sites apart (no merging, no tail call) */
    if (k & 1) {
        __asm__ volatile("nop" ::: "memory");
        p = path(d - 1, k >> 1);
        sink_a = p;
    } else {
        __asm__ volatile("nop; nop" ::: "memory");
        p = path(d - 1, k >> 1);
        sink_b = p;
    }
    return p;
}

static void *keeper(void *arg)
{
    (void)arg;
    for (int i = 0; i < 64; i++)
        sink_a = malloc(1024);
    for (;;)
        pause();
    return NULL;
}

/* final: the second round is allocated after alloctop's last interval reading, so only the
 * exit-time reading sees it. */
struct final_thread {
    pid_t tid;
    unsigned long long count, bytes;
};
static struct final_thread *final_threads;
static pthread_barrier_t final_ready, final_go, final_done;

static void final_round(int n)
{
    for (int k = 0; k < n; k++)
        sink_a = malloc(100);
}

/* The thread's own counters, as the library has them (glibc may allocate on a thread too, once
 * in a while: the program's own count is not the truth). */
static void final_own_counters(struct final_thread *f)
{
    const struct lum_registry_v1 *reg = &lumalloc_registry;
    if (!reg)
        reg = dlsym(RTLD_DEFAULT, "lumalloc_registry");
    if (!reg)
        return;
    for (uint64_t a = reg->threads_head; a; a = ((const struct lum_thread_counters_v1 *)(uintptr_t)a)->next) {
        const struct lum_thread_counters_v1 *c = (const void *)(uintptr_t)a;
        if (c->tid == (uint32_t)f->tid && c->state == LUM_THREAD_LIVE) {
            f->count = c->alloc_count;
            f->bytes = c->alloc_bytes;
            return;
        }
    }
}

static void *final_worker(void *arg)
{
    struct final_thread *f = arg;
    int n = (int)(f - final_threads) % 100 + 1;
    f->tid = gettid();
    final_round(n);
    pthread_barrier_wait(&final_ready);
    pthread_barrier_wait(&final_go);
    final_round(n);
    final_own_counters(f);
    pthread_barrier_wait(&final_done);
    for (;;)
        pause();
    return NULL;
}

/* 8 MiB in 4 KiB blocks and one 3 MiB block, kept: noinline, so that each is its own site */
static __attribute__((noinline)) void keep_from(void)
{
    for (int i = 0; i < 2048; i++) {
        char *volatile p = malloc(4096);
        p[0] = 1;
    }
    char *volatile big = malloc(3 << 20);
    big[0] = 1;
}

static __attribute__((noinline, noipa)) void old_site(void)
{
    keep_from();
    __asm__ volatile("" ::: "memory");
}

static __attribute__((noinline, noipa)) void young_site(void)
{
    keep_from();
    __asm__ volatile("" ::: "memory");
}

/* idle leader: the thread that outlives the main thread, then ends the process */
static void *exit_later(void *arg)
{
    (void)arg;
    sleep_ms((long)(secs * 1000));
    exit(0);
}

/* relay: the first thread after the leader (the one a tool attaches through) and its exit on
 * demand; the spawner's threads fire thread_start and thread_exit. */
static pid_t relay_tids[2];
static pthread_barrier_t relay_named;

static void *relay_short(void *arg)
{
    (void)arg;
    void *volatile p = malloc(100);
    free(p);
    return NULL;
}

/* A relay thread's name and TID, before the leader prints the TIDs and leaves. */
static void relay_announce(const char *name, int slot)
{
    pthread_setname_np(pthread_self(), name);
    relay_tids[slot] = gettid();
    pthread_barrier_wait(&relay_named);
}

static void *relay_first(void *arg)
{
    (void)arg;
    relay_announce("sh-a", 0);
    char b;
    if (read(0, &b, 1) < 0)
        perror("read");
    return NULL;
}

static void *relay_spawner(void *arg)
{
    (void)arg;
    relay_announce("sh-w0", 1);
    double end = now() + secs;
    while (now() < end) {
        pthread_t th;
        if (pthread_create(&th, NULL, relay_short, NULL) == 0)
            pthread_join(th, NULL);
        sleep_ms(20);
    }
    exit(0);
}

static void start_workers(pthread_t t[2])
{
    for (long i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, worker, (void *)i);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s mainexit|exec DELAY_MS SECS | plain|badname SECS\n", argv[0]);
        return 2;
    }
    pthread_t t[2];
    if (!strcmp(argv[1], "stacks")) {
        unsigned n = (unsigned)atoi(argv[2]);
        for (int round = 0; round < 40; round++)
            for (unsigned k = 0; k < n && k < 4096; k++)
                free(path(12, k));
        return 0;
    }
    if (!strcmp(argv[1], "many") && argc >= 4) {
        int n = atoi(argv[2]);
        secs = atof(argv[3]);
        for (int i = 0; i < n; i++) {
            pthread_t th;
            if (pthread_create(&th, NULL, keeper, NULL)) {
                perror("pthread_create");
                return 1;
            }
        }
        sleep_ms((long)(secs * 1000));
        exit(0);
    }
    if (!strcmp(argv[1], "aging")) {
        old_site();
        sleep_ms((long)(atof(argv[2]) * 1000));
        young_site();
        sleep_ms(200);
        return 0;
    }
    if (!strcmp(argv[1], "idle")) {
        old_site();
        secs = atof(argv[2]);
        if (argc > 3 && !strcmp(argv[3], "leader")) {
            pthread_create(&t[0], NULL, exit_later, NULL);
            pthread_exit(NULL);
        }
        sleep_ms((long)(secs * 1000));
        return 0;
    }
    if (!strcmp(argv[1], "execbatch")) {
        /* what the start-up sampled is published (LUM_BATCH_FLUSH_MS) before ours are taken
         * (through a volatile pointer: GCC drops a free(malloc(n)) pair) */
        void *volatile first = malloc(100);
        free(first);
        sleep_ms(argc > 4 ? atol(argv[4]) : 100);
        int n = atoi(argv[2]);
        for (int i = 0; i < n; i++)
            sink_a = malloc(4321);
        execv(argv[3], (char *[]){argv[3], NULL});
        return 0;
    }
    if (!strcmp(argv[1], "final") && argc >= 5) {
        int n = atoi(argv[2]);
        secs = atof(argv[3]);
        final_threads = calloc((size_t)n, sizeof(*final_threads));
        pthread_barrier_init(&final_ready, NULL, (unsigned)n + 1);
        pthread_barrier_init(&final_go, NULL, (unsigned)n + 1);
        pthread_barrier_init(&final_done, NULL, (unsigned)n + 1);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        /* small, for 4000 threads, but room for a sample's unwinding (a CFI file read) */
        pthread_attr_setstacksize(&attr, 256 << 10);
        for (int i = 0; i < n; i++) {
            pthread_t th;
            if (pthread_create(&th, &attr, final_worker, &final_threads[i])) {
                perror("pthread_create");
                return 1;
            }
        }
        pthread_barrier_wait(&final_ready);
        FILE *out = fopen(argv[4], "w");
        if (!out) {
            perror(argv[4]);
            return 1;
        }
        sleep_ms((long)(secs * 1000));
        pthread_barrier_wait(&final_go);
        pthread_barrier_wait(&final_done);
        for (int i = 0; i < n; i++)
            fprintf(out, "%d %llu %llu\n", (int)final_threads[i].tid, final_threads[i].count, final_threads[i].bytes);
        fclose(out);
        exit(0);
    }
    if (!strcmp(argv[1], "relay")) {
        secs = atof(argv[2]);
        pthread_barrier_init(&relay_named, NULL, 3);
        pthread_create(&t[0], NULL, relay_first, NULL);
        pthread_create(&t[1], NULL, relay_spawner, NULL);
        pthread_barrier_wait(&relay_named);
        printf("%d %d\n", (int)relay_tids[0], (int)relay_tids[1]);
        fflush(stdout);
        pthread_exit(NULL);
    }
    if (!strcmp(argv[1], "plain") || !strcmp(argv[1], "badname")) {
        secs = atof(argv[2]);
        bad_name = !strcmp(argv[1], "badname");
        if (getenv("TOOLS_SHAPES_EXECED"))
            prefix = "sh-x";
        start_workers(t);
        pthread_join(t[0], NULL);
        pthread_join(t[1], NULL);
        return 0;
    }
    if (argc < 4)
        return 2;
    long delay = atol(argv[2]);
    secs = atof(argv[3]);
    if (!strcmp(argv[1], "mainexit")) {
        start_workers(t);
        sleep_ms(delay);
        pthread_exit(NULL);
    }
    if (!strcmp(argv[1], "exec")) {
        start_workers(t);
        sleep_ms(delay);
        for (int i = 0; i < 8192; i++) /* 8 MiB the exec frees */
            sink_a = malloc(1024);
        setenv("TOOLS_SHAPES_EXECED", "1", 1);
        execl("/proc/self/exe", argv[0], "plain", argv[3], (char *)NULL);
        perror("exec");
        return 1;
    }
    return 2;
}
