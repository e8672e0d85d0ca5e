/* The malloc family: fast paths here, everything else in heap.c.  Each function exists twice:
 * lum_* (always lumalloc's) and the standard name (an alias, so linking or LD_PRELOAD makes
 * lumalloc the process allocator). */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "internal.h"
#include "observe.h"
#include "options.h"
#include "lumalloc.h"

#define ALIAS(name) __attribute__((alias(name), visibility("default")))

/* GCC 12 keeps the heap pointer in %rax, where its TLS load put it, and the block in another
 * register, which cost a mov before each ret of malloc's fast path.  The block bound to %rax
 * where it is returned has the allocator give the heap another register: an empty asm, no
 * instruction (20 instead of 21 on the cache path, and the page path returns by itself).
 * malloc's only (`in_rax`): calloc, whose block goes on to memset, gains two movs from it. */
#if defined(__x86_64__)
#define IN_RETURN_REG(b) __asm__("" : "+a"(b))
#else
#define IN_RETURN_REG(b) ((void)0)
#endif

static inline __attribute__((always_inline)) void *alloc_small_fast(size_t size, bool in_rax)
{
    struct lum_heap *heap = lum_tls_heap;
    /* 64-bit, and in the third argument's register: it indexes the tables as it is and goes to
     * lum_malloc_sample with heap and size where they are (as unsigned, GCC copied it into
     * another register first, on the fast path). */
    size_t cls;
    if (LUM_LIKELY(size <= LUM_SMALL_TABLE_MAX))
        cls = heap->slot_class[(size + LUM_ALIGN - 1) / LUM_ALIGN];
    else if (size <= LUM_MEDIUM_TABLE_MAX && size < lum_fast_limit_get())
        cls = lum_medium_class[(size + LUM_MEDIUM_STEP - 1) / LUM_MEDIUM_STEP];
    else if (size < lum_fast_limit_get())
        cls = lum_size_class(size);
    else
        return lum_malloc_slow(size, 0);
    lum_block *b = heap->cache[cls];
    uint32_t bs = heap->class_size[cls];
    /* The sampling countdown's subtraction is its test (lum_malloc_sample gives the bytes back
     * where it does not sample); the exact counter moves only with a block handed out, so a
     * reader in another process never sees one that was not. */
    if (LUM_LIKELY(b != NULL)) {
        if (LUM_UNLIKELY((heap->sample_left -= bs) < 0)) return lum_malloc_sample(size, heap, cls);
        LUM_OWN_ADD(heap->tc.alloc_bytes, bs);
        LUM_OWN_SET(heap->cache[cls], b->next);
        LUM_OWN_ADD(heap->cache_room[cls], 1);
        LUM_OWN_ADD(heap->tc.alloc_count, 1);
        if (in_rax) IN_RETURN_REG(b);
        return b;
    }
    /* The two tests each have their own way out, at no cost here.  An exhausted page first:
     * lum_malloc_slow also samples. */
    struct lum_page *page = heap->current[cls];
    b = page->free;
    if (LUM_UNLIKELY(b == NULL)) return lum_malloc_slow(size, 0);
    if (LUM_UNLIKELY((heap->sample_left -= bs) < 0)) return lum_malloc_sample(size, heap, cls);
    LUM_OWN_ADD(heap->tc.alloc_bytes, bs);
    page->free = lum_free_next(page, b);
    lum_block_handed_out(b);
    LUM_OWN_ADD(page->used, 1);
    LUM_OWN_ADD(heap->tc.alloc_count, 1);
    if (in_rax) IN_RETURN_REG(b);
    return b;
}

LUM_EXPORT void *lum_malloc(size_t size)
{
    return alloc_small_fast(size, true);
}

void lum_heap_free_run_check(struct lum_heap *heap, struct lum_page *page, void *p);

