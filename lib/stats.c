/* Statistics snapshot.  One pass under the heap-list lock (no thread starts or exits meanwhile),
 * the segment walk and the process figures inside it under the segment lock; the counters and
 * page "used" counts belong to their owners and are read racily (exact when the owners are
 * quiet; see counter.h), which keeps every allocation and free free of any stats cost.  Blocks
 * other threads freed and the owner has not collected are counted here, off their lists, which
 * costs the snapshot a walk of those lists instead. */
#include <stdio.h>
#include <string.h>
#include "internal.h"
#include "lumalloc_stats.h"

_Static_assert(LUM_STATS_CLASSES == LUM_CLASSES, "stats and allocator classes agree");

static uint64_t stats_epoch;

struct snap {
    struct lum_stats *s;
    /* the pages of blocks waiting in owners' inboxes (one entry a block), sorted */
    uintptr_t *inbox;
    size_t ninbox, cap;
};

static void inbox_count(struct lum_page *page, void *arg)
{
    (void)page;
    ((struct snap *)arg)->ninbox++;
}

static void inbox_note(struct lum_page *page, void *arg)
{
    struct snap *sn = arg;
    if (sn->ninbox < sn->cap) sn->inbox[sn->ninbox++] = (uintptr_t)page;
}

static void heap_inbox_count(struct lum_heap *h, void *arg) { lum_heap_inbox_pages(h, inbox_count, arg); }
static void heap_inbox_note(struct lum_heap *h, void *arg) { lum_heap_inbox_pages(h, inbox_note, arg); }

/* Heapsort: no libc qsort, which may allocate (this runs inside the allocator, under its locks). */
static void sift(uintptr_t *a, size_t i, size_t n)
{
    for (size_t c; (c = 2 * i + 1) < n; i = c) {
        if (c + 1 < n && a[c + 1] > a[c]) c++;
        if (a[i] >= a[c]) return;
        uintptr_t t = a[i];
        a[i] = a[c];
        a[c] = t;
    }
}

static void sort_pages(uintptr_t *a, size_t n)
{
    for (size_t i = n / 2; i-- > 0;) sift(a, i, n);
    for (size_t end = n; end-- > 1;) {
        uintptr_t t = a[0];
        a[0] = a[end];
        a[end] = t;
        sift(a, 0, end);
    }
}

static uint32_t inbox_blocks_of(const struct snap *sn, const struct lum_page *page)
{
    size_t lo = 0, hi = sn->ninbox;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (sn->inbox[mid] < (uintptr_t)page) lo = mid + 1; else hi = mid;
    }
    uint32_t n = 0;
    while (lo < sn->ninbox && sn->inbox[lo++] == (uintptr_t)page) n++;
    return n;
}

static void add_segment(struct lum_segment *seg, void *arg)
{
    struct snap *sn = arg;
    struct lum_stats *s = sn->s;
    s->segments++;
    for (unsigned i = 1; i < LUM_SLICES;) {
        struct lum_page *page = seg->slice_page[i];
        if (page == &lum_invalid_sentinel) { i++; continue; }
        struct lum_class_stats *c = &s->classes[page->cls];
        c->pages++;
        c->blocks += page->capacity;
        int64_t live = (int64_t)__atomic_load_n(&page->used, __ATOMIC_RELAXED) +
                       (__atomic_load_n(&page->in_full, __ATOMIC_RELAXED) ? __atomic_load_n(&page->park_bias, __ATOMIC_RELAXED) : 0);
        /* freed by other threads, though used counts them until the owner collects them (an
         * idle owner: for good) */
        if (page->kind == LUM_PAGE_SMALL)
            live -= (int64_t)lum_page_remote_pending(page) + inbox_blocks_of(sn, page);
        /* The three fields above are read apart while the owner changes them (page_unfull
         * restores used before in_full clears): a page caught in between counted park_bias
         * twice, and its class more live blocks than its pages hold.  A page holds no fewer
         * than none and no more than all. */
        if (live < 0) live = 0;
        if (live > (int64_t)page->capacity) live = page->capacity;
        c->live_blocks += (uint64_t)live;
        /* what its slices record touched (the owner raises it as it carves: counter.h) */
        if (live) s->active += lum_span_bytes(seg, i, page->slices);
        i += page->slices ? page->slices : 1;
    }
}

