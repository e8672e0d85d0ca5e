/* The sample_batch buffer (lib/batch.c), seen through its test hook as a tracer would see the
 * probe's arguments: records complete and in the order of the events; nothing written without
 * the semaphore; published when full, when old at the next event, by the flusher for an idle
 * process, at thread exit, before another probe fires and at exit; a fork child never
 * publishes its parent's records. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include "batch.h"
#include "lumalloc_options.h"
#include "lumalloc_prof.h"

/* What the hook saw: one entry per record, filled under lum_prof_lock (no malloc there). */
struct seen {
    uint16_t kind, depth;
    uint32_t tid;
    uint32_t publisher; /* thread that published the batch */
    uint32_t batch;     /* index of the batch */
    uint64_t ts, ptr, requested, usable, weight, stack_id, frame0, frame1;
};
#define MAX_SEEN 65536
static struct seen seen[MAX_SEEN];
static volatile uint32_t nseen, nbatches;
static int bad_batch; /* a batch whose records do not add up to its arguments */
static int pipe_fd = -1;
static void *volatile sink; /* keeps the compiler from eliding a malloc/free pair */

static void hook(const void *buf, uint64_t bytes, uint32_t n)
{
    const char *p = buf, *end = p + bytes;
    uint32_t parsed = 0, me = (uint32_t)gettid();
    if (bytes > LUM_BATCH_BYTES)
        bad_batch = 1;
    while (end - p >= LUM_BATCH_REC_SIZE) {
        const struct lum_batch_rec_v1 *r = (const void *)p;
        if (r->size != LUM_BATCH_REC_SIZE + r->depth * 8u || r->size > (size_t)(end - p)) {
            bad_batch = 1;
            break;
        }
        if (nseen < MAX_SEEN) {
            const uint64_t *frames = (const uint64_t *)(r + 1);
            seen[nseen] = (struct seen){r->kind, r->depth, r->tid, me, nbatches, r->ts_ns, r->ptr,
                                        r->requested_size, r->usable_size, r->weight_bytes,
                                        r->stack_id, r->depth ? frames[0] : 0,
                                        r->depth > 1 ? frames[1] : 0};
            __atomic_store_n(&nseen, nseen + 1, __ATOMIC_RELEASE);
        }
        if (pipe_fd >= 0 && write(pipe_fd, &r->ptr, sizeof r->ptr) != sizeof r->ptr)
            bad_batch = 1;
        parsed++;
        p += r->size;
    }
    if (parsed != n || p != end)
        bad_batch = 1;
    __atomic_store_n(&nbatches, nbatches + 1, __ATOMIC_RELEASE);
}

static void reset(bool flusher)
{
    lum_batch_sync(); /* nothing of an earlier test left waiting */
    nseen = nbatches = 0;
    bad_batch = 0;
    lum_batch_test_no_flusher = !flusher;
}

