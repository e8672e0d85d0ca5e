/* Shared by the tools' BPF programs (alloctop, allocsnoop): the per-CPU loss counters, the
 * verifier-friendly frame copy size and the hold of a -c command at its first event.  Define
 * LUM_BPF_LOST_MAX (the number of loss counters) before including. */
#ifndef LUM_COMMON_BPF_H
#define LUM_COMMON_BPF_H

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, LUM_BPF_LOST_MAX);
    __type(key, u32);
    __type(value, u64);
} lost SEC(".maps");

/* Bytes of frames to copy, in a form the verifier can bound: clang otherwise reuses the
 * unclamped register for the size argument. */
static __always_inline u64 frames_size(u32 depth)
{
    u64 sz = (u64)depth * sizeof(u64);
    asm volatile("" : "+r"(sz));
    if (sz > LUM_MAX_FRAMES * sizeof(u64))
        sz = LUM_MAX_FRAMES * sizeof(u64);
    asm volatile("" : "+r"(sz));
    return sz;
}

/* -c: hold a command we launched at its first event (SIGSTOP) until user space has located the
 * registry and snapshotted its mappings (then SIGCONT).  Without this a short-lived command can
 * exit before the tool sees its libraries, leaving its stacks unresolvable. */
#define SIGSTOP_NR 19
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, u32);
    __type(value, u8);
} hold SEC(".maps");
volatile uint32_t hold_active; /* fast path: no map lookup unless a hold is pending */

static __always_inline void maybe_hold(void)
{
    if (!hold_active)
        return;
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (bpf_map_delete_elem(&hold, &pid) == 0)
        bpf_send_signal(SIGSTOP_NR);
}

static __always_inline void count_lost(u32 idx)
{
    u64 *v = bpf_map_lookup_elem(&lost, &idx);
    if (v)
        (*v)++;
}

#endif