/* Still under the segment lock, after the walk: resident goes down there (slices purged,
 * pages released) and up by the owners' carving, which accounts it before it raises the
 * slices' records (lum_page_touch): read after them, it covers every touched count read. */
static void read_globals(void *arg)
{
    struct lum_stats *s = ((struct snap *)arg)->s;
    const struct lum_global_counters_v1 *g = &lumalloc_registry.global;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    /* large blocks are accounted resident before they count live */
    s->large_live = __atomic_load_n(&g->large_live_bytes, __ATOMIC_ACQUIRE);
    s->mapped = __atomic_load_n(&g->mapped_bytes, __ATOMIC_RELAXED);
    s->resident = __atomic_load_n(&g->resident_bytes, __ATOMIC_RELAXED);
    s->retained = __atomic_load_n(&g->retained_bytes, __ATOMIC_RELAXED);
    s->metadata = __atomic_load_n(&g->metadata_bytes, __ATOMIC_RELAXED);
}

/* The thread walk's state: live records fill threads[] from the front, exited ones from the
 * back, so that past LUM_STATS_MAX_THREADS records exited threads make way for live ones
 * (truncated in list order, 300 exited threads left no room for the live ones). */
struct thread_walk {
    struct lum_stats *s;
    uint32_t nlive, nexited;
};

static void add_thread(struct lum_heap *h, void *arg)
{
    struct thread_walk *w = arg;
    struct lum_stats *s = w->s;
    const struct lum_thread_counters_v1 c = lum_tc_peek(&h->tc), *tc = &c;
    s->allocated += tc->alloc_bytes - tc->free_bytes; /* wraps back for cross-thread pairs */
    for (unsigned c = 0; c < LUM_CLASSES; c++) { /* freed, though their pages count them used */
        int8_t room = __atomic_load_n(&h->cache_room[c], __ATOMIC_RELAXED);
        /* no room and nothing cached: the cache is off (heap_caches_off), not full */
        if (room <= 0 && !__atomic_load_n(&h->cache[c], __ATOMIC_RELAXED)) continue;
        s->classes[c].live_blocks -= (uint64_t)(lum_cache_max[c] - (room < 0 ? 0 : room));
    }
    bool live = tc->state == LUM_THREAD_LIVE;
    if (w->nlive + w->nexited >= LUM_STATS_MAX_THREADS) {
        if (!live || !w->nexited) return;
        w->nexited--; /* the exited record kept last makes way */
    }
    struct lum_thread_stats *t = live ? &s->threads[w->nlive++]
                                      : &s->threads[LUM_STATS_MAX_THREADS - ++w->nexited];
    t->tid = tc->tid;
    t->live = live;
    t->alloc_count = tc->alloc_count;
    t->alloc_bytes = tc->alloc_bytes;
    t->free_count = tc->free_count;
    t->free_bytes = tc->free_bytes;
    t->large_count = tc->large_count;
    t->large_bytes = tc->large_bytes;
    t->failures = tc->failures;
    t->sampled_count = tc->sampled_count;
    t->sampled_bytes = tc->sampled_bytes;
}

/* Moves the exited records, kept at the back in reverse, behind the live ones in list order. */
static void close_threads(struct thread_walk *w)
{
    struct lum_stats *s = w->s;
    struct lum_thread_stats *first = &s->threads[LUM_STATS_MAX_THREADS - w->nexited];
    for (uint32_t i = 0, j = w->nexited; i + 1 < j; i++, j--) {
        struct lum_thread_stats t = first[i];
        first[i] = first[j - 1];
        first[j - 1] = t;
    }
    memmove(&s->threads[w->nlive], first, w->nexited * sizeof *first);
    s->nthreads = w->nlive + w->nexited;
}

