/* In-process reports of the sampling profiler: text, folded stacks, per-thread totals, and the
 * C API around them.  Writers work on a snapshot of the stack table (the profiler lock is held
 * only for the copy) and render into an mmap buffer, so the same code serves user calls, the
 * exit dump and the signal dumper thread. */
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include "counter.h"
#include "obs_internal.h"
#include "options.h"
#include "lumalloc_prof.h"

extern uint64_t lum_large_warnings, lum_prof_dumps;

int lum_snap_take(struct lum_snap *sn)
{
    memset(sn, 0, sizeof *sn);
    sn->interval = lum_opt.sample_interval;
    lum_lock(&lum_prof_lock);
    size_t n = 0, frames = 0;
    for (struct lum_stack *s = lum_stacktab_first(); s; s = s->anext) {
        n++;
        frames += s->depth;
    }
    size_t sz = n * sizeof(struct lum_stack *) + n * sizeof(struct lum_stack) +
                frames * sizeof(uint64_t) + 4096;
    sz = (sz + 4095) & ~(size_t)4095;
    /* mmap under the lock: a syscall, not an allocation through malloc. */
    char *mem = n ? lum_obs_pages(sz) : NULL;
    if (n && !mem) {
        lum_unlock(&lum_prof_lock);
        return -ENOMEM;
    }
    sn->mem = mem;
    sn->memsz = n ? sz : 0;
    sn->v = (struct lum_stack **)mem;
    char *p = mem + n * sizeof(struct lum_stack *);
    lum_lock(&lum_sampled_lock); /* the figures' lock (obs_internal.h) */
    for (struct lum_stack *s = lum_stacktab_first(); s && sn->n < n; s = s->anext) {
        size_t one = sizeof *s + s->depth * sizeof(uint64_t);
        memcpy(p, s, one);
        sn->v[sn->n++] = (struct lum_stack *)p;
        p += (one + 15) & ~(size_t)15;
    }
    lum_unlock(&lum_sampled_lock);
    lum_unlock(&lum_prof_lock);
    return 0;
}

void lum_snap_free(struct lum_snap *sn)
{
    lum_obs_free_pages(sn->mem, sn->memsz);
    memset(sn, 0, sizeof *sn);
}

/* Descending by key; shell sort because qsort may allocate and reports should not need to. */
static void sort_sites(struct lum_stack **v, size_t n, bool live)
{
#define KEY(s) (live ? (double)(s)->live_bytes : (double)(s)->alloc_bytes)
    static const size_t gaps[] = {701, 301, 132, 57, 23, 10, 4, 1};
    for (size_t g = 0; g < sizeof gaps / sizeof *gaps; g++) {
        size_t gap = gaps[g];
        for (size_t i = gap; i < n; i++) {
            struct lum_stack *t = v[i];
            size_t j = i;
            while (j >= gap && KEY(v[j - gap]) < KEY(t)) {
                v[j] = v[j - gap];
                j -= gap;
            }
            v[j] = t;
        }
    }
#undef KEY
}

/* ---- symbol cache ---- */
#define SYMC_SLOTS 8192
struct symc_ent {
    uint64_t addr;
    unsigned flags;
    char name[244];
};
struct lum_symcache {
    struct symc_ent e[SYMC_SLOTS];
    unsigned used;
    char scratch[320];
};

struct lum_symcache *lum_symcache_new(void)
{
    return lum_obs_pages(sizeof(struct lum_symcache));
}

void lum_symcache_free(struct lum_symcache *c)
{
    lum_obs_free_pages(c, sizeof *c);
}

