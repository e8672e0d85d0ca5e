/* Large blocks: one mapping each, 4 MiB-aligned, header in the first 4 KiB (laid out like a
 * segment so free() finds it by address mask).  Freed mappings go to a bounded cache; growth
 * by realloc moves page tables with mremap instead of copying bytes. */
#define _GNU_SOURCE
#include <string.h>
#include <sys/mman.h>
#include "internal.h"
#include "observe.h"
#include "options.h"

lum_lock_t lum_large_lock;
static struct lum_large *cache;     /* most recently freed first */
static size_t cache_bytes;

static size_t page_round(size_t n) { return (n + 4095) & ~(size_t)4095; }

static struct lum_large *cache_take(size_t map_size)
{
    if (!cache) return NULL;
    lum_lock(&lum_large_lock);
    struct lum_large **link = &cache, *hit = NULL;
    for (struct lum_large *l = cache; l; link = &l->next, l = l->next) {
        /* reuse only mappings that fit without wasting more than half */
        if (l->map_size >= map_size && l->map_size / 2 <= map_size) {
            *link = l->next;
            cache_bytes -= l->map_size;
            hit = l;
            break;
        }
    }
    lum_unlock(&lum_large_lock);
    return hit;
}

/* Maps size bytes whose start is 4 MiB-aligned and whose byte at offset is alignment-aligned. */
static uint8_t *map_for(size_t size, size_t offset, size_t alignment)
{
    if (alignment <= LUM_SEGMENT_SIZE) return lum_os_map_aligned(size, LUM_SEGMENT_SIZE);
    /* offset == LUM_SEGMENT_SIZE: align the user address, the header sits 4 MiB before it */
    uint8_t *base = lum_os_map_aligned(size + alignment, alignment);
    if (!base) return NULL;
    uint8_t *user = base + alignment; /* alignment-aligned, and base + alignment - offset is too */
    uint8_t *hdr = user - offset;
    lum_os_unmap(base, (size_t)(hdr - base));
    size_t tail = (size_t)((base + size + alignment) - (hdr + size));
    if (tail) lum_os_unmap(hdr + size, tail);
    return hdr;
}

static void header_init(struct lum_large *l)
{
    for (size_t i = 0; i <= LUM_SLICES; i++) l->slice_page[i] = &lum_large_sentinel;
    l->kind = LUM_SEG_LARGE;
}

void *lum_large_alloc(struct lum_heap *heap, size_t size, size_t alignment, bool zero, bool sampled)
{
    size_t offset = LUM_LARGE_HEADER;
    if (alignment > LUM_LARGE_HEADER) offset = alignment < LUM_SEGMENT_SIZE ? alignment : LUM_SEGMENT_SIZE;
    size_t usable = page_round(size ? size : 1);
    if (usable < size || usable + offset < usable) return NULL;
    size_t map_size = offset + usable;
    struct lum_large *l = NULL;
    bool fresh = true;
    if (offset == LUM_LARGE_HEADER && (l = cache_take(map_size)) != NULL) {
        fresh = false;
        usable = l->map_size - offset;
        map_size = l->map_size;
    } else {
        l = (struct lum_large *)map_for(map_size, offset, alignment);
        if (!l) return NULL;
        header_init(l);
        lum_os_name(l, map_size, "lumalloc-large");
    }
    l->map_base = l;
    l->map_size = map_size;
    l->usable = usable;
    l->requested = size;
    l->user = (uint8_t *)l + offset;
    l->sampled = sampled;
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
    return ((struct lum_large *)lum_segment_of(p))->usable;
}