LUM_EXPORT void lum_stats_snapshot(struct lum_stats *s)
{
    memset(s, 0, sizeof *s);
    for (unsigned c = 0; c < LUM_CLASSES; c++) s->classes[c].block_size = lum_class_size[c];
    struct snap sn = { s, NULL, 0, 0 };
    uint64_t exited[2];
    struct thread_walk walk = { s, 0, 0 };
    lum_lock(&lum_heaps_lock);
    /* Counted, then noted: what arrives in between is left out (exact when quiet). */
    lum_heaps_for_each_locked(heap_inbox_count, &sn, NULL);
    size_t bytes = 0;
    if (sn.ninbox) {
        sn.cap = sn.ninbox + sn.ninbox / 4 + 64;
        bytes = sn.cap * sizeof *sn.inbox;
        sn.inbox = lum_meta_alloc(bytes);
        sn.ninbox = 0;
        if (sn.inbox) {
            lum_heaps_for_each_locked(heap_inbox_note, &sn, NULL);
            sort_pages(sn.inbox, sn.ninbox);
        }
    }
    lum_segments_for_each_then(add_segment, read_globals, &sn);
    lum_heaps_for_each_locked(add_thread, &walk, exited);
    lum_unlock(&lum_heaps_lock);
    if (sn.inbox) lum_meta_free(sn.inbox, bytes);
    close_threads(&walk);
    const struct lum_global_counters_v1 *g = &lumalloc_registry.global;
    s->allocated += exited[0] - exited[1];
    s->active += s->large_live;
    /* The owners' caches, subtracted by add_thread, were read after their pages: a block taken
     * from its page and cached since is subtracted though its page did not count it. */
    for (unsigned c = 0; c < LUM_CLASSES; c++)
        if ((int64_t)s->classes[c].live_blocks < 0) s->classes[c].live_blocks = 0;
    s->purged_total = LUM_PEEK(g->purged_bytes);
    s->purge_events = LUM_PEEK(g->purge_events);
    s->pressure_events = LUM_PEEK(g->pressure_events);
    lum_lock(&lum_abandoned_lock);
    for (unsigned c = 0; c < LUM_CLASSES; c++)
        for (struct lum_page *p = lum_abandoned[c].head; p; p = p->next) s->abandoned_pages++;
    lum_unlock(&lum_abandoned_lock);
    s->epoch = __atomic_add_fetch(&stats_epoch, 1, __ATOMIC_RELAXED);
}

LUM_EXPORT void lum_stats_print(FILE *f, const struct lum_stats *s)
{
    fprintf(f, "___ lumalloc statistics (epoch %llu) ___\n", (unsigned long long)s->epoch);
    fprintf(f, "allocated %llu  active %llu  resident %llu  mapped %llu  retained %llu  metadata %llu\n",
            (unsigned long long)s->allocated, (unsigned long long)s->active,
            (unsigned long long)s->resident, (unsigned long long)s->mapped,
            (unsigned long long)s->retained, (unsigned long long)s->metadata);
    fprintf(f, "large live %llu  segments %llu  abandoned pages %llu  purged %llu in %llu passes  pressure events %llu\n",
            (unsigned long long)s->large_live, (unsigned long long)s->segments,
            (unsigned long long)s->abandoned_pages, (unsigned long long)s->purged_total,
            (unsigned long long)s->purge_events, (unsigned long long)s->pressure_events);
    fprintf(f, "%10s %8s %12s %12s %6s\n", "size", "pages", "blocks", "live", "util%");
    for (unsigned c = 0; c < LUM_STATS_CLASSES; c++) {
        const struct lum_class_stats *k = &s->classes[c];
        if (!k->pages) continue;
        fprintf(f, "%10u %8u %12llu %12llu %6.1f\n", k->block_size, k->pages,
                (unsigned long long)k->blocks, (unsigned long long)k->live_blocks,
                k->blocks ? 100.0 * (double)k->live_blocks / (double)k->blocks : 0.0);
    }
    fprintf(f, "%8s %5s %14s %14s %14s %14s %8s %6s\n", "tid", "live", "allocs", "alloc bytes",
            "frees", "free bytes", "large", "fails");
    for (uint32_t i = 0; i < s->nthreads; i++) {
        const struct lum_thread_stats *t = &s->threads[i];
        fprintf(f, "%8u %5s %14llu %14llu %14llu %14llu %8llu %6llu\n", t->tid, t->live ? "yes" : "no",
                (unsigned long long)t->alloc_count, (unsigned long long)t->alloc_bytes,
                (unsigned long long)t->free_count, (unsigned long long)t->free_bytes,
                (unsigned long long)t->large_count, (unsigned long long)t->failures);
    }
}

