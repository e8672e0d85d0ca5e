/* lumalloc statistics: one consistent snapshot of the figures jemalloc's mallctl gives
 * (allocated, active, resident, mapped, retained, metadata), per size class and per thread. */
#ifndef LUMALLOC_STATS_H
#define LUMALLOC_STATS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LUM_STATS_CLASSES 96
#define LUM_STATS_MAX_THREADS 256

struct lum_class_stats {
    uint32_t block_size;
    uint32_t pages;        /* pages of this class in use */
    uint64_t blocks;       /* blocks those pages can hold */
    uint64_t live_blocks;  /* blocks handed out and not freed (a block another thread freed
                            * counts freed at once, though its page's owner has not taken it
                            * back yet); never more than blocks */
};

struct lum_thread_stats {
    uint32_t tid;
    uint32_t live;         /* 1 running, 0 exited */
    uint64_t alloc_count, alloc_bytes, free_count, free_bytes;
    uint64_t large_count, large_bytes, failures, sampled_count, sampled_bytes;
};

struct lum_stats {
    uint64_t epoch;        /* bumps with every snapshot */
    uint64_t allocated;    /* usable bytes of live allocations (sum over threads) */
    uint64_t active;       /* what pages holding live blocks carved (4 KiB pages), plus large
                            * blocks */
    uint64_t resident;     /* touched and not purged: lumalloc's share of RSS to 4 KiB (pages
                            * count what they carved; see lumalloc_probes.h) */
    uint64_t mapped;       /* bytes mapped from the OS */
    uint64_t retained;     /* purged but still mapped (address space only) */
    uint64_t metadata;     /* internal metadata mappings */
    uint64_t large_live;   /* usable bytes of live large blocks */
    uint64_t purged_total, purge_events, pressure_events;
    uint64_t segments, abandoned_pages;
    struct lum_class_stats classes[LUM_STATS_CLASSES];
    uint32_t nthreads;     /* entries filled in threads[]: live threads first, then exited
                            * ones (records are reused, so exited ones are the process's peak
                            * thread count less the live); with more than
                            * LUM_STATS_MAX_THREADS records, exited ones are left out first */
    struct lum_thread_stats threads[LUM_STATS_MAX_THREADS];
};

/* Fills *out with one snapshot, taken in one pass under the allocator's locks (no thread starts
 * or exits during it).  Exact when no thread allocates or frees meanwhile.  Otherwise the
 * figures that threads move as they allocate and free (allocated, active, resident, the
 * classes' live_blocks, the threads' counters) are read from those threads' counters without
 * stopping them, each at a slightly different moment: a class's live_blocks never exceeds its
 * blocks, but active <= resident <= mapped and allocated <= active, which hold when threads are
 * quiet, may be off by what was allocated or freed during the snapshot. */
void lum_stats_snapshot(struct lum_stats *out);
void lum_stats_print(FILE *f, const struct lum_stats *s);      /* human-readable */
void lum_stats_print_json(FILE *f, const struct lum_stats *s); /* one JSON object, one line */
/* glibc's malloc_stats(): the text form on stderr. */
void lum_malloc_stats(void);

#ifdef __cplusplus
}
#endif
#endif
