/* Large blocks: one mapping each, 4 MiB-aligned, header in the first 4 KiB (laid out like a
 * segment so free() finds it by address mask).  Freed mappings go to a bounded cache; growth
 * by realloc moves page tables with mremap instead of copying bytes. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include "internal.h"
#include "observe.h"
#include "options.h"

lum_lock_t lum_large_lock;
static struct lum_large *cache;     /* most recently freed first */
size_t lum_large_cached; /* bytes in the cache (internal.h) */

static size_t page_round(size_t n) { return (n + 4095) & ~(size_t)4095; }

static void large_unmap_list(struct lum_large *l);

/* Moves a cached mapping's pages into one of map_size bytes, 4 MiB-aligned like any; false
 * when the kernel will not (the mapping is untouched then). */
static bool grow_mapping(struct lum_large **lp, size_t map_size)
{
    struct lum_large *l = *lp;
    int64_t delta = (int64_t)map_size - (int64_t)l->map_size; /* read while l is mapped */
    void *moved = mremap(l->map_base, l->map_size, map_size, 0);
    if (moved == MAP_FAILED) {
        void *dst = lum_os_map_aligned(map_size, LUM_SEGMENT_SIZE);
        if (!dst) return false;
        moved = mremap(l->map_base, l->map_size, map_size, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
        if (moved == MAP_FAILED) {
            lum_os_unmap(dst, map_size, 0);
            return false;
        }
        lum_os_account(-(int64_t)map_size, 0); /* dst's reservation became the block */
    }
    lum_os_account(delta, delta); /* handed to the program: counted as touched */
    l = (struct lum_large *)((uint8_t *)moved + LUM_HEADER_OFFSET);
    l->map_base = moved;
    l->map_size = map_size;
    *lp = l;
    return true;
}

/* Best fit from the cache.  A mapping much larger than needed is shrunk in place (mremap drops
 * its tail), so the pages it already has are reused instead of faulting in a fresh mapping.
 * When none is large enough, the largest is grown (mremap keeps its pages) and the rest are
 * unmapped: a fresh mapping next to them would hold both resident until decay, where glibc's
 * heap serves the larger block from the freed memory (bench python, PYTHONMALLOC=malloc: its
 * 344 KiB buffers, then 1.1 MiB ones). */
static struct lum_large *cache_take(size_t map_size)
{
    if (!__atomic_load_n(&cache, __ATOMIC_RELAXED)) return NULL; /* peek: the lock decides */
    lum_lock(&lum_large_lock);
    struct lum_large **link = &cache, **best_link = NULL, *best = NULL;
    for (struct lum_large *l = cache; l; link = &l->next, l = l->next)
        if (l->map_size >= map_size && (!best || l->map_size < best->map_size)) {
            best = l;
            best_link = link;
            if (l->map_size == map_size) break;
        }
    struct lum_large *rest = NULL;
    if (best) {
        __atomic_store_n(best_link, best->next, __ATOMIC_RELAXED);
        __atomic_sub_fetch(&lum_large_cached, best->map_size, __ATOMIC_RELAXED);
        best->cached = 0;
    } else if (cache && !LUM_HARDENED) { /* hardened mappings end in a guard page: never grown */
        rest = cache;
        __atomic_store_n(&cache, NULL, __ATOMIC_RELAXED);
        __atomic_store_n(&lum_large_cached, 0, __ATOMIC_RELAXED);
        struct lum_large **big = &rest;
        for (struct lum_large **q = &rest; *q; q = &(*q)->next)
            if ((*q)->map_size > (*big)->map_size) big = q;
        best = *big;
        *big = best->next;
        best->cached = 0;
    }
    lum_unlock(&lum_large_lock);
    large_unmap_list(rest);
    if (!best) return NULL;
    if (best->map_size < map_size) {
        if (!grow_mapping(&best, map_size)) {
            best->next = NULL;
            large_unmap_list(best);
            return NULL;
        }
    } else if (best->map_size / 2 > map_size && !LUM_HARDENED) {
        /* hardened mappings end in a guard page: they are reused whole instead */
        if (mremap(best->map_base, best->map_size, map_size, 0) != MAP_FAILED) {
            lum_os_account(-(int64_t)(best->map_size - map_size), -(int64_t)(best->map_size - map_size));
            best->map_size = map_size;
        }
    }
    return best;
}

/* Maps size bytes whose start is 4 MiB-aligned and whose byte at offset is alignment-aligned. */
/* Maps size bytes whose start is 4 MiB-aligned and whose byte at offset is alignment-aligned. */
static uint8_t *map_for(size_t size, size_t offset, size_t alignment)
{
    if (alignment <= LUM_SEGMENT_SIZE) return lum_os_map_aligned(size, LUM_SEGMENT_SIZE);
    /* offset == LUM_SEGMENT_SIZE: align the user address, the header sits 4 MiB before it */
    uint8_t *raw = lum_os_map_aligned(size + alignment, alignment);
    if (!raw) return NULL;
    uint8_t *user = raw + alignment; /* alignment-aligned, and user - offset is 4 MiB-aligned */
    uint8_t *base = user - offset;
    lum_os_unmap(raw, (size_t)(base - raw), 0);
    size_t tail = (size_t)((raw + size + alignment) - (base + size));
    if (tail) lum_os_unmap(base + size, tail, 0);
    return base;
}

static struct lum_large *header_of(const void *p) { return (struct lum_large *)lum_segment_of(p); }

static void header_init(struct lum_large *l)
{
    for (size_t i = 0; i <= LUM_SLICES; i++) l->slice_page[i] = &lum_large_sentinel;
    l->kind = LUM_SEG_LARGE;
}

/* Hardened builds put a guard page after every large block (and one before its header). */
#define TRAILER (LUM_HARDENED ? LUM_GUARD_SIZE : 0)

void *lum_large_alloc(struct lum_heap *heap, size_t size, size_t alignment, bool zero, bool may_sample)
{
    size_t offset = LUM_LARGE_HEADER;
    if (alignment > LUM_LARGE_HEADER) offset = alignment < LUM_SEGMENT_SIZE ? alignment : LUM_SEGMENT_SIZE;
    size_t usable = page_round(size ? size : 1);
    if (usable < size || usable + offset + TRAILER < usable) return NULL;
    size_t map_size = offset + usable + TRAILER;
    struct lum_large *l = NULL;
    uint8_t *base;
    bool fresh = true;
    if (offset == LUM_LARGE_HEADER && (l = cache_take(map_size)) != NULL) {
        fresh = false;
        base = l->map_base;
        map_size = l->map_size;
        usable = map_size - offset - TRAILER;
    } else {
        lum_dirty_limit_check(true);
        base = map_for(map_size, offset, alignment);
        if (!base) return NULL;
        l = (struct lum_large *)(base + LUM_HEADER_OFFSET);
        header_init(l);
        lum_os_account(0, (int64_t)map_size); /* handed to the program: counted as touched */
        lum_os_name(base, map_size, "lumalloc-large");
#if LUM_HARDENED
        lum_os_guard(base, LUM_GUARD_SIZE);
        lum_os_guard(base + map_size - LUM_GUARD_SIZE, LUM_GUARD_SIZE);
        lum_hardened_own((uintptr_t)base, true);
#endif
    }
    /* decided over the bytes the counter will really move by (a cached mapping may be larger) */
    bool sampled = may_sample && lum_heap_take_sample(heap, usable, usable);
    l->map_base = base;
    l->map_size = map_size;
    l->usable = usable;
    l->requested = size;
    l->user = base + offset;
    l->sampled = sampled;
    l->cached = 0;
    l->next = NULL;
    if (zero && !fresh) memset(l->user, 0, size);
    lum_count_global(&lumalloc_registry.global.large_live_bytes, (int64_t)usable);
    heap->tc.alloc_count++;
    heap->tc.alloc_bytes += usable;
    heap->tc.large_count++;
    heap->tc.large_bytes += usable;
    lum_on_large_alloc(&heap->tc, l->user, size, usable);
    if (sampled) {
        heap->tc.sampled_count++;
        lum_on_sample(&heap->tc, l->user, size, usable);
    }
    return l->user;
}

size_t lum_large_usable(const void *p)
{
    return header_of(p)->usable;
}

static void large_unmap(struct lum_large *l)
{
#if LUM_HARDENED
    lum_hardened_own((uintptr_t)l->map_base, false);
#endif
    lum_os_unmap(l->map_base, l->map_size, l->map_size);
}

static void large_unmap_list(struct lum_large *l)
{
    while (l) {
        struct lum_large *next = l->next;
        large_unmap(l);
        l = next;
    }
}

void lum_large_free(void *p)
{
    struct lum_large *l = header_of(p);
    if (LUM_UNLIKELY(l->cached || p != l->user)) {
        /* a block already in the cache, or an address inside a large block */
        if (lum_opt.harden || LUM_HARDENED) {
#if LUM_HARDENED
            lum_hardened_fail(l->cached ? "double free of" : "invalid free (not the start of a block) at",
                              p, l->usable);
#else
            lum_write_err(l->cached ? "lumalloc: double free of a large block\n"
                                    : "lumalloc: invalid free inside a large block\n");
            abort();
#endif
        }
        return;
    }
    struct lum_heap *heap = lum_tls_heap;
    if (l->sampled) lum_on_sample_free(p, l->usable);
    lum_on_large_free(p, l->usable);
    if (heap != &lum_empty_heap) {
        heap->tc.free_count++;
        heap->tc.free_bytes += l->usable;
    }
    lum_count_global(&lumalloc_registry.global.large_live_bytes, -(int64_t)l->usable);
    if ((size_t)((uint8_t *)p - (uint8_t *)l->map_base) == LUM_LARGE_HEADER &&
        l->map_size <= lum_opt.large_cache / 4) {
        lum_lock(&lum_large_lock);
        l->next = cache;
        l->freed_ms = lum_now_ms();
        l->cached = 1;
        __atomic_store_n(&cache, l, __ATOMIC_RELAXED);
        __atomic_add_fetch(&lum_large_cached, l->map_size, __ATOMIC_RELAXED);
        struct lum_large *evict = NULL;
        if (lum_large_cached > lum_opt.large_cache) {
            /* drop the oldest entries: walk to the point where the budget is met */
            size_t kept = 0;
            struct lum_large *q = cache;
            while (q->next && kept + q->map_size + q->next->map_size <= lum_opt.large_cache) {
                kept += q->map_size;
                q = q->next;
            }
            evict = q->next;
            q->next = NULL;
            __atomic_store_n(&lum_large_cached, kept + q->map_size, __ATOMIC_RELAXED);
        }
        lum_unlock(&lum_large_lock);
        large_unmap_list(evict);
        lum_background_note_dirty();
        return;
    }
    large_unmap(l);
}

size_t lum_large_cache_purge(void)
{
    lum_lock(&lum_large_lock);
    struct lum_large *l = cache;
    size_t bytes = lum_large_cached;
    __atomic_store_n(&cache, NULL, __ATOMIC_RELAXED);
    __atomic_store_n(&lum_large_cached, 0, __ATOMIC_RELAXED);
    lum_unlock(&lum_large_lock);
    large_unmap_list(l);
    return bytes;
}

/* Unmaps cached mappings that have waited longer than the decay time (newest are first). */
size_t lum_large_cache_decay(void)
{
    uint64_t now = lum_now_ms();
    lum_lock(&lum_large_lock);
    struct lum_large **link = &cache;
    while (*link && now - (*link)->freed_ms < lum_opt.decay_ms) link = &(*link)->next;
    struct lum_large *old = *link;
    __atomic_store_n(link, NULL, __ATOMIC_RELAXED);
    size_t bytes = 0;
    for (struct lum_large *l = old; l; l = l->next) bytes += l->map_size;
    __atomic_sub_fetch(&lum_large_cached, bytes, __ATOMIC_RELAXED);
    lum_unlock(&lum_large_lock);
    large_unmap_list(old);
    return bytes;
}

size_t lum_large_cache_bytes(void)
{
    return __atomic_load_n(&lum_large_cached, __ATOMIC_RELAXED);
}

/* Grows or shrinks a large block in place or by moving its pages; NULL means "copy instead". */
void *lum_large_realloc(void *p, size_t size)
{
    struct lum_large *l = header_of(p);
    uint8_t *base = l->map_base;
    size_t offset = (size_t)((uint8_t *)p - base);
    if (size <= l->usable && size >= l->usable / 2) {
        l->requested = size;
        return p;
    }
    /* Hardened blocks carry guard pages that mremap would have to move too: copy instead. */
    if (LUM_HARDENED || offset != LUM_LARGE_HEADER || size < lum_opt.large_threshold)
        return NULL;
    size_t usable = page_round(size);
    if (usable < size) return NULL;
    size_t map_size = offset + usable;
    struct lum_heap *heap = lum_tls_heap;
    struct lum_thread_counters_v1 *tc = heap != &lum_empty_heap ? &heap->tc : NULL;
    size_t old_usable = l->usable;
    void *moved = mremap(base, l->map_size, map_size, 0);
    if (moved == MAP_FAILED) {
        /* Reserve an aligned destination, then let the kernel move the page tables there. */
        void *dst = lum_os_map_aligned(map_size, LUM_SEGMENT_SIZE);
        if (!dst) return NULL;
        /* The old address stops being this block before the move: report it now, so another
         * thread that maps and samples the same range afterwards is not confused with it. */
        if (l->sampled) {
            lum_on_sample_free(p, old_usable);
            l->sampled = 0;
        }
        lum_on_large_free(p, old_usable);
        moved = mremap(base, l->map_size, map_size, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
        if (moved == MAP_FAILED) {
            lum_os_unmap(dst, map_size, 0);
            if (tc) lum_on_large_alloc(tc, p, l->requested, old_usable); /* still here after all */
            return NULL;
        }
        /* dst's reservation was replaced by the moved pages: undo its accounting, the delta
         * below covers the block */
        lum_os_account(-(int64_t)map_size, 0);
    } else {
        if (l->sampled) {
            lum_on_sample_free(p, old_usable);
            l->sampled = 0;
        }
        lum_on_large_free(p, old_usable);
    }
    base = moved;
    l = (struct lum_large *)(base + LUM_HEADER_OFFSET);
    int64_t delta = (int64_t)map_size - (int64_t)l->map_size;
    lum_os_account(delta, delta);
    lum_count_global(&lumalloc_registry.global.large_live_bytes, (int64_t)usable - (int64_t)old_usable);
    /* For the profiler a realloc is a free and an allocation: the new block is sampled (or
     * not) like any allocation of its size, decided before the counters move. */
    bool sample_new = tc && lum_heap_take_sample(heap, usable, usable);
    if (tc) {
        tc->free_count++;
        tc->free_bytes += old_usable;
        tc->alloc_count++;
        tc->alloc_bytes += usable;
        tc->large_count++;
        tc->large_bytes += usable;
    }
    l->map_base = base;
    l->map_size = map_size;
    l->usable = usable;
    l->requested = size;
    l->user = base + offset;
    if (tc) {
        lum_on_large_alloc(tc, l->user, size, usable);
        if (sample_new) {
            l->sampled = 1;
            tc->sampled_count++;
            lum_on_sample(tc, l->user, size, usable);
        }
    }
    return l->user;
}
