// SPDX-License-Identifier: GPL-2.0
/* allocsnoop: one ring-buffer event per lumalloc probe firing, with the in-process unwound
 * stack copied from the target (the library passes frames_addr + depth).  Filtering by kind and
 * size happens here so that filtered events cost no ring-buffer space. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
/* Each (pid, probe, call site) attachment takes a spec slot: room for many targets. */
#define BPF_USDT_MAX_SPEC_CNT 4096
#include <bpf/usdt.bpf.h>
#include "allocsnoop.h"

char LICENSE[] SEC("license") = "GPL";

const volatile uint32_t kind_mask = 0xffffffff; /* bit per enum snoop_kind */
const volatile uint64_t min_size = 0;
const volatile bool want_stacks = true;
const volatile uint64_t wakeup_bytes = 4 << 20; /* wake the reader past this much unread data */

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 16 << 20);
} events SEC(".maps");

#define LUM_BPF_LOST_MAX SNOOP_LOST_MAX
#define LUM_USDT_FAST
#include "common.bpf.h"

static __always_inline bool wanted(u32 kind, u64 size)
{
    if (!(kind_mask & (1u << kind)))
        return false;
    /* -m filters allocations by size; thread, purge and pressure events carry none */
    return kind > SNOOP_FAILURE || size >= min_size;
}

/* Processes seen so far: the first event of a process wakes the reader at once, so that it
 * snapshots the process's mappings for symbolisation even if the process is short-lived.
 * Sized for -b on a host where thousands of processes map the library at once: a busy process
 * is looked up only when another's event came between two of its own (seen_last), so its entry
 * ages in the LRU whatever its rate, and once evicted its exit event (on_process_exit) is lost
 * and its blocks are aged at its last event instead.  An LRU still, not a plain hash: without
 * on_process_exit (a kernel lacking tp_btf) nothing deletes entries.  ~64 bytes an entry. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 16384);
    __type(key, u32);
    __type(value, u8);
} seen SEC(".maps");
/* The last pid found in `seen`: with one busy target the hash is not touched per event (each
 * cache line a program touches is likely a miss, the target having just evicted it). */
volatile uint32_t seen_last;

/* Sample events wake the reader only when the buffer is filling up: at high sample rates a
 * wakeup per event costs more than the event (the reader also polls every 100 ms).  The rare
 * kinds (large, failure, thread, ...) wake it at once. */
