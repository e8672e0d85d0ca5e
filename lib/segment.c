/* Segments: 4 MiB aligned mappings cut into 64 KiB slices; pages are runs of slices.  All of
 * it under one lock: a thread comes here once per page (thousands of allocations), not per
 * allocation.  Free slices are returned to the OS by decay (lum_segments_purge). */
#define _GNU_SOURCE
#include <string.h>
#include <sys/mman.h>
#include "internal.h"
#include "options.h"
#include "observe.h"

lum_lock_t lum_segment_lock;
static struct lum_segment *segments;     /* every small segment */
static struct lum_segment *spare_segment; /* one wholly free segment kept to absorb churn */
static uint64_t spare_since_ms;
static uint64_t last_purge_ms;

#define ALL_SLICES (~(uint64_t)1) /* slice 0 is the header, never free */

static void segment_init(struct lum_segment *seg)
{
    seg->kind = LUM_SEG_SMALL;
    for (size_t i = 0; i <= LUM_SLICES; i++) seg->slice_page[i] = &lum_invalid_sentinel;
    seg->free_slices = ALL_SLICES;
    seg->purged_slices = 0;
}

static struct lum_segment *segment_new(void)
{
    struct lum_segment *seg = spare_segment;
    if (seg) {
        spare_segment = NULL;
    } else {
        uint8_t *base = lum_os_map_aligned(LUM_SEGMENT_SIZE, LUM_SEGMENT_SIZE);
        if (!base) return NULL;
        lum_os_name(base, LUM_SEGMENT_SIZE, "lumalloc");
        if (lum_opt.thp) madvise(base, LUM_SEGMENT_SIZE, MADV_HUGEPAGE);
#if LUM_HARDENED
        /* guards on both sides of the metadata: an overrun from the previous segment's last
         * block, or an underrun from slice 1, faults instead of corrupting it */
        lum_os_guard(base, LUM_GUARD_SIZE);
        lum_os_guard(base + LUM_SLICE_SIZE - LUM_GUARD_SIZE, LUM_GUARD_SIZE);
        lum_hardened_own((uintptr_t)base, true);
#endif
        seg = (struct lum_segment *)(base + LUM_HEADER_OFFSET);
        segment_init(seg);
    }
    seg->prev = NULL;
    seg->next = segments;
    if (segments) segments->prev = seg;
    segments = seg;
    return seg;
}

static void segment_unmap(struct lum_segment *seg)
{
#if LUM_HARDENED
    lum_hardened_own((uintptr_t)lum_seg_base(seg), false);
#endif
    lum_os_unmap(lum_seg_base(seg), LUM_SEGMENT_SIZE);
}

/* Bit i of the result is set when bits i..i+n-1 of free are all set. */
static int find_run(uint64_t free, unsigned n)
{
    uint64_t x = free;
    for (unsigned i = 1; i < n && x; i++) x &= free >> i;
    return x ? __builtin_ctzll(x) : -1;
}

struct lum_page *lum_page_alloc(unsigned cls, enum lum_page_kind kind)
{
    unsigned n = lum_class_slices[cls];
    struct lum_segment *seg;
    int idx = -1;
    lum_lock(&lum_segment_lock);
    /* Pack densely (as TCMalloc's Temeraire does for huge pages): take the fullest segment that
     * fits, so emptier ones drain and go back whole; and prefer slices still resident, which
     * cost no page faults. */
    for (int pass = 0; pass < 2 && idx < 0; pass++) {
        unsigned best_free = 65;
        struct lum_segment *best = NULL;
        int best_idx = -1;
        for (struct lum_segment *s = segments; s; s = s->next) {
            unsigned nfree = (unsigned)__builtin_popcountll(s->free_slices);
            if (nfree < n || nfree >= best_free) continue;
            uint64_t candidates = pass == 0 ? s->free_slices & ~s->purged_slices : s->free_slices;
            int at = find_run(candidates, n);
            if (at >= 0) { best = s; best_idx = at; best_free = nfree; }
        }
        seg = best;
        idx = best_idx;
    }
    if (idx < 0) {
        seg = segment_new();
        if (!seg) { lum_unlock(&lum_segment_lock); return NULL; }
        idx = find_run(seg->free_slices, n);
    }
    uint64_t mask = (n == 64 ? ~(uint64_t)0 : (((uint64_t)1 << n) - 1)) << idx;
    seg->free_slices &= ~mask;
    uint64_t refaulted = seg->purged_slices & mask;
    if (refaulted) {
        seg->purged_slices &= ~mask;
        int64_t bytes = (int64_t)__builtin_popcountll(refaulted) * (int64_t)LUM_SLICE_SIZE;
        lum_count_global(&lumalloc_registry.global.resident_bytes, bytes);
        lum_count_global(&lumalloc_registry.global.retained_bytes, -bytes);
    }
    struct lum_page *page = &seg->pages[idx];
    for (unsigned i = 0; i < n; i++) seg->slice_page[idx + i] = page;
    page->slices = (uint8_t)n;
    lum_unlock(&lum_segment_lock);

    page->start = lum_seg_base(seg) + (size_t)idx * LUM_SLICE_SIZE;
#if LUM_HARDENED
    page->key = (uintptr_t)lum_hardened_random() | 1;
#endif
    page->cls = (uint8_t)cls;
    page->kind = (uint8_t)kind;
    page->block_size = lum_class_size[cls];
    page->capacity = (uint32_t)(((size_t)n * LUM_SLICE_SIZE) / page->block_size);
    page->carved = 0;
    page->free = NULL;
    page->used = 0;
    page->in_full = 0;
    page->retained = 0;
    page->fast_heap = NULL;
    page->next = page->prev = NULL;
    atomic_store_explicit(&page->owner, NULL, memory_order_relaxed);
    atomic_store_explicit(&page->thread_free, NULL, memory_order_relaxed);
    return page;
}