static inline void free_fast(void *p)
{
    struct lum_page *page = lum_page_of(p);
    struct lum_heap *heap = lum_tls_heap;
    if (LUM_LIKELY(lum_page_fast_is(page, heap))) {
        LUM_OWN_ADD(heap->tc.free_count, 1);
        LUM_OWN_ADD(heap->tc.free_bytes, page->block_size);
#if !LUM_HARDENED /* the cache's links are plain: hardened builds keep every free on its page */
        unsigned cls = page->cls;
        /* Decrement first: the borrow out of 0 is the test, one instruction fewer than a
         * compare before the decrement. */
        if (LUM_LIKELY(LUM_OWN_SUB(heap->cache_room[cls], 1) >= 0)) {
            ((lum_block *)p)->next = heap->cache[cls];
            LUM_OWN_SET(heap->cache[cls], p);
            return;
        }
        LUM_OWN_SET(heap->cache_room[cls], 0);
        /* one in 256 frees past a full cache looks for a run of frees with no malloc */
        if (LUM_UNLIKELY(LUM_OWN_SUB(heap->free_run_tick, 1) == 0)) {
            lum_heap_free_run_check(heap, page, p);
            return;
        }
#endif
        lum_page_free_own(heap, page, p);
        return;
    }
    lum_free_slow(p, page);
}

LUM_EXPORT void lum_free(void *p)
{
    if (LUM_LIKELY(p != NULL)) free_fast(p);
}

LUM_EXPORT size_t lum_malloc_usable_size(const void *p)
{
    if (!p) return 0;
    struct lum_page *page = lum_page_of(p);
    if (page->kind == LUM_PAGE_LARGE) return lum_large_usable(p);
    if (page->kind == LUM_PAGE_INVALID) return 0;
#if LUM_HARDENED
    lum_hardened_check_block(page, p, "malloc_usable_size of an address inside a block:",
                             "malloc_usable_size of a freed block");
#endif
    return page->block_size;
}

/* free_sized / free_aligned_sized (C23): lookup by address is as cheap as trusting the size;
 * the hardened library checks it against the block (no more than it holds: an aligned or a
 * sampled block, or one realloc left in place, may hold more than was asked for). */
static inline void check_size(const void *p, size_t size)
{
#if LUM_HARDENED
    if (p && size > lum_malloc_usable_size(p))
        lum_hardened_fail("free_sized with a size larger than the block at", p, lum_malloc_usable_size(p));
#else
    (void)p;
    (void)size;
#endif
}

LUM_EXPORT void lum_free_sized(void *p, size_t size)
{
    check_size(p, size);
    lum_free(p);
}

LUM_EXPORT void lum_free_aligned_sized(void *p, size_t alignment, size_t size)
{
    (void)alignment;
    check_size(p, size);
    lum_free(p);
}

/* count * size overflowed: a failure like any other (probe, count, report, abort), the report
 * naming both (the SIZE_MAX passed on names no request). */
static LUM_NOINLINE void *overflowed(size_t count, size_t size)
{
    lum_diag_note_overflow(count, size);
    void *p = lum_alloc_failed(lum_heap_get(), SIZE_MAX, 0, ENOMEM);
    lum_diag_note_overflow(0, 0);
    return p;
}

/* calloc of a block carved alone (4 KiB and up): when the allocation carved it from memory
 * no block had used, only the bytes that may hold data are cleared (lum_page_refill): the rest
 * stays untouched, not resident, as glibc's calloc leaves fresh memory.  Any other block (one
 * freed before, the heap's, a sampled one) is cleared whole. */
static LUM_NOINLINE void *calloc_fresh(size_t bytes)
{
    lum_tls_fresh.block = NULL; /* a carve before this allocation says nothing about its block */
    void *p = alloc_small_fast(bytes, false);
    if (LUM_UNLIKELY(p == NULL)) return NULL;
    size_t clear = bytes;
    if (p == lum_tls_fresh.block && lum_tls_fresh.dirty < bytes) clear = lum_tls_fresh.dirty;
    lum_tls_fresh.block = NULL;
    memset(p, 0, clear);
    return p;
}

