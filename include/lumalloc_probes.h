/*
 * lumalloc probe and registry contract, version 1.
 *
 * Shared by lib/ (which fires the probes and publishes the registry), bpf/ (which reads probe
 * arguments) and tools/ (which read the registry with process_vm_readv).  Only fixed-width
 * integer types: this header is included by BPF C compiled with clang -target bpf.
 *
 * Versioning rule: a probe's argument list never changes.  A changed list is a new probe name
 * (e.g. `sample2`), and the old probe keeps firing until tools have moved.  Registry structs carry
 * their own version and size so that readers can refuse layouts they do not know.
 *
 * USDT provider: "lumalloc".  Every probe has a semaphore (sys/sdt.h _SEMAPHORE), so the library
 * skips tracer-only work (unwinding when the in-process profiler is off, argument building) until
 * a tracer attaches.
 *
 * Probes (arguments in order; all are integers or user-space addresses):
 *
 *   sample        (u64 ptr, u64 requested_size, u64 usable_size, u64 weight_bytes,
 *                  u64 frames_addr, u32 depth, u64 stack_id, u64 thread_counters_addr)
 *       A Poisson-sampled allocation.  weight_bytes is the unbiased estimate of the bytes this
 *       sample stands for (sum of weights over a site estimates the bytes allocated there);
 *       objects are estimated by weight_bytes / requested_size.  frames_addr points to `depth`
 *       u64 return addresses (innermost first) unwound in-process, valid during the probe.
 *       stack_id is a 64-bit hash of those frames (0 if no stack was taken).
 *
 *   sample_free   (u64 ptr, u64 requested_size, u64 usable_size, u64 weight_bytes, u64 stack_id)
 *       A sampled allocation is freed.  Pairs with `sample` by ptr.
 *
 *   large_alloc   (u64 ptr, u64 requested_size, u64 usable_size, u64 frames_addr, u32 depth,
 *                  u64 stack_id, u64 thread_counters_addr)
 *       An allocation above the large threshold (LUMALLOC_LARGE_THRESHOLD): its own mapping.
 *
 *   large_free    (u64 ptr, u64 usable_size)
 *
 *   alloc_failure (u64 requested_size, u64 alignment, u32 error, u64 frames_addr, u32 depth,
 *                  u64 stack_id, u64 thread_counters_addr)
 *       An allocation failed (NULL, or an error from posix_memalign, which leaves errno
 *       alone): error is ENOMEM or EINVAL; injected failures included.  requested_size is
 *       SIZE_MAX where calloc's or reallocarray's count * size overflowed.
 *
 *   thread_start  (u32 tid, u64 thread_counters_addr)
 *   thread_exit   (u32 tid, u64 thread_counters_addr)
 *       A thread's heap is created / torn down.  thread_counters_addr points to its
 *       struct lum_thread_counters_v1, which at thread_exit holds the thread's final figures:
 *       read them in the handler.  The record stays mapped, but it is recycled for the next
 *       thread that starts (whose thread_start gives the same address; its tid then changes).
 *
 *   purge         (u64 bytes, u32 reason)      reason: LUM_PURGE_*
 *   pressure      (u64 stall_us, u64 bytes_released)
 *
 *   sample_batch  (u64 buf_addr, u64 bytes, u32 nrecords)          (added in version 1, additive)
 *       The same events as `sample` and `sample_free`, many per firing: buf_addr points to
 *       `bytes` bytes (at most LUM_BATCH_BYTES) holding `nrecords` records, each a
 *       struct lum_batch_rec_v1 (below) followed by its frames, in the order the library saw
 *       the events (one process-wide order, under the lock every sample takes).  Valid during
 *       the probe: copy the `bytes` bytes inside the handler.  It costs a tracer one probe hit per
 *       few hundred events instead of two per sampled block, which is what makes a tracer that
 *       wants every sample affordable on an allocation-heavy process.
 *       Records are only written while this probe's semaphore is set; `sample` and `sample_free`
 *       keep firing, each behind its own semaphore, for tracers attached to them.
 */
