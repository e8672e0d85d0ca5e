/* In-process unwinding at sample time, right for code built without frame pointers.
 *
 * libunwind follows DWARF CFI and does not call malloc, but a walk through it costs ~80
 * instructions a frame plus ~160 to set up a cursor (unw_backtrace, measured with callgrind;
 * its per-thread trace cache also costs each sampling thread ~30 pages), and a sample's stack
 * is mostly the same few frames again and again.  So the walk is split:
 *
 * - a rule cache, keyed by code address, says how to get from one frame to its caller on
 *   x86-64: CFA = rsp + k or rbp + 16, the return address at CFA - 8, rbp restored from
 *   CFA + off or unchanged, or "outermost frame".  A walk whose every address is in the cache
 *   costs ~30 instructions a frame and touches nothing but the stack and the cache;
 * - on a miss, libunwind walks the stack with unw_step from the same context, and the rule of
 *   each frame is read off what it found: the caller's rsp is the CFA, unw_get_save_loc says
 *   where rbp and the return address were saved.  A frame that sets up rbp as a frame pointer
 *   (rbp saved at CFA - 16 and pointing at it) gets the rbp rule, which stays right where rsp
 *   moves (alloca, VLAs); any other frame has a fixed rsp offset at a call site.  Frames that
 *   fit neither (signal frames, rbp restored from a register, odd save slots) are not cached,
 *   so a stack through them always takes the libunwind walk.
 *
 * Every address computed from a cached rule is checked to lie on this thread's stack between
 * the current frame and the top the last libunwind walk reached; a check that fails falls back
 * to libunwind, so a rule can make a walk slower but never read wild memory.  The sampler
 * starts the walk in its caller (lum_unwind_from), which also skips the context capture.
 * Building with -DLUM_UNWIND_VERIFY checks every cached walk against libunwind's on stderr. */
#define _GNU_SOURCE 1
#define UNW_LOCAL_ONLY
#include <dlfcn.h>
#include <libunwind.h>
#include <link.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "obs_internal.h"

/* libunwind is loaded at the first unwind, not linked: a process that never samples (sampling
 * off, or a small program) never maps it nor the liblzma it pulls in (~110 KiB of RSS, two
 * fewer libraries to load at start-up).  Its functions are called through this table. */
#define LUM_STR_(x) #x
#define LUM_STR(x) LUM_STR_(x) /* the symbol a libunwind macro stands for, e.g. _ULx86_64_step */
static struct {
    __typeof__(unw_tdep_getcontext) *getcontext;
    __typeof__(unw_init_local) *init_local;
    __typeof__(unw_step) *step;
    __typeof__(unw_get_reg) *get_reg;
    __typeof__(unw_get_save_loc) *get_save_loc;
    __typeof__(unw_is_signal_frame) *is_signal_frame;
    __typeof__(unw_set_caching_policy) *set_caching_policy;
    __typeof__(unw_get_accessors) *get_accessors;
    unw_addr_space_t *local_addr_space;
} U;
/* 0: not tried; 1: U is ready; -1: libunwind cannot be loaded; below -1: being loaded by a
 * thread of the process whose pid is -(state + 2) (a fork child whose loading thread did not
 * survive the fork tries again). */
static long load_state;
/* dlopen allocates: its nested mallocs may be sampled, and must not try to load again */
static __thread int loading LUM_TLS;

static bool unwind_load(void);
static uint64_t now_ns(void);

/* Held for reading while this library is inside libunwind or dl_iterate_phdr, for writing by
 * fork's prepare handler (observe.c).  Both take locks of their own (libunwind's, the loader's
 * write lock) that glibc does not reset in a fork child: a fork while a sampling thread was in
 * there left the child's first walk blocked on them forever (about 1 fork child in 20 in
 * test_observe_fork).  Recursive read locks are fine: glibc's default prefers readers. */
pthread_rwlock_t lum_unwind_fork_lock = PTHREAD_RWLOCK_INITIALIZER;

/* The name of the function holding addr from the object's symbol tables (libunwind reads the
 * ELF .symtab), for reports. */
