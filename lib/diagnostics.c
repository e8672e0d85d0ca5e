/* The diagnostics report printed when an allocation fails (mode none/critical/all): what failed,
 * where (stack), the thread's and the process's figures, the largest live sampled sites, then
 * the application's own section.  Built in an mmap buffer and written with write(2): the
 * process may be out of memory, so nothing here goes through malloc. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include "counter.h"
#include "obs_internal.h"
#include "options.h"
#include "lumalloc_failure.h"

extern struct lum_registry_v1 lumalloc_registry __attribute__((weak));

static lum_diagnostics_producer producer;
static void *producer_arg;
static int diag_fd = 2;

LUM_EXPORT void lum_set_diagnostics_producer(lum_diagnostics_producer p, void *arg)
{
    producer_arg = arg;
    __atomic_store_n(&producer, p, __ATOMIC_RELEASE);
}

LUM_EXPORT void lum_set_diagnostics_fd(int fd)
{
    diag_fd = fd;
}

LUM_EXPORT void lum_set_diagnostics_mode(enum lum_diagnostics_mode mode)
{
    if (mode <= LUM_DIAGNOSTICS_ALL)
        lum_opt.diag = (enum lum_diag_mode)mode;
}

/* The producer's writer: straight to the fd, so the application's text appears even if the
 * report buffer could not be mapped. */
static void producer_write(const char *text, size_t len)
{
    if (text && len)
        lum_write_all(diag_fd, text, len);
}

#define TOP_SITES 5
#define TOP_FRAMES 6

struct top_site {
    int64_t live_bytes;
    double live_objects;
    uint32_t depth;
    uint64_t frames[TOP_FRAMES];
};

static void collect_top(struct top_site *top, int *ntop)
{
    *ntop = 0;
    /* A failure inside profiler code would find the lock held by its own thread. */
    if (!lum_trylock(&lum_prof_lock))
        return;
    /* the figures' lock (obs_internal.h): a failure in the core may come with it held */
    if (!lum_trylock(&lum_sampled_lock)) {
        lum_unlock(&lum_prof_lock);
        return;
    }
    for (struct lum_stack *s = lum_stacktab_first(); s; s = s->anext) {
        if (s->live_bytes <= 0)
            continue;
        int pos = *ntop;
        while (pos > 0 && top[pos - 1].live_bytes < s->live_bytes)
            pos--;
        if (pos >= TOP_SITES)
            continue;
        int last = *ntop < TOP_SITES ? *ntop : TOP_SITES - 1;
        memmove(&top[pos + 1], &top[pos], (size_t)(last - pos) * sizeof *top);
        top[pos].live_bytes = s->live_bytes;
        top[pos].live_objects = s->live_objects;
        top[pos].depth = s->depth < TOP_FRAMES ? s->depth : TOP_FRAMES;
        memcpy(top[pos].frames, s->frames, top[pos].depth * sizeof(uint64_t));
        if (*ntop < TOP_SITES)
            (*ntop)++;
    }
    lum_unlock(&lum_sampled_lock);
    lum_unlock(&lum_prof_lock);
}

static void put_frames(struct lum_buf *b, const uint64_t *frames, uint32_t depth, const char *ind)
{
    char name[320];
    for (uint32_t i = 0; i < depth; i++) {
        /* Return addresses: symbolise the call instruction (addr - 1). */
        lum_symbolize((uintptr_t)frames[i] - 1, name, sizeof name, LUM_SYM_OFFSET | LUM_SYM_MODULE | LUM_SYM_INSIDE);
        lum_buf_printf(b, "%s#%-2u 0x%016llx %s\n", ind, i, (unsigned long long)frames[i], name);
    }
}

static const char *errname(int err)
{
    switch (err) {
    case ENOMEM: return "ENOMEM";
    case EINVAL: return "EINVAL";
    default: return "error";
    }
}

/* The request an overflowing count * size stood for, while its failure is reported. */
static __thread struct {
    size_t count, size;
} overflow LUM_TLS;

void lum_diag_note_overflow(size_t count, size_t size)
{
    overflow.count = count;
    overflow.size = size;
}

bool lum_diag_overflow(size_t *count, size_t *size)
{
    *count = overflow.count;
    *size = overflow.size;
    return overflow.count != 0;
}

/* What was asked: "allocation of N bytes", with the count and size that overflowed where
 * calloc or reallocarray multiplied them (the SIZE_MAX they pass stands for no real size). */
static void put_request(struct lum_buf *b, size_t size, size_t alignment)
{
    if (overflow.count)
        lum_buf_printf(b, "allocation of %zu x %zu bytes (more than SIZE_MAX)", overflow.count, overflow.size);
    else
        lum_buf_printf(b, "allocation of %zu bytes", size);
    if (alignment)
        lum_buf_printf(b, " (alignment %zu)", alignment);
}

/* on_request: lum_diagnostics_report, where nothing failed and tc, err and injected mean
 * nothing; the rest of the report is a failure's. */