/*
 * How lib/ fires them (notes for tracer authors; the argument lists above are the contract):
 *
 *   - Semaphores are `lumalloc_<probe>_semaphore` (u16, section .probes), recorded in each
 *     stapsdt note.  While a probe's semaphore is zero the library does no work for it: no
 *     unwinding for `sample` when the in-process profiler is off (LUMALLOC_PROF=off), none for
 *     `large_alloc` / `alloc_failure` unless a warning or diagnostics report needs the stack.
 *   - frames_addr: return addresses (call site + 1), innermost first, unwound from DWARF CFI
 *     (DWARF CFI, so right without frame pointers), at most LUMALLOC_PROF_DEPTH (32, max 64).
 *     It points into the firing thread's stack: copy it inside the probe handler.  When
 *     lumalloc is a shared object (linked or LD_PRELOADed) its own frames are dropped, so
 *     frame 0 is the caller of malloc/calloc/...; when it is linked statically into the
 *     executable, the public entry point (malloc, ...) may appear as frame 0, and a large
 *     block's stacks (large_alloc, and sample of a large block) may begin with one or two of
 *     the allocator's own frames (lum_malloc_slow, lum_large_alloc): its code is not one range
 *     there to skip (alloctop and allocsnoop skip them by name).
 *   - depth is 0 (and stack_id 0) when no stack was taken: nested inside profiler code,
 *     LUMALLOC_PROF_DEPTH=0, or not even the first frame could be unwound.
 *   - stack_id is the same 64-bit hash the in-process reports print (`stack 0x...`), so tracer
 *     output and lum_prof_write_text() can be joined.
 *   - sample_free fires only for allocations that were recorded as samples (the library keeps a
 *     table of live samples, whatever LUMALLOC_PROF says), with the sample's own size, weight
 *     and stack_id.
 *   - A large allocation that is also sampled fires large_alloc then sample.
 *   - thread_counters_addr points to the thread's struct lum_thread_counters_v1; sampled_bytes
 *     there already includes this sample's weight when `sample` fires.
 *   - usable_size in `sample` and `sample_free` is the usable size of the block an unsampled
 *     allocation of that size gets (its size class): a sampled block sits on a page of its own
 *     class, at least as large, which malloc_usable_size and the thread's counters report.
 *   - sample_batch: the library fires it when the next record would not fit, when the oldest
 *     waiting record is older than LUM_BATCH_MAX_AGE_MS at the next sampled event, from a
 *     background thread (`lumalloc-batch`, running only while the semaphore is set) every
 *     LUM_BATCH_FLUSH_MS so an idle process does not hold records, when a thread exits, at
 *     process exit (exit() or return from main; a process killed by a signal or _exit()
 *     loses at most the last LUM_BATCH_FLUSH_MS of records; at a successful execve() the
 *     records waiting are not published: a tracer takes them through `lumalloc_batch`, below),
 *     and before any other probe fires
 *     (large_alloc, large_free, alloc_failure, thread_start, thread_exit, purge, pressure), so
 *     a tracer attached to sample_batch and those probes sees one process's events in order,
 *     with one exception: that flush only tries the lock, so while another thread holds it
 *     (flushing, or recording a sample) such a probe may fire before records written just
 *     before it, which then come in the next batch (a record's ts_ns puts it in place).
 *     A fork child starts with an empty buffer (the parent's records are the parent's).
 *     The firing thread may be any thread (records carry their own tid).
 *   - Record timestamps are CLOCK_MONOTONIC nanoseconds, the clock of bpf_ktime_get_ns().
 *   - A record's `size` is what to skip to reach the next one: readers skip kinds they do not
 *     know, and later versions may append fields before the frames (frames start at
 *     `size - depth * 8`).
 *
 * bpftrace one-liners (LIB = path of liblumalloc.so, as mapped by the target):
 *   estimated bytes allocated per call site:
 *     bpftrace -p PID -e 'usdt:LIB:lumalloc:sample { @bytes[usym(*(uint64 *)arg4)] = sum(arg3); }'
 *   estimated live bytes (samples minus their frees):
 *     bpftrace -p PID -e 'usdt:LIB:lumalloc:sample { @live = sum(arg3); }
 *                         usdt:LIB:lumalloc:sample_free { @freed = sum(arg3); }'
 *   large allocations by size:
 *     bpftrace -p PID -e 'usdt:LIB:lumalloc:large_alloc { @sizes = hist(arg1); }'
 *   sampled events per batch (records per sample_batch firing):
 *     bpftrace -p PID -e 'usdt:LIB:lumalloc:sample_batch { @records = hist(arg2); }'
 *   failed allocations with the caller:
 *     bpftrace -p PID -e 'usdt:LIB:lumalloc:alloc_failure {
 *                           printf("%lu bytes, errno %d, from %s\n", arg0, arg2,
 *                                  usym(*(uint64 *)arg3)); }'
 */
#ifndef LUMALLOC_PROBES_H
#define LUMALLOC_PROBES_H

/* BPF C gets its fixed-width types from vmlinux.h and has no libc headers. */
#ifndef __bpf__
#include <stdint.h>
#endif

#define LUM_PROBES_VERSION 1
#define LUM_PROVIDER lumalloc

/* Maximum in-process unwind depth (LUMALLOC_PROF_DEPTH is clamped to this). */
#define LUM_MAX_FRAMES 64