LUM_EXPORT void *lum_calloc(size_t count, size_t size)
{
    size_t bytes;
    if (LUM_UNLIKELY(__builtin_mul_overflow(count, size, &bytes))) return overflowed(count, size);
    struct lum_heap *heap = lum_tls_heap;
    if (bytes > lum_opt.large_threshold && bytes <= PTRDIFF_MAX) {
        /* A thread's (or the process's) first allocation: its heap first, or the slow path
         * mapped the block and the memset below faulted all of it in (calloc(1, 2 GiB): 2 GiB
         * resident, glibc 1 MiB) */
        if (heap == &lum_empty_heap) heap = lum_heap_get_unless_exited();
        if (heap && heap != &lum_empty_heap) {
            if (LUM_UNLIKELY(lum_fail_injected(heap, bytes))) return lum_alloc_failed(heap, bytes, 0, ENOMEM);
            /* fresh mappings are already zero: only a recycled one is cleared */
            return lum_large_alloc_or_fail(heap, bytes, 0, true);
        }
    }
    if (bytes >= 4096) return calloc_fresh(bytes);
    void *p = alloc_small_fast(bytes, false);
    if (LUM_LIKELY(p != NULL)) memset(p, 0, bytes);
    return p;
}

LUM_EXPORT void *lum_realloc(void *p, size_t size)
{
    if (!p) return lum_malloc(size);
    if (size == 0) {
        /* glibc frees and returns NULL here; programs written for it rely on that */
        lum_free(p);
        return NULL;
    }
    struct lum_page *page = lum_page_of(p);
    size_t old, fit, want = size;
#if LUM_HARDENED
    /* before the block is kept or copied from: a freed one kept in place had two owners */
    if (page->kind == LUM_PAGE_INVALID) lum_hardened_fail("realloc of an address no allocation returned:", p, 0);
    if (page->kind != LUM_PAGE_LARGE)
        lum_hardened_check_block(page, p, "invalid realloc (not the start of a block) at", "realloc of a freed block");
#endif
    if (page->kind == LUM_PAGE_LARGE) {
        old = lum_large_usable(p);
        /* growth is an allocation like any other for the failure injector (lum_large_realloc
         * may move or map more) */
        if (LUM_UNLIKELY(lum_fail_is_armed()) && size > old && lum_fail_should_inject(size))
            return lum_alloc_failed(lum_heap_get(), size, 0, ENOMEM);
        if (size <= PTRDIFF_MAX) {
            void *q = lum_large_realloc(p, size);
            if (q) return q;
        }
        /* Copied (always, in the hardened library: mremap cannot move its guard pages), growth
         * by small steps copied the whole block at every step: an 8 MiB buffer grown 4 KiB at a
         * time took 3 s, awk on a 30 MB line 44 s.  Half as much again leaves room for the
         * next steps, the room untouched (not resident) until written. */
        if (size > old && size - old < old / 2) want = old + old / 2;
        fit = old;
    } else {
        old = page->block_size;
        /* A sampled block sits in a bigger class than its own (lum_sampled_size), recorded as
         * `usable`: it stays or moves as that class's block would.  Kept wherever it fits, it
         * stayed where its unsampled siblings moved and were sampled again, and the profile
         * counted such blocks twice (in-use objects 2x the truth for malloc(300) grown to 500). */
        fit = old;
        unsigned fit_cls = page->cls;
        if (page->kind == LUM_PAGE_SAMPLED) {
            uint64_t own = lum_sampled_rec(page, p)->usable; /* 0: taken unsampled, no record */
            if (own > 1 && own < old) {
                fit = own;
                fit_cls = lum_size_class(own);
            }
        }
        /* same class, or shrinking by less than half: stay put */
        if (size <= fit && (size >= fit / 2 || fit <= 16 ||
                            (size <= LUM_SMALL_TABLE_MAX && lum_size_class(size) == fit_cls)))
            return p;
        /* Growth by small steps (CPython's lists add an eighth, its string and bytes writers a
         * quarter) crosses a size class almost every time, and each crossing copied the whole
         * block, where glibc mostly extends in place: in the bench's python3 run (pymalloc
         * sends blocks over 512 B here) that was 4x the bytes copied, +1.2 M L1 and +60 k LL
         * misses.  Half as much again as the old block leaves room for the next steps; growth
         * by doubling (redis, sqlite) is not padded, nor blocks under 1 KiB (many and small). */
        if (size > fit && fit >= LUM_SMALL_TABLE_MAX && size - fit < fit / 2 &&
            fit + fit / 2 < lum_fast_limit_get())
            want = fit + fit / 2;
    }
    void *q;
    struct lum_heap *heap = lum_tls_heap;
    /* a block alone on its page (over 64 KiB) grows into the free slices after it, if any:
     * no copy, and only what it adds is new memory (lum_heap_grow_block) */
    if (size > fit && old > LUM_SLICE_SIZE && heap != &lum_empty_heap && lum_heap_grow_block(heap, page, want, size))
        return p;
    if (want != size && heap != &lum_empty_heap) {
        /* samples, warnings and failure reports show the size asked for, not the padding */
        heap->pad_want = want;
        heap->pad_asked = size;
        heap->padding = true;
        q = lum_malloc(want);
        heap->padding = false;
        heap->pad_want = heap->pad_asked = 0;
    } else {
        q = lum_malloc(want);
    }
    if (!q) return NULL; /* the old block stays valid, as C requires */
    memcpy(q, p, old < size ? old : size);
    lum_free(p);
    return q;
}