static int setup(void **state)
{
    (void)state;
    lum_batch_test_hook = hook;
    lum_batch_test_no_flusher = true; /* once started it runs as long as the semaphore is set */
    assert_int_equal(lum_options_set("sample_interval", "1"), 0); /* every allocation sampled */
    lumalloc_sample_batch_semaphore = 1;
    /* The first samples come first, so that the tests below see only their own blocks (the
     * unwinder allocates nothing through malloc, but stdio and cmocka may).  Several: the
     * first allocation after the interval changed may come before the sampler. */
    for (int i = 0; i < 8; i++) {
        sink = malloc(64);
        free(sink);
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    lumalloc_sample_batch_semaphore = 0;
    lum_options_set("sample_interval", "512k");
    return 0;
}

static int find(uint64_t ptr, uint16_t kind)
{
    for (uint32_t i = 0; i < __atomic_load_n(&nseen, __ATOMIC_ACQUIRE); i++)
        if (seen[i].ptr == ptr && seen[i].kind == kind)
            return (int)i;
    return -1;
}

#define N 3000
static void *blocks[N];
static size_t sizes[N];

static void test_records_complete_in_order(void **state)
{
    (void)state;
    reset(false);
    struct lum_prof_stats a, b;
    lum_prof_get_stats(&a);
    for (int i = 0; i < N; i++) {
        sizes[i] = 16 + (size_t)(i * 37 % 2000);
        blocks[i] = malloc(sizes[i]);
    }
    for (int i = N - 1; i >= 0; i -= 2) /* frees in an order of their own */
        free(blocks[i]);
    for (int i = 0; i < N; i += 2)
        free(blocks[i]);
    lum_prof_get_stats(&b);
    lum_batch_sync();
    assert_false(bad_batch);
    /* Some 3000 samples with their stacks and as many frees do not fit one buffer. */
    assert_true(nbatches > 2);
    uint64_t samples = b.samples - a.samples, frees = b.sample_frees - a.sample_frees;
    assert_true(samples > N * 9 / 10); /* sampling every byte: (nearly) every block */
    assert_int_equal(frees, samples);
    /* Every sample and every free is there once, in the order they happened: the records
     * walk the allocation order, then the free order, skipping only unsampled blocks. */
    uint32_t me = (uint32_t)gettid(), k = 0, f = 0, nsamples = 0, nfrees = 0;
    uint64_t last_ts = 0;
    for (uint32_t i = 0; i < nseen; i++) {
        const struct seen *s = &seen[i];
        assert_int_equal(s->tid, me);
        assert_true(s->ts >= last_ts);
        last_ts = s->ts;
        if (s->kind == LUM_BATCH_SAMPLE) {
            assert_int_equal(nfrees, 0); /* every sample came before the first free */
            while (k < N && (uintptr_t)blocks[k] != s->ptr)
                k++;
            assert_true(k < N);
            assert_int_equal(s->requested, sizes[k]);
            assert_true(s->usable >= sizes[k]);
            assert_true(s->weight >= sizes[k]);
            /* the stack starts in this function, as `sample`'s frames do (linked statically,
             * malloc itself may come first) */
            assert_true(s->depth > 0);
            assert_true(s->stack_id != 0);
            uintptr_t fn = (uintptr_t)test_records_complete_in_order;
            assert_true((s->frame0 > fn && s->frame0 < fn + 4096) ||
                        (s->frame1 > fn && s->frame1 < fn + 4096));
            k++;
            nsamples++;
        } else {
            assert_int_equal(s->kind, LUM_BATCH_FREE);
            int j;
            for (;; f++) {
                assert_true(f < N);
                j = f < (N + 1) / 2 ? N - 1 - 2 * (int)f : 2 * (int)(f - (N + 1) / 2);
                if ((uintptr_t)blocks[j] == s->ptr)
                    break;
            }
            assert_int_equal(s->requested, sizes[j]);
            assert_int_equal(s->depth, 0);
            f++;
            nfrees++;
        }
    }
    assert_int_equal(nsamples, samples);
    assert_int_equal(nfrees, frees);
}

/* No stack taken (LUMALLOC_PROF_DEPTH=0): depth 0 and stack_id 0, in the samples and their
 * frees, as the contract says (it was the hash of no frames). */
static void test_no_stack_is_stack_id_0(void **state)
{
    (void)state;
    reset(false);
    assert_int_equal(lum_options_set("prof_depth", "0"), 0);
    for (int i = 0; i < 50; i++) {
        sink = malloc(100);
        free(sink);
    }
    assert_int_equal(lum_options_set("prof_depth", "32"), 0);
    lum_batch_sync();
    assert_false(bad_batch);
    assert_true(nseen >= 50);
    for (uint32_t i = 0; i < nseen; i++) {
        assert_int_equal(seen[i].depth, 0);
        assert_int_equal(seen[i].stack_id, 0);
    }
}

static void test_nothing_without_semaphore(void **state)
{
    (void)state;
    reset(false);
    lumalloc_sample_batch_semaphore = 0;
    void *p = malloc(100);
    free(p);
    lumalloc_sample_batch_semaphore = 1;
    lum_batch_sync();
    assert_int_equal(nseen, 0);
}

static void sleep_ms(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* With no flusher: a record older than LUM_BATCH_MAX_AGE_MS goes out with the next event. */
static void test_old_records_go_with_next_event(void **state)
{
    (void)state;
    reset(false);
    void *p = malloc(100);
    sleep_ms(LUM_BATCH_MAX_AGE_MS + 10);
    assert_int_equal(nbatches, 0);
    void *q = malloc(100);
    assert_int_equal(nbatches, 1);
    assert_int_equal(nseen, 2);
    assert_int_equal(seen[0].ptr, (uintptr_t)p);
    assert_int_equal(seen[1].ptr, (uintptr_t)q);
    free(p);
    free(q);
    assert_int_equal(nbatches, 1); /* young: they wait */
}

/* An idle process: the flusher thread publishes without any further event. */
static void test_idle_process_flushed(void **state)
{
    (void)state;
    reset(true);
    void *p = malloc(200);
    uint32_t me = (uint32_t)gettid();
    int i;
    /* The bound is LUM_BATCH_FLUSH_MS; the deadline only keeps a broken build from hanging. */
    for (i = 0; i < 1000 && find((uintptr_t)p, LUM_BATCH_SAMPLE) < 0; i++)
        sleep_ms(5);
    int at = find((uintptr_t)p, LUM_BATCH_SAMPLE);
    assert_true(at >= 0);
    assert_true(seen[at].publisher != me); /* not us: we only slept */
    free(p);
}

struct thread_out {
    uint32_t tid;
    void *p[8];
};

static void *thread_body(void *arg)
{
    struct thread_out *o = arg;
    o->tid = (uint32_t)gettid();
    for (int i = 0; i < 8; i++) /* a thread's first allocation may come before its sampler */
        o->p[i] = malloc(300);
    return NULL;
}

static void test_thread_exit_flushes(void **state)
{
    (void)state;
    reset(false);
    struct thread_out o;
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, thread_body, &o), 0);
    pthread_join(t, NULL);
    /* With no flusher and nothing else happening, only the exiting thread can have published
     * its samples, and it has, before join returned. */
    assert_int_equal(lum_batch_count, 0);
    int n = 0;
    for (uint32_t i = 0; i < nseen; i++)
        if (seen[i].tid == o.tid) {
            assert_int_equal(seen[i].publisher, o.tid);
            n++;
        }
    assert_true(n > 0);
    for (int i = 0; i < 8; i++)
        free(o.p[i]);
}