static __always_inline u64 wakeup_flags(u32 kind, u32 pid)
{
    if (pid != seen_last) {
        if (!bpf_map_lookup_elem(&seen, &pid)) {
            u8 one = 1;
            bpf_map_update_elem(&seen, &pid, &one, BPF_ANY);
            seen_last = pid;
            return BPF_RB_FORCE_WAKEUP;
        }
        seen_last = pid;
    }
    if (kind != SNOOP_SAMPLE && kind != SNOOP_SAMPLE_FREE)
        return 0;
    return bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

/* Reserve a record with room for n frames and read the stack straight into it (no per-CPU
 * scratch and copy): records come in four sizes, so a typical shallow stack takes 64 bytes of
 * frames, not LUM_MAX_FRAMES * 8.  The consumer reads `depth` frames, whatever the record size. */
/* When and by whom, the same for every record type; returns pid_tgid for the wakeup policy. */
static __always_inline u64 stamp_header(uint64_t *ts_ns, uint32_t *pid, uint32_t *tid)
{
    u64 pt = bpf_get_current_pid_tgid();
    *ts_ns = bpf_ktime_get_ns();
    *pid = pt >> 32;
    *tid = (u32)pt;
    return pt;
}

#define RESERVE_STACK(n)                                                                           \
    do {                                                                                           \
        e = bpf_ringbuf_reserve(&events, SNOOP_HDR_SIZE + (n) * sizeof(u64), 0);                  \
        if (!e)                                                                                    \
            break;                                                                                 \
        u64 rd = sz;                                                                               \
        asm volatile("" : "+r"(rd));                                                               \
        if (rd > (n) * sizeof(u64))                                                                \
            rd = (n) * sizeof(u64);                                                                \
        if (bpf_probe_read_user(e->frames, rd, (void *)frames_addr) == 0) {                        \
            got = rd / sizeof(u64);                                                                \
        } else {                                                                                   \
            count_lost(SNOOP_LOST_STACK);                                                          \
        }                                                                                          \
    } while (0)

static __always_inline int emit(u32 kind, u64 ptr, u64 size, u64 usable, u64 weight, u64 frames_addr, u32 depth,
                                u64 stack_id, u64 arg, u64 arg2)
{
    maybe_hold();
    if (!wanted(kind, size))
        return 0;
    struct snoop_event *e;
    u32 got = 0;
    u64 sz = want_stacks && frames_addr ? frames_size(depth) : 0;
    if (!sz)
        e = bpf_ringbuf_reserve(&events, SNOOP_HDR_SIZE, 0);
    else if (sz <= 8 * sizeof(u64))
        RESERVE_STACK(8);
    else if (sz <= 16 * sizeof(u64))
        RESERVE_STACK(16);
    else if (sz <= 32 * sizeof(u64))
        RESERVE_STACK(32);
    else
        RESERVE_STACK(LUM_MAX_FRAMES);
    if (!e) {
        count_lost(SNOOP_LOST_RINGBUF);
        return 0;
    }
    u64 pt = stamp_header(&e->ts_ns, &e->pid, &e->tid);
    e->kind = kind;
    e->depth = got;
    e->ptr = ptr;
    e->size = size;
    e->usable = usable;
    e->weight = weight;
    e->stack_id = stack_id;
    e->arg = arg;
    e->arg2 = arg2;
    bpf_ringbuf_submit(e, wakeup_flags(kind, pt >> 32));
    return 0;
}

/* Arguments through lum_usdt_args() (common.bpf.h): one spec lookup, one register copy and one
 * read of the stack-passed arguments per event instead of libbpf's two or three helper calls per
 * argument.  An event whose arguments cannot be fetched is counted lost, not sent with zeros
 * (a batch's, with zero records, was dropped uncounted). */
#define ARGS(n)                                                                                    \
    u64 a[n];                                                                                      \
    if (lum_usdt_args(ctx, a, n)) {                                                                \
        maybe_hold();                                                                              \
        count_lost(SNOOP_LOST_ARGS);                                                               \
        return 0;                                                                                  \
    }

SEC("usdt")
int on_sample(struct pt_regs *ctx)
{
    /* ptr, req, usable, weight, frames, depth, stack_id, tc */
    ARGS(8);
    return emit(SNOOP_SAMPLE, a[0], a[1], a[2], a[3], a[4], (u32)a[5], a[6], a[7], 0);
}

SEC("usdt")
int on_sample_free(struct pt_regs *ctx)
{
    /* ptr, req, usable, weight, stack_id */
    ARGS(5);
    return emit(SNOOP_SAMPLE_FREE, a[0], a[1], a[2], a[3], 0, 0, a[4], 0, 0);
}

SEC("usdt")
int on_large_alloc(struct pt_regs *ctx)
{
    /* ptr, req, usable, frames, depth, stack_id, tc */
    ARGS(7);
    return emit(SNOOP_LARGE_ALLOC, a[0], a[1], a[2], 0, a[3], (u32)a[4], a[5], a[6], 0);
}

SEC("usdt")
int on_large_free(struct pt_regs *ctx)
{
    /* ptr, usable */
    ARGS(2);
    return emit(SNOOP_LARGE_FREE, a[0], a[1], a[1], 0, 0, 0, 0, 0, 0);
}

SEC("usdt")
int on_alloc_failure(struct pt_regs *ctx)
{
    /* req, align, err, frames, depth, stack_id, tc */
    ARGS(7);
    return emit(SNOOP_FAILURE, 0, a[0], 0, 0, a[3], (u32)a[4], a[5], a[1], (u32)a[2]);
}

SEC("usdt")
int on_thread_start(struct pt_regs *ctx)
{
    /* tid, tc */
    ARGS(2);
    return emit(SNOOP_THREAD_START, 0, 0, 0, 0, 0, 0, 0, a[1], (u32)a[0]);
}

SEC("usdt")
int on_thread_exit(struct pt_regs *ctx)
{
    /* tid, tc */
    ARGS(2);
    return emit(SNOOP_THREAD_EXIT, 0, 0, 0, 0, 0, 0, 0, a[1], (u32)a[0]);
}

SEC("usdt")
int on_purge(struct pt_regs *ctx)
{
    /* bytes, reason */
    ARGS(2);
    return emit(SNOOP_PURGE, 0, a[0], 0, 0, 0, 0, 0, (u32)a[1], 0);
}

SEC("usdt")
int on_pressure(struct pt_regs *ctx)
{
    /* stall_us, released */
    ARGS(2);
    return emit(SNOOP_PRESSURE, 0, a[1], a[1], 0, 0, 0, 0, a[0], 0);
}

/* The library's batch, copied as it is with one read: per event this costs the target a
 * fraction of one probe hit and no BPF work at all (records are parsed, filtered and counted in
 * user space).  Reservations come in powers of two, the smallest that holds `bytes`. */
#define RESERVE_BATCH(n)                                                                           \
    do {                                                                                           \
        b = bpf_ringbuf_reserve(&events, SNOOP_BATCH_HDR_SIZE + (n), 0);                          \
        if (!b)                                                                                    \
            break;                                                                                 \
        u64 rd = bytes;                                                                            \
        asm volatile("" : "+r"(rd));                                                               \
        if (rd > (n))                                                                              \
            rd = (n);                                                                              \
        if (bpf_probe_read_user(b->data, rd, (void *)buf)) {                                       \
            bpf_ringbuf_discard(b, BPF_RB_NO_WAKEUP);                                              \
            b = NULL;                                                                              \
            unreadable = true;                                                                     \
        }                                                                                          \
    } while (0)

/* kind: SNOOP_BATCH or SNOOP_BATCH_EXEC.  0, or -1 with the records counted lost. */
static __always_inline int send_batch(u32 kind, u64 buf, u64 bytes, u32 n)
{
    if (bytes > LUM_BATCH_BYTES)
        bytes = LUM_BATCH_BYTES;
    struct snoop_batch *b = NULL;
    bool unreadable = false;
    if (bytes <= 512)
        RESERVE_BATCH(512);
    else if (bytes <= 2048)
        RESERVE_BATCH(2048);
    else if (bytes <= 8192)
        RESERVE_BATCH(8192);
    else if (bytes <= 16384)
        RESERVE_BATCH(16384);
    else if (bytes <= 32768)
        RESERVE_BATCH(32768);
    else
        RESERVE_BATCH(LUM_BATCH_BYTES);
    if (!b) {
        count_lost_n(unreadable ? SNOOP_LOST_BATCH : SNOOP_LOST_RINGBUF, n);
        return -1;
    }
    u64 pt = stamp_header(&b->ts_ns, &b->pid, &b->tid);
    b->kind = kind;
    b->nrecords = n;
    b->bytes = bytes;
    bpf_ringbuf_submit(b, kind == SNOOP_BATCH ? wakeup_flags(SNOOP_SAMPLE, pt >> 32) : 0);
    return 0;
}

SEC("usdt")
int on_sample_batch(struct pt_regs *ctx)
{
    /* buf, bytes, nrecords */
    ARGS(3);
    maybe_hold();
    u64 buf = a[0], bytes = a[1];
    u32 n = (u32)a[2];
    if (!n || !bytes)
        return 0;
    send_batch(SNOOP_BATCH, buf, bytes, n);
    return 0;
}

/* ---- execve: the records the library had not published yet ----
 * A successful exec replaces the image without running exit handlers, so the batch waiting in
 * the buffer would never be published.  It is read at the system call's entry, while the old
 * image is still there (sched_process_exec comes after its memory is gone), and user space
 * uses it only once SNOOP_EXEC_DONE says the exec succeeded.  The syscalls tracepoints (they
 * need tracefs mounted to attach) rather than fentry on __x64_sys_execve, which kernels with
 * function tracing locked down refuse; not raw_syscalls, which would run for every system
 * call of every process. */

/* pid -> address of its lumalloc_batch (struct lum_batch_info_v1), filled in by user space. */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, u32);
    __type(value, u64);
} exec_watch SEC(".maps");

