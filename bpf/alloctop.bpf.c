// SPDX-License-Identifier: GPL-2.0
/* alloctop: aggregate in the kernel.  Per-site sample weights go to a hash map read once per
 * interval; a site's frames are copied once, the first time its stack id is seen.  Every event
 * that cannot be stored is counted in `lost`. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
/* Each (pid, probe, call site) attachment takes a spec slot: room for many targets. */
#define BPF_USDT_MAX_SPEC_CNT 4096
#include <bpf/usdt.bpf.h>
#include "alloctop.h"

#ifndef EEXIST
#define EEXIST 17
#endif

char LICENSE[] SEC("license") = "GPL";

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, TOP_MAX_SITES);
    __type(key, struct top_site_key);
    __type(value, struct top_site_val);
} sites SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, TOP_MAX_STACKS);
    __type(key, struct top_site_key);
    __type(value, struct top_stack);
} stacks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, struct top_stack);
} scratch SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 2 << 20); /* room for a whole exit-time reading (~420 KiB) */
} events SEC(".maps");

#define LUM_BPF_LOST_MAX TOP_LOST_MAX
#include "common.bpf.h"

SEC("usdt")
int BPF_USDT(on_sample, u64 ptr, u64 req, u64 usable, u64 weight, u64 frames, u32 depth, u64 stack_id, u64 tc)
{
    maybe_hold();
    /* Per-thread sample counts are in the registry (sampled_count/bytes): only the site here,
     * the sample probe is the hot one. */
    struct top_site_key k = {.pid = bpf_get_current_pid_tgid() >> 32, .stack_id = stack_id};
    struct top_site_val *sv = bpf_map_lookup_elem(&sites, &k);
    if (!sv) {
        struct top_site_val zero = {};
        long err = bpf_map_update_elem(&sites, &k, &zero, BPF_NOEXIST);
        if (err && err != -EEXIST) {
            count_lost(TOP_LOST_SITES_FULL);
            return 0;
        }
        sv = bpf_map_lookup_elem(&sites, &k);
        if (!sv) { /* deleted meanwhile (the map is only read): never silent */
            count_lost(TOP_LOST_SITES_FULL);
            return 0;
        }
        /* First sighting of this stack: keep its frames. */
        if (stack_id && frames && depth) {
            u32 zk = 0;
            struct top_stack *st = bpf_map_lookup_elem(&scratch, &zk);
            if (st) {
                u64 sz = frames_size(depth);
                if (bpf_probe_read_user(st->frames, sz, (void *)frames) == 0) {
                    st->depth = sz / sizeof(u64);
                    err = bpf_map_update_elem(&stacks, &k, st, BPF_NOEXIST);
                    if (err && err != -EEXIST)
                        count_lost(TOP_LOST_STACKS_FULL);
                } else {
                    count_lost(TOP_LOST_STACKS_FULL); /* unreadable: the site shows no stack */
                }
            }
        }
    }
    __sync_fetch_and_add(&sv->count, 1);
    __sync_fetch_and_add(&sv->weight, weight);
    return 0;
}

static __always_inline int thread_event(u32 kind, u32 tid, u64 tc)
{
    maybe_hold();
    struct top_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e) {
        count_lost(TOP_LOST_RINGBUF);
        return 0;
    }
    e->ts_ns = bpf_ktime_get_ns();
    e->pid = bpf_get_current_pid_tgid() >> 32;
    e->tid = tid;
    e->kind = kind;
    e->pad = 0;
    e->counters_addr = tc;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    bpf_ringbuf_submit(e, 0);
    return 0;
}

SEC("usdt")
int BPF_USDT(on_thread_start, u32 tid, u64 tc)
{
    return thread_event(TOP_THREAD_START, tid, tc);
}

SEC("usdt")
int BPF_USDT(on_thread_exit, u32 tid, u64 tc)
{
    return thread_event(TOP_THREAD_EXIT, tid, tc);
}

/* pid -> address of its lumalloc_registry, filled in by user space once located. */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, u32);
    __type(value, u64);
} registries SEC(".maps");