#define LUM_PURGE_DECAY 1    /* time-based decay */
#define LUM_PURGE_EXPLICIT 2 /* lum_purge() / malloc_trim() */
#define LUM_PURGE_PRESSURE 3 /* PSI memory-pressure trigger */
#define LUM_PURGE_LIMIT 4    /* freed-but-resident memory outgrew the live heap */
#define LUM_PURGE_FRAGMENT 5 /* free slices too few together for a page that faults memory in */

/* Exact per-thread counters, updated only by the owning thread (plain stores: readers on
 * x86-64 see whole aligned u64s).  Bytes are usable bytes, as jemalloc's thread.allocated. */
struct lum_thread_counters_v1 {
    uint64_t next;          /* address of the next counters block in the registry list, or 0 */
    uint32_t tid;
    uint32_t state;         /* LUM_THREAD_LIVE or LUM_THREAD_EXITED */
    uint64_t alloc_count;   /* allocations served (small and large) */
    uint64_t alloc_bytes;   /* usable bytes of those */
    uint64_t free_count;    /* frees performed by this thread (of any thread's blocks) */
    uint64_t free_bytes;
    uint64_t large_count;   /* allocations that took the large path */
    uint64_t large_bytes;
    uint64_t failures;      /* allocations that returned NULL */
    uint64_t sampled_count; /* samples taken */
    uint64_t sampled_bytes; /* sum of sample weights */
};

/* ---- sample_batch records ---- */
#define LUM_BATCH_BYTES 65536     /* largest `bytes` a sample_batch firing passes */
#define LUM_BATCH_MAX_AGE_MS 20   /* a sampled event flushes records older than this */
#define LUM_BATCH_FLUSH_MS 25     /* the background flush period */

#define LUM_BATCH_SAMPLE 1        /* a `sample`: all fields, depth frames follow */
#define LUM_BATCH_FREE 2          /* a `sample_free`: the sample's own sizes, weight, stack_id */

/* One record: this header, then `depth` u64 return addresses (innermost first, as `sample`'s
 * frames).  8-byte aligned; the next record starts `size` bytes after this one. */
struct lum_batch_rec_v1 {
    uint32_t size;           /* bytes of this record, frames included (a multiple of 8) */
    uint16_t kind;           /* LUM_BATCH_SAMPLE or LUM_BATCH_FREE */
    uint16_t depth;          /* frames that follow (0 for a free, or when no stack was taken) */
    uint32_t tid;            /* thread that allocated / freed */
    uint32_t reserved;       /* 0 */
    uint64_t ts_ns;          /* CLOCK_MONOTONIC */
    uint64_t ptr;
    uint64_t requested_size;
    uint64_t usable_size;
    uint64_t weight_bytes;   /* as `sample` / `sample_free` */
    uint64_t stack_id;
};
#define LUM_BATCH_REC_SIZE 64 /* sizeof(struct lum_batch_rec_v1), frames excluded */

/* Exported as the data symbol `lumalloc_batch` (added in version 1, additive: libraries before
 * it lack the symbol): where sample_batch records wait until they are published.  For tracers
 * that must take them where the process cannot publish them: execve() replaces the image
 * without running exit handlers, so what waits there at a successful exec would be lost (the
 * tools read it at the execve system call's entry, and use it only once the exec succeeded:
 * after a failed one the process publishes the records itself).  The records are those of
 * *pid_addr's process only: a vfork() child shares its parent's buffer. */
#define LUM_BATCH_INFO_MAGIC 0x6c756d6261746368ULL /* "lumbatch" */
struct lum_batch_info_v1 {
    uint64_t magic;      /* LUM_BATCH_INFO_MAGIC */
    uint32_t version;    /* LUM_PROBES_VERSION */
    uint32_t size;       /* sizeof(struct lum_batch_info_v1) */
    /* Read from outside while the process runs: another thread may be writing a record the
     * count already includes (counted before it is filled), so a reader checks each record's
     * size and depth, and takes a record that fails them as malformed. */
    uint64_t buf_addr;   /* the buffer, LUM_BATCH_BYTES: records from its start */
    uint64_t used_addr;  /* u32: bytes of records waiting */
    uint64_t count_addr; /* u32: records waiting (0: none, whatever used says) */
    uint64_t pid_addr;   /* u32: the process whose records wait */
};

#define LUM_THREAD_LIVE 1
#define LUM_THREAD_EXITED 2