/* Threads inside an execve whose records were sent: their verdict is awaited.  LRU: a thread
 * killed by another thread's exec never gets one. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 1024);
    __type(key, u32);
    __type(value, u8);
} exec_pending SEC(".maps");

static __always_inline int exec_enter(void)
{
    u64 pt = bpf_get_current_pid_tgid();
    u32 pid = pt >> 32, tid = (u32)pt;
    u64 *ia = bpf_map_lookup_elem(&exec_watch, &pid);
    if (!ia)
        return 0;
    struct lum_batch_info_v1 info;
    u32 count = 0, used = 0, owner = 0;
    if (bpf_probe_read_user(&info, sizeof(info), (void *)*ia) || info.magic != LUM_BATCH_INFO_MAGIC ||
        bpf_probe_read_user(&count, sizeof(count), (void *)info.count_addr) || !count)
        return 0;
    /* a vfork() child shares its parent's buffer: those are the parent's records */
    if (bpf_probe_read_user(&owner, sizeof(owner), (void *)info.pid_addr) || owner != pid ||
        bpf_probe_read_user(&used, sizeof(used), (void *)info.used_addr) || !used)
        return 0;
    if (send_batch(SNOOP_BATCH_EXEC, info.buf_addr, used, count))
        return 0;
    u8 one = 1;
    bpf_map_update_elem(&exec_pending, &tid, &one, BPF_ANY);
    return 0;
}

