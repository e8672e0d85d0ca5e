/* lumalloc sampling heap profiler: reports from inside the process.
 *
 * Allocations are sampled by bytes (Poisson, mean LUMALLOC_SAMPLE_INTERVAL, 512 KiB by default);
 * each sample carries an unbiased weight w = s / (1 - exp(-s/T)), so summed weights estimate the
 * bytes (and w/s the objects) allocated at each stack.  Stacks are unwound in-process at sample
 * time (LUMALLOC_PROF_DEPTH frames, DWARF-based: right without frame pointers).
 *
 * Reports: live heap by stack (sampled blocks not yet freed), cumulative allocations by stack,
 * per-thread totals; as text, folded stacks (flamegraph.pl: `outer;...;inner bytes`) or pprof
 * (uncompressed profile.proto, readable by `go tool pprof` / `pprof`).
 *
 * Dumps happen on request (these functions), at exit (LUMALLOC_PROF_DUMP=path) and on a signal
 * (LUMALLOC_PROF_SIGNAL=USR2: written by a small dumper thread, never in the handler).
 * Writers must not be called from inside a malloc hook or signal handler. */
#ifndef LUMALLOC_PROF_H
#define LUMALLOC_PROF_H

#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

enum lum_prof_format {
    LUM_PROF_AUTO = 0,         /* by the path's extension: .folded, .pb/.pprof/.proto, else text */
    LUM_PROF_TEXT = 1,
    LUM_PROF_FOLDED = 2,       /* live heap (inuse bytes) */
    LUM_PROF_FOLDED_ALLOC = 3, /* cumulative allocated bytes */
    LUM_PROF_PPROF = 4,
};

enum lum_prof_kind { LUM_PROF_LIVE = 0, LUM_PROF_CUMULATIVE = 1 };

/* Writes a profile to path (created/truncated).  0 or -errno. */
int lum_prof_dump(const char *path, enum lum_prof_format format);

/* Folded stacks, outermost frame first, one line per stack: `main;f;g 123456` where the value is
 * estimated bytes (live or cumulative).  0 or -errno. */
int lum_prof_write_folded(FILE *f, enum lum_prof_kind kind);

/* pprof profile.proto (not gzipped): sample types alloc_objects/count, alloc_space/bytes,
 * inuse_objects/count, inuse_space/bytes; locations by address (call instruction: return
 * address - 1), mappings from /proc/self/maps, function names where they can be found. */
int lum_prof_write_pprof(int fd);

/* Human-readable: header, live heap by stack, cumulative by stack, per-thread totals. */
int lum_prof_write_text(FILE *f);

/* Per-thread totals only (exact counters, plus the sampled estimate). */
int lum_prof_write_threads(FILE *f);

/* One site (distinct stack) as seen by lum_prof_foreach_site. */
struct lum_prof_site {
    const uint64_t *frames;  /* return addresses, innermost first */
    uint32_t depth;
    uint64_t stack_id;       /* as in the probes' stack_id */
    uint64_t samples;        /* cumulative samples */
    double alloc_bytes;      /* estimated bytes allocated (cumulative) */
    double alloc_objects;
    uint64_t live_samples;
    double live_bytes;       /* estimated bytes still allocated */
    double live_objects;
};
/* Calls fn for every site (on a snapshot, without locks held: fn may allocate).  A non-zero
 * return from fn stops the walk and is returned.  -ENOMEM if the snapshot failed. */
int lum_prof_foreach_site(int (*fn)(const struct lum_prof_site *site, void *arg), void *arg);

/* Forgets cumulative figures (live ones are kept: the blocks still exist). */
void lum_prof_reset(void);

struct lum_prof_stats {
    uint64_t samples;        /* samples taken */
    uint64_t sample_frees;   /* sampled blocks freed */
    uint64_t live_samples;   /* sampled blocks alive */
    uint64_t stacks;         /* distinct stacks */
    uint64_t dropped_stacks; /* samples not attributed to a stack (table full / no memory) */
    uint64_t dropped_records;
    uint64_t unwinds;        /* in-process unwinds (samples, large warnings, failures) */
    uint64_t unwind_ns;      /* total time unwinding (estimated: one unwind in 16 is timed) */
    uint64_t unwind_frames;  /* total frames unwound */
    uint64_t large_warnings; /* large-allocation warnings printed */
    uint64_t dumps;          /* profiles written by the exit/signal dumper */
};
void lum_prof_get_stats(struct lum_prof_stats *out);

/* Current count of the USDT semaphore of a `lumalloc` probe ("sample", "large_alloc", ...):
 * the number of tracers attached to it.  -1 for an unknown probe. */
int lum_probe_semaphore(const char *probe);

#ifdef __cplusplus
}
#endif
#endif