LUM_EXPORT void lum_stats_print_json(FILE *f, const struct lum_stats *s)
{
    fprintf(f, "{\"epoch\":%llu,\"allocated\":%llu,\"active\":%llu,\"resident\":%llu,\"mapped\":%llu,"
               "\"retained\":%llu,\"metadata\":%llu,\"large_live\":%llu,\"segments\":%llu,"
               "\"abandoned_pages\":%llu,\"purged\":%llu,\"purge_events\":%llu,\"pressure_events\":%llu,"
               "\"classes\":[",
            (unsigned long long)s->epoch, (unsigned long long)s->allocated,
            (unsigned long long)s->active, (unsigned long long)s->resident,
            (unsigned long long)s->mapped, (unsigned long long)s->retained,
            (unsigned long long)s->metadata, (unsigned long long)s->large_live,
            (unsigned long long)s->segments, (unsigned long long)s->abandoned_pages,
            (unsigned long long)s->purged_total, (unsigned long long)s->purge_events,
            (unsigned long long)s->pressure_events);
    const char *sep = "";
    for (unsigned c = 0; c < LUM_STATS_CLASSES; c++) {
        const struct lum_class_stats *k = &s->classes[c];
        if (!k->pages) continue;
        fprintf(f, "%s{\"size\":%u,\"pages\":%u,\"blocks\":%llu,\"live\":%llu}", sep, k->block_size,
                k->pages, (unsigned long long)k->blocks, (unsigned long long)k->live_blocks);
        sep = ",";
    }
    fprintf(f, "],\"threads\":[");
    for (uint32_t i = 0; i < s->nthreads; i++) {
        const struct lum_thread_stats *t = &s->threads[i];
        fprintf(f, "%s{\"tid\":%u,\"live\":%s,\"alloc_count\":%llu,\"alloc_bytes\":%llu,"
                   "\"free_count\":%llu,\"free_bytes\":%llu,\"large_count\":%llu,\"large_bytes\":%llu,"
                   "\"failures\":%llu,\"sampled_count\":%llu,\"sampled_bytes\":%llu}",
                i ? "," : "", t->tid, t->live ? "true" : "false", (unsigned long long)t->alloc_count,
                (unsigned long long)t->alloc_bytes, (unsigned long long)t->free_count,
                (unsigned long long)t->free_bytes, (unsigned long long)t->large_count,
                (unsigned long long)t->large_bytes, (unsigned long long)t->failures,
                (unsigned long long)t->sampled_count, (unsigned long long)t->sampled_bytes);
    }
    fprintf(f, "]}\n");
}

LUM_EXPORT void lum_malloc_stats(void)
{
    /* The snapshot is large: keep it off the stack of whatever thread asked. */
    struct lum_stats *s = lum_meta_alloc(sizeof *s);
    if (!s) return;
    lum_stats_snapshot(s);
    lum_stats_print(stderr, s);
    lum_meta_free(s, sizeof *s);
}

void malloc_stats(void) __attribute__((alias("lum_malloc_stats"), visibility("default")));