/* Another probe about to fire (here large_alloc) first publishes what came before it. */
static void test_flushed_before_other_probe(void **state)
{
    (void)state;
    reset(false);
    void *p = malloc(100);
    assert_int_equal(nbatches, 0);
    lumalloc_large_alloc_semaphore = 1;
    void *big = sink = malloc(4 << 20);
    lumalloc_large_alloc_semaphore = 0;
    assert_true(nbatches >= 1);
    assert_int_equal(seen[0].ptr, (uintptr_t)p);
    free(big);
    free(p);
}

/* exit() publishes what waits; a fork child never publishes what its parent had waiting. */
static void test_exit_flush_and_fork(void **state)
{
    (void)state;
    reset(false);
    void *parents = malloc(100); /* waiting in the parent's buffer across the fork */
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t c = fork();
    assert_true(c >= 0);
    if (c == 0) {
        close(fds[0]);
        pipe_fd = fds[1];
        void *mine = malloc(100);
        if (write(fds[1], &mine, sizeof mine) != sizeof mine)
            _exit(2);
        exit(bad_batch ? 3 : 0); /* the destructor publishes `mine` into the pipe */
    }
    close(fds[1]);
    uint64_t v[16];
    ssize_t n, got = 0;
    while ((n = read(fds[0], (char *)v + got, sizeof v - (size_t)got)) > 0)
        got += n;
    close(fds[0]);
    int st;
    waitpid(c, &st, 0);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    /* v[0]: the child's block; then what the child published: exactly that block. */
    assert_int_equal(got, 2 * (ssize_t)sizeof(uint64_t));
    assert_int_equal(v[1], v[0]);
    assert_true(v[1] != (uintptr_t)parents);
    lum_batch_sync();
    assert_true(find((uintptr_t)parents, LUM_BATCH_SAMPLE) >= 0); /* the parent's is the parent's */
    free(parents);
}

/* A fork child inherits the raised semaphore of a traced parent, which the kernel lowers when
 * the probe first fires there if no tracer follows the child (emulated by the hook below).
 * The child publishes before it starts a flusher, and starts none when the semaphore went
 * down: it started one at once, and every child of a traced process had two threads
 * (unshare(CLONE_NEWUSER) then fails). */
static void untraced_child_hook(const void *buf, uint64_t bytes, uint32_t nrecords)
{
    (void)buf, (void)bytes, (void)nrecords;
    lumalloc_sample_batch_semaphore = 0;
}

/* Threads of this process, from /proc/self/status (open and read: no allocation, which would
 * sample). */
static int task_count(void)
{
    char buf[4096];
    int fd = open("/proc/self/status", O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    const char *t = strstr(buf, "\nThreads:");
    return t ? atoi(t + 9) : -1;
}

/* In a child: samples a few blocks (sampling every allocation), waits a little for a flusher
 * to show up; exits with the number of threads. */
static int child_threads(bool traced)
{
    if (!traced) lum_batch_test_hook = untraced_child_hook;
    lum_batch_test_no_flusher = false;
    for (int i = 0; i < 16; i++) {
        sink = malloc(64);
        free(sink);
    }
    for (int i = 0; i < 20 && task_count() < 2; i++) usleep(5000);
    return task_count();
}

static void test_untraced_fork_child_starts_no_flusher(void **state)
{
    (void)state;
    reset(false);
    for (int traced = 0; traced <= 1; traced++) {
        fflush(NULL);
        pid_t c = fork();
        assert_true(c >= 0);
        if (c == 0) _exit(child_threads(traced));
        int st;
        assert_int_equal(waitpid(c, &st, 0), c);
        assert_true(WIFEXITED(st));
        /* untraced: alone; traced (the semaphore stays up): the flusher, which proves the check */
        assert_int_equal(WEXITSTATUS(st), traced ? 2 : 1);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_records_complete_in_order),
        cmocka_unit_test(test_no_stack_is_stack_id_0),
        cmocka_unit_test(test_nothing_without_semaphore),
        cmocka_unit_test(test_old_records_go_with_next_event),
        cmocka_unit_test(test_thread_exit_flushes),
        cmocka_unit_test(test_flushed_before_other_probe),
        cmocka_unit_test(test_exit_flush_and_fork),
        cmocka_unit_test(test_untraced_fork_child_starts_no_flusher),
        cmocka_unit_test(test_idle_process_flushed), /* last: it leaves the flusher running */
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
