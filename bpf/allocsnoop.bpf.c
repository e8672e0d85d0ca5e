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
#include "common.bpf.h"

static __always_inline bool wanted(u32 kind, u64 size)
{
    if (!(kind_mask & (1u << kind)))
        return false;
    return size >= min_size;
}

static __always_inline void fill(struct snoop_event *e, u32 kind, u64 ptr, u64 size, u64 usable, u64 weight,
                                 u64 stack_id, u64 arg, u64 arg2)
{
    u64 pt = bpf_get_current_pid_tgid();
    e->ts_ns = bpf_ktime_get_ns();
    e->pid = pt >> 32;
    e->tid = (u32)pt;
    e->kind = kind;
    e->depth = 0;
    e->ptr = ptr;
    e->size = size;
    e->usable = usable;
    e->weight = weight;
    e->stack_id = stack_id;
    e->arg = arg;
    e->arg2 = arg2;
}

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, struct snoop_event);
} scratch SEC(".maps");

/* Processes seen so far: the first event of a process wakes the reader at once, so that it
 * snapshots the process's mappings for symbolisation even if the process is short-lived. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 1024);
    __type(key, u32);
    __type(value, u8);
} seen SEC(".maps");

/* Sample events wake the reader only when the buffer is filling up: at high sample rates a
 * wakeup per event costs more than the event (the reader also polls every 100 ms).  The rare
 * kinds (large, failure, thread, ...) wake it at once. */
static __always_inline u64 wakeup_flags(u32 kind)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!bpf_map_lookup_elem(&seen, &pid)) {
        u8 one = 1;
        bpf_map_update_elem(&seen, &pid, &one, BPF_ANY);
        return BPF_RB_FORCE_WAKEUP;
    }
    if (kind != SNOOP_SAMPLE && kind != SNOOP_SAMPLE_FREE)
        return 0;
    return bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

static __always_inline int emit(u32 kind, u64 ptr, u64 size, u64 usable, u64 weight, u64 frames_addr, u32 depth,
                                u64 stack_id, u64 arg, u64 arg2)
{
    maybe_hold();
    if (!wanted(kind, size))
        return 0;
    if (want_stacks && frames_addr && depth) {
        /* Build in per-CPU scratch and output only the frames actually present: typical stacks
         * are a few frames, the record would otherwise always carry LUM_MAX_FRAMES. */
        u32 zero = 0;
        struct snoop_event *e = bpf_map_lookup_elem(&scratch, &zero);
        if (!e)
            return 0;
        fill(e, kind, ptr, size, usable, weight, stack_id, arg, arg2);
        u64 sz = frames_size(depth);
        if (bpf_probe_read_user(e->frames, sz, (void *)frames_addr) == 0) {
            e->depth = sz / sizeof(u64);
        } else {
            count_lost(SNOOP_LOST_STACK);
            sz = 0;
        }
        if (bpf_ringbuf_output(&events, e, SNOOP_HDR_SIZE + sz, wakeup_flags(kind)))
            count_lost(SNOOP_LOST_RINGBUF);
        return 0;
    }
    struct snoop_event *e = bpf_ringbuf_reserve(&events, SNOOP_HDR_SIZE, 0);
    if (!e) {
        count_lost(SNOOP_LOST_RINGBUF);
        return 0;
    }
    fill(e, kind, ptr, size, usable, weight, stack_id, arg, arg2);
    bpf_ringbuf_submit(e, wakeup_flags(kind));
    return 0;
}

SEC("usdt")
int BPF_USDT(on_sample, u64 ptr, u64 req, u64 usable, u64 weight, u64 frames, u32 depth, u64 stack_id, u64 tc)
{
    return emit(SNOOP_SAMPLE, ptr, req, usable, weight, frames, depth, stack_id, tc, 0);
}

SEC("usdt")
int BPF_USDT(on_sample_free, u64 ptr, u64 req, u64 usable, u64 weight, u64 stack_id)
{
    return emit(SNOOP_SAMPLE_FREE, ptr, req, usable, weight, 0, 0, stack_id, 0, 0);
}

SEC("usdt")
int BPF_USDT(on_large_alloc, u64 ptr, u64 req, u64 usable, u64 frames, u32 depth, u64 stack_id, u64 tc)
{
    return emit(SNOOP_LARGE_ALLOC, ptr, req, usable, 0, frames, depth, stack_id, tc, 0);
}

SEC("usdt")
int BPF_USDT(on_large_free, u64 ptr, u64 usable)
{
    return emit(SNOOP_LARGE_FREE, ptr, usable, usable, 0, 0, 0, 0, 0, 0);
}

SEC("usdt")
int BPF_USDT(on_alloc_failure, u64 req, u64 align, u32 err, u64 frames, u32 depth, u64 stack_id, u64 tc)
{
    return emit(SNOOP_FAILURE, 0, req, 0, 0, frames, depth, stack_id, align, err);
}

SEC("usdt")
int BPF_USDT(on_thread_start, u32 tid, u64 tc)
{
    return emit(SNOOP_THREAD_START, 0, 0, 0, 0, 0, 0, 0, tc, tid);
}

SEC("usdt")
int BPF_USDT(on_thread_exit, u32 tid, u64 tc)
{
    return emit(SNOOP_THREAD_EXIT, 0, 0, 0, 0, 0, 0, 0, tc, tid);
}

SEC("usdt")
int BPF_USDT(on_purge, u64 bytes, u32 reason)
{
    return emit(SNOOP_PURGE, 0, bytes, 0, 0, 0, 0, 0, reason, 0);
}

SEC("usdt")
int BPF_USDT(on_pressure, u64 stall_us, u64 released)
{
    return emit(SNOOP_PRESSURE, 0, released, released, 0, 0, 0, 0, stall_us, 0);
}
