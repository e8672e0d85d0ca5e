/* Kernel -> user maps and records of alloctop (bpf/alloctop.bpf.c -> tools/alloctop).
 * alloctop aggregates in the kernel: per-site sample weights live in a hash map that user space
 * reads once per interval; only thread lifecycle goes through the ring buffer.  Every per-thread
 * figure (bytes, counts, large allocations, failures) comes from the registry, not from here. */
#ifndef LUMALLOC_BPF_ALLOCTOP_H
#define LUMALLOC_BPF_ALLOCTOP_H
#ifndef __bpf__
#include <stdint.h>
#endif
#include "lumalloc_probes.h"

struct top_site_key {
    uint32_t pid, pad;
    uint64_t stack_id;              /* library's stack hash (0: no stack taken) */
};

struct top_site_val {
    uint64_t count, weight;
};

struct top_stack {
    uint32_t depth, pad;
    uint64_t frames[LUM_MAX_FRAMES];
};

enum top_event_kind { TOP_THREAD_START, TOP_THREAD_EXIT, TOP_FINAL };

struct top_event {
    uint64_t ts_ns;
    uint32_t pid, tid;
    uint32_t kind, pad;
    uint64_t counters_addr;
    char comm[16]; /* the thread's name when the probe fired (it may be gone when we look) */
};

/* The registry as it was when the process began to exit, read by the BPF side at do_exit()
 * (the process's memory is gone by the time user space notices the exit).  Same prefix as
 * struct top_event.  One record per TOP_FINAL_CHUNK threads, in list order (chunk 0, 1, ...):
 * a ring-buffer record has a fixed size, and one of TOP_FINAL_MAX_THREADS threads (~420 KiB)
 * would be reserved whole for a process of a few threads.  Services run 300-2000 threads; the
 * registry list has no bound of its own (one record per thread that ever ran at once). */
#define TOP_FINAL_CHUNK 256
#define TOP_FINAL_MAX_CHUNKS 16
#define TOP_FINAL_MAX_THREADS (TOP_FINAL_CHUNK * TOP_FINAL_MAX_CHUNKS)
struct top_final_thread {
    uint64_t addr;
    struct lum_thread_counters_v1 c;
};
struct top_final {
    uint64_t ts_ns;
    uint32_t pid, nthreads;   /* nthreads: in this record */
    uint32_t kind, truncated; /* kind = TOP_FINAL; truncated (last record): more threads than
                               * TOP_FINAL_MAX_THREADS, or one could not be read (those after it
                               * are missing) */
    uint32_t chunk, last;     /* chunk: this record's index; last: no record follows */
    uint32_t beyond, pad;     /* last record: threads in the list past the reading (counted up
                               * to TOP_FINAL_COUNT_MAX, also in lost[TOP_LOST_FINAL_THREADS]) */
    struct lum_registry_v1 reg;
    struct top_final_thread threads[TOP_FINAL_CHUNK];
};
/* Past TOP_FINAL_MAX_THREADS only `next` is read, to count the threads missed. */
#define TOP_FINAL_COUNT_MAX (1u << 16)

enum top_lost {
    TOP_LOST_RINGBUF,      /* thread event dropped: ring buffer full */
    TOP_LOST_SITES_FULL,   /* sample not attributed to a site: sites map full */
    TOP_LOST_STACKS_FULL,  /* stack frames not stored: stacks map full, or unreadable */
    TOP_LOST_FINAL,        /* the exit-time registry reading could not be read */
    TOP_LOST_FINAL_THREADS, /* threads past the exit-time reading's bound, or in a record of it
                             * the ring buffer had no room for */
    TOP_LOST_MAX
};

#define TOP_MAX_SITES 16384
#define TOP_MAX_STACKS 8192

#endif