const char *lum_symcache_get(struct lum_symcache *c, uintptr_t addr, unsigned flags)
{
    if (!c) {
        /* No cache (mmap failed): a shared buffer rather than TLS, to keep lumalloc's static
         * TLS small; concurrent reports in that state may garble a name, nothing worse. */
        static char buf[320];
        lum_symbolize(addr, buf, sizeof buf, flags);
        return buf;
    }
    uint64_t key = addr ? addr : 1;
    unsigned i = (unsigned)((key * 0x9e3779b97f4a7c15ULL) >> 51) & (SYMC_SLOTS - 1);
    while (c->e[i].addr && !(c->e[i].addr == key && c->e[i].flags == flags))
        i = (i + 1) & (SYMC_SLOTS - 1);
    if (c->e[i].addr)
        return c->e[i].name;
    if (c->used >= SYMC_SLOTS * 3 / 4) {
        lum_symbolize(addr, c->scratch, sizeof c->scratch, flags);
        return c->scratch;
    }
    lum_symbolize(addr, c->e[i].name, sizeof c->e[i].name, flags);
    c->e[i].addr = key;
    c->e[i].flags = flags;
    c->used++;
    return c->e[i].name;
}

/* ---- text ---- */

static double nonneg(double x)
{
    return x > 0 ? x : 0;
}

static void text_sites(struct lum_buf *b, struct lum_snap *sn, struct lum_symcache *sc, bool live)
{
    sort_sites(sn->v, sn->n, live);
    for (size_t i = 0; i < sn->n; i++) {
        const struct lum_stack *s = sn->v[i];
        double bytes = live ? nonneg((double)s->live_bytes) : (double)s->alloc_bytes;
        double objs = live ? nonneg(s->live_objects) : s->alloc_objects;
        uint64_t samples = live ? s->live_samples : s->samples;
        if (bytes <= 0 || !samples)
            continue;
        lum_buf_printf(b, "%14.0f bytes %12.0f objects %8llu samples  stack 0x%016llx\n", bytes,
                       objs, (unsigned long long)samples, (unsigned long long)s->id);
        for (uint32_t f = 0; f < s->depth; f++) {
            const char *name = lum_symcache_get(sc, (uintptr_t)s->frames[f] - 1,
                                                LUM_SYM_OFFSET | LUM_SYM_MODULE | LUM_SYM_DEEP);
            lum_buf_printf(b, "      #%-2u 0x%016llx ", f, (unsigned long long)s->frames[f]);
            lum_buf_puts(b, name);
            lum_buf_puts(b, "\n");
        }
        if (!s->depth)
            lum_buf_puts(b, "      [unknown: no stack]\n");
    }
}

static void thread_line(const struct lum_thread_counters_v1 *live, void *arg)
{
    struct lum_buf *b = arg;
    const struct lum_thread_counters_v1 c = lum_tc_peek(live), *tc = &c; /* counter.h */
    lum_buf_printf(b, "%8u %-6s %12llu %15llu %12llu %15llu %8llu %14llu %6llu %8llu %15llu\n",
                   tc->tid, tc->state == LUM_THREAD_LIVE ? "live" : "exited",
                   (unsigned long long)tc->alloc_count, (unsigned long long)tc->alloc_bytes,
                   (unsigned long long)tc->free_count, (unsigned long long)tc->free_bytes,
                   (unsigned long long)tc->large_count, (unsigned long long)tc->large_bytes,
                   (unsigned long long)tc->failures, (unsigned long long)tc->sampled_count,
                   (unsigned long long)tc->sampled_bytes);
}

static void render_threads(struct lum_buf *b)
{
    lum_buf_printf(b, "%8s %-6s %12s %15s %12s %15s %8s %14s %6s %8s %15s\n", "tid", "state",
                   "allocs", "alloc_bytes", "frees", "free_bytes", "large", "large_bytes",
                   "fails", "samples", "sampled_bytes");
    lum_threads_foreach(thread_line, b);
}

