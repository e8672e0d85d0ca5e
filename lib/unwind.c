/* In-process unwinding at sample time, right for code built without frame pointers (x86-64).
 *
 * A walk follows the DWARF call frame information that every object carries in .eh_frame, as
 * an exception unwinder would, but reading and running those tables (cfi.c) costs a few
 * thousand instructions a frame, and a sample's stack is mostly the same few frames again and
 * again.  So the walk is split:
 *
 * - a rule cache, keyed by return address, says how to get from one frame to its caller:
 *   CFA = rsp + k or rbp + k, the return address at CFA - 8, rbp restored from CFA + off or
 *   unchanged, or "the walk ends here".  A walk whose every address is in the cache costs ~30
 *   instructions a frame and touches nothing but the stack and the cache;
 * - on a miss, cfi.c derives the rule of that address from the object's tables, and the walk
 *   goes on with it and caches it.  Frames whose rule does not fit that form (signal
 *   trampolines, CFA by expression, rbp kept in a register, no tables at all) are cached as
 *   "ends here": the stack is cut short there, and costs nothing more the next time.
 *
 * Every address read lies between the frame being unwound and a top known to be readable: on
 * the thread's own stack, the stack's top (its pages checked once, one syscall a page, see
 * stack_from); on any other (a coroutine's, an alternate signal stack), the highest page this
 * walk checked, every walk again.  A wrong rule can cut a stack short, or off the thread's own
 * stack read the memory mapped above as frames, but never read unmapped memory (short of
 * another thread unmapping it in the middle of a walk).  The sampler starts the walk in its
 * caller (lum_unwind_from), lum_unwind in its own; every frame's code address is then a return
 * address.  Building with -DLUM_UNWIND_VERIFY
 * checks every walk against libunwind's on stderr (the library then links libunwind). */
#define _GNU_SOURCE 1
#include <link.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include "obs_internal.h"
#include "unwind_memo.h"
#ifdef LUM_UNWIND_VERIFY
#define UNW_LOCAL_ONLY
#include <libunwind.h>
#endif

/* Held for reading while this library derives rules (cfi.c) or looks itself up, for writing by
 * fork's prepare handler (observe.c): no walking thread is half-way through the object cache,
 * or holds the file it reads tables from open, at a fork.  Without _dl_find_object, walks take
 * the loader's lock inside dl_iterate_phdr under it; that only keeps this library's walkers
 * from holding the loader's lock at a fork (glibc does not reset it in the child), not the
 * program's other threads, which is why a fork child then never calls dl_iterate_phdr from
 * here.  Recursive read locks are fine: glibc's default prefers readers. */
pthread_rwlock_t lum_unwind_fork_lock = PTHREAD_RWLOCK_INITIALIZER;

uint64_t lum_unwind_ns;
uint64_t lum_unwind_count, lum_unwind_frames;
LUM_SAMPLE_DATA uint64_t lum_unwind_hits_locked, lum_unwind_hit_frames_locked;
/* Serialises additions to the rule cache; reset in fork children by observe.c.  lock.h's lock,
 * not a pthread mutex: glibc's pthread_mutex_trylock dispatches on the mutex kind through a
 * jump table in libc's .rodata, and the first sample's read of it made a 64 KiB window of
 * libc's read-only data resident that the program never touches (bench churn: libc Rss
 * 1118 -> 1072 KiB, mean of 16 runs). */
lum_lock_t lum_unwind_rules_lock = LUM_LOCK_INIT;

/* lumalloc's own executable range when it is a separate object (liblumalloc.so, LD_PRELOAD):
 * leading frames inside it are allocator internals and are dropped.  When lumalloc is linked
 * into the executable (lumalloc_static) that range would cover the program too, so only the
 * frames up to the hook's caller are dropped (see skip_copy). */
static uintptr_t self_lo, self_hi;
int lum_self_state; /* 0: not yet looked up, 1: separate object, 2: inside the executable */

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
        __atomic_store_n(&lum_self_state, 2, __ATOMIC_RELEASE);
    } else {
        __atomic_store_n(&self_lo, lo, __ATOMIC_RELAXED);
        __atomic_store_n(&self_hi, hi, __ATOMIC_RELAXED);
        __atomic_store_n(&lum_self_state, 1, __ATOMIC_RELEASE);
    }
    return 1;
}

static void locate_self(void)
{
    struct dl_phdr_info info;
    lum_lock_order_check(&lum_unwind_fork_lock);
    pthread_rwlock_rdlock(&lum_unwind_fork_lock);
    /* The loader's index, not its lock (see cfi.c); dl_iterate_phdr where there is no index,
     * but not in a fork child (the generic skipping then). */
    if (lum_cfi_object_info((uintptr_t)&locate_self, &info)) {
        if (!find_self(&info, sizeof info, (void *)(uintptr_t)&locate_self))
            __atomic_store_n(&lum_self_state, 2, __ATOMIC_RELEASE);
    } else if (lum_cfi_forked || !dl_iterate_phdr(find_self, (void *)(uintptr_t)&locate_self)) {
        __atomic_store_n(&lum_self_state, 2, __ATOMIC_RELEASE);
    }
    pthread_rwlock_unlock(&lum_unwind_fork_lock);
}