LUM_EXPORT void *lum_reallocarray(void *p, size_t count, size_t size)
{
    size_t bytes;
    if (__builtin_mul_overflow(count, size, &bytes)) return overflowed(count, size);
    return lum_realloc(p, bytes);
}

static inline bool is_pow2(size_t x) { return x && !(x & (x - 1)); }

static void *aligned(size_t alignment, size_t size)
{
    if (alignment <= LUM_ALIGN) return lum_malloc(size);
    return lum_malloc_slow(size, alignment);
}

LUM_EXPORT void *lum_memalign(size_t alignment, size_t size)
{
    /* glibc rounds a non-power-of-two alignment up rather than failing */
    if (!is_pow2(alignment)) {
        if (alignment > ((size_t)1 << 62)) return lum_alloc_failed(lum_heap_get(), size, alignment, EINVAL);
        size_t a = 1;
        while (a < alignment) a <<= 1;
        alignment = a;
    }
    return aligned(alignment, size);
}

LUM_EXPORT int lum_posix_memalign(void **out, size_t alignment, size_t size)
{
    int saved = errno;
    if (!is_pow2(alignment) || alignment % sizeof(void *)) {
        /* a failure like aligned_alloc's (probe, count, report), but errno as it was: glibc's
         * posix_memalign only returns the error */
        lum_alloc_failed(lum_heap_get(), size, alignment, EINVAL);
        errno = saved;
        return EINVAL;
    }
    void *p = aligned(alignment, size);
    if (!p) {
        int err = errno;
        errno = saved;
        return err ? err : ENOMEM;
    }
    *out = p;
    return 0;
}

LUM_EXPORT void *lum_aligned_alloc(size_t alignment, size_t size)
{
    if (!is_pow2(alignment)) /* a failure (probe, report), as the contract counts EINVAL */
        return lum_alloc_failed(lum_heap_get(), size, alignment, EINVAL);
    return aligned(alignment, size);
}

LUM_EXPORT void *lum_valloc(size_t size)
{
    return aligned((size_t)sysconf(_SC_PAGESIZE), size);
}