static void render_text(struct lum_buf *b, struct lum_snap *sn, struct lum_symcache *sc)
{
    struct lum_prof_stats st;
    lum_prof_get_stats(&st);
    double lb = 0, lo = 0, ab = 0, ao = 0;
    for (size_t i = 0; i < sn->n; i++) {
        lb += nonneg((double)sn->v[i]->live_bytes);
        lo += nonneg(sn->v[i]->live_objects);
        ab += (double)sn->v[i]->alloc_bytes;
        ao += sn->v[i]->alloc_objects;
    }
    lum_buf_printf(b, "lumalloc heap profile, pid %d\n", (int)getpid());
    lum_buf_printf(b, "sample interval %llu bytes; %llu samples, %llu live, %llu stacks, "
                      "%llu dropped\n",
                   (unsigned long long)sn->interval, (unsigned long long)st.samples,
                   (unsigned long long)st.live_samples, (unsigned long long)st.stacks,
                   (unsigned long long)(st.dropped_stacks + st.dropped_records));
    if (st.unwinds)
        lum_buf_printf(b, "unwinding: %llu stacks, mean %.2f us and %.1f frames each\n",
                       (unsigned long long)st.unwinds, (double)st.unwind_ns / 1e3 / (double)st.unwinds,
                       (double)st.unwind_frames / (double)st.unwinds);
    lum_buf_printf(b, "estimated live heap: %.0f bytes in %.0f objects\n", lb, lo);
    lum_buf_printf(b, "estimated allocated since start: %.0f bytes in %.0f objects\n\n", ab, ao);
    lum_buf_puts(b, "== live heap by stack (estimated) ==\n");
    text_sites(b, sn, sc, true);
    lum_buf_puts(b, "\n== cumulative allocations by stack (estimated) ==\n");
    text_sites(b, sn, sc, false);
    lum_buf_puts(b, "\n== threads (exact counters; sampled_bytes is the estimate) ==\n");
    render_threads(b);
}

/* ---- folded ---- */

static void folded_name(struct lum_buf *b, const char *name)
{
    /* ';' separates frames and ' ' the count: neither may appear inside a frame. */
    for (const char *c = name; *c; c++) {
        char ch = (*c == ';' || *c == ' ' || *c == '\n' || *c == '\t') ? '_' : *c;
        lum_buf_put(b, &ch, 1);
    }
}

static void render_folded(struct lum_buf *b, struct lum_snap *sn, struct lum_symcache *sc, bool live)
{
    sort_sites(sn->v, sn->n, live);
    for (size_t i = 0; i < sn->n; i++) {
        const struct lum_stack *s = sn->v[i];
        double v = live ? (double)s->live_bytes : (double)s->alloc_bytes;
        if (v < 0.5)
            continue;
        if (!s->depth)
            lum_buf_puts(b, "[unknown]");
        for (uint32_t f = s->depth; f-- > 0;) {
            folded_name(b, lum_symcache_get(sc, (uintptr_t)s->frames[f] - 1, LUM_SYM_DEEP));
            if (f)
                lum_buf_puts(b, ";");
        }
        lum_buf_printf(b, " %.0f\n", v);
    }
}

int lum_prof_render(struct lum_buf *b, int f)
{
    int was_busy = lum_obs_busy;
    /* Allocations made while reporting (the ELF symbol reader, stdio) are not profiled. */
    lum_obs_busy = 1;
    struct lum_snap sn;
    int rc = lum_snap_take(&sn);
    if (rc) {
        lum_obs_busy = was_busy;
        return rc;
    }
    struct lum_symcache *sc = lum_symcache_new();
    switch (f) {
    case LUM_PROF_FOLDED: render_folded(b, &sn, sc, true); break;
    case LUM_PROF_FOLDED_ALLOC: render_folded(b, &sn, sc, false); break;
    case LUM_PROF_PPROF: rc = lum_pprof_encode(b, &sn, sc); break;
    default: render_text(b, &sn, sc); break;
    }
    lum_symcache_free(sc);
    lum_snap_free(&sn);
    lum_obs_busy = was_busy;
    if (!rc && b->failed)
        rc = -ENOMEM;
    return rc;
}