void lum_unwind_preload(void)
{
    if (!__atomic_load_n(&lum_self_state, __ATOMIC_ACQUIRE))
        locate_self();
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

/* Drops lumalloc's own leading frames from the n frames in buf and copies at most max of the
 * rest to frames. */
static uint32_t skip_copy(const uint64_t *buf, int n, uint64_t *frames, uint32_t max, uintptr_t hook_ret)
{
    int start = 0;
    if (__atomic_load_n(&lum_self_state, __ATOMIC_ACQUIRE) == 1) {
        uintptr_t lo = __atomic_load_n(&self_lo, __ATOMIC_RELAXED), hi = __atomic_load_n(&self_hi, __ATOMIC_RELAXED);
        while (start < n && buf[start] >= lo && buf[start] < hi)
            start++;
    } else {
        /* Drop our own frames up to the return into the core (hook_ret) and that frame too,
         * the core's slow path: its entry point (malloc/calloc/...) stays as the innermost
         * frame, which reads well in reports. */
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


static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void unwind_account(bool timed, uint64_t t0, uint32_t walked)
{
    if (timed)
        __atomic_fetch_add(&lum_unwind_ns, (now_ns() - t0) * LUM_TIME_EVERY, __ATOMIC_RELAXED);
    __atomic_fetch_add(&lum_unwind_count, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&lum_unwind_frames, walked, __ATOMIC_RELAXED);
}

#if defined(__x86_64__)
/* Rule of one return address.  Entries are written once (fields, then ip with a release store)
 * and never changed, so readers need no lock: an ip read with acquire guards its fields. */
struct rule {
    uint64_t ip;       /* the key (rule_key): 0 is an empty slot */
    int32_t cfa_off;   /* CFA = (rbp or rsp) + cfa_off */
    int16_t rbp_off;   /* rbp saved at CFA + rbp_off; 0: rbp unchanged */
    uint8_t flags;
};
#define R_CFA_RBP 1u /* CFA from rbp, not rsp */
#define R_LAST 2u    /* the walk ends at this frame: outermost, or no rule of this form */
#define R_SELF 4u    /* inside liblumalloc.so (when it is a separate object) */

struct rtab {
    uint32_t shift;  /* 64 - log2(slots) */
    uint32_t used;   /* under rules_lock */
    uint32_t epoch;  /* the generations its rules were learnt in: gen >> 16 (rule keys hold the rest) */
    struct rule e[];
};
/* Starts at 64 slots (1 KiB: with the first stacks and records, one page of the arena): a
 * program's sampled stacks go through a few dozen distinct return addresses; rebuilt at 3/4
 * full.  A replaced table is left in place (a walk on another thread may be reading it); a
 * rebuilt table is at most half full, so the old ones come to at most 64 bytes a rule ever
 * learnt. */
#define RTAB_MIN_BITS 6
#define RTAB_MAX_BITS 20
static struct rtab *rtab;

/* A rule describes the code at its address while that code stays loaded: after a dlclose the
 * next dlopen often maps another object at the same address, and the old rule would read its
 * frames with the wrong offsets.  So the top 16 bits of a rule's key (user addresses stay below
 * 2^47; only code mapped above it on a 5-level-paging machine, by an explicit hint, could share
 * a key with another generation's) hold the generation of the loader's unload count it was
 * learnt in: a walk looks up only rules of the generation it started in, and a rebuilt table
 * keeps only those.  The table holds one epoch of 65536 generations (a process that loads and
 * unloads libraries in a loop gets there): a walk uses it only in that epoch, and the first rules
 * of the next start a table of their own, so that a tag that came round again never matches. */
static uint64_t rules_unloads; /* lum_cfi_unloads() when lum_rules_gen last moved */
LUM_SAMPLE_DATA4 uint32_t lum_rules_gen;

static inline uint64_t rule_key(uintptr_t ip, uint32_t gen)
{
    return (uint64_t)ip ^ ((uint64_t)(gen & 0xffffu) << 48);
}

/* The generation for a walk starting now, after a look at unloads (probe: lum_cfi_unloads,
 * which asks the loader's index again about each object rules were derived from) or as the last
 * look left it.  A look costs a _dl_find_object per such object (before the index, one
 * dl_iterate_phdr callback, ~370 instructions with its locks: ring +0.8 % instructions when
 * every sample looked), so walks look one in LUM_UNLOAD_EVERY per thread, and before every walk
 * that derives rules, when it is cheap next to the walk (a thorough look there: it also compares
 * the objects' bytes, which the periodic look does at most once in 10 ms).  The count is stored after the
 * generation moves, so a thread that sees the new count also sees the new generation (two
 * threads may both move it: a harmless extra step). */
static uint32_t rules_generation_look(bool thorough)
{
    uint64_t u = lum_cfi_unloads(thorough);
    if (u != __atomic_load_n(&rules_unloads, __ATOMIC_ACQUIRE)) {
        __atomic_fetch_add(&lum_rules_gen, 1, __ATOMIC_RELEASE);
        __atomic_store_n(&rules_unloads, u, __ATOMIC_RELEASE);
    }
    return __atomic_load_n(&lum_rules_gen, __ATOMIC_ACQUIRE);
}

/* the thorough look goes before a walk that may derive rules */
enum unload_look { LOOK_NONE, LOOK_PERIODIC, LOOK_THOROUGH };

static uint32_t rules_generation(enum unload_look look)
{
    if (look == LOOK_NONE)
        return __atomic_load_n(&lum_rules_gen, __ATOMIC_ACQUIRE);
    return rules_generation_look(look == LOOK_THOROUGH);
}

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

static struct rtab *rtab_new(uint32_t bits, uint32_t gen)
{
    struct rtab *t = lum_obs_alloc(sizeof *t + ((size_t)1 << bits) * sizeof(struct rule));
    if (t) {
        t->shift = 64 - bits;
        t->epoch = gen >> 16;
    }
    return t;
}

/* The rule table, if it holds generation gen's rules. */
static inline const struct rtab *rtab_for(uint32_t gen)
{
    const struct rtab *t = __atomic_load_n(&rtab, __ATOMIC_ACQUIRE);
    return t && t->epoch == gen >> 16 ? t : NULL;
}

/* Adds rules learnt by one walk of generation gen.  A busy lock just skips the learning. */
static void rules_learn(const struct rule *nr, int n, uint32_t gen)
{
    if (!n || !lum_trylock(&lum_unwind_rules_lock))
        return;
    struct rtab *t = rtab;
    if (t && t->epoch > gen >> 16)
        goto out; /* a walk that began before the epoch moved: its rules are of no more use */
    if ((!t || t->epoch != gen >> 16) && !(t = rtab_new(RTAB_MIN_BITS, gen)))
        goto out;
    for (int i = 0; i < n; i++) {
        uint32_t bits = 64 - t->shift;
        if ((uint64_t)(t->used + 1) * 4 > ((uint64_t)3 << bits)) {
            /* rebuilt with this generation's rules only, at most half full */
            size_t live = (size_t)(n - i);
            for (size_t j = 0; j < ((size_t)1 << bits); j++)
                live += t->e[j].ip && (t->e[j].ip >> 48) == (gen & 0xffffu);
            uint32_t nb = bits;
            while (live * 2 > ((size_t)1 << nb))
                nb++;
            struct rtab *g = nb <= RTAB_MAX_BITS ? rtab_new(nb, gen) : NULL;
            if (!g)
                break;
            for (size_t j = 0; j < ((size_t)1 << bits); j++)
                if (t->e[j].ip && (t->e[j].ip >> 48) == (gen & 0xffffu))
                    rule_put(g, &t->e[j]);
            t = g;
        }
        rule_put(t, &nr[i]);
    }
out:
    __atomic_store_n(&rtab, t, __ATOMIC_RELEASE);
    lum_unlock(&lum_unwind_rules_lock);
}

/* The stack run: [lum_memo.stack_lo, lum_memo.stack_hi), the part of this thread's own stack
 * (home_find) checked readable, from its top down to the deepest walk's start.  A thread's own
 * stack stays mapped while the thread runs, so the run is trusted from then on: a walk starting
 * in it reads only between its frame and the top with no check, and the memo of such a walk
 * stays good.  Any other stack (a coroutine's, stacks from mmap or the heap, an alternate signal
 * stack) may be unmapped, or another mapping put in its place, between two walks, and what lies
 * above it is whatever the program mapped next (the next stack of a pool): a walk there checks
 * every page it reads, each time, and neither the run nor the memo keeps anything of it. */
#define PAGE 4096u
/* at most this many pages checked by one walk */
#define REACH_PAGES 1024u

/* Whether the 8 bytes at a can be read, without touching them: rt_sigprocmask copies the new
 * set from user memory before it looks at `how`, so an invalid how fails with EFAULT on memory
 * that cannot be read and EINVAL otherwise, changing nothing (abseil's AddressIsReadable).
 * Only EINVAL counts: a seccomp filter that answers with another error proves nothing.  Raw,
 * so that errno is left alone. */
static bool readable(uintptr_t a)
{
    register long r10 __asm__("r10") = 8; /* sizeof the kernel's sigset_t */
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "0"((long)SYS_rt_sigprocmask), "D"(-1L), "S"(a), "d"(0L), "r"(r10)
                     : "rcx", "r11", "memory");
    return ret == -22; /* EINVAL */
}

extern void *__libc_stack_end __attribute__((weak)); /* ld.so's: the initial rsp, at argc */

/* How far into glibc's struct pthread (the TCB, at %fs:0) its stack block is looked for: the
 * words are at 0x690 of its 0x940 bytes in 2.36, and the bound leaves room for them to move. */
#define TCB_SCAN 0xa00u

/* This thread's own stack, once a thread: its TLS is set up afresh for a thread that reuses an
 * exited one's cached stack.  pthread_getattr_np allocates (and reads /proc/self/maps for the
 * main thread), so neither is usable here.  glibc puts the struct pthread at the top of a
 * thread's stack block, its own or the program's (pthread_attr_setstack), and keeps the block
 * there as the words stackblock, stackblock_size, guardsize, in a layout that moves between
 * releases: found by what they must be (a block around the TCB, whose top is at most 64 KiB
 * above it), the stack is [stackblock + guardsize, TCB).  The main thread's stackblock is NULL:
 * its stack is the kernel's, up to a page above argc (__libc_stack_end), down to RLIMIT_STACK
 * (at most 1 GiB taken); between the two only pages found readable from the top down join the
 * run, and the kernel keeps other mappings a guard gap away from its bottom.  Found neither way
 * (no such words, no __libc_stack_end): no stack is the thread's own, and every walk checks its
 * pages.  A thread that is not the main one but finds no block takes the main thread's stack,
 * which it never runs on: the same. */
static bool home_scan(uintptr_t tcb, uintptr_t from, uintptr_t end)
{
    for (const uintptr_t *w = (const uintptr_t *)from; (uintptr_t)(w + 3) <= end; w++) {
        uintptr_t b = w[0], s = w[1], g = w[2];
        /* the block holds the TCB and these very words, and ends at most 64 KiB above */
        if (b && !(b & 15) && s >= (16u << 10) && s < ((uintptr_t)1 << 40) && b < tcb && tcb - b < s &&
            b + s >= (uintptr_t)(w + 3) && b + s - tcb <= (64u << 10) && !(g & (PAGE - 1)) && g < tcb - b) {
            lum_memo.home_lo = b + g;
            lum_memo.home_hi = tcb;
            return true;
        }
    }
    return false;
}

static void home_find(void)
{
    lum_memo.home_known = 1;
    uintptr_t tcb;
    __asm__("movq %%fs:0, %0" : "=r"(tcb));
    /* the TCB's page is mapped (%fs:0 was just read there); the next only if found so, and
     * looked at only when needed: a glibc thread's TCB ends at the top of its block */
    uintptr_t end = (tcb | (PAGE - 1)) + 1;
    if (home_scan(tcb, tcb, end) ||
        (end - tcb < TCB_SCAN && readable(end) && home_scan(tcb, end - 16, tcb + TCB_SCAN)))
        goto found;
    if (!&__libc_stack_end || !__libc_stack_end)
        return;
    uintptr_t top = ((uintptr_t)__libc_stack_end + 8 + PAGE - 1) & ~(uintptr_t)(PAGE - 1);
    struct rlimit rl;
    uintptr_t depth = (uintptr_t)1 << 30;
    if (!getrlimit(RLIMIT_STACK, &rl) && rl.rlim_cur < depth)
        depth = (uintptr_t)rl.rlim_cur;
    lum_memo.home_lo = top > depth ? top - depth : PAGE;
    lum_memo.home_hi = top;
found:
    /* the run: the top's page, read above (the TCB's) or holding argc */
    lum_memo.stack_hi = lum_memo.home_hi;
    lum_memo.stack_lo = lum_memo.home_hi & ~(uintptr_t)(PAGE - 1);
}

/* Makes sp the start of a walk, whose reads are then bounded by *top: in the stack run (*home
 * set; the run grows down to sp when the pages between are readable, at most *budget checks),
 * or else in a run of this walk's own, its page (sp is the caller's frame: the thread runs on
 * it), grown by stack_reach as the walk reads higher. */
static void stack_from(uintptr_t sp, bool *home, uintptr_t *top, unsigned *budget)
{
    uintptr_t page = sp & ~(uintptr_t)(PAGE - 1);
    *home = true;
    *top = lum_memo.stack_hi;
    if (sp >= lum_memo.stack_lo && sp < lum_memo.stack_hi)
        return;
    if (!lum_memo.home_known) {
        home_find();
        *top = lum_memo.stack_hi;
        if (sp >= lum_memo.stack_lo && sp < lum_memo.stack_hi)
            return;
    }
    if (sp >= lum_memo.home_lo && sp < lum_memo.home_hi) {
        /* pages checked stay in the run even when the budget ends first: the next walk
         * goes on from there */
        uintptr_t a = lum_memo.stack_lo;
        while (a > page && *budget && readable(a - PAGE)) {
            --*budget;
            a -= PAGE;
        }
        lum_memo.stack_lo = a;
        if (a <= page)
            return;
    }
    *home = false;
    *top = page + PAGE;
}

/* Grows a walk's own run up to cover [.., end), checking each new page; *budget bounds the
 * syscalls one walk makes. */
static bool stack_reach(uintptr_t *top, uintptr_t end, unsigned *budget)
{
    uintptr_t hi = *top;
    while (hi < end) {
        if (!*budget || !readable(hi))
            break;
        --*budget;
        hi += PAGE;
    }
    *top = hi;
    return hi >= end;
}

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

/* The CFA rule r gives for the frame (sp, bp). */
static inline uintptr_t rule_cfa(const struct rule *r, uintptr_t sp, uintptr_t bp)
{
    return (r->flags & R_CFA_RBP ? bp : sp) + (uintptr_t)(intptr_t)r->cfa_off;
}

/* Applies r to the frame (*ip, *sp, *bp): 1 on to the caller, 0 at the end of the stack, -1
 * when a check fails.  Every word read lies in [*sp, top): the return address at CFA - 8 with
 * sp <= CFA - 8 and CFA <= top, the rbp slot at or above sp and below the CFA (cfi.c only
 * gives negative slots). */
static inline int rule_step(const struct rule *r, uintptr_t *ip, uintptr_t *sp, uintptr_t *bp,
                            uintptr_t top)
{
    unsigned f = r->flags;
    if (f & R_LAST)
        return 0;
    uintptr_t cfa = rule_cfa(r, *sp, *bp);
    if (cfa < *sp + 8 || cfa > top)
        return -1;
    if (r->rbp_off) {
        uintptr_t slot = cfa + (uintptr_t)(intptr_t)r->rbp_off;
        if (slot < *sp)
            return -1;
        *bp = *(const uintptr_t *)slot;
    }
    *ip = *(const uintptr_t *)(cfa - 8);
    *sp = cfa;
    return *ip != 0;
}

/* The memo (unwind_memo.h): recorded by rules_walk, its hit read inline by the sampler too. */
/* 64-aligned: the layout of struct lum_walk_memo counts its lines from here */
__thread struct lum_walk_memo lum_memo LUM_TLS __attribute__((aligned(64)));

uint64_t lum_unwind_timed_begin(void)
{
    uint64_t t0 = now_ns();
    return t0 ? t0 : 1;
}

void lum_unwind_timed_end(uint64_t t0)
{
    __atomic_fetch_add(&lum_unwind_ns, (now_ns() - t0) * LUM_TIME_EVERY, __ATOMIC_RELAXED);
}

#if defined(__x86_64__)
/* Loads of this thread's lum_memo at offset off, as %fs:(tpoff + off): GCC forms a pointer to a
 * thread-local array it indexes in a loop, reading the thread pointer at %fs:0 first (the TCB's
 * line, which nothing else on malloc's paths reads: a cache miss a sample). */
#define MEMO_AT(type, suffix, scale, tpoff, off, i)                                                  \
    ({                                                                                             \
        type v_;                                                                                   \
        __asm__("mov" suffix " %%fs:%c3(%1,%2," #scale "), %0"                                     \
                : "=r"(v_)                                                                         \
                : "r"(tpoff), "r"((uintptr_t)(i)), "i"(off));                                      \
        v_;                                                                                        \
    })
bool lum_memo_holds_at(uintptr_t sp)
{
    uintptr_t t;
    __asm__("movq lum_memo@gottpoff(%%rip), %0" : "=r"(t));
    const uint32_t nret = lum_memo.nret, nb = lum_memo.nb;
    for (uint32_t i = 0; i < nret; i++)
        if (*(const uintptr_t *)(sp + MEMO_AT(uint32_t, "l", 4, t, offsetof(struct lum_walk_memo, roff), i)) !=
            MEMO_AT(uint64_t, "q", 8, t, offsetof(struct lum_walk_memo, frames) + 8, i))
            return false;
    for (uint32_t i = 0; i < nb; i++)
        if (*(const uintptr_t *)(sp + MEMO_AT(uint32_t, "l", 4, t, offsetof(struct lum_walk_memo, boff), i)) !=
            MEMO_AT(uint64_t, "q", 8, t, offsetof(struct lum_walk_memo, bval), i))
            return false;
    return true;
}
#undef MEMO_AT
#else
bool lum_memo_holds_at(uintptr_t sp)
{
    for (uint32_t i = 0; i < lum_memo.nret; i++)
        if (*(const uintptr_t *)(sp + lum_memo.roff[i]) != lum_memo.frames[i + 1])
            return false;
    for (uint32_t i = 0; i < lum_memo.nb; i++)
        if (*(const uintptr_t *)(sp + lum_memo.boff[i]) != lum_memo.bval[i])
            return false;
    return true;
}
#endif

/* Walks from the frame (ip, sp, bp) with cached rules only, into out[] (at most max frames).
 * With skip_self, the leading frames inside lumalloc (R_SELF) are walked but not stored.  The
 * number of frames stored, or -1 on the first address without a rule or the first check that
 * fails (the full walk then takes it); *walked counts every frame walked.  When the frames
 * stored are this thread's lum_memo's, *seq is set to the lum_memo's recording (lum_memo.seq). */
static int rules_walk(uintptr_t ip, uintptr_t sp, uintptr_t bp, uint64_t *out, uint32_t max,
                      bool skip_self, uint32_t *walked, uint32_t gen, uint64_t *seq)
{
    const struct rtab *t = rtab_for(gen);
    const uintptr_t top = lum_memo.stack_hi;
    if (!t || sp >= top || sp < lum_memo.stack_lo)
        return -1;
    /* a local copy, so that the stores into out[] do not make the compiler reload it */
    const struct rules_view v = {t->e, t->shift, SIZE_MAX >> t->shift};
    uint32_t n = 0, d = 0;
    const struct rule *r;
    /* lumalloc's own leading frames: walked, not stored.  Known by address, as rule_derive
     * marks them (R_SELF), so that a lum_memo hit needs no rule for the key frame. */
    if (skip_self) {
        const uintptr_t lo = __atomic_load_n(&self_lo, __ATOMIC_RELAXED), hi = __atomic_load_n(&self_hi, __ATOMIC_RELAXED);
        while (ip >= lo && ip < hi) {
            if (++n > LUM_UNWIND_SLACK)
                return -1; /* not a stack we expect: the full walk and the generic skipping decide */
            if (!(r = rule_find(&v, rule_key(ip, gen))))
                return -1;
            int st = rule_step(r, &ip, &sp, &bp, top);
            if (st <= 0) {
                *walked = n;
                return st < 0 ? -1 : 0;
            }
        }
    }
    /* A walk nested in another's recording (a signal handler's) neither reads nor records
     * the lum_memo: it takes the full walk.  A scratch copy of the memo here cost every
     * sample 1.3 KiB more stack (in many a thread a page more resident) for so rare a case. */
    struct lum_walk_memo *m = &lum_memo;
    if (m->busy)
        return -1;
    m->busy = 1;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    if (m->key == lum_memo_key(gen, max, skip_self) && m->ip == ip && m->sp == sp &&
        (!m->uses_bp || m->bp == bp) && m->top <= top && lum_memo_holds(m, sp, out)) {
        d = m->d;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        m->busy = 0;
        *walked = n + d;
        *seq = lum_memo.seq;
        lum_memo.hits++;
        return (int)d;
    }
    m->key = 0;
    if (!(r = rule_find(&v, rule_key(ip, gen))))
        goto fail;
    const uintptr_t kip = ip, ksp = sp, kbp = bp;
    /* Only the saved rbp words that a later CFA reads are checked on a hit: bsrc is the one
     * the current bp came from (-1: the key's bp), need the ones read. */
    uint32_t nret = 0, nb = 0, need = 0;
    int bsrc = -1;
    bool uses_bp = false;
    int res;
    for (;;) {
        m->frames[d] = ip;
        out[d++] = ip;
        n++;
        if (d >= max)
            break;
        /* rule_step, noting what it reads */
        unsigned f = r->flags;
        if (f & R_LAST)
            break;
        if (f & R_CFA_RBP) {
            if (bsrc < 0)
                uses_bp = true;
            else if (bsrc < MEMO_RBP)
                need |= 1u << bsrc;
        }
        uintptr_t cfa = rule_cfa(r, sp, bp);
        if (cfa < sp + 8 || cfa > top)
            goto fail;
        if (r->rbp_off) {
            uintptr_t slot = cfa + (uintptr_t)(intptr_t)r->rbp_off;
            if (slot < sp)
                goto fail;
            bp = *(const uintptr_t *)slot;
            if (nb < MEMO_RBP) {
                m->boff[nb] = (uint32_t)(slot - ksp);
                m->bval[nb] = bp;
            }
            bsrc = (int)nb++;
        }
        ip = *(const uintptr_t *)(cfa - 8);
        sp = cfa;
        m->roff[nret++] = (uint32_t)(cfa - 8 - ksp);
        if (!ip) {
            m->frames[d] = 0;
            break;
        }
        if (!(r = rule_find(&v, rule_key(ip, gen))))
            goto fail;
    }
    *walked = n;
    res = (int)d;
    /* offsets kept in 32 bits: a walk reaching further is not remembered */
    if (nb <= MEMO_RBP && sp - ksp <= UINT32_MAX) {
        uint32_t kept = 0;
        for (uint32_t i = 0; i < nb; i++)
            if (need & (1u << i)) {
                m->boff[kept] = m->boff[i];
                m->bval[kept++] = m->bval[i];
            }
        nb = kept;
        m->ip = kip, m->sp = ksp, m->bp = kbp, m->top = sp;
        m->d = d, m->nret = nret, m->nb = nb;
        m->uses_bp = uses_bp;
        m->key = lum_memo_key(gen, max, skip_self);
        *seq = ++lum_memo.seq;
    }
    goto out;
fail:
    res = -1;
out:
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    m->busy = 0;
    return res;
}

/* The rule of ip from the call frame information, keyed for generation gen. */
static struct rule rule_derive(uintptr_t ip, uint32_t gen, struct lum_cfi_files *files)
{
    struct lum_cfi_rule c;
    int k = lum_cfi_rule_with(files, ip, &c);
    unsigned self = lum_self_state == 1 && ip >= self_lo && ip < self_hi ? R_SELF : 0;
    struct rule r = {.ip = rule_key(ip, gen), .flags = (uint8_t)self};
    if (k != LUM_CFI_OK) {
        r.flags |= R_LAST;
        return r;
    }
    r.cfa_off = c.cfa_off;
    r.rbp_off = c.rbp_off;
    if (c.cfa_rbp)
        r.flags |= R_CFA_RBP;
    return r;
}

/* The walk that takes any stack: cached rules where there are, derived ones elsewhere (and
 * learnt), stack pages checked as it goes.  Every frame into buf, at most max.  noinline: its
 * learnt rules stay off the stack of the cached walk. */
static __attribute__((noinline)) int full_walk(uintptr_t ip, uintptr_t sp, uintptr_t bp, uint64_t *buf, int keep,
                                               int max, bool skip_self, uint32_t *walked, uint32_t gen)
{
    /* Learnt in batches of LEARN: the rules of a whole walk (76 frames, 1.2 KiB) on the stack
     * took a new thread's first sample (always a full walk: it has no stack run yet) a page
     * deeper in many a thread. */
    enum { LEARN = 16 };
    struct rule nr[LEARN];
    struct lum_cfi_files files = LUM_CFI_FILES_INIT;
    int nn = 0, n = 0;
    unsigned budget = REACH_PAGES;
    int d = 0;
    const uintptr_t lo = skip_self ? __atomic_load_n(&self_lo, __ATOMIC_RELAXED) : 0,
                    hi = skip_self ? __atomic_load_n(&self_hi, __ATOMIC_RELAXED) : 0;
    *walked = 0;
    bool home;
    uintptr_t top;
    stack_from(sp, &home, &top, &budget);
    const struct rtab *t = rtab_for(gen);
    struct rules_view v = {0};
    if (t)
        v = (struct rules_view){t->e, t->shift, SIZE_MAX >> t->shift};
    while (ip && n < max) {
        n++;
        /* lumalloc's own leading frames (skip_self): walked, not stored */
        if (ip >= lo && ip < hi) {
            if (!d)
                goto step;
        }
        buf[d++] = ip;
        if (d >= keep)
            break;
    step:
        if (n >= max)
            break;
        const struct rule *r = t ? rule_find(&v, rule_key(ip, gen)) : NULL;
        if (!r) {
            if (nn == LEARN) {
                rules_learn(nr, nn, gen);
                nn = 0;
            }
            nr[nn] = rule_derive(ip, gen, &files);
            r = &nr[nn++];
        }
        if (r->flags & R_LAST)
            break;
        uintptr_t cfa = rule_cfa(r, sp, bp);
        /* the stack run ends at the top of the thread's stack: nothing above it is read */
        if (cfa < sp + 8 || (cfa > top && (home || !stack_reach(&top, cfa, &budget))))
            break;
        if (rule_step(r, &ip, &sp, &bp, top) <= 0)
            break;
    }
    lum_cfi_files_close(&files);
    rules_learn(nr, nn, gen);
    *walked = (uint32_t)n;
    return d;
}

/* The cached walk from (ip, sp, bp) into frames[], lumalloc's own frames dropped; -1 when the
 * cache cannot take it.  As a separate object, lumalloc's frames are known by address and are
 * skipped as the walk goes; linked into the program, the generic skipping needs the whole walk
 * (in buf). */
static __attribute__((noinline)) int cached_walk_linked(uintptr_t ip, uintptr_t sp, uintptr_t bp,
                                                        uint64_t *frames, uint32_t max,
                                                        uintptr_t hook_ret, uint32_t *walked, uint32_t gen)
{
    uint64_t buf[LUM_MAX_FRAMES + LUM_UNWIND_SLACK];
    uint64_t seq = 0; /* buf's frames, not frames': not passed on */
    int got = rules_walk(ip, sp, bp, buf, max + LUM_UNWIND_SLACK, false, walked, gen, &seq);
    return got < 0 ? -1 : (int)skip_copy(buf, got, frames, max, hook_ret);
}

static inline int cached_walk(uintptr_t ip, uintptr_t sp, uintptr_t bp, uint64_t *frames, uint32_t max,
                              uintptr_t hook_ret, uint32_t *walked, uint32_t gen, uint64_t *seq)
{
    if (__atomic_load_n(&lum_self_state, __ATOMIC_ACQUIRE) == 1)
        return rules_walk(ip, sp, bp, frames, max, true, walked, gen, seq);
    return cached_walk_linked(ip, sp, bp, frames, max, hook_ret, walked, gen);
}

/* Linked into the program, lumalloc's frames are found by the generic skipping, which needs
 * the whole walk (in buf). */
static __attribute__((noinline)) uint32_t full_unwind_linked(uint64_t *frames, uint32_t max, uintptr_t ip,
                                                             uintptr_t sp, uintptr_t bp, uintptr_t hook_ret,
                                                             uint32_t *walked, uint32_t gen)
{
    uint64_t buf[LUM_MAX_FRAMES + LUM_UNWIND_SLACK];
    int n = full_walk(ip, sp, bp, buf, (int)(max + LUM_UNWIND_SLACK), (int)(max + LUM_UNWIND_SLACK), false,
                      walked, gen);
    return skip_copy(buf, n, frames, max, hook_ret);
}

/* As a separate object, lumalloc's frames are known by address and skipped as the walk goes,
 * the rest stored straight into frames: no buffer of the whole walk on the stack of a thread's
 * first sample (always a full walk). */
static __attribute__((noinline)) uint32_t full_unwind(uint64_t *frames, uint32_t max, uintptr_t ip, uintptr_t sp,
                                                      uintptr_t bp, uintptr_t hook_ret, uint32_t *walked,
                                                      uint32_t gen)
{
    if (!__atomic_load_n(&lum_self_state, __ATOMIC_ACQUIRE))
        locate_self(); /* racing first samples may both look: they find the same answer */
    if (__atomic_load_n(&lum_self_state, __ATOMIC_ACQUIRE) == 1)
        return (uint32_t)full_walk(ip, sp, bp, frames, (int)max, (int)(max + LUM_UNWIND_SLACK), true, walked,
                                   gen);
    return full_unwind_linked(frames, max, ip, sp, bp, hook_ret, walked, gen);
}
#endif

#ifdef LUM_UNWIND_VERIFY
/* libunwind's walk of the same stack, lumalloc's frames dropped the same way, on stderr when it
 * differs.  Ours ends at a signal frame where libunwind's goes on: only a prefix is checked
 * then. */
static __attribute__((noinline)) void verify(const uint64_t *frames, uint32_t got, uint32_t max, uintptr_t hook_ret)
{
    uint64_t buf[LUM_MAX_FRAMES + LUM_UNWIND_SLACK + 8], chk[LUM_MAX_FRAMES];
    int m = unw_backtrace((void **)buf, (int)(sizeof buf / sizeof buf[0]));
    uint32_t dm = skip_copy(buf, m, chk, max, hook_ret);
    if (dm == got && !memcmp(chk, frames, dm * sizeof *chk))
        return;
    char msg[160];
    int l = snprintf(msg, sizeof msg, "lum_unwind verify: ours %u frames, libunwind %u\n", got, dm);
    lum_write_all(2, msg, (size_t)l);
    for (uint32_t i = 0; i < got || i < dm; i++) {
        l = snprintf(msg, sizeof msg, "  %2u %#lx %#lx\n", i, (unsigned long)(i < got ? frames[i] : 0),
                     (unsigned long)(i < dm ? chk[i] : 0));
        lum_write_all(2, msg, (size_t)l);
    }
}
#endif

uint32_t lum_unwind_from(uint64_t *frames, uint32_t max, uintptr_t ip, uintptr_t sp, uintptr_t bp,
                         uintptr_t hook_ret, uint64_t *same)
{
    uint64_t seq = 0;
    if (max > LUM_MAX_FRAMES)
        max = LUM_MAX_FRAMES;
    if (!max)
        return 0;
#if defined(__x86_64__)
    uint32_t n = lum_memo.unwinds++;
    bool timed = n % LUM_TIME_EVERY == 0, look = n % LUM_UNLOAD_EVERY == 0;
    uint64_t t0 = timed ? now_ns() : 0;
    uint32_t walked = 0, gen = rules_generation(look ? LOOK_PERIODIC : LOOK_NONE);
    int got = -1;
    if (__atomic_load_n(&lum_self_state, __ATOMIC_ACQUIRE))
        got = cached_walk(ip, sp, bp, frames, max, hook_ret, &walked, gen, &seq);
    if (got < 0)
        seq = 0, got = (int)full_unwind(frames, max, ip, sp, bp, hook_ret, &walked, rules_generation(LOOK_THOROUGH));
    unwind_account(timed, t0, walked);
#ifdef LUM_UNWIND_VERIFY
    verify(frames, (uint32_t)got, max, hook_ret);
#endif
    if (same)
        *same = seq;
    return (uint32_t)got;
#else
    if (same)
        *same = 0;
    (void)frames, (void)ip, (void)sp, (void)bp, (void)hook_ret;
    return 0; /* the rule form and the reader are x86-64's */
#endif
}

/* noinline, with a frame of its own: the walk starts in its caller, at the return address. */
__attribute__((noinline)) uint32_t lum_unwind(uint64_t *frames, uint32_t max, uintptr_t hook_ret)
{
    const uintptr_t *fp = __builtin_frame_address(0);
    /* gcc gives this function a standard frame (see lum_on_sample): the caller's rbp at fp[0],
     * the return address at fp[1], the caller's rsp at the call at fp + 2 */
    if (fp[1] != (uintptr_t)__builtin_return_address(0))
        return 0;
    return lum_unwind_from(frames, max, fp[1], (uintptr_t)(fp + 2), fp[0], hook_ret, NULL);
}