static void report(struct lum_thread_counters_v1 *tc, size_t size, size_t alignment, int err,
                   bool injected, const uint64_t *frames, uint32_t depth, bool on_request)
{
    int saved_errno = errno, was_busy = lum_obs_busy;
    lum_obs_busy = 1; /* symbolising and vsnprintf must not sample or be failed */
    struct lum_buf b = {0};
    long tid = (long)syscall(SYS_gettid);
    if (on_request) {
        /* not "failed": a reader (or a log scanner) takes that line for a real failure */
        lum_buf_printf(&b, "lumalloc: diagnostics report requested in thread %ld (no allocation "
                           "failed; size given: %zu)\n", tid, size);
    } else {
        lum_buf_puts(&b, "lumalloc: ");
        put_request(&b, size, alignment);
        lum_buf_printf(&b, " failed: %s%s in thread %ld%s\n", errname(err),
                       injected ? " (injected)" : "", tid,
                       lum_fail_in_critical() ? ", inside a critical allocation scope" : "");
    }
    if (depth) {
        lum_buf_puts(&b, "  stack:\n");
        put_frames(&b, frames, depth, "    ");
    }
    if (tc)
        lum_buf_printf(&b,
                       "  thread: %llu allocations (%llu bytes), %llu frees (%llu bytes), "
                       "%llu large (%llu bytes), %llu failures, %llu samples\n",
                       (unsigned long long)tc->alloc_count, (unsigned long long)tc->alloc_bytes,
                       (unsigned long long)tc->free_count, (unsigned long long)tc->free_bytes,
                       (unsigned long long)tc->large_count, (unsigned long long)tc->large_bytes,
                       (unsigned long long)tc->failures, (unsigned long long)tc->sampled_count);
    if (&lumalloc_registry) {
        const struct lum_global_counters_v1 *g = &lumalloc_registry.global;
        lum_buf_printf(&b,
                       "  process: mapped %llu, resident %llu, metadata %llu, retained %llu, "
                       "large live %llu bytes\n",
                       (unsigned long long)LUM_PEEK(g->mapped_bytes), (unsigned long long)LUM_PEEK(g->resident_bytes),
                       (unsigned long long)LUM_PEEK(g->metadata_bytes), (unsigned long long)LUM_PEEK(g->retained_bytes),
                       (unsigned long long)LUM_PEEK(g->large_live_bytes));
    }
    struct top_site top[TOP_SITES];
    int ntop;
    collect_top(top, &ntop);
    if (ntop) {
        lum_buf_printf(&b, "  largest live sampled sites (estimated, 1 sample per %llu bytes):\n",
                       (unsigned long long)lum_opt.sample_interval);
        for (int i = 0; i < ntop; i++) {
            lum_buf_printf(&b, "    %lld bytes in ~%.0f objects\n", (long long)top[i].live_bytes,
                           top[i].live_objects);
            put_frames(&b, top[i].frames, top[i].depth, "      ");
        }
    }
    lum_diagnostics_producer p = __atomic_load_n(&producer, __ATOMIC_ACQUIRE);
    if (p)
        lum_buf_puts(&b, "  application diagnostics:\n");
    if (b.len)
        lum_write_all(diag_fd, b.data, b.len);
    if (b.failed) {
        /* No memory for the report (the address space or the map count ran out, which is
         * what it is for): its first line at least, from the stack, and what is missing. */
        char line[256], what[128];
        if (on_request)
            snprintf(what, sizeof what, "diagnostics report requested");
        else if (overflow.count)
            snprintf(what, sizeof what, "allocation of %zu x %zu bytes failed: %s%s", overflow.count,
                     overflow.size, errname(err), injected ? " (injected)" : "");
        else
            snprintf(what, sizeof what, "allocation of %zu bytes failed: %s%s", size, errname(err),
                     injected ? " (injected)" : "");
        int n = snprintf(line, sizeof line, "%slumalloc: %s in thread %ld (report truncated: no memory for it)\n",
                         b.len ? "\n" : "", what, tid);
        if (n > 0)
            lum_write_all(diag_fd, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    }
    lum_buf_free(&b);
    if (p)
        p(producer_write, producer_arg);
    lum_obs_busy = was_busy;
    errno = saved_errno;
}

void lum_diag_report(struct lum_thread_counters_v1 *tc, size_t size, size_t alignment, int err,
                     bool injected, const uint64_t *frames, uint32_t depth)
{
    report(tc, size, alignment, err, injected, frames, depth, false);
}

struct find_self {
    uint32_t tid;
    struct lum_thread_counters_v1 *tc;
};

static void find_self(const struct lum_thread_counters_v1 *tc, void *arg)
{
    struct find_self *f = arg;
    if (!f->tc && LUM_PEEK(tc->tid) == f->tid && LUM_PEEK(tc->state) == LUM_THREAD_LIVE)
        f->tc = (struct lum_thread_counters_v1 *)tc;
}

/* Not inlined (LUM_COLD_TEXT): the return into lum_diagnostics_report is where the unwinder,
 * when it does not know lumalloc's own range, drops our frames up to. */
static LUM_COLD_TEXT void report_on_request(size_t size)
{
    /* the stack and the thread's figures, as a failure's report has them */
    uint64_t frames[LUM_MAX_FRAMES];
    uint32_t depth = 0;
    if (!lum_obs_busy && lum_opt.prof_depth) {
        lum_obs_busy = 1;
        depth = lum_unwind(frames, lum_opt.prof_depth, (uintptr_t)__builtin_return_address(0));
        lum_obs_busy = 0;
    }
    struct find_self f = { (uint32_t)syscall(SYS_gettid), NULL };
    lum_threads_foreach(find_self, &f);
    report(f.tc, size, 0, 0, false, frames, depth, true);
}

LUM_EXPORT void lum_diagnostics_report(size_t size)
{
    report_on_request(size);
}