/* Process-wide figures.  Updated with relaxed atomics on slow paths. */
struct lum_global_counters_v1 {
    uint64_t mapped_bytes;     /* bytes mapped from the OS (segments + large blocks + metadata) */
    /* what lumalloc touched and has not purged: a size class's page counts the 4 KiB pages
     * it carved (not its whole span), large blocks and metadata count whole once handed out;
     * lumalloc's share of RSS to 4 KiB (an upper bound only with LUMALLOC_THP=on, where a
     * page's slices count whole) */
    uint64_t resident_bytes;
    uint64_t metadata_bytes;   /* internal metadata mappings */
    uint64_t retained_bytes;   /* purged but still mapped (virtual only) */
    uint64_t large_live_bytes; /* usable bytes of live large blocks */
    uint64_t purged_bytes;     /* total bytes ever purged (whole slices and segments given back) */
    uint64_t purge_events;
    uint64_t pressure_events;  /* PSI triggers handled */
    uint64_t exited_alloc_bytes; /* counters folded in from threads whose records were reused */
    uint64_t exited_free_bytes;
};

#define LUM_REGISTRY_MAGIC 0x6c756d616c6c6f63ULL /* "lumalloc" */

/* Exported as the data symbol `lumalloc_registry` (dynsym of liblumalloc.so, or symtab of a
 * static executable).  Tools locate it by symbol and read it with process_vm_readv. */
struct lum_registry_v1 {
    uint64_t magic;            /* LUM_REGISTRY_MAGIC */
    uint32_t version;          /* LUM_PROBES_VERSION */
    uint32_t counters_size;    /* sizeof(struct lum_thread_counters_v1) */
    uint64_t threads_head;     /* address of the first lum_thread_counters_v1, or 0 */
    uint64_t generation;       /* bumped whenever the thread list changes, and before and
                                * after a record is reused (its figures folded into the
                                * exited_* totals, its fields cleared: tid 0 and state 0 for a
                                * moment); a walk that reads it unchanged before and after saw
                                * no such change half done */
    uint64_t sample_interval;  /* mean sampling interval in bytes (0: off) */
    uint64_t large_threshold;  /* bytes above which allocations take the large path */
    struct lum_global_counters_v1 global;
};


/* ---- the in-process heap profile, read from outside ---- */
/* With LUMALLOC_PROF=on (the default) the library keeps one record per distinct sampled stack
 * for the life of the process: what was allocated from it and what of that is still live,
 * estimated from every sample since the process started.  A tool reads it from a running
 * process, without stopping it or having attached before (`allocsnoop --heap`): locate the
 * data symbol `lumalloc_profile` as `lumalloc_registry` is located, read it with
 * process_vm_readv, then walk `stacks` through each record's `older`.
 *
 * Records are never freed or moved, and a new one is complete before `stacks` names it (a
 * release store), so a walk started from one reading of `stacks` sees whole records, and at
 * most `nstacks` as read afterwards.  The figures change in place as samples come and go
 * (aligned u64s and doubles): a reading may catch one sample's update between two fields.
 * A reader accepts any version >= 1: later ones only append fields to struct lum_profile_v1
 * and to the record before its frames (which start `stack_size` bytes in), and a record holds
 * at most `max_depth` frames. */
#define LUM_PROFILE_MAGIC 0x6c756d70726f6631ULL /* "lumprof1", written as LUM_REGISTRY_MAGIC is */

struct lum_profile_stack_v1 {
    uint64_t samples;        /* samples taken from this stack since start, or since the last
                              * lum_prof_reset() (which zeroes the three cumulative figures) */
    uint64_t alloc_bytes;    /* estimated bytes allocated: the sum of their weights */
    double alloc_objects;    /* estimated objects allocated: the sum of weight / requested size */
    uint64_t live_samples;   /* of those samples, the blocks not freed yet */
    int64_t live_bytes;      /* estimated bytes still allocated from this stack */
    double live_objects;     /* estimated objects still allocated */
    uint64_t stack_id;       /* as `sample`'s stack_id */
    uint32_t depth;          /* frames that follow the record (0: the stack could not be taken) */
    uint32_t reserved;
    uint64_t library_private; /* the library's own: not part of the contract */
    uint64_t older;          /* address of the record made before this one, or 0 */
    /* then `depth` u64 return addresses, innermost first, as `sample`'s frames */
};
#define LUM_PROFILE_STACK_SIZE 80 /* sizeof(struct lum_profile_stack_v1), frames excluded */

struct lum_profile_v1 {
    uint64_t magic;          /* LUM_PROFILE_MAGIC */
    uint32_t version;        /* 1 */
    uint32_t stack_size;     /* LUM_PROFILE_STACK_SIZE: where a record's frames start */
    uint64_t stacks;         /* address of the newest struct lum_profile_stack_v1, or 0 */
    uint64_t nstacks;        /* records in the list */
    uint64_t dropped;        /* samples no record holds (the table full, or out of memory) */
    uint32_t enabled;        /* 1 while LUMALLOC_PROF is on: records are being kept */
    uint32_t max_depth;      /* LUMALLOC_PROF_DEPTH */
};

#endif
