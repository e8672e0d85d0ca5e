/* In-process unwinding at sample time.  libunwind's unw_backtrace follows DWARF CFI, so stacks
 * are right in code built without frame pointers, and it does not call malloc (it caches
 * per-thread state in mmap-backed pools); measured ~3 us for ~18 frames on this machine. */
#define _GNU_SOURCE 1
#define UNW_LOCAL_ONLY
#include <libunwind.h>
#include <link.h>
#include <time.h>
#include "obs_internal.h"

uint64_t lum_unwind_count, lum_unwind_ns, lum_unwind_frames;

/* unw_backtrace's fast path keeps a per-thread trace cache that libunwind maps and clears on a
 * thread's first use (~30 page faults): worth it for threads that sample often, a tax on
 * short-lived ones.  A thread's first samples walk with unw_step instead, which needs no
 * per-thread state. */
#define LUM_STEP_UNWIND_SAMPLES 8
static __thread uint32_t thread_unwinds __attribute__((tls_model("initial-exec")));

static int step_backtrace(void **buf, int max)
{
    unw_context_t ctx;
    unw_cursor_t cursor;
    if (unw_getcontext(&ctx) < 0 || unw_init_local(&cursor, &ctx) < 0) return 0;
    int n = 0;
    do {
        unw_word_t ip;
        if (unw_get_reg(&cursor, UNW_REG_IP, &ip) < 0 || ip == 0) break;
        buf[n++] = (void *)(uintptr_t)ip;
    } while (n < max && unw_step(&cursor) > 0);
    /* the first frames are this helper and lum_unwind: the skipping in lum_unwind drops every
     * frame inside lumalloc, these included */
    return n;
}

/* lumalloc's own executable range when it is a separate object (liblumalloc.so, LD_PRELOAD):
 * leading frames inside it are allocator internals and are dropped.  When lumalloc is linked
 * into the executable (lumalloc_static) that range would cover the program too, so only the
 * frames up to the hook's caller are dropped (see lum_unwind). */
static uintptr_t self_lo, self_hi;
static int self_state; /* 0: not yet looked up, 1: separate object, 2: inside the executable */

static int find_self(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size;
    uintptr_t me = (uintptr_t)arg;
    uintptr_t lo = UINTPTR_MAX, hi = 0;
    bool mine = false;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_X))
            continue;
        uintptr_t a = info->dlpi_addr + ph->p_vaddr, b = a + ph->p_memsz;
        if (me >= a && me < b)
            mine = true;
        if (a < lo)
            lo = a;
        if (b > hi)
            hi = b;
    }
    if (!mine)
        return 0;
    if (!info->dlpi_name || !info->dlpi_name[0]) {
        __atomic_store_n(&self_state, 2, __ATOMIC_RELEASE);
    } else {
        __atomic_store_n(&self_lo, lo, __ATOMIC_RELAXED);
        __atomic_store_n(&self_hi, hi, __ATOMIC_RELAXED);
        __atomic_store_n(&self_state, 1, __ATOMIC_RELEASE);
    }
    return 1;
}

static void locate_self(void)
{
    /* dl_iterate_phdr takes the loader's recursive lock and does not allocate: usable here. */
    if (!dl_iterate_phdr(find_self, (void *)(uintptr_t)&locate_self))
        __atomic_store_n(&self_state, 2, __ATOMIC_RELEASE);
}

uint64_t lum_stack_hash(const uint64_t *frames, uint32_t depth)
{
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ depth;
    for (uint32_t i = 0; i < depth; i++) {
        h ^= frames[i];
        h *= 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
    }
    return h ? h : 1; /* 0 means "no stack" in the probe contract */
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* noinline: the frame it unwinds from must be a real frame for the skipping below. */
__attribute__((noinline)) uint32_t lum_unwind(uint64_t *frames, uint32_t max, uintptr_t hook_ret)
{
    /* Slack for the frames dropped below (this function, the hook, the core's slow path and
     * entry point, possibly a few more when the core's call chain is deep). */
    enum { SLACK = 12 };
    void *buf[LUM_MAX_FRAMES + SLACK];
    if (max > LUM_MAX_FRAMES)
        max = LUM_MAX_FRAMES;
    if (!max)
        return 0;
    /* racing first samples may both look: they find the same answer */
    if (!__atomic_load_n(&self_state, __ATOMIC_ACQUIRE))
        locate_self();
    uint64_t t0 = now_ns();
    int n = thread_unwinds++ < LUM_STEP_UNWIND_SAMPLES ? step_backtrace(buf, (int)(max + SLACK))
                                                       : unw_backtrace(buf, (int)(max + SLACK));
    uint64_t t1 = now_ns();
    if (n < 0)
        n = 0;
    int start = 0;
    if (__atomic_load_n(&self_state, __ATOMIC_ACQUIRE) == 1) {
        uintptr_t lo = __atomic_load_n(&self_lo, __ATOMIC_RELAXED), hi = __atomic_load_n(&self_hi, __ATOMIC_RELAXED);
        while (start < n && (uintptr_t)buf[start] >= lo && (uintptr_t)buf[start] < hi)
            start++;
    } else {
        /* Drop our own frames up to the return into the core (hook_ret) and that frame too,
         * the core's slow path: its entry point (malloc/calloc/...) stays as the innermost
         * frame, which reads well in reports. */
        start = 1;
        for (int i = 0; i < n && i < SLACK; i++) {
            if ((uintptr_t)buf[i] == hook_ret) {
                start = i + 1;
                break;
            }
        }
    }
    uint32_t d = 0;
    for (int i = start; i < n && d < max; i++)
        frames[d++] = (uint64_t)(uintptr_t)buf[i];
    __atomic_fetch_add(&lum_unwind_count, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&lum_unwind_ns, t1 - t0, __ATOMIC_RELAXED);
    __atomic_fetch_add(&lum_unwind_frames, (uint64_t)n, __ATOMIC_RELAXED);
    return d;
}
