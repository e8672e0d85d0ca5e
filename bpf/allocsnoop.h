/* Kernel -> user records of allocsnoop (bpf/allocsnoop.bpf.c -> tools/allocsnoop). */
#ifndef LUMALLOC_BPF_ALLOCSNOOP_H
#define LUMALLOC_BPF_ALLOCSNOOP_H
#ifndef __bpf__
#include <stdint.h>
#include <stddef.h>
#endif
#include "lumalloc_probes.h"

enum snoop_kind {
    SNOOP_SAMPLE,
    SNOOP_SAMPLE_FREE,
    SNOOP_LARGE_ALLOC,
    SNOOP_LARGE_FREE,
    SNOOP_FAILURE,
    SNOOP_THREAD_START,
    SNOOP_THREAD_EXIT,
    SNOOP_PURGE,
    SNOOP_PRESSURE,
    SNOOP_NKINDS
};

/* Indices of the per-CPU `lost` counter array. */
enum snoop_lost {
    SNOOP_LOST_RINGBUF, /* bpf_ringbuf_reserve failed: ring buffer full */
    SNOOP_LOST_STACK,   /* frames could not be read from the target (event kept, depth 0) */
    SNOOP_LOST_BATCH,   /* records of a sample_batch that could not be read from the target */
    SNOOP_LOST_ARGS,    /* events whose probe arguments could not be fetched */
    SNOOP_LOST_MAX
};

/* One event.  Events without a stack are submitted truncated to SNOOP_HDR_SIZE bytes, so the
 * ring buffer is not filled with empty frame arrays. */
struct snoop_event {
    uint64_t ts_ns;     /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
    uint32_t pid, tid;
    uint32_t kind;      /* enum snoop_kind */
    uint32_t depth;     /* valid entries in frames[] */
    uint64_t ptr;       /* address (sample*, large*), 0 otherwise */
    uint64_t size;      /* requested size; purge, pressure: bytes released */
    uint64_t usable;    /* usable size; pressure: bytes released */
    uint64_t weight;    /* sample weight in bytes (sample, sample_free) */
    uint64_t stack_id;  /* library's stack hash, 0 if none */
    uint64_t arg;       /* failure: alignment; thread_*: counters address; purge: reason;
                         * pressure: stall_us */
    uint64_t arg2;      /* failure: errno */
    uint64_t frames[LUM_MAX_FRAMES]; /* return addresses, innermost first */
};

#define SNOOP_HDR_SIZE __builtin_offsetof(struct snoop_event, frames)

/* A sample_batch firing: the library's buffer as it was, nrecords struct lum_batch_rec_v1
 * records in `bytes` bytes (include/lumalloc_probes.h), parsed in user space.  The header
 * shares snoop_event's first fields, so `kind` tells the two apart.  Submitted in one of a few
 * reserved sizes (the verifier wants a constant): data[] may run past `bytes`. */
#define SNOOP_BATCH 0x100
struct snoop_batch {
    uint64_t ts_ns;     /* when the batch was published */
    uint32_t pid, tid;  /* tid: the thread that published it (records carry their own) */
    uint32_t kind;      /* SNOOP_BATCH */
    uint32_t nrecords;
    uint64_t bytes;
    uint64_t data[];
};

#define SNOOP_BATCH_HDR_SIZE __builtin_offsetof(struct snoop_batch, data)

/* An execve() of a traced process: the records waiting in the library's batch buffer at the
 * system call's entry (struct snoop_batch, tid: the calling thread), to be used only if the
 * exec succeeds, which SNOOP_EXEC_DONE says (struct snoop_event header: tid the calling thread's
 * id before the exec, arg 0, or the error of a failed exec as a negative number).  A failed
 * exec leaves the records to the process, which publishes them itself. */
#define SNOOP_BATCH_EXEC 0x101
#define SNOOP_EXEC_DONE 0x102

/* A traced process (one that sent an event) is gone: its last thread exited at ts_ns, and its
 * memory went with it.  struct snoop_event header, tid: that thread; sent once a process. */
#define SNOOP_PROCESS_EXIT 0x103

#endif