bool lum_unwind_proc_name(uintptr_t addr, char *name, size_t len, uint64_t *off)
{
    if (!unwind_load())
        return false;
    unw_word_t o = 0;
    pthread_rwlock_rdlock(&lum_unwind_fork_lock);
    unw_accessors_t *acc = U.get_accessors(*U.local_addr_space);
    bool ok = acc && acc->get_proc_name &&
              acc->get_proc_name(*U.local_addr_space, addr, name, len, &o, NULL) == 0 && name[0];
    pthread_rwlock_unlock(&lum_unwind_fork_lock);
    if (ok)
        *off = o;
    return ok;
}

static void *unw_sym(void *lib, const char *name)
{
    void *p = dlsym(RTLD_DEFAULT, name); /* a program linked with libunwind has it already */
    return p ? p : lib ? dlsym(lib, name) : NULL;
}

static bool unwind_load(void)
{
    long st = __atomic_load_n(&load_state, __ATOMIC_ACQUIRE);
    if (__builtin_expect(st == 1, 1))
        return true;
    if (st == -1 || loading)
        return false;
    long me = -((long)getpid() + 2);
    if (st == me) {
        /* Another thread is loading it, which takes a few ms: wait, or this thread's samples
         * meanwhile would have no stack.  Bounded, since this thread may hold the loader's lock
         * (a malloc from a constructor that dlopen runs) that the loading thread needs. */
        uint64_t deadline = now_ns() + 50000000u; /* a deadline: timer slack stretches sleeps */
        while ((st = __atomic_load_n(&load_state, __ATOMIC_ACQUIRE)) == me && now_ns() < deadline)
            nanosleep(&(struct timespec){.tv_nsec = 20000}, NULL);
        return st == 1;
    }
    /* Not while the loader is adding or removing an object (this thread's malloc may have been
     * called from inside dlopen): a dlopen nested there trips glibc's consistency assertions.
     * A later sample tries again. */
    if (__atomic_load_n(&_r_debug.r_state, __ATOMIC_RELAXED) != RT_CONSISTENT)
        return false;
    if (!__atomic_compare_exchange_n(&load_state, &st, me, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return st == 1;
    loading = 1;
    pthread_rwlock_rdlock(&lum_unwind_fork_lock);
    void *lib = NULL;
    if (!dlsym(RTLD_DEFAULT, LUM_STR(unw_init_local))) {
        lib = dlopen("libunwind.so.8", RTLD_NOW | RTLD_LOCAL);
        if (!lib)
            lib = dlopen("libunwind.so", RTLD_NOW | RTLD_LOCAL);
    }
    U.getcontext = (__typeof__(U.getcontext))unw_sym(lib, LUM_STR(unw_tdep_getcontext));
    U.init_local = (__typeof__(U.init_local))unw_sym(lib, LUM_STR(unw_init_local));
    U.step = (__typeof__(U.step))unw_sym(lib, LUM_STR(unw_step));
    U.get_reg = (__typeof__(U.get_reg))unw_sym(lib, LUM_STR(unw_get_reg));
    U.get_save_loc = (__typeof__(U.get_save_loc))unw_sym(lib, LUM_STR(unw_get_save_loc));
    U.is_signal_frame = (__typeof__(U.is_signal_frame))unw_sym(lib, LUM_STR(unw_is_signal_frame));
    U.set_caching_policy = (__typeof__(U.set_caching_policy))unw_sym(lib, LUM_STR(unw_set_caching_policy));
    U.get_accessors = (__typeof__(U.get_accessors))unw_sym(lib, LUM_STR(unw_get_accessors));
    U.local_addr_space = (unw_addr_space_t *)unw_sym(lib, LUM_STR(unw_local_addr_space));
    bool ok = U.getcontext && U.init_local && U.step && U.get_reg && U.get_save_loc &&
              U.is_signal_frame && U.set_caching_policy && U.get_accessors && U.local_addr_space;
    if (ok)
        /* Debian 12's libunwind has no per-thread cache and falls back to its global one, behind
         * a mutex: fork safety comes from lum_unwind_fork_lock, not from this. */
        U.set_caching_policy(*U.local_addr_space, UNW_CACHE_PER_THREAD);
    else
        lum_write_all(2, "lumalloc: libunwind.so.8 cannot be loaded: samples will have no stack\n",
                      sizeof "lumalloc: libunwind.so.8 cannot be loaded: samples will have no stack\n" - 1);
    pthread_rwlock_unlock(&lum_unwind_fork_lock);
    loading = 0;
    __atomic_store_n(&load_state, ok ? 1L : -1L, __ATOMIC_RELEASE);
    return ok;
}

uint64_t lum_unwind_count, lum_unwind_ns, lum_unwind_frames;
/* Frames walked beyond the requested depth, for lumalloc's own (this function, the hook, the
 * core's slow path and entry point, possibly a few more when the core's call chain is deep). */
#define LUM_UNWIND_SLACK 12
/* Serialises additions to the rule cache (x86-64); reset in fork children by observe.c. */
pthread_mutex_t lum_unwind_rules_lock = PTHREAD_MUTEX_INITIALIZER;

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

/* At start-up, when sampling is on: loaded from a constructor, before other threads exist and
 * outside any malloc, the first samples neither wait for it nor go without a stack. */
void lum_unwind_preload(void)
{
    if (!unwind_load())
        return;
    pthread_rwlock_rdlock(&lum_unwind_fork_lock);
    if (!__atomic_load_n(&self_state, __ATOMIC_ACQUIRE))
        locate_self();
    pthread_rwlock_unlock(&lum_unwind_fork_lock);
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

/* ---- the libunwind walk (every architecture; the rule cache's fallback on x86-64) ---- */

#if defined(__x86_64__)
#define RULES 1
/* Rule of one code address.  Entries are written once (fields, then ip with a release store)
 * and never changed, so readers need no lock: an ip read with acquire guards its fields. */
struct rule {
    uint64_t ip;       /* 0: empty slot */
    int32_t cfa_off;   /* CFA = (rbp or rsp) + cfa_off */
    int16_t rbp_off;   /* rbp saved at CFA + rbp_off; 0: rbp unchanged */
    uint8_t flags;
};
#define R_CFA_RBP 1u /* CFA from rbp, not rsp */
#define R_LAST 2u    /* outermost frame: libunwind's step ended here */
#define R_SELF 4u    /* inside liblumalloc.so (when it is a separate object) */

struct rtab {
    uint32_t shift;  /* 64 - log2(slots) */
    uint32_t used;   /* under rules_lock */
    struct rule e[];
};
/* Starts at 256 slots (4 KiB): a program's sampled stacks go through a few dozen distinct
 * return addresses; grows at 3/4 full.  A replaced table is left in place (a walk on another
 * thread may be reading it); together the old ones are smaller than the current one. */
#define RTAB_MIN_BITS 8
#define RTAB_MAX_BITS 20
static struct rtab *rtab;

/* The stack the last libunwind walk of this thread went through: from stack_low (where it
 * started, less STACK_BELOW of room for deeper calls) to stack_top (the highest CFA it
 * reached).  A cached walk must start in that range and may only lead to addresses below the
 * top.  A thread that moves to another
 * stack (coroutines, an alternate signal stack) starts outside it and takes libunwind's walk,
 * which moves the range there. */
#define STACK_BELOW (256u << 10)
static __thread uintptr_t stack_top LUM_TLS, stack_low LUM_TLS;

static inline size_t rule_slot(const struct rtab *t, uint64_t ip)
{
    return (size_t)((ip * 0x9e3779b97f4a7c15ULL) >> t->shift);
}

static void rule_put(struct rtab *t, const struct rule *r)
{
    size_t mask = ((size_t)1 << (64 - t->shift)) - 1;
    size_t i = rule_slot(t, r->ip);
    while (t->e[i].ip) {
        if (t->e[i].ip == r->ip)
            return;
        i = (i + 1) & mask;
    }
    t->e[i].cfa_off = r->cfa_off;
    t->e[i].rbp_off = r->rbp_off;
    t->e[i].flags = r->flags;
    __atomic_store_n(&t->e[i].ip, r->ip, __ATOMIC_RELEASE);
    t->used++;
}

static struct rtab *rtab_new(uint32_t bits)
{
    struct rtab *t = lum_obs_alloc(sizeof *t + ((size_t)1 << bits) * sizeof(struct rule));
    if (t)
        t->shift = 64 - bits;
    return t;
}

/* Adds rules learnt by one libunwind walk.  A busy lock just skips the learning. */
static void rules_learn(const struct rule *nr, int n)
{
    if (!n || pthread_mutex_trylock(&lum_unwind_rules_lock))
        return;
    struct rtab *t = rtab;
    if (!t && !(t = rtab_new(RTAB_MIN_BITS)))
        goto out;
    for (int i = 0; i < n; i++) {
        uint32_t bits = 64 - t->shift;
        if ((uint64_t)(t->used + 1) * 4 > ((uint64_t)3 << bits)) {
            struct rtab *g = bits < RTAB_MAX_BITS ? rtab_new(bits + 1) : NULL;
            if (!g)
                break;
            for (size_t j = 0; j < ((size_t)1 << bits); j++)
                if (t->e[j].ip)
                    rule_put(g, &t->e[j]);
            t = g;
        }
        rule_put(t, &nr[i]);
    }
out:
    __atomic_store_n(&rtab, t, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&lum_unwind_rules_lock);
}

/* Walks from the frame (ip, sp, bp) with cached rules only, into out[] (at most max frames).
 * With skip_self, the leading frames inside lumalloc (R_SELF) are walked but not stored.  The
 * number of frames stored, or -1 on the first address without a rule or the first check that
 * fails; *walked counts every frame walked.
 *
 * Safety: the walk starts in the stack the last libunwind walk went through (stack_low,
 * stack_top) and every CFA must lie in (sp, top]: the stack between the current frame and the
 * top, all of it mapped (the walk starts in a frame of this very call chain, with this
 * function's own frames below it).  The words read at CFA - 8 and CFA + rbp_off then are too:
 * learnt rbp slots lie at or above the frame's rsp, and the rbp rule reads CFA - 16, at most
 * 15 bytes below a frame's rsp, which is still on the live stack below it. */
struct rules_view {
    const struct rule *e;
    unsigned shift;
    size_t mask;
};

static inline const struct rule *rule_find(const struct rules_view *v, uintptr_t ip)
{
    for (size_t i = (size_t)((ip * 0x9e3779b97f4a7c15ULL) >> v->shift);; i = (i + 1) & v->mask) {
        const struct rule *r = &v->e[i];
        uint64_t k = __atomic_load_n(&r->ip, __ATOMIC_ACQUIRE);
        if (k == ip)
            return r;
        if (!k)
            return NULL;
    }
}

/* Applies r to the frame (*ip, *sp, *bp): 1 on to the caller, 0 at the end of the stack, -1
 * when a check fails. */
static inline int rule_step(const struct rule *r, uintptr_t *ip, uintptr_t *sp, uintptr_t *bp,
                            uintptr_t top)
{
    unsigned f = r->flags;
    if (f & R_LAST)
        return 0;
    uintptr_t cfa = (f & R_CFA_RBP ? *bp : *sp) + (uintptr_t)(intptr_t)r->cfa_off;
    if (cfa - *sp - 1 >= top - *sp) /* cfa <= sp || cfa > top, with sp < top */
        return -1;
    if (r->rbp_off)
        *bp = *(const uintptr_t *)(cfa + (uintptr_t)(intptr_t)r->rbp_off);
    *ip = *(const uintptr_t *)(cfa - 8);
    *sp = cfa;
    return *ip != 0;
}

static int rules_walk(uintptr_t ip, uintptr_t sp, uintptr_t bp, uint64_t *out, uint32_t max,
                      bool skip_self, uint32_t *walked)
{
    const struct rtab *t = __atomic_load_n(&rtab, __ATOMIC_ACQUIRE);
    const uintptr_t top = stack_top;
    if (!t || sp >= top || sp < stack_low)
        return -1;
    /* a local copy, so that the stores into out[] do not make the compiler reload it */
    const struct rules_view v = {t->e, t->shift, SIZE_MAX >> t->shift};
    uint32_t n = 0, d = 0;
    const struct rule *r = rule_find(&v, ip);
    if (!r)
        return -1;
    /* lumalloc's own leading frames: walked, not stored */
    while (skip_self && (r->flags & R_SELF)) {
        if (++n > LUM_UNWIND_SLACK)
            return -1; /* not a stack we expect: libunwind and the generic skipping decide */
        int st = rule_step(r, &ip, &sp, &bp, top);
        if (st <= 0) {
            *walked = n;
            return st < 0 ? -1 : 0;
        }
        if (!(r = rule_find(&v, ip)))
            return -1;
    }
    for (;;) {
        out[d++] = ip;
        n++;
        if (d >= max)
            break;
        int st = rule_step(r, &ip, &sp, &bp, top);
        if (st < 0)
            return -1;
        if (!st)
            break;
        if (!(r = rule_find(&v, ip)))
            return -1;
    }
    *walked = n;
    return (int)d;
}
#endif

/* The libunwind walk from ctx; on x86-64 it also learns the rule of each frame it steps over.
 * noinline: its cursor and learnt rules (~2.5 KiB) stay off the stack of the cached walk. */
static __attribute__((noinline)) int step_walk(unw_context_t *ctx, uint64_t *buf, int max)
{
    unw_cursor_t cursor;
    if (U.init_local(&cursor, ctx) < 0)
        return 0;
    int n = 0;
#ifdef RULES
    enum { LEARN = LUM_MAX_FRAMES + 16 };
    struct rule nr[LEARN];
    int nn = 0;
    bool lost = false;
    unw_word_t sp, bp;
    unw_save_loc_t bl;
    if (U.get_reg(&cursor, UNW_REG_SP, &sp) < 0 || U.get_reg(&cursor, UNW_X86_64_RBP, &bp) < 0 ||
        U.get_save_loc(&cursor, UNW_X86_64_RBP, &bl) < 0)
        return 0;
    uintptr_t top = sp, start_sp = sp;
#endif
    for (;;) {
        unw_word_t ip;
        if (U.get_reg(&cursor, UNW_REG_IP, &ip) < 0 || ip == 0)
            break;
        buf[n++] = ip;
        if (n >= max)
            break;
#ifdef RULES
        bool signal = U.is_signal_frame(&cursor) > 0;
#endif
        int s = U.step(&cursor);
#ifdef RULES
        unsigned self = self_state == 1 && ip >= self_lo && ip < self_hi ? R_SELF : 0;
        if (s == 0 && !signal && !lost && nn < LEARN)
            nr[nn++] = (struct rule){.ip = ip, .flags = R_LAST | self};
#endif
        if (s <= 0)
            break;
#ifdef RULES
        if (lost)
            continue;
        unw_word_t cfa, nbp;
        unw_save_loc_t nbl, ril;
        if (U.get_reg(&cursor, UNW_REG_SP, &cfa) < 0 || U.get_reg(&cursor, UNW_X86_64_RBP, &nbp) < 0 ||
            U.get_save_loc(&cursor, UNW_X86_64_RBP, &nbl) < 0 ||
            U.get_save_loc(&cursor, UNW_X86_64_RIP, &ril) < 0) {
            lost = true; /* lost track of the registers: learn nothing more from this walk */
            continue;
        }
        struct rule r = {.ip = ip, .flags = (uint8_t)self};
        bool ok = !signal && cfa > sp && cfa - sp < (1u << 30) && !(cfa & 7) && ril.type == UNW_SLT_MEMORY &&
                  ril.u.addr == cfa - 8 && nbl.type == UNW_SLT_MEMORY && bl.type == UNW_SLT_MEMORY;
        if (ok && nbl.u.addr != bl.u.addr) {
            /* this frame saved rbp: where, relative to the CFA, and is rbp its frame pointer? */
            intptr_t off = (intptr_t)(nbl.u.addr - cfa);
            ok = off < 0 && off >= INT16_MIN && nbl.u.addr >= sp;
            r.rbp_off = (int16_t)off;
            if (off == -16 && bp == cfa - 16) {
                r.flags |= R_CFA_RBP;
                r.cfa_off = 16;
            }
        }
        if (ok && !(r.flags & R_CFA_RBP))
            r.cfa_off = (int32_t)(cfa - sp);
        if (ok && nn < LEARN)
            nr[nn++] = r;
        sp = cfa;
        bp = nbp;
        bl = nbl;
        if (cfa > top)
            top = cfa;
#endif
    }
#ifdef RULES
    stack_top = top;
    stack_low = start_sp > STACK_BELOW ? start_sp - STACK_BELOW : 0;
    rules_learn(nr, nn);
#endif
    return n;
}

/* Unwinding cost is timed on one unwind in TIME_EVERY per thread (and scaled): a
 * clock_gettime pair cost more than a cached walk. */
#define TIME_EVERY 16
static __thread uint32_t thread_unwinds LUM_TLS;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Drops lumalloc's own leading frames from the n frames in buf and copies at most max of the
 * rest to frames. */
static uint32_t skip_copy(const uint64_t *buf, int n, uint64_t *frames, uint32_t max, uintptr_t hook_ret)
{
    int start = 0;
    if (__atomic_load_n(&self_state, __ATOMIC_ACQUIRE) == 1) {
        uintptr_t lo = __atomic_load_n(&self_lo, __ATOMIC_RELAXED), hi = __atomic_load_n(&self_hi, __ATOMIC_RELAXED);
        while (start < n && buf[start] >= lo && buf[start] < hi)
            start++;
    } else {
        /* Drop our own frames up to the return into the core (hook_ret) and that frame too,
         * the core's slow path: its entry point (malloc/calloc/...) stays as the innermost
         * frame, which reads well in reports. */
        start = 1;
        for (int i = 0; i < n && i < LUM_UNWIND_SLACK; i++) {
            if (buf[i] == hook_ret) {
                start = i + 1;
                break;
            }
        }
    }
    uint32_t d = 0;
    for (int i = start; i < n && d < max; i++)
        frames[d++] = buf[i];
    return d;
}

static void unwind_account(bool timed, uint64_t t0, uint32_t walked)
{
    if (timed)
        __atomic_fetch_add(&lum_unwind_ns, (now_ns() - t0) * TIME_EVERY, __ATOMIC_RELAXED);
    __atomic_fetch_add(&lum_unwind_count, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&lum_unwind_frames, walked, __ATOMIC_RELAXED);
}

#ifdef RULES
/* The cached walk from (ip, sp, bp) into frames[], lumalloc's own frames dropped; -1 when the
 * cache cannot take it.  As a separate object, lumalloc's frames are known by address and are
 * skipped as the walk goes; linked into the program, the generic skipping needs the whole walk
 * (in buf). */
static __attribute__((noinline)) int cached_walk_linked(uintptr_t ip, uintptr_t sp, uintptr_t bp,
                                                        uint64_t *frames, uint32_t max,
                                                        uintptr_t hook_ret, uint32_t *walked)
{
    uint64_t buf[LUM_MAX_FRAMES + LUM_UNWIND_SLACK];
    int got = rules_walk(ip, sp, bp, buf, max + LUM_UNWIND_SLACK, false, walked);
    return got < 0 ? -1 : (int)skip_copy(buf, got, frames, max, hook_ret);
}

static inline int cached_walk(uintptr_t ip, uintptr_t sp, uintptr_t bp, uint64_t *frames, uint32_t max,
                              uintptr_t hook_ret, uint32_t *walked)
{
    if (__atomic_load_n(&self_state, __ATOMIC_ACQUIRE) == 1)
        return rules_walk(ip, sp, bp, frames, max, true, walked);
    return cached_walk_linked(ip, sp, bp, frames, max, hook_ret, walked);
}
#endif

/* noinline: the frame it unwinds from must be a real frame for the skipping. */
__attribute__((noinline)) uint32_t lum_unwind(uint64_t *frames, uint32_t max, uintptr_t hook_ret)
{
    if (max > LUM_MAX_FRAMES)
        max = LUM_MAX_FRAMES;
    if (!max || !unwind_load())
        return 0;
    pthread_rwlock_rdlock(&lum_unwind_fork_lock);
    /* racing first samples may both look: they find the same answer */
    if (!__atomic_load_n(&self_state, __ATOMIC_ACQUIRE))
        locate_self();
    bool timed = thread_unwinds++ % TIME_EVERY == 0;
    uint64_t t0 = timed ? now_ns() : 0;
    unw_context_t ctx;
    uint64_t buf[LUM_MAX_FRAMES + LUM_UNWIND_SLACK];
    int n = 0;
    uint32_t d = 0;
    if (U.getcontext(&ctx) == 0) {
        int got = -1;
#ifdef RULES
        uint32_t walked = 0;
        got = cached_walk((uintptr_t)ctx.uc_mcontext.gregs[REG_RIP], (uintptr_t)ctx.uc_mcontext.gregs[REG_RSP],
                          (uintptr_t)ctx.uc_mcontext.gregs[REG_RBP], frames, max, hook_ret, &walked);
        n = (int)walked;
#ifdef LUM_UNWIND_VERIFY
        if (got >= 0) {
            uint64_t chk[LUM_MAX_FRAMES];
            int m = step_walk(&ctx, buf, (int)(max + LUM_UNWIND_SLACK));
            uint32_t dm = skip_copy(buf, m, chk, max, hook_ret);
            if (dm != (uint32_t)got || memcmp(chk, frames, dm * sizeof *chk)) {
                char msg[160];
                int l = snprintf(msg, sizeof msg, "lum_unwind verify: rules %d frames, libunwind %u\n", got, dm);
                lum_write_all(2, msg, (size_t)l);
                for (uint32_t i = 0; i < (uint32_t)got || i < dm; i++) {
                    l = snprintf(msg, sizeof msg, "  %2u %#lx %#lx\n", i,
                                 (unsigned long)(i < (uint32_t)got ? frames[i] : 0),
                                 (unsigned long)(i < dm ? chk[i] : 0));
                    lum_write_all(2, msg, (size_t)l);
                }
            }
        }
#endif
#endif
        if (got >= 0) {
            d = (uint32_t)got;
        } else {
            n = step_walk(&ctx, buf, (int)(max + LUM_UNWIND_SLACK));
            d = skip_copy(buf, n, frames, max, hook_ret);
        }
    }
    pthread_rwlock_unlock(&lum_unwind_fork_lock);
    unwind_account(timed, t0, (uint32_t)n);
    return d;
}

uint32_t lum_unwind_from(uint64_t *frames, uint32_t max, uintptr_t ip, uintptr_t sp, uintptr_t bp,
                         uintptr_t hook_ret)
{
#ifdef RULES
    if (max > LUM_MAX_FRAMES)
        max = LUM_MAX_FRAMES;
    if (max && __atomic_load_n(&self_state, __ATOMIC_ACQUIRE)) {
        bool timed = thread_unwinds % TIME_EVERY == 0;
        uint64_t t0 = timed ? now_ns() : 0;
        uint32_t walked;
        int got = cached_walk(ip, sp, bp, frames, max, hook_ret, &walked);
        if (got >= 0) {
            thread_unwinds++;
            unwind_account(timed, t0, walked);
#ifdef LUM_UNWIND_VERIFY
            uint64_t chk[LUM_MAX_FRAMES];
            uint32_t dm = lum_unwind(chk, max, hook_ret);
            if (dm != (uint32_t)got || memcmp(chk, frames, dm * sizeof *chk))
                lum_write_all(2, "lum_unwind_from verify: differs\n", 32);
#endif
            return (uint32_t)got;
        }
    }
#else
    (void)ip, (void)sp, (void)bp;
#endif
    /* the first unwind, or a frame the cache cannot take: the whole walk, which learns */
    return lum_unwind(frames, max, hook_ret);
}