/* always: said even when no records were taken at the call (a watched process's exec: user
 * space drops the old image's blocks and watches the new image) */
static __always_inline void exec_done(u32 pid, u32 tid, long ret, bool always)
{
    if (bpf_map_delete_elem(&exec_pending, &tid) && !always)
        return;
    struct snoop_event *e = bpf_ringbuf_reserve(&events, SNOOP_HDR_SIZE, 0);
    if (!e) {
        /* user space keeps the records: without a verdict it counts them lost */
        count_lost(SNOOP_LOST_RINGBUF);
        return;
    }
    __builtin_memset(e, 0, SNOOP_HDR_SIZE);
    e->ts_ns = bpf_ktime_get_ns();
    e->pid = pid;
    e->tid = tid;
    e->kind = SNOOP_EXEC_DONE;
    e->arg = (u64)ret;
    bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
}

SEC("tracepoint/syscalls/sys_enter_execve")
int on_execve(struct trace_event_raw_sys_enter *ctx)
{
    return exec_enter();
}

SEC("tracepoint/syscalls/sys_enter_execveat")
int on_execveat(struct trace_event_raw_sys_enter *ctx)
{
    return exec_enter();
}

/* A failed exec: the process goes on, and publishes the records itself. */
static __always_inline int exec_ret(long ret)
{
    u64 pt = bpf_get_current_pid_tgid();
    if (ret < 0)
        exec_done(pt >> 32, (u32)pt, ret, false);
    return 0;
}

SEC("tracepoint/syscalls/sys_exit_execve")
int on_execve_ret(struct trace_event_raw_sys_exit *ctx)
{
    return exec_ret(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_execveat")
int on_execveat_ret(struct trace_event_raw_sys_exit *ctx)
{
    return exec_ret(ctx->ret);
}

/* A successful exec (fires in the new image only): old_pid is the caller's thread id before a
 * non-leader thread's exec made it the leader.  The watched address was the old image's. */
SEC("tp_btf/sched_process_exec")
int BPF_PROG(on_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!bpf_map_lookup_elem(&exec_watch, &pid))
        return 0;
    bpf_map_delete_elem(&exec_watch, &pid);
    exec_done(pid, (u32)old_pid, 0, true);
    return 0;
}

/* ---- a traced process's exit: when its blocks stopped ageing ----
 * Fires for every thread of every process that exits, so it does little: one load of the
 * thread group's live count, and for a process's last thread one hash delete.
 *
 * The process is gone when its last thread is, whichever that is: the leader may have left
 * first with pthread_exit (a zombie while the others run), so neither pid == tgid nor the
 * leader's exit says it.  signal->live counts the group's threads that have not yet reached
 * this point of do_exit (decremented before the tracepoint in every kernel; not the 6.x group_dead
 * argument, which older kernels lack): 0 means this is the last thread, or one exiting alongside
 * it, which the delete below lets through only once.  An exec is no exit: de_thread's killed
 * threads leave the exec'ing one counted.
 *
 * Only processes in `seen` (they sent an event) are said: taking them out also lets a process
 * that reuses the pid be seen anew, its first event waking the reader as any first event does. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(on_process_exit, struct task_struct *p)
{
    if (p->signal->live.counter)
        return 0;
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    /* before the delete, whatever it finds: a pid that comes back must look itself up again */
    if (seen_last == pid)
        seen_last = 0;
    if (bpf_map_delete_elem(&seen, &pid))
        return 0;
    struct snoop_event *e = bpf_ringbuf_reserve(&events, SNOOP_HDR_SIZE, 0);
    if (!e) {
        /* user space ages its blocks at its last event instead */
        count_lost(SNOOP_LOST_RINGBUF);
        return 0;
    }
    __builtin_memset(e, 0, SNOOP_HDR_SIZE);
    stamp_header(&e->ts_ns, &e->pid, &e->tid);
    e->kind = SNOOP_PROCESS_EXIT;
    bpf_ringbuf_submit(e, 0);
    return 0;
}