/* Returns free, not yet purged slices whose decay has expired (or all of them) to the OS, in as
 * few madvise calls as the runs allow.  Caller holds lum_segment_lock. */
static size_t purge_locked(bool all, uint64_t now)
{
    size_t released = 0;
    int advice = lum_opt.purge_mode == LUM_PURGE_FREE ? MADV_FREE : MADV_DONTNEED;
    for (struct lum_segment *seg = segments; seg; seg = seg->next) {
        uint64_t candidates = seg->free_slices & ~seg->purged_slices;
        if (!all) {
            uint64_t c = candidates;
            while (c) {
                int i = __builtin_ctzll(c);
                c &= c - 1;
                if (now - seg->freed_at_ms[i] < lum_opt.decay_ms) candidates &= ~((uint64_t)1 << i);
            }
        }
        while (candidates) {
            int start = __builtin_ctzll(candidates);
            /* slice 0 is never free, so the shifted run always ends in a zero bit */
            int len = __builtin_ctzll(~(candidates >> start));
            madvise(lum_seg_base(seg) + (size_t)start * LUM_SLICE_SIZE, (size_t)len * LUM_SLICE_SIZE, advice);
            uint64_t mask = (len == 64 ? ~(uint64_t)0 : (((uint64_t)1 << len) - 1)) << start;
            seg->purged_slices |= mask;
            candidates &= ~mask;
            released += (size_t)len * LUM_SLICE_SIZE;
        }
    }
    if (spare_segment && (all || now - spare_since_ms >= lum_opt.decay_ms)) {
        segment_unmap(spare_segment);
        released += LUM_SEGMENT_SIZE;
        spare_segment = NULL;
    }
    return released;
}

static void account_purge(size_t released, uint32_t reason)
{
    if (!released) return;
    lum_count_global(&lumalloc_registry.global.resident_bytes, -(int64_t)released);
    lum_count_global(&lumalloc_registry.global.retained_bytes, (int64_t)released);
    lum_count_global(&lumalloc_registry.global.purged_bytes, (int64_t)released);
    lum_count_global(&lumalloc_registry.global.purge_events, 1);
    lum_on_purge(released, reason);
}

void lum_page_release(struct lum_page *page)
{
    struct lum_segment *seg = lum_segment_of(page->start);
    unsigned idx = (unsigned)(((uintptr_t)page->start - (uintptr_t)lum_seg_base(seg)) >> LUM_SLICE_SHIFT);
    unsigned n = page->slices;
    uint64_t now = lum_now_ms();
    size_t released = 0;
    lum_lock(&lum_segment_lock);
    for (unsigned i = 0; i < n; i++) {
        seg->slice_page[idx + i] = &lum_invalid_sentinel;
        seg->freed_at_ms[idx + i] = now;
    }
    uint64_t mask = (n == 64 ? ~(uint64_t)0 : (((uint64_t)1 << n) - 1)) << idx;
    seg->free_slices |= mask;
    page->slices = 0;
    page->kind = LUM_PAGE_SMALL;
    atomic_store_explicit(&page->owner, NULL, memory_order_relaxed);
    if (seg->free_slices == ALL_SLICES) {
        /* A wholly free segment: keep one, unmap the rest at once (there is nothing to decay). */
        if (seg->prev) seg->prev->next = seg->next; else segments = seg->next;
        if (seg->next) seg->next->prev = seg->prev;
        if (!spare_segment) {
            spare_segment = seg;
            spare_since_ms = now;
        } else {
            size_t purged = (size_t)__builtin_popcountll(seg->purged_slices) * LUM_SLICE_SIZE;
            lum_count_global(&lumalloc_registry.global.resident_bytes, (int64_t)purged);
            lum_count_global(&lumalloc_registry.global.retained_bytes, -(int64_t)purged);
            segment_unmap(seg);
        }
    }
    /* Decay runs on the allocator's own activity; the optional purger thread covers idle time. */
    if (lum_opt.decay_ms && now - last_purge_ms >= (lum_opt.decay_ms / 4 ? lum_opt.decay_ms / 4 : 1)) {
        last_purge_ms = now;
        released = purge_locked(false, now);
    }
    lum_unlock(&lum_segment_lock);
    account_purge(released, LUM_PURGE_DECAY);
    lum_background_note_dirty();
}

bool lum_segments_dirty(void)
{
    bool dirty = false;
    lum_lock(&lum_segment_lock);
    for (struct lum_segment *seg = segments; seg && !dirty; seg = seg->next)
        dirty = (seg->free_slices & ~seg->purged_slices) != 0;
    dirty = dirty || spare_segment;
    lum_unlock(&lum_segment_lock);
    return dirty;
}

size_t lum_segments_purge(bool all, uint32_t reason)
{
    lum_lock(&lum_segment_lock);
    uint64_t now = lum_now_ms();
    last_purge_ms = now;
    size_t released = purge_locked(all, now);
    lum_unlock(&lum_segment_lock);
    account_purge(released, reason);
    return released;
}

void lum_segments_for_each(void (*fn)(struct lum_segment *, void *), void *arg)
{
    lum_lock(&lum_segment_lock);
    for (struct lum_segment *seg = segments; seg; seg = seg->next) fn(seg, arg);
    lum_unlock(&lum_segment_lock);
}
