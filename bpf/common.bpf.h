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

static __always_inline void count_lost_n(u32 idx, u64 n)
{
    u64 *v = bpf_map_lookup_elem(&lost, &idx);
    if (v)
        *v += n;
}

static __always_inline void count_lost(u32 idx)
{
    count_lost_n(idx, 1);
}


#ifdef LUM_USDT_FAST
/* USDT arguments in one pass (define LUM_USDT_FAST; include after <bpf/usdt.bpf.h>).
 *
 * libbpf's BPF_USDT() fetches each argument with its own call to the global function
 * bpf_usdt_arg(), which looks the attach cookie and the spec up again and costs one
 * bpf_probe_read_kernel() (the register) plus, for an argument in memory, one
 * bpf_probe_read_user(): for `sample` (8 arguments, 3 of them spilled to the stack) ~0.8 us of
 * the ~1.3 us the program took per event on a 6.18 kernel, the target's caches being cold.  Here
 * the spec is looked up once, registers are loaded straight from the context, and the arguments
 * that live in memory relative to one register (the compiler spills them next to each other
 * around %rsp) come in with a single bpf_probe_read_user() into the BPF stack.  Same spec and
 * casts as libbpf; memory arguments based on different registers or spread wider than
 * LUM_USDT_SPAN bytes fall back to one read each. */
#define LUM_USDT_SPAN 64

/* The register at pt_regs byte offset reg_off, as libbpf records it (x86-64 names libbpf
 * knows).  Constant-offset context loads: no helper call. */
static __always_inline bool lum_usdt_reg(struct pt_regs *ctx, int reg_off, u64 *v)
{
    u64 x;
    /* Inline asm so that clang cannot fold the cases into one load at ctx + reg_off, which the
     * verifier rejects (context loads need a constant offset). */
    switch (reg_off) {
#define R(f)                                                                                       \
    case __builtin_offsetof(struct pt_regs, f):                                                   \
        asm volatile("%0 = *(u64 *)(%1 + %2)"                                                      \
                     : "=r"(x)                                                                     \
                     : "r"(ctx), "i"(__builtin_offsetof(struct pt_regs, f)));                     \
        *v = x;                                                                                    \
        return true;
        R(ax) R(bx) R(cx) R(dx) R(si) R(di) R(bp) R(sp) R(ip)
        R(r8) R(r9) R(r10) R(r11) R(r12) R(r13) R(r14) R(r15)
#undef R
    }
    return false;
}

static __always_inline u64 lum_usdt_cast(const struct __bpf_usdt_arg_spec *a, u64 v)
{
    u32 sh = (u8)a->arg_bitshift & 63;
    v <<= sh;
    return a->arg_signed ? (u64)((s64)v >> sh) : v >> sh;
}

/* Fills out[0..n) with the probe's first n arguments; 0, or -1 (the rest zero) if the spec or a
 * read fails. */
static __always_inline int lum_usdt_args(struct pt_regs *ctx, u64 *out, const int n)
{
    for (int i = 0; i < n; i++)
        out[i] = 0;
    int id = __bpf_usdt_spec_id(ctx);
    if (id < 0)
        return -1;
    struct __bpf_usdt_spec *spec = bpf_map_lookup_elem(&__bpf_usdt_specs, &id);
    if (!spec || spec->arg_cnt < n)
        return -1;
    /* Memory arguments: one base register, one span? */
    int base = -1;
    bool one = true;
    s64 lo = 0, hi = 0;
    for (int i = 0; i < n; i++) {
        struct __bpf_usdt_arg_spec *a = &spec->args[i];
        if (a->arg_type != BPF_USDT_ARG_REG_DEREF)
            continue;
        s64 off = (s64)a->val_off;
        if (base < 0) {
            base = a->reg_off;
            lo = hi = off;
        } else if (a->reg_off != base) {
            one = false;
        }
        if (off < lo)
            lo = off;
        if (off > hi)
            hi = off;
    }
    u64 mem[LUM_USDT_SPAN / sizeof(u64)] = {};
    if (base >= 0 && one) {
        u64 size = (u64)(hi - lo) + sizeof(u64), bv;
        asm volatile("" : "+r"(size));
        if (size > sizeof(mem) || !lum_usdt_reg(ctx, base, &bv))
            one = false;
        else if (bpf_probe_read_user(mem, size, (void *)(bv + lo)))
            return -1;
    }
    for (int i = 0; i < n; i++) {
        struct __bpf_usdt_arg_spec *a = &spec->args[i];
        u64 v;
        switch (a->arg_type) {
        case BPF_USDT_ARG_CONST:
            v = a->val_off;
            break;
        case BPF_USDT_ARG_REG:
            if (!lum_usdt_reg(ctx, a->reg_off, &v))
                return -1;
            break;
        case BPF_USDT_ARG_REG_DEREF:
            if (one && !(((s64)a->val_off - lo) & 7)) {
                u64 k = (u64)((s64)a->val_off - lo) / sizeof(u64);
                asm volatile("" : "+r"(k));
                if (k >= LUM_USDT_SPAN / sizeof(u64))
                    return -1;
                v = mem[k];
            } else if (!lum_usdt_reg(ctx, a->reg_off, &v) ||
                       bpf_probe_read_user(&v, sizeof(v), (void *)(v + a->val_off))) {
                return -1;
            }
            break;
        default:
            return -1;
        }
        out[i] = lum_usdt_cast(a, v);
    }
    return 0;
}
#endif

#endif