LUM_EXPORT void *lum_pvalloc(size_t size)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t rounded = (size + page - 1) & ~(page - 1);
    if (rounded < size) /* reported as asked */
        return lum_alloc_failed(lum_heap_get(), size, page, ENOMEM);
    return aligned(page, rounded ? rounded : page);
}

LUM_EXPORT size_t lum_purge(void)
{
    if (lum_tls_heap != &lum_empty_heap) {
        lum_heap_cache_flush(lum_tls_heap); /* its pages may empty */
        lum_heap_release_empty(lum_tls_heap);
    }
    size_t released = lum_large_cache_purge();
    lum_sampled_purge(true);
    lum_abandoned_reclaim(true);
    released += lum_segments_purge(true, LUM_PURGE_EXPLICIT);
    return released;
}

LUM_EXPORT int lum_malloc_trim(size_t pad)
{
    (void)pad;
    return lum_purge() > 0;
}

LUM_EXPORT struct mallinfo2 lum_mallinfo2(void)
{
    struct mallinfo2 mi;
    memset(&mi, 0, sizeof mi);
    const struct lum_global_counters_v1 *g = &lumalloc_registry.global;
    lum_lock(&lum_heaps_lock);
    /* under the lock heap_create folds a reused record's figures into these with */
    uint64_t alloc = LUM_PEEK(g->exited_alloc_bytes), freed = LUM_PEEK(g->exited_free_bytes);
    for (struct lum_thread_counters_v1 *tc = (void *)(uintptr_t)lumalloc_registry.threads_head; tc;
         tc = (void *)(uintptr_t)tc->next) {
        alloc += LUM_PEEK(tc->alloc_bytes); /* the owners' counters: counter.h */
        freed += LUM_PEEK(tc->free_bytes);
    }
    lum_unlock(&lum_heaps_lock);
    size_t live = alloc > freed ? (size_t)(alloc - freed) : 0;
    uint64_t resident = LUM_PEEK(g->resident_bytes), mapped = LUM_PEEK(g->mapped_bytes);
    size_t large = LUM_PEEK(g->large_live_bytes);
    /* glibc's fields: large blocks (its mmapped chunks) in hblkhd only, so that programs that
     * add uordblks and hblkhd (or arena and hblkhd) count them once */
    mi.arena = mapped > large ? mapped - large : 0;
    mi.hblkhd = large;
    mi.hblks = __atomic_load_n(&lum_large_live_blocks, __ATOMIC_RELAXED);
    mi.uordblks = live > large ? live - large : 0;
    mi.fordblks = resident > live ? resident - live : 0;
    mi.keepcost = LUM_PEEK(g->retained_bytes);
    return mi;
}

/* mallopt: glibc's tunables describe its own arenas; accepting them (and changing nothing)
 * is what a replacement allocator must do so programs that set them keep working. */
LUM_EXPORT int lum_mallopt(int param, int value)
{
    (void)param;
    (void)value;
    return 1;
}

/* The pre-2.33 mallinfo with int fields, saturated rather than wrapped.  Cold text: deprecated
 * since glibc 2.33, and mallinfo2, which monitoring code calls, stays warm. */
LUM_EXPORT LUM_COLD_TEXT struct mallinfo lum_mallinfo(void)
{
    struct mallinfo2 m2 = lum_mallinfo2();
    struct mallinfo mi;
    memset(&mi, 0, sizeof mi);
#define SAT(x) ((x) > (size_t)INT32_MAX ? INT32_MAX : (int)(x))
    mi.arena = SAT(m2.arena);
    mi.hblks = SAT(m2.hblks);
    mi.hblkhd = SAT(m2.hblkhd);
    mi.uordblks = SAT(m2.uordblks);
    mi.fordblks = SAT(m2.fordblks);
    mi.keepcost = SAT(m2.keepcost);
#undef SAT
    return mi;
}