struct final_walk {
    struct lum_registry_v1 reg;
    u64 addr; /* the next thread's counters, 0 at the end of the list */
    u64 ts_ns;
    u32 pid;
    u32 beyond;
    bool short_read;
};

static long count_one(u32 i, void *arg)
{
    struct final_walk *w = arg;
    u64 next = 0;
    if (!w->addr || bpf_probe_read_user(&next, sizeof(next), (void *)w->addr))
        return 1;
    w->beyond++;
    w->addr = next;
    return 0;
}

/* Threads left in the list from w->addr on: their final figures are not sent, and that is
 * counted, not silent.  Links only, 8 bytes a thread; bounded in case the list is cut while
 * being walked (a cycle cannot form, records are only prepended). */
static __always_inline void count_rest(struct final_walk *w)
{
    w->beyond = 0;
    bpf_loop(TOP_FINAL_COUNT_MAX, count_one, w, 0);
    if (w->beyond)
        count_lost_n(TOP_LOST_FINAL_THREADS, w->beyond);
}

/* One record of the exit-time reading: the next TOP_FINAL_CHUNK threads of the list. */
static long final_chunk(u32 idx, void *arg)
{
    struct final_walk *w = arg;
    struct top_final *f = bpf_ringbuf_reserve(&events, sizeof(*f), 0);
    if (!f) {
        /* user space, without a `last` record, keeps the last interval's figures for the rest */
        count_lost(TOP_LOST_RINGBUF);
        count_rest(w);
        return 1;
    }
    f->ts_ns = w->ts_ns;
    f->pid = w->pid;
    f->kind = TOP_FINAL;
    f->chunk = idx;
    f->nthreads = 0;
    f->truncated = 0;
    f->last = 0;
    f->beyond = 0;
    f->pad = 0;
    __builtin_memcpy(&f->reg, &w->reg, sizeof(f->reg));
    u64 a = w->addr;
    for (int i = 0; i < TOP_FINAL_CHUNK; i++) {
        if (!a)
            break;
        f->threads[i].addr = a;
        if (bpf_probe_read_user(&f->threads[i].c, sizeof(f->threads[i].c), (void *)a)) {
            w->short_read = true; /* the threads after it are missing: say so */
            break;
        }
        f->nthreads = i + 1;
        a = f->threads[i].c.next;
    }
    w->addr = a;
    bool last = !a || w->short_read || idx + 1 >= TOP_FINAL_MAX_CHUNKS;
    if (last) {
        if (w->short_read)
            count_lost(TOP_LOST_FINAL);
        else if (a)
            count_rest(w);
        f->beyond = w->beyond;
        f->truncated = w->short_read || a;
        f->last = 1;
    }
    /* one wake-up for the whole reading */
    bpf_ringbuf_submit(f, last ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
    return last;
}

/* Final registry reading.  Since Linux 6.16 sched_process_exit fires before exit_mm() and says
 * whether this is the last thread (group_dead): the process's memory is still mapped and every
 * counter is final.  The map entry is also the once-guard.  Runs once per process exit, so the
 * whole list is read here (up to TOP_FINAL_MAX_THREADS), in as many records as it takes. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(on_do_exit, struct task_struct *task, bool group_dead)
{
    if (!group_dead)
        return 0;
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    u64 *raddr = bpf_map_lookup_elem(&registries, &pid);
    if (!raddr)
        return 0;
    u64 addr = *raddr;
    if (bpf_map_delete_elem(&registries, &pid))
        return 0; /* another thread got there first */
    struct final_walk w = {.ts_ns = bpf_ktime_get_ns(), .pid = pid};
    if (bpf_probe_read_user(&w.reg, sizeof(w.reg), (void *)addr)) {
        count_lost(TOP_LOST_FINAL);
        return 0;
    }
    w.addr = w.reg.threads_head;
    bpf_loop(TOP_FINAL_MAX_CHUNKS, final_chunk, &w, 0);
    return 0;
}