void lum_large_free(void *p)
{
    struct lum_large *l = (struct lum_large *)lum_segment_of(p);
    struct lum_heap *heap = lum_tls_heap;
    if (l->sampled) lum_on_sample_free(p, l->usable);
    lum_on_large_free(p, l->usable);
    if (heap != &lum_empty_heap) {
        heap->tc.free_count++;
        heap->tc.free_bytes += l->usable;
    }
    lum_count_global(&lumalloc_registry.global.large_live_bytes, -(int64_t)l->usable);
    if ((uint8_t *)p - (uint8_t *)l == LUM_LARGE_HEADER && l->map_size <= lum_opt.large_cache / 4) {
        lum_lock(&lum_large_lock);
        l->next = cache;
        l->freed_ms = lum_now_ms();
        cache = l;
        cache_bytes += l->map_size;
        struct lum_large *evict = NULL;
        if (cache_bytes > lum_opt.large_cache) {
            /* drop the oldest entries: walk to the point where the budget is met */
            size_t kept = 0;
            struct lum_large *q = cache;
            while (q->next && kept + q->map_size + q->next->map_size <= lum_opt.large_cache) {
                kept += q->map_size;
                q = q->next;
            }
            evict = q->next;
            q->next = NULL;
            cache_bytes = kept + q->map_size;
        }
        lum_unlock(&lum_large_lock);
        while (evict) {
            struct lum_large *next = evict->next;
            lum_os_unmap(evict, evict->map_size);
            evict = next;
        }
        lum_background_note_dirty();
        return;
    }
    lum_os_unmap(l->map_base, l->map_size);
}

size_t lum_large_cache_purge(void)
{
    lum_lock(&lum_large_lock);
    struct lum_large *l = cache;
    size_t bytes = cache_bytes;
    cache = NULL;
    cache_bytes = 0;
    lum_unlock(&lum_large_lock);
    while (l) {
        struct lum_large *next = l->next;
        lum_os_unmap(l, l->map_size);
        l = next;
    }
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
    *link = NULL;
    size_t bytes = 0;
    for (struct lum_large *l = old; l; l = l->next) bytes += l->map_size;
    cache_bytes -= bytes;
    lum_unlock(&lum_large_lock);
    while (old) {
        struct lum_large *next = old->next;
        lum_os_unmap(old, old->map_size);
        old = next;
    }
    return bytes;
}

size_t lum_large_cache_bytes(void)
{
    return __atomic_load_n(&cache_bytes, __ATOMIC_RELAXED);
}

/* Grows or shrinks a large block in place or by moving its pages; NULL means "copy instead". */
void *lum_large_realloc(void *p, size_t size)
{
    struct lum_large *l = (struct lum_large *)lum_segment_of(p);
    size_t offset = (size_t)((uint8_t *)p - (uint8_t *)l);
    if (size <= l->usable && size >= l->usable / 2) {
        l->requested = size;
        return p;
    }
    if (l->sampled || offset != LUM_LARGE_HEADER || size < lum_opt.large_threshold) return NULL;
    size_t usable = page_round(size);
    if (usable < size) return NULL;
    size_t map_size = offset + usable;
    struct lum_heap *heap = lum_tls_heap;
    void *moved = mremap(l, l->map_size, map_size, 0);
    if (moved == MAP_FAILED) {
        /* Reserve an aligned destination, then let the kernel move the page tables there. */
        void *dst = lum_os_map_aligned(map_size, LUM_SEGMENT_SIZE);
        if (!dst) return NULL;
        moved = mremap(l, l->map_size, map_size, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
        if (moved == MAP_FAILED) {
            lum_os_unmap(dst, map_size);
            return NULL;
        }
        /* dst's reservation was replaced by the moved pages; the old range is gone */
        lum_count_global(&lumalloc_registry.global.mapped_bytes, -(int64_t)map_size);
        lum_count_global(&lumalloc_registry.global.resident_bytes, -(int64_t)map_size);
    }
    l = moved;
    int64_t delta = (int64_t)map_size - (int64_t)l->map_size;
    lum_count_global(&lumalloc_registry.global.mapped_bytes, delta);
    lum_count_global(&lumalloc_registry.global.resident_bytes, delta);
    lum_count_global(&lumalloc_registry.global.large_live_bytes, (int64_t)usable - (int64_t)l->usable);
    if (heap != &lum_empty_heap) {
        /* counted as a free of the old block and an allocation of the new one */
        heap->tc.free_count++;
        heap->tc.free_bytes += l->usable;
        heap->tc.alloc_count++;
        heap->tc.alloc_bytes += usable;
        heap->tc.large_count++;
        heap->tc.large_bytes += usable;
    }
    lum_on_large_free(p, l->usable);
    l->map_base = l;
    l->map_size = map_size;
    l->usable = usable;
    l->requested = size;
    l->user = (uint8_t *)l + offset;
    if (heap != &lum_empty_heap) lum_on_large_alloc(&heap->tc, l->user, size, usable);
    return l->user;
}