static int to_file(FILE *f, int fmt)
{
    struct lum_buf b = {0};
    int rc = lum_prof_render(&b, fmt);
    if (!rc && b.len && fwrite(b.data, 1, b.len, f) != b.len)
        rc = -EIO;
    lum_buf_free(&b);
    return rc;
}

LUM_EXPORT int lum_prof_write_folded(FILE *f, enum lum_prof_kind kind)
{
    return to_file(f, kind == LUM_PROF_CUMULATIVE ? LUM_PROF_FOLDED_ALLOC : LUM_PROF_FOLDED);
}

LUM_EXPORT int lum_prof_write_text(FILE *f)
{
    return to_file(f, LUM_PROF_TEXT);
}

LUM_EXPORT int lum_prof_write_pprof(int fd)
{
    struct lum_buf b = {0};
    int rc = lum_prof_render(&b, LUM_PROF_PPROF);
    if (!rc)
        rc = lum_write_all(fd, b.data, b.len);
    lum_buf_free(&b);
    return rc;
}

LUM_EXPORT int lum_prof_write_threads(FILE *f)
{
    struct lum_buf b = {0};
    render_threads(&b);
    int rc = b.failed ? -ENOMEM : 0;
    if (!rc && b.len && fwrite(b.data, 1, b.len, f) != b.len)
        rc = -EIO;
    lum_buf_free(&b);
    return rc;
}

LUM_EXPORT int lum_prof_foreach_site(int (*fn)(const struct lum_prof_site *, void *), void *arg)
{
    struct lum_snap sn;
    int rc = lum_snap_take(&sn);
    if (rc)
        return rc;
    for (size_t i = 0; i < sn.n && !rc; i++) {
        const struct lum_stack *s = sn.v[i];
        struct lum_prof_site site = {
            .frames = s->frames, .depth = s->depth, .stack_id = s->id, .samples = s->samples,
            .alloc_bytes = (double)s->alloc_bytes, .alloc_objects = s->alloc_objects,
            .live_samples = s->live_samples, .live_bytes = nonneg((double)s->live_bytes),
            .live_objects = nonneg(s->live_objects),
        };
        rc = fn(&site, arg);
    }
    lum_snap_free(&sn);
    return rc;
}

LUM_EXPORT void lum_prof_reset(void)
{
    lum_lock(&lum_prof_lock);
    lum_lock(&lum_sampled_lock);
    lum_stacktab_reset_cumulative();
    lum_unlock(&lum_sampled_lock);
    lum_unlock(&lum_prof_lock);
}

LUM_EXPORT void lum_prof_get_stats(struct lum_prof_stats *out)
{
    memset(out, 0, sizeof *out);
    lum_lock(&lum_prof_lock);
    lum_lock(&lum_sampled_lock);
    out->live_samples = lum_records_live();
    out->unwinds = lum_unwind_hits_locked;
    out->unwind_frames = lum_unwind_hit_frames_locked;
    lum_unlock(&lum_sampled_lock);
    out->stacks = lum_stacktab_count();
    out->dropped_stacks = lumalloc_profile.dropped;
    out->dropped_records = lum_records_dropped;
    lum_unlock(&lum_prof_lock);
    out->samples = __atomic_load_n(&lum_prof_samples, __ATOMIC_RELAXED);
    out->sample_frees = __atomic_load_n(&lum_prof_sample_frees, __ATOMIC_RELAXED);
    out->unwinds += __atomic_load_n(&lum_unwind_count, __ATOMIC_RELAXED);
    out->unwind_ns = __atomic_load_n(&lum_unwind_ns, __ATOMIC_RELAXED);
    out->unwind_frames += __atomic_load_n(&lum_unwind_frames, __ATOMIC_RELAXED);
    out->large_warnings = __atomic_load_n(&lum_large_warnings, __ATOMIC_RELAXED);
    out->dumps = __atomic_load_n(&lum_prof_dumps, __ATOMIC_RELAXED);
}
