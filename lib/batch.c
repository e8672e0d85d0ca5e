/* The sample_batch probe: sampled allocations and frees handed to a tracer a buffer at a time.
 *
 * A tracer that wants every sample pays ~1 us per probe hit even with optimized uprobes, and the
 * per-event probes cost two hits per sampled block (sample, sample_free): at ~100k samples/s
 * that is a fifth of a core.  While sample_batch's semaphore is set the sampler appends records
 * here instead, under lum_prof_lock (which every sample and sampled free takes anyway, so the
 * buffer needs no lock of its own and its order is the order the profiler saw the events in),
 * and the probe fires once per buffer.
 *
 * Nothing here allocates: the buffer is static (untouched, hence unmapped, until a tracer
 * attaches), and the flusher thread never calls malloc. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "batch.h"

uint32_t lum_batch_count;
void (*lum_batch_test_hook)(const void *buf, uint64_t bytes, uint32_t nrecords);
bool lum_batch_test_no_flusher;

/* In .lbss, which the linker places after .bss: in the middle of .bss the untouched buffer
 * split the small variables around it onto pages of their own (7 resident pages of .bss in
 * bench churn, 6 without the split). */
static uint64_t batch_buf[LUM_BATCH_BYTES / sizeof(uint64_t)] __attribute__((aligned(64), section(".lbss")));
static uint32_t batch_used;      /* bytes */
static uint64_t batch_first_ns;  /* timestamp of the oldest waiting record */
static pid_t batch_pid;          /* the process whose records are waiting (see lum_batch_sync) */
static pid_t self_pid;
static bool batch_final;         /* past the exit flush: every record goes out at once */

/* Where tracers find the waiting records (lumalloc_probes.h): addresses only, so that the
 * paths that write them are the same as without it. */
LUM_EXPORT __attribute__((used)) const struct lum_batch_info_v1 lumalloc_batch = {
    .magic = LUM_BATCH_INFO_MAGIC,
    .version = LUM_PROBES_VERSION,
    .size = sizeof(struct lum_batch_info_v1),
    .buf_addr = (uint64_t)(uintptr_t)batch_buf,
    .used_addr = (uint64_t)(uintptr_t)&batch_used,
    .count_addr = (uint64_t)(uintptr_t)&lum_batch_count,
    .pid_addr = (uint64_t)(uintptr_t)&batch_pid,
};
/* The flusher thread: 0 none, 1 starting or running, 2 could not be started (not retried). */
static int flusher_state;
/* Our constructor has run, so libc is initialised: a tracer attached at exec sees samples from
 * the dynamic loader's own allocations, too early to start a thread. */
static bool batch_ready;
static __thread uint32_t my_tid LUM_TLS;

static inline uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t); /* the clock of bpf_ktime_get_ns(): tracers can merge */
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void flush_locked(void)
{
    uint32_t n = lum_batch_count;
    if (!n)
        return;
    STAP_PROBE3(lumalloc, sample_batch, LUM_U64(batch_buf), LUM_U64(batch_used), LUM_U32(n));
    if (lum_batch_test_hook)
        lum_batch_test_hook(batch_buf, batch_used, n);
    batch_used = 0;
    __atomic_store_n(&lum_batch_count, 0, __ATOMIC_RELAXED);
}

static struct lum_batch_rec_v1 *append(uint16_t kind, uint32_t depth, uint64_t *now)
{
    uint32_t size = LUM_BATCH_REC_SIZE + depth * (uint32_t)sizeof(uint64_t);
    if (batch_used + size > LUM_BATCH_BYTES)
        flush_locked();
    /* Taken under the lock, so timestamps never go backwards within the buffer. */
    *now = now_ns();
    if (!lum_batch_count) {
        if (!self_pid) /* sampled before our constructor ran (a tracer attached at exec) */
            self_pid = getpid();
        batch_first_ns = *now;
        __atomic_store_n(&batch_pid, self_pid, __ATOMIC_RELAXED);
    }
    if (!my_tid)
        my_tid = (uint32_t)gettid();
    struct lum_batch_rec_v1 *r = (void *)((char *)batch_buf + batch_used);
    r->size = size;
    r->kind = kind;
    r->depth = (uint16_t)depth;
    r->tid = my_tid;
    r->reserved = 0;
    r->ts_ns = *now;
    batch_used += size;
    __atomic_store_n(&lum_batch_count, lum_batch_count + 1, __ATOMIC_RELAXED);
    return r;
}

/* The batch goes out at once at exit, or when its oldest record is LUM_BATCH_MAX_AGE_MS old. */
static void flush_if_due(uint64_t now)
{
    if (batch_final || now - batch_first_ns >= (uint64_t)LUM_BATCH_MAX_AGE_MS * 1000000u)
        flush_locked();
}

/* A fork child inherits the parent's raised semaphores in its copy of memory, though no tracer
 * may follow it: the kernel takes its breakpoints out, and lowers the count, when a probe first
 * fires there.  Until the child has published a batch and still sees sample_batch's semaphore
 * set, it starts no flusher: one started at once made every child of a traced process
 * multithreaded (unshare(CLONE_NEWUSER) then fails with EINVAL), for nothing. */
