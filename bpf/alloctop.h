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
 * struct top_event. */
#define TOP_FINAL_MAX_THREADS 256
struct top_final_thread {
    uint64_t addr;
    struct lum_thread_counters_v1 c;
};
struct top_final {
    uint64_t ts_ns;
    uint32_t pid, nthreads;
    uint32_t kind, truncated; /* kind = TOP_FINAL; truncated: more threads than fit, or one
                               * could not be read (those after it are missing) */
    struct lum_registry_v1 reg;
    struct top_final_thread threads[TOP_FINAL_MAX_THREADS];
};

enum top_lost {
    TOP_LOST_RINGBUF,      /* thread event dropped: ring buffer full */
    TOP_LOST_SITES_FULL,   /* sample not attributed to a site: sites map full */
    TOP_LOST_STACKS_FULL,  /* stack frames not stored: stacks map full, or unreadable */
    TOP_LOST_FINAL,        /* the exit-time registry reading could not be read */
    TOP_LOST_MAX
};

#define TOP_MAX_SITES 16384
#define TOP_MAX_STACKS 8192

#endif