/* malloc_info: glibc writes XML; lumalloc writes the same element structure with its own
 * figures (options must be 0, as in glibc).  Cold text: a report, whose messages are cold already
 * (and room in the warm text's 8 pages). */
LUM_COLD_TEXT LUM_EXPORT int lum_malloc_info(int options, FILE *fp)
{
    if (options != 0) {
        errno = EINVAL;
        return -1;
    }
    struct mallinfo2 mi = lum_mallinfo2();
    const struct lum_global_counters_v1 *g = &lumalloc_registry.global;
    /* allocated is every live block: mallinfo2 keeps the large ones apart, in hblkhd, for
     * glibc's meanings (uordblks alone left a program's 10 MiB block out) */
    fprintf(fp, "<malloc version=\"lumalloc-%d.%d\">\n"
                "<total type=\"allocated\" size=\"%zu\"/>\n"
                "<total type=\"mapped\" size=\"%llu\"/>\n"
                "<total type=\"resident\" size=\"%llu\"/>\n"
                "<total type=\"retained\" size=\"%llu\"/>\n"
                "<total type=\"large\" count=\"%zu\" size=\"%zu\"/>\n"
                "<system type=\"current\" size=\"%llu\"/>\n"
                "</malloc>\n",
            LUMALLOC_VERSION_MAJOR, LUMALLOC_VERSION_MINOR, mi.uordblks + mi.hblkhd,
            (unsigned long long)LUM_PEEK(g->mapped_bytes), (unsigned long long)LUM_PEEK(g->resident_bytes),
            (unsigned long long)LUM_PEEK(g->retained_bytes), mi.hblks, mi.hblkhd,
            (unsigned long long)LUM_PEEK(g->mapped_bytes));
    return 0;
}

/* ---- the standard names ---- */
void *malloc(size_t) ALIAS("lum_malloc");
void free(void *) ALIAS("lum_free");
void *calloc(size_t, size_t) ALIAS("lum_calloc");
void *realloc(void *, size_t) ALIAS("lum_realloc");
void *reallocarray(void *, size_t, size_t) ALIAS("lum_reallocarray");
void *memalign(size_t, size_t) ALIAS("lum_memalign");
int posix_memalign(void **, size_t, size_t) ALIAS("lum_posix_memalign");
void *aligned_alloc(size_t, size_t) ALIAS("lum_aligned_alloc");
void *valloc(size_t) ALIAS("lum_valloc");
void *pvalloc(size_t) ALIAS("lum_pvalloc");
size_t malloc_usable_size(void *) ALIAS("lum_malloc_usable_size");
void free_sized(void *, size_t) ALIAS("lum_free_sized");
void free_aligned_sized(void *, size_t, size_t) ALIAS("lum_free_aligned_sized");
int malloc_trim(size_t) ALIAS("lum_malloc_trim");
struct mallinfo2 mallinfo2(void) ALIAS("lum_mallinfo2");
struct mallinfo mallinfo(void) ALIAS("lum_mallinfo");
int mallopt(int, int) ALIAS("lum_mallopt");
int malloc_info(int, FILE *) ALIAS("lum_malloc_info");
void *__libc_valloc(size_t) ALIAS("lum_valloc");
void *__libc_pvalloc(size_t) ALIAS("lum_pvalloc");
int __posix_memalign(void **, size_t, size_t) ALIAS("lum_posix_memalign");
/* glibc-internal entry points some programs and libraries call directly */
void *__libc_malloc(size_t) ALIAS("lum_malloc");
void __libc_free(void *) ALIAS("lum_free");
void *__libc_calloc(size_t, size_t) ALIAS("lum_calloc");
void *__libc_realloc(void *, size_t) ALIAS("lum_realloc");
void *__libc_memalign(size_t, size_t) ALIAS("lum_memalign");
void cfree(void *) ALIAS("lum_free");