static bool child_unverified;

static bool after_append(uint64_t now)
{
    flush_if_due(now);
    if (flusher_state || lum_batch_test_no_flusher || !__atomic_load_n(&batch_ready, __ATOMIC_RELAXED))
        return false;
    if (child_unverified) {
        flush_locked();
        if (!LUM_PROBE_ON(sample_batch))
            return false; /* nobody traces the child: the samples stop taking this path */
        child_unverified = false;
    }
    flusher_state = 1;
    return true;
}

bool lum_batch_add_sample(uint64_t ptr, uint64_t requested, uint64_t usable, uint64_t weight,
                          uint64_t stack_id, const uint64_t *frames, uint32_t depth)
{
    uint64_t now;
    if (depth > LUM_MAX_FRAMES)
        depth = LUM_MAX_FRAMES;
    struct lum_batch_rec_v1 *r = append(LUM_BATCH_SAMPLE, depth, &now);
    r->ptr = ptr;
    r->requested_size = requested;
    r->usable_size = usable;
    r->weight_bytes = weight;
    r->stack_id = stack_id;
    memcpy(r + 1, frames, depth * sizeof(uint64_t));
    return after_append(now);
}

/* Never starts the flusher (returns false): a free may come from inside glibc holding its
 * thread-stack cache lock (pthread_join freeing a thread's TLS block), which pthread_create
 * then waits for, for good.  The next sampled allocation starts it. */
bool lum_batch_add_free(uint64_t ptr, uint64_t requested, uint64_t usable, uint64_t weight,
                        uint64_t stack_id)
{
    uint64_t now;
    struct lum_batch_rec_v1 *r = append(LUM_BATCH_FREE, 0, &now);
    r->ptr = ptr;
    r->requested_size = requested;
    r->usable_size = usable;
    r->weight_bytes = weight;
    r->stack_id = stack_id;
    flush_if_due(now);
    return false;
}

void lum_batch_sync(void)
{
    /* A fork child runs the core's handlers (which fire thread_exit for the threads that did
     * not survive) while lum_prof_lock is still the parent's, held across fork() until our
     * side re-initialises it: the parent's records tell us we are there.  getpid() is a real
     * system call, paid only when records wait and another probe is about to fire. */
    if (__atomic_load_n(&batch_pid, __ATOMIC_RELAXED) != getpid())
        return;
    /* Never wait: a purge fires this with the allocator's locks held, and fork takes
     * lum_prof_lock before those.  A busy lock means a sample is being recorded this moment; the
     * next event or the flusher publishes the batch, and tracers order events by timestamp. */
    if (!lum_trylock(&lum_prof_lock))
        return;
    flush_locked();
    lum_unlock(&lum_prof_lock);
}

static void *flusher_main(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "lumalloc-batch");
    const struct timespec period = {0, LUM_BATCH_FLUSH_MS * 1000000L};
    for (;;) {
        nanosleep(&period, NULL);
        lum_lock(&lum_prof_lock);
        flush_locked();
        /* The tracer went away: nothing more will be written, so nothing to wait for. */
        bool done = !LUM_PROBE_ON(sample_batch);
        if (done)
            flusher_state = 0;
        lum_unlock(&lum_prof_lock);
        if (done)
            return NULL;
    }
}

void lum_batch_start_flusher(void)
{
    /* pthread_create may call malloc (thread descriptor, TLS): none of that may be sampled
     * into a batch that is starting its own flusher. */
    int busy = lum_obs_busy;
    lum_obs_busy = 1;
    int r = lum_obs_thread_start(flusher_main, 64 * 1024, "lumalloc-batch");
    if (r) {
        /* Full buffers, old records, thread exit and process exit still flush. */
        lum_lock(&lum_prof_lock);
        flusher_state = 2;
        lum_unlock(&lum_prof_lock);
    }
    lum_obs_busy = busy;
}

/* At exit() the records still waiting go out, and any written after (other threads, later
 * destructors) go out one by one.  A bounded wait for the lock: exit() called from a signal
 * handler that interrupted this thread inside the sampler must not hang. */
__attribute__((destructor)) static void batch_at_exit(void)
{
    for (int i = 0; i < 200; i++) {
        if (lum_trylock(&lum_prof_lock)) {
            flush_locked();
            batch_final = true;
            lum_unlock(&lum_prof_lock);
            return;
        }
        const struct timespec wait = {0, 50000};
        nanosleep(&wait, NULL);
    }
}

/* The child's buffer holds the parent's records (the parent publishes them) and it has no
 * flusher thread.  Runs single-threaded, with lum_prof_lock held or freshly initialised. */
static void batch_fork_child(void)
{
    batch_used = 0;
    __atomic_store_n(&lum_batch_count, 0, __ATOMIC_RELAXED);
    flusher_state = 0;
    child_unverified = true;
    my_tid = 0;
    self_pid = getpid();
}

__attribute__((constructor)) static void batch_ctor(void)
{
    self_pid = getpid();
    pthread_atfork(NULL, NULL, batch_fork_child);
    __atomic_store_n(&batch_ready, true, __ATOMIC_RELAXED);
}
