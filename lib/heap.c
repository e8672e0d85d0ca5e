/* Thread heaps: the slow paths behind malloc and free, cross-thread frees, thread start and exit,
 * page abandonment and adoption, and the registry that tools read. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "internal.h"
#include "observe.h"
#include "options.h"
#include "sampler_fast.h"
#include "lumalloc.h"
#include "lumalloc_failure.h"

/* A heap record's first page holds the lists up to the 4 KiB class (56 in size_class.c): see
 * struct lum_heap's avail. */
_Static_assert(offsetof(struct lum_heap, avail) + 57 * sizeof(struct lum_page_list) <= 4096,
               "the 4 KiB class's lists moved to the heap record's second page");

/* its class indexes the heaps' always empty cache slot */
struct lum_page lum_empty_page = { .kind = LUM_PAGE_INVALID, .cls = LUM_CLASSES };
struct lum_page lum_large_sentinel = { .kind = LUM_PAGE_LARGE };
struct lum_page lum_invalid_sentinel = { .kind = LUM_PAGE_INVALID };

#define E8(x) x, x, x, x, x, x, x, x
#define E96(x) E8(x), E8(x), E8(x), E8(x), E8(x), E8(x), E8(x), E8(x), E8(x), E8(x), E8(x), E8(x)
/* The heap of a thread that has none yet (or no longer): what malloc's and free's fast paths
 * read of it, and nothing more.  Every other path checks for it before it reads a heap (it is
 * only ever compared against), so the object is the fast fields alone: 2.3 KiB of .data
 * instead of 6.1, and the library's written data and .bss one 4 KiB page fewer in every
 * process (4 -> 3). */
#define SAME_OFFSET(f) _Static_assert(offsetof(struct lum_heap_fast, f) == offsetof(struct lum_heap, f), #f)
SAME_OFFSET(cache);
SAME_OFFSET(cache_room);
SAME_OFFSET(slot_class);
SAME_OFFSET(class_size);
SAME_OFFSET(current);
SAME_OFFSET(tc);
SAME_OFFSET(sample_left);
struct lum_heap_fast lum_empty_heap_fast = {
    .current = { E96(&lum_empty_page), &lum_empty_page },
    .sample_left = LUM_SAMPLE_FORCED };

__thread struct lum_heap *lum_tls_heap __attribute__((tls_model("initial-exec"))) = &lum_empty_heap;
/* Set once this thread's heap has been torn down: later frees (other TLS destructors) must not
 * build a new heap just to count them. */
static __thread int lum_tls_exited __attribute__((tls_model("initial-exec")));

LUM_EXPORT struct lum_registry_v1 lumalloc_registry = {
    .magic = LUM_REGISTRY_MAGIC,
    .version = LUM_PROBES_VERSION,
    .counters_size = sizeof(struct lum_thread_counters_v1),
};

/* malloc's fast path serves sizes below this; at and above it, the large path and the large
 * warning need the slow path. */
size_t lum_fast_limit = LUM_SMALL_MAX + 1;
_Atomic int lum_initialized; /* 0: no, 1: in progress (recursive calls go ahead), 2: done */
lum_lock_t lum_heaps_lock;
lum_lock_t lum_abandoned_lock;
struct lum_page_list lum_abandoned[LUM_CLASSES];
static struct lum_heap *all_heaps;
static struct lum_heap *heap_pool;
static pthread_key_t heap_key;
static uint64_t rng_seed_counter;

static void heap_teardown(void *arg);
static void forward_inbox(struct lum_heap *heap);
static void forward_pooled_inbox(struct lum_heap *heap);
/* Set while this thread holds lum_heaps_lock and may free blocks on (abandonment, reclaim). */
static __thread int holding_heaps_lock __attribute__((tls_model("initial-exec")));
void lum_fork_install(void);
/* A heap's size slots, as lum_small_class, but those holding sizes at or above warn (the large
 * warning's threshold; 0: off) go to LUM_SLOW_CLASS, whose tests send them to lum_malloc_slow,
 * which warns.  The fast path's slots are its own tests: a threshold check there would cost
 * every small allocation two instructions for an option that is almost always off or far above
 * 1 KiB (sizes above are checked against lum_fast_limit).  A slot's sizes below the threshold
 * take the slow path too, and are served there as usual.  Relaxed stores: the owner's fast path
 * may be reading them (lum_size_limits_apply). */
static void heap_slot_classes(struct lum_heap *heap, uint64_t warn)
{
    for (unsigned i = 0; i < LUM_DIRECT_SLOTS; i++) {
        uint8_t c = warn && (uint64_t)i * LUM_ALIGN >= warn ? LUM_SLOW_CLASS : lum_small_class[i];
        __atomic_store_n(&heap->slot_class[i], c, __ATOMIC_RELAXED);
    }
}

/* Puts LUMALLOC_LARGE_THRESHOLD and LUMALLOC_LARGE_WARN into effect, at initialisation and
 * whenever lum_options_set changes either while threads allocate: the threshold (clamped as it
 * is parsed, options.c) published for the tools, and the sizes that leave the fast path (at and
 * above the warning's threshold, or over the large one).  A thread in the middle of a malloc
 * may still serve one block by the old rule. */
void lum_size_limits_apply(void)
{
    /* under the lock that heap_create links a new record with (its slots made there), and one
     * change at a time: what the last one leaves is what lum_opt holds */
    lum_lock(&lum_heaps_lock);
    __atomic_store_n(&lumalloc_registry.large_threshold, lum_opt.large_threshold, __ATOMIC_RELAXED);
    size_t fast_limit = lum_opt.large_threshold + 1;
    if (lum_opt.large_warn && lum_opt.large_warn < fast_limit) fast_limit = lum_opt.large_warn;
    __atomic_store_n(&lum_fast_limit, fast_limit, __ATOMIC_RELAXED);
    /* every record, whatever the change: it is rare, and so no record keeps slots an earlier
     * warning set */
    for (struct lum_heap *h = all_heaps; h; h = h->next_all) heap_slot_classes(h, lum_opt.large_warn);
    lum_unlock(&lum_heaps_lock);
}

/* Set while this thread initialises: its own nested allocations go ahead with the defaults,
 * while other threads wait for initialisation to finish. */
static __thread int lum_tls_initializing __attribute__((tls_model("initial-exec")));

void lum_global_init(void)
{
    static lum_lock_t init_lock;
    if (lum_tls_initializing) return;
    lum_lock(&init_lock);
    if (atomic_load(&lum_initialized) == 0) {
        lum_tls_initializing = 1;
        atomic_store(&lum_initialized, 1);
        lum_options_init();
        lumalloc_registry.sample_interval = lum_opt.sample_interval;
        lum_size_limits_apply();
        pthread_key_create(&heap_key, heap_teardown);
        lum_fork_install();
        atomic_store(&lum_initialized, 2);
        lum_tls_initializing = 0;
        /* a heap made by an allocation nested in the above still needs its exit hook */
        if (lum_tls_heap != &lum_empty_heap) pthread_setspecific(heap_key, lum_tls_heap);
        lum_unlock(&init_lock);
        lum_observe_init();
        return;
    }
    lum_unlock(&init_lock);
}

/* Larger sizes than any allocation can have: a draw (at most 2^62) plus one of them cannot
 * wrap sample_left. */
#define SAMPLE_AFTER_MAX ((uint64_t)1 << 61)

/* sample_left for a point drawn `after` bytes (below SAMPLE_AFTER_MAX) from where the counter
 * stands (the allocation being made will count them): the point itself is the byte no
 * allocation may reach unsampled; or where to draw again (LUM_SAMPLE_RECHECK). */
static inline __attribute__((always_inline)) int64_t next_point(struct lum_heap *heap, uint64_t after)
{
    /* the epoch first: an interval changed in between makes this point stale, never one drawn
     * with the old interval current */
    heap->sample_epoch = __atomic_load_n(&lum_sample_epoch, __ATOMIC_ACQUIRE);
    int64_t interval = lum_sampler_draw(&heap->rng); /* INT64_MAX: sampling off */
    heap->sample_recheck = interval > LUM_SAMPLE_RECHECK;
    if (heap->sample_recheck) interval = LUM_SAMPLE_RECHECK;
    return interval + (int64_t)after - 1;
}

/* The point with what next_point sets beside it, so that a sample taken and then undone (a
 * growth in place that cannot grow, lum_heap_grow_block) leaves malloc the very point: the left
 * bytes alone, put back beside a recheck flag or epoch of the next draw, made malloc's slow path
 * find the point stale and draw again, and the sample was lost (every growth refused after a
 * draw over LUM_SAMPLE_RECHECK: most of them at an 8 MiB interval). */
struct sample_state {
    int64_t left;
    uint32_t epoch;
    bool recheck;
};

static inline struct sample_state sample_state_save(const struct lum_heap *heap)
{
    return (struct sample_state){heap->sample_left, heap->sample_epoch, heap->sample_recheck};
}

static inline void sample_state_restore(struct lum_heap *heap, struct sample_state s)
{
    heap->sample_left = s.left;
    heap->sample_epoch = s.epoch;
    heap->sample_recheck = s.recheck;
}

/* Whether the point in sample_left is not one to sample at (see lum_sample_epoch). */
static inline bool point_stale(const struct lum_heap *heap)
{
    return heap->sample_recheck | (heap->sample_epoch != __atomic_load_n(&lum_sample_epoch, __ATOMIC_RELAXED));
}

/* next_point for any size, or LUM_SAMPLE_FORCED while failure injection needs every
 * allocation on the slow path. */
static inline __attribute__((always_inline)) int64_t next_sample_after(struct lum_heap *heap, uint64_t after)
{
    if (lum_fail_is_armed()) return LUM_SAMPLE_FORCED;
    if (after >= SAMPLE_AFTER_MAX) return LUM_SAMPLE_OFF;
    return next_point(heap, after);
}

void lum_heap_force_slow(void)
{
    if (lum_tls_heap != &lum_empty_heap) lum_tls_heap->sample_left = LUM_SAMPLE_FORCED;
}

LUM_SAMPLE_DATA4 uint32_t lum_sample_epoch;

void lum_heap_interval_changed(void)
{
    __atomic_fetch_add(&lum_sample_epoch, 1, __ATOMIC_RELEASE);
    lum_heap_force_slow();
}

/* Decides whether an allocation whose ordinary block is `window` bytes is sampled: it is when
 * the next sample point falls inside it (probability 1 - exp(-window / interval), which the
 * sampler's weight inverts).  A sampled block may be larger (`advance`, the bytes the counter
 * will move by): the next point is drawn from where the counter will then stand. */
static inline bool take_sample(struct lum_heap *heap, size_t window, size_t advance)
{
    int64_t left = heap->sample_left;
    if (lum_sample_forced(left)) { /* back from failure injection: re-arm, no sample */
        heap->sample_left = next_sample_after(heap, 0);
        return false;
    }
    if (left >= 0 && (uint64_t)left >= window) return false;
    if (LUM_UNLIKELY(point_stale(heap))) {
        heap->sample_left = next_sample_after(heap, window);
        return false;
    }
    heap->sample_left = next_sample_after(heap, advance);
    return true;
}

bool lum_heap_take_sample(struct lum_heap *heap, size_t window, size_t advance)
{
    return take_sample(heap, window, advance);
}

/* Empties class c's cache and gives it its full room again; returns the blocks it held. */
static lum_block *cache_take(struct lum_heap *heap, unsigned c)
{
    lum_block *b = heap->cache[c];
    LUM_OWN_SET(heap->cache[c], NULL);
    LUM_OWN_SET(heap->cache_room[c], (int8_t)lum_cache_max[c]);
    return b;
}

/* Empties a heap record's page lists (a fresh record, or a dead thread's in a fork child). */
static void heap_forget_pages(struct lum_heap *heap)
{
    lum_heap_set_current(heap, LUM_SLOW_CLASS, &lum_empty_page);
    for (unsigned c = 0; c < LUM_CLASSES; c++) {
        lum_heap_set_current(heap, c, &lum_empty_page);
        /* written only when set: a fresh record's lists of big classes and full lists stay
         * untouched (struct lum_heap) */
        if (heap->avail[c].head || heap->avail[c].tail) heap->avail[c].head = heap->avail[c].tail = NULL;
        if (heap->full[c].head || heap->full[c].tail) heap->full[c].head = heap->full[c].tail = NULL;
        heap->retained_count[c] = 0;
        cache_take(heap, c); /* its blocks are on pages this record no longer has */
    }
    heap->retained_bytes = 0;
    if (heap->empty_big) heap->empty_big = NULL;
    /* what a dead thread collected is no reason for its successor to scan early */
    if (heap->remote_collected) heap->remote_collected = 0;
}

static void tc_clear(struct lum_thread_counters_v1 *tc)
{
    _Static_assert(offsetof(struct lum_thread_counters_v1, next) == 0 &&
                       sizeof *tc == 8 + 4 + 4 + 9 * 8, "tc_clear clears every field but the link");
#define TC_CLEAR_FIELD(f) LUM_OWN_SET(tc->f, 0);
    LUM_TC_FIELDS(TC_CLEAR_FIELD)
#undef TC_CLEAR_FIELD
}

static struct lum_heap *heap_create(void)
{
    struct lum_heap *heap;
    lum_lock(&lum_heaps_lock);
    heap = heap_pool;
    if (heap) {
        heap_pool = heap->next_pool;
        heap->pooled = false;
        /* The record is reused: fold its final figures into the process totals, and clear
         * them, in one step under the lock (readers sum both under it).  The generation moves
         * before as well as after: a reader in another process that sees it unchanged across
         * its walk saw no record half folded (it moved only after). */
        __atomic_add_fetch(&lumalloc_registry.generation, 1, __ATOMIC_RELEASE);
        lum_count_global(&lumalloc_registry.global.exited_alloc_bytes, (int64_t)heap->tc.alloc_bytes);
        lum_count_global(&lumalloc_registry.global.exited_free_bytes, (int64_t)heap->tc.free_bytes);
        /* Everything but the link: readers walk the list without the lock (tools, through
         * process_vm_readv, and lum_threads_foreach), and a link zeroed for a moment would cut
         * it short for them.  Field by field, as the owner writes them (counter.h), for those
         * readers. */
        tc_clear(&heap->tc);
    }
    lum_unlock(&lum_heaps_lock);
    if (heap) {
        /* a fork child's pooled record is as its thread left it, maybe inside realloc's padded
         * allocation (lum_realloc): its padding is not the new thread's */
        heap->padding = false;
        heap->pad_want = heap->pad_asked = 0;
        forward_inbox(heap); /* frees that reached it after its thread left */
    } else {
        heap = lum_meta_alloc(sizeof *heap);
        if (!heap) return NULL;
        /* Whole before it is linked: a fork child pools every linked record whose thread is
         * gone, as it finds it.  A pooled record comes back as lum_heap_abandon left it, its
         * lists and caches emptied already: the 96-class pass again was ~2,700 instructions a
         * thread (bench threadchurn). */
        heap_forget_pages(heap);
        memcpy(heap->class_size, lum_class_size, sizeof lum_class_size);
        heap->class_size[LUM_SLOW_CLASS] = 0;
        lum_lock(&lum_heaps_lock);
        /* under the lock, so that a change of the large warning (lum_size_limits_apply) finds
         * the record in the list or is in lum_opt already */
        heap_slot_classes(heap, lum_opt.large_warn);
        heap->next_all = all_heaps;
        heap->tc.next = all_heaps ? (uint64_t)(uintptr_t)&all_heaps->tc : 0;
        all_heaps = heap;
        /* release: a reader walking without the lock must find the link already written */
        __atomic_store_n(&lumalloc_registry.threads_head, (uint64_t)(uintptr_t)&heap->tc, __ATOMIC_RELEASE);
        lum_unlock(&lum_heaps_lock);
    }
    heap->tid = (uint32_t)syscall(SYS_gettid);
    LUM_OWN_SET(heap->tc.tid, heap->tid);
    LUM_OWN_SET(heap->tc.state, LUM_THREAD_LIVE);
    heap->rng = (uint64_t)(uintptr_t)heap ^ ((uint64_t)heap->tid << 32) ^
                (__atomic_add_fetch(&rng_seed_counter, 0x9e3779b97f4a7c15ULL, __ATOMIC_RELAXED));
    if (!heap->rng) heap->rng = 1;
    __atomic_store_n(&heap->alive, 1, __ATOMIC_RELAXED); /* read by remote frees: see free_remote */
    heap->sample_left = next_sample_after(heap, 0);
    __atomic_add_fetch(&lumalloc_registry.generation, 1, __ATOMIC_RELEASE);
    return heap;
}

/* The calling thread's heap, made on first use; NULL only if metadata cannot be mapped. */
struct lum_heap *lum_heap_get(void)
{
    struct lum_heap *heap = lum_tls_heap;
    if (LUM_LIKELY(heap != &lum_empty_heap)) return heap;
    if (atomic_load_explicit(&lum_initialized, memory_order_acquire) != 2) lum_global_init();
    heap = lum_tls_heap; /* initialisation may have allocated, and so made it */
    if (heap != &lum_empty_heap) return heap;
    heap = heap_create();
    if (!heap) return NULL;
    lum_tls_heap = heap;
    lum_tls_exited = 0;
    if (atomic_load(&lum_initialized) == 2) pthread_setspecific(heap_key, heap);
    lum_on_thread_start(&heap->tc);
    return heap;
}

/* A mapping failed (an address-space limit, overcommit off, memory gone): before the caller
 * fails, everything free goes back, wholly free segments unmapped (decay would have kept them
 * for LUMALLOC_DECAY_MS: under `ulimit -v`, 200 MB freed and then malloc(3 MiB) failed where
 * glibc's succeeded).  Whether any came back, and the mapping is worth another try.  Called
 * with no lock held. */
bool lum_release_for_retry(void)
{
    return lum_purge() > 0;
}

void *lum_large_alloc_or_fail(struct lum_heap *heap, size_t size, size_t alignment, bool zero)
{
    int err = errno;
    void *p = lum_large_alloc(heap, size, alignment, zero, !lum_fail_is_armed());
    if (LUM_UNLIKELY(!p) && lum_release_for_retry()) {
        errno = err;
        p = lum_large_alloc(heap, size, alignment, zero, !lum_fail_is_armed());
    }
    return p ? p : lum_alloc_failed(heap, size, alignment, ENOMEM);
}

struct lum_heap *lum_heap_get_unless_exited(void)
{
    return lum_tls_heap == &lum_empty_heap && lum_tls_exited ? NULL : lum_heap_get();
}

/* ---- cross-thread frees ---- */

/* Pushes the chain first..last (last a block of page) onto list (an inbox). */
static inline void push_chain_atomic(_Atomic(lum_block *) *list, const struct lum_page *page, lum_block *first,
                                     lum_block *last)
{
    lum_block *head = atomic_load_explicit(list, memory_order_relaxed);
    do {
        lum_remote_set_next(page, last, head);
    } while (!atomic_compare_exchange_weak_explicit(list, &head, first, memory_order_release,
                                                    memory_order_relaxed));
}


/* A page's thread_free list carries this mark (and no blocks) while the page sits on its
 * owner's full list: the owner would not look at the page again by itself, so the first remote
 * free after the mark takes it off and sends its block to the owner's inbox, which brings the
 * page back to the avail list.  Mark and list share one word, so a free either lands on the list
 * before the owner parks the page (and the owner sees it) or finds the mark (mimalloc's
 * delayed free). */
#define LUM_TF_FULL ((lum_block *)(uintptr_t)1)

/* What decay has to look at (lum_abandoned_idle): the bytes carved in the empty pages of exited
 * threads kept on the abandoned lists (about what they hold resident; a multiple of 16, as every
 * block size), and in bit 0 ABANDONED_FREED_INTO (abandoned_freed_into).  One word, so that
 * decay's test on each slow path that maps a page stays one load; atomic adds, as the bit is
 * set without lum_abandoned_lock, under which the bytes are counted. */
static size_t abandoned_due;
#define ABANDONED_FREED_INTO ((size_t)1)
/* Pages let go of onto the abandoned lists so far (wrapping): read by a remote free around its
 * push (push_to_page), moved by abandon_locked.  Read-mostly: on a line of its own. */
static _Alignas(64) _Atomic uint32_t lum_abandons;
static void abandoned_freed_into(void);

/* Pushes the chain first..last (blocks of page) where other threads' frees of page go: the
 * page's own thread_free list, or the owner's inbox when the page is parked full.  A remote free
 * (one block: free_remote) also sees to an exiting owner and to an ownerless page; statistics put
 * a chain back with lum_heaps_lock held, so that no owner exits meanwhile. */
static inline __attribute__((always_inline)) void push_to_page(struct lum_page *page, lum_block *first,
                                                               lum_block *last, bool from_free)
{
    /* The count of pages let go of, then the owner, before the push: once the push has landed,
     * the page may be collected, emptied, released and its segment unmapped (with
     * LUMALLOC_DECAY_MS=0 at once), so after it only the count is read. */
    uint32_t abandons = atomic_load_explicit(&lum_abandons, memory_order_seq_cst);
    bool owned = atomic_load_explicit(&page->owner, memory_order_seq_cst) != NULL;
    lum_block *head = atomic_load_explicit(&page->thread_free, memory_order_relaxed);
    for (;;) {
        if (head == LUM_TF_FULL) {
            if (!atomic_compare_exchange_weak_explicit(&page->thread_free, &head, NULL, memory_order_acq_rel,
                                                       memory_order_relaxed))
                continue;
            /* the mark was the current owner's: look it up (a stale owner's inbox forwards, see
             * drain_inbox) */
            struct lum_heap *owner = atomic_load_explicit(&page->owner, memory_order_acquire);
            if (owner) {
                push_chain_atomic(&owner->inbox, page, first, last);
                /* The owner may be exiting: it clears alive and then drains its inbox a last
                 * time.  With a full fence on each side, either that drain sees this block or
                 * this load sees alive clear and the block is sent on here; otherwise it would
                 * wait in a pooled record, pinning its page, until a new thread reused it. */
                if (from_free) {
                    atomic_thread_fence(memory_order_seq_cst);
                    if (!__atomic_load_n(&owner->alive, __ATOMIC_RELAXED) && !holding_heaps_lock)
                        forward_pooled_inbox(owner);
                }
                return;
            }
            head = NULL;
        }
        lum_remote_set_next(page, last, head);
        if (atomic_compare_exchange_weak_explicit(&page->thread_free, &head, first, memory_order_seq_cst,
                                                  memory_order_relaxed))
            break;
    }
    /* An owner that lets the page go meanwhile may collect the page's list before this push
     * lands: it clears the page's owner, counts the page in lum_abandons, and collects once
     * more (abandon_locked), so that either that collect sees this push or this read sees the
     * count moved (or the owner read above saw it gone).  With the owner read only before the
     * push and no count, a page was filed as holding blocks that had all come back, where
     * decay never looked.  Any page let go of meanwhile moves the count: a look too many for
     * decay at worst. */
    if (!owned || atomic_load_explicit(&lum_abandons, memory_order_seq_cst) != abandons) {
        if (from_free)
            abandoned_freed_into();
        else
            __atomic_fetch_or(&abandoned_due, ABANDONED_FREED_INTO, __ATOMIC_RELEASE);
    }
}

/* A block whose page this thread does not own.  It goes on the page's own thread_free list (one
 * CAS on a line the owner seldom touches; the owner collects the list when it next looks for
 * room in that page), to the owner's inbox when the page is parked full, or stays on the page
 * while nobody owns it.  Inline: free_foreign's call of it, with the registers it saved, was
 * a tenth of a remote free's instructions (callgrind, bench xthread: -5.7% inlined). */
static inline __attribute__((always_inline)) void free_remote(struct lum_page *page, lum_block *b)
{
    push_to_page(page, b, b, true);
}

/* free_remote out of line, for a block the owner's drain finds is no longer its own (the page
 * changed hands after the sender looked): seldom, so not worth a copy in the hot text. */
static LUM_NOINLINE void forward_remote(struct lum_page *page, lum_block *b)
{
    free_remote(page, b);
}

/* The owner parks a page with no room on its full list only if no remote free has arrived since
 * it last collected: false when one has (the caller collects it and goes on with the page). */
static bool page_mark_full(struct lum_page *page)
{
    lum_block *expected = NULL;
    return atomic_compare_exchange_strong_explicit(&page->thread_free, &expected, LUM_TF_FULL,
                                                   memory_order_acq_rel, memory_order_acquire) ||
           expected == LUM_TF_FULL;
}

static void page_unmark_full(struct lum_page *page)
{
    lum_block *expected = LUM_TF_FULL;
    /* fails when a remote free took the mark off already: nothing to do then */
    atomic_compare_exchange_strong_explicit(&page->thread_free, &expected, NULL, memory_order_acq_rel,
                                            memory_order_relaxed);
}

/* Sends each block of a list taken off an inbox on to its page's current owner. */
static void forward_blocks(lum_block *b)
{
    while (b) {
        lum_block *next = lum_remote_next(b);
        free_remote(lum_page_of(b), b);
        b = next;
    }
}

/* A heap record whose thread has gone (pooled, or a fork child's dead thread) owns no pages:
 * whatever reached its inbox late goes on to the pages' current owners. */
static void forward_inbox(struct lum_heap *heap)
{
    if (!atomic_load_explicit(&heap->inbox, memory_order_relaxed)) return;
    forward_blocks(atomic_exchange_explicit(&heap->inbox, NULL, memory_order_acquire));
}

/* For a free that raced with its owner's exit (see free_remote).  Only while the record is in
 * the pool: once a new thread has it, its inbox holds blocks sent for that thread's parked pages,
 * which a forward would put back on those pages' lists behind the full mark.  An exiting owner
 * holds lum_heaps_lock from its last drain until the record is pooled, so a free that saw alive
 * clear finds it pooled here, unless a new thread took the record in between; and a free that
 * stalled between its push and its look at alive while the owner exited and a new thread took
 * the record reads that thread's alive.  Either way its block waits in the new thread's inbox
 * until that thread's next drain (a page switch, lum_purge, its exit), which sends it on to its
 * page (drain_inbox): late, not lost. */
static void forward_pooled_inbox(struct lum_heap *heap)
{
    lum_lock(&lum_heaps_lock);
    lum_block *b = heap->pooled ? atomic_exchange_explicit(&heap->inbox, NULL, memory_order_acquire) : NULL;
    lum_unlock(&lum_heaps_lock);
    forward_blocks(b);
}

/* ---- pending cross-thread frees, for statistics ---- */

/* A page's used counts the blocks other threads freed into it until its owner collects them,
 * which an idle owner never does: statistics take each such list off (which makes its blocks
 * theirs to read), count it and put it back.  Only under lum_heaps_lock, so that no owner is
 * between its last drain and its record's pooling (lum_heap_abandon): blocks put back then
 * would wait in a pooled record. */

LUM_COLD_TEXT uint32_t lum_page_remote_pending(struct lum_page *page)
{
    lum_block *list = atomic_load_explicit(&page->thread_free, memory_order_relaxed);
    /* a CAS, not an exchange: the owner's full mark, set since the load, must stay */
    do {
        if ((uintptr_t)list <= 1) return 0;
    } while (!atomic_compare_exchange_weak_explicit(&page->thread_free, &list, NULL, memory_order_acquire,
                                                    memory_order_relaxed));
    uint32_t n = 1;
    lum_block *last = list;
    for (lum_block *next; (next = lum_remote_next(last)) != NULL; last = next) n++;
    push_to_page(page, list, last, false); /* back, as free_remote would put them */
    return n;
}

LUM_COLD_TEXT void lum_heap_inbox_pages(struct lum_heap *heap, void (*fn)(struct lum_page *, void *), void *arg)
{
    if (heap->pooled || !atomic_load_explicit(&heap->inbox, memory_order_relaxed)) return;
    lum_block *list = atomic_exchange_explicit(&heap->inbox, NULL, memory_order_acquire);
    if (!list) return;
    lum_block *last = list;
    for (lum_block *b = list; b; b = lum_remote_next(b)) {
        fn(lum_page_of(b), arg);
        last = b;
    }
    push_chain_atomic(&heap->inbox, lum_page_of(last), list, last);
}

/* A remote free landed on an abandoned page's thread_free: a free from a thread whose heap was
 * torn down (pthread-key destructors that run after lumalloc's, glibc's thread freeres), one
 * that read the owner just before it abandoned the page, or one forwarded from an exited
 * owner's inbox.  The page stays filed as holding blocks, so the bytes of empty pages do not
 * move; the bit makes decay look (lum_abandoned_idle) and collect them (95 pages of such frees,
 * all empty, stayed resident for as long as the process ran and allocated none of their
 * class).  Out of line, in place of the call it wraps: the remote free's text no longer. */
static LUM_NOINLINE void abandoned_freed_into(void)
{
    /* release: after the push (in C11 terms too, not only as x86's locked CAS orders it), so
     * after the clear that a walk that missed the push made before it (lum_abandoned_reclaim) */
    __atomic_fetch_or(&abandoned_due, ABANDONED_FREED_INTO, __ATOMIC_RELEASE);
    lum_background_note_dirty(); /* the page may now be empty: decay reclaims it */
}
/* Thread exits so far (wrapping), under lum_abandoned_lock: the clock of abandoned_release_stale. */
static uint16_t abandon_exits;
#define LUM_STALE_EXITS 16
/* Stale pages (see abandoned_release_stale) kept while they carve no more than this in all. */
#define LUM_STALE_KEEP ((size_t)32 << 10)
/* Stale pages ranked by age at one exit (the first LUM_STALE_RANK the walk finds); those it
 * finds beyond them go back whatever their age or bytes. */
#define LUM_STALE_RANK 32
#define LUM_ABANDONED_EMPTY_MAX ((size_t)4 << 20)

static size_t page_carved_bytes(const struct lum_page *page)
{
    return (size_t)page->carved * page->block_size;
}

static void abandoned_unlink(struct lum_page *page);

/* The oldest empty abandoned page (empty ones sit at the tails of the class lists, oldest
 * first), or NULL.  Under lum_abandoned_lock. */
static struct lum_page *oldest_empty_abandoned(void)
{
    struct lum_page *oldest = NULL;
    for (unsigned c = 0; c < LUM_CLASSES; c++) {
        struct lum_page *p = lum_abandoned[c].tail;
        if (!p || p->abandoned != LUM_ABANDONED_EMPTY) continue;
        while (p->prev && p->prev->abandoned == LUM_ABANDONED_EMPTY) p = p->prev;
        if (!oldest || p->abandoned_ms < oldest->abandoned_ms) oldest = p;
    }
    return oldest;
}

/* Puts page on lum_abandoned[cls] (caller holds lum_abandoned_lock): pages with live blocks
 * first, since adopting those fills their holes; empty ones at the back, oldest first. */
static void abandoned_file(struct lum_page *page, unsigned cls, bool empty)
{
    if (empty) {
        page->abandoned_exits = abandon_exits;
        __atomic_fetch_add(&abandoned_due, page_carved_bytes(page), __ATOMIC_RELAXED);
        lum_list_push_back(&lum_abandoned[cls], page);
    } else {
        page->freed_by = 0;
        lum_list_push_front(&lum_abandoned[cls], page);
    }
    page->abandoned = empty ? LUM_ABANDONED_EMPTY : LUM_ABANDONED_WITH_BLOCKS;
}

/* An empty page that carved nothing (lum_page_uncarve) holds no memory worth keeping, and
 * would add nothing to abandoned_due, by which decay decides whether to look at the
 * lists at all: kept, it stayed there for good. */
static bool not_worth_keeping(const struct lum_page *page)
{
    return page->used == 0 && page->carved == 0;
}

/* A fork child finds the pages of the threads that did not survive by their owner
 * (lum_heaps_after_fork_child) and keeps the abandoned lists: a small page in a slice map with
 * neither an owner nor a list is one nobody will ever use or release in the child.  So a page
 * is without an owner only on an abandoned list, or in the hands of a thread that holds
 * lum_abandoned_lock (which fork's prepare handler takes before lum_segment_lock) until the
 * page is filed again or out of its slice map: an empty abandoned page that goes back does so
 * under the lock, and a page its owner lets go of to its segment keeps its owner until
 * lum_page_release clears it under the segment lock.  Taken outside both locks, those steps
 * lost pages (an emptied abandoned page filed again, stale ones given back at a thread exit):
 * 15 of the 39 such pages in 6000 children of test_fork_orphan_pages, the other 24 new pages
 * (lum_page_alloc).
 * Puts a page let go of on lum_abandoned[cls]; false for an empty page over the bound, with its
 * owner as it was (the caller releases it, under the lock if it has none).  Caller holds
 * lum_abandoned_lock. */
static bool abandon_locked(struct lum_page *page, unsigned cls, uint64_t now)
{
    bool empty = page->used == 0;
    if (not_worth_keeping(page)) return false;
    /* over the bound, the oldest go first: they are the least likely to be wanted again */
    /* (abandoned_due's bit 0 counts as a byte: no matter to this bound) */
    while (empty && __atomic_load_n(&abandoned_due, __ATOMIC_RELAXED) + page_carved_bytes(page) > LUM_ABANDONED_EMPTY_MAX) {
        struct lum_page *old = oldest_empty_abandoned();
        if (!old) return false;
        abandoned_unlink(old);
        lum_page_release(old, false);
    }
    atomic_store_explicit(&page->owner, NULL, memory_order_seq_cst);
    atomic_fetch_add_explicit(&lum_abandons, 1, memory_order_seq_cst);
    if (!empty) {
        /* A remote free that read the old owner may have pushed since the caller collected, and
         * it reads lum_abandons after its push (push_to_page): this collect, after the count
         * and a full fence, or that read sees the other.  A page it empties is filed as empty,
         * over the bound or not (the bound is the next exits' and decay's to keep). */
        atomic_thread_fence(memory_order_seq_cst);
        empty = lum_page_collect(page) && page->used == 0;
    }
    abandoned_file(page, cls, empty);
    /* shares its word with park_bias, which a statistics snapshot may still be reading */
    __atomic_store_n(&page->abandoned_ms, now, __ATOMIC_RELAXED);
    return true;
}

/* abandon_locked for a page its owner lets go of: false, the owner kept, when the caller is to
 * release it. */
static bool abandon_page(struct lum_page *page, unsigned cls, uint64_t now)
{
    if (not_worth_keeping(page)) return false; /* no lock for it */
    lum_lock(&lum_abandoned_lock);
    bool filed = abandon_locked(page, cls, now);
    lum_unlock(&lum_abandoned_lock);
    return filed;
}

/* Takes page off lum_abandoned[cls] (caller holds lum_abandoned_lock). */
static void abandoned_unlink(struct lum_page *page)
{
    lum_list_remove(&lum_abandoned[page->cls], page);
    if (page->abandoned == LUM_ABANDONED_EMPTY)
        __atomic_fetch_sub(&abandoned_due, page_carved_bytes(page), __ATOMIC_RELAXED);
    page->abandoned = 0;
}

/* Owns the stale pages an exiting thread gives back (abandoned_release_stale), from their list
 * to their release: the uncarve and release, a madvise or two each, go outside
 * lum_abandoned_lock (held through them, exits and page refills waited on each other: bench
 * threadchurn ran 7% slower, with ~160 more page faults), and a fork child made meanwhile takes
 * such pages as it takes a dead thread's (collect_dead_pages): never without an owner off the
 * lists (see abandon_locked).  Not a heap anyone allocates from: no field of it is read. */
static struct lum_heap stale_owner;

/* At each thread exit: empty abandoned pages that no thread took through the last
 * LUM_STALE_EXITS exits go back, carve and slice, oldest first, down to LUM_STALE_KEEP bytes of
 * such pages.  Otherwise the pool of exited threads' pages grows to the most pages of each
 * class that threads ever held at once (a page a class a thread): a class most threads barely
 * use keeps a page for every thread that once used it at the same time as the others, each at
 * least a 4 KiB carve, for the decay time (1 s by default, longer than all of bench
 * threadchurn: 72-110 pooled pages after 500 threads, 105-133 after 4000).  Counted in exits,
 * not time, it costs only the pages a thread's class mix leaves out for a while; giving back
 * every exited thread's carve took 2.6 madvise calls an exit and doubled the run time.  The
 * few stale pages kept are those a later thread's mix wants again: given back at once, bench
 * threadchurn made 0.3 madvise calls an exit and faulted the page back in soon after (0.1 with
 * 32 KiB kept, ~0.13 faults an exit fewer, peak RSS +50-60 KiB).  Looked at every exit, so no
 * page over the bytes waits longer than the bound plus one; a kept page's age may wrap the
 * 16-bit clock, and it then waits again, within the same bytes (and decay's time limit). */
static void abandoned_release_stale(void)
{
    struct lum_page *stale = NULL, *rank[LUM_STALE_RANK];
    unsigned n = 0;
    size_t kept = 0;
    lum_lock(&lum_abandoned_lock);
    uint16_t now = ++abandon_exits;
    for (unsigned c = 0; c < LUM_CLASSES; c++) {
        struct lum_page *p = lum_abandoned[c].tail; /* the empty ones, newest first */
        while (p && p->abandoned == LUM_ABANDONED_EMPTY) {
            struct lum_page *prev = p->prev;
            uint16_t age = (uint16_t)(now - p->abandoned_exits);
            if (age > LUM_STALE_EXITS && n < LUM_STALE_RANK) {
                unsigned i = n++; /* rank[] oldest first */
                for (; i && (uint16_t)(now - rank[i - 1]->abandoned_exits) < age; i--) rank[i] = rank[i - 1];
                rank[i] = p;
                kept += page_carved_bytes(p);
            } else if (age > LUM_STALE_EXITS) {
                abandoned_unlink(p);
                atomic_store_explicit(&p->owner, &stale_owner, memory_order_relaxed);
                p->next = stale;
                stale = p;
            }
            p = prev;
        }
    }
    for (unsigned i = 0; i < n && kept > LUM_STALE_KEEP; i++) {
        kept -= page_carved_bytes(rank[i]);
        abandoned_unlink(rank[i]);
        atomic_store_explicit(&rank[i]->owner, &stale_owner, memory_order_relaxed);
        rank[i]->next = stale;
        stale = rank[i];
    }
    lum_unlock(&lum_abandoned_lock);
    while (stale) { /* stale_owner's until lum_page_release clears it under the segment lock */
        struct lum_page *next = stale->next;
        stale->next = stale->prev = NULL;
        lum_page_uncarve(stale);
        lum_page_release(stale, false);
        stale = next;
    }
}

static void page_unfull(struct lum_heap *heap, struct lum_page *page)
{
    LUM_OWN_SET(page->used, lum_page_live(page));
    page_unmark_full(page);
    lum_list_remove(&heap->full[page->cls], page);
    lum_list_push_back(&heap->avail[page->cls], page);
    LUM_OWN_SET(page->in_full, 0);
    lum_page_set_fast(page, heap);
}

static void retained_forget(struct lum_heap *heap, struct lum_page *page)
{
    if (!page->retained) return;
    page->retained = 0;
    heap->retained_count[page->cls]--;
    heap->retained_bytes -= (size_t)page->slices * LUM_SLICE_SIZE;
}

/* Keeps an empty page on its list for the class's next pages, within the heap's budget
 * (LUM_RETAIN_EMPTY_PER_CLASS, LUM_RETAIN_EMPTY_BYTES): whether it did. */
static bool page_retain(struct lum_heap *heap, struct lum_page *page)
{
    unsigned cls = page->cls;
    size_t bytes = (size_t)page->slices * LUM_SLICE_SIZE;
    if (page->in_full || heap->retained_count[cls] >= LUM_RETAIN_EMPTY_PER_CLASS ||
        heap->retained_bytes + bytes > LUM_RETAIN_EMPTY_BYTES)
        return false;
    page->retained = 1;
    heap->retained_count[cls]++;
    heap->retained_bytes += bytes;
    return true;
}

/* Keeps an empty page for reuse or gives it back; allocating: this heap allocates its class. */
static void page_retire_as(struct lum_heap *heap, struct lum_page *page, bool allocating)
{
    unsigned cls = page->cls;
    /* A ring of live objects empties pages in turn and needs a fresh one just after: keep a
     * couple per class instead of a trip through the segment lock each time.  Kept with what
     * their blocks touched, whatever the size: the pages of blocks over 16 KiB were uncarved
     * here (it saved ~290 KiB of python3's peak RSS with PYTHONMALLOC=malloc), and a FIFO ring
     * of such blocks then faulted its memory in again at every page: bench/src/pairs at 32 KiB
     * took 3.8 s for 2M steps, 1.56M page faults, where tcmalloc took 0.01 s (0.13 s and 47k
     * faults since).  LUM_RETAIN_EMPTY_BYTES bounds what a heap keeps this way. */
    if (allocating && page_retain(heap, page)) return;
    lum_list_remove(page->in_full ? &heap->full[cls] : &heap->avail[cls], page);
    lum_page_set_fast(page, NULL);
    LUM_OWN_SET(page->in_full, 0);
    page->next = page->prev = NULL;
    /* A page of a class this heap does not allocate from (one it adopted by freeing into it)
     * goes back where a thread that needs the class will look first. */
    if (!allocating && abandon_page(page, cls, lum_now_ms())) return;
    /* a class this heap allocates may get the page's span back for its next pages */
    lum_page_release(page, allocating);
}

static void page_retire(struct lum_heap *heap, struct lum_page *page)
{
    unsigned cls = page->cls;
    if (heap->current[cls] == page || page->retained) return; /* a ping-pong pattern's page */
    /* a class whose cache is off has no current page, and is still one this heap allocates
     * (lum_purge turns the caches on again: a page of such a class emptied after it, before the
     * class's next malloc, goes to the abandoned lists, as any class's with no current page) */
    page_retire_as(heap, page, heap->current[cls] != &lum_empty_page || lum_cache_off(heap, cls));
}

/* Called from the free fast path when a page's used count reaches 0: a parked page has gathered
 * the free blocks it waited for (park_bias), or its last block came back.  A current page stays
 * current when it empties (a ping-pong pattern's page), but of the pages of more than one slice
 * (blocks of 10 KiB and up) only the last one to empty does: the one before is retired like
 * any other page.  Kept forever, each held up to 1 MiB of touched memory that no other class
 * could use and no purge could reach (python3 with PYTHONMALLOC=malloc: 3 MiB at its peak).
 * The one that stays keeps its carve: the class's next blocks come from it, and uncarved at
 * every empty it faulted in again each time a few big blocks were taken and all given back
 * (two 40 KB blocks a round: 20 faults and a madvise call a round, glibc none). */
LUM_NOINLINE void lum_page_empty(struct lum_heap *heap, struct lum_page *page)
{
    if (page->in_full) {
        /* a page of one block (over 64 KiB) parks with no bias: its free empties it, and it is
         * retired as any other empty page, kept for the class's next block or given back */
        bool bias = page->park_bias != 0;
        page_unfull(heap, page);
        if (bias) return;
    }
    unsigned cls = page->cls;
    if (page->slices > 1 && heap->current[cls] == page) {
        struct lum_page *old = heap->empty_big;
        unsigned ocls = heap->empty_big_cls;
        heap->empty_big = page;
        heap->empty_big_cls = (uint8_t)cls;
        /* still current (so still this heap's and mapped) before it is read */
        if (old && old != page && heap->current[ocls] == old && old->used == 0) {
            lum_heap_set_current(heap, ocls, &lum_empty_page);
            page_retire_as(heap, old, true);
        }
        return;
    }
    page_retire(heap, page);
}

void lum_heap_local_free(struct lum_heap *heap, struct lum_page *page, lum_block *b)
{
    lum_page_push_free(page, b);
    if (page->in_full) page_unfull(heap, page);
    if (LUM_OWN_SUB(page->used, 1) == 0) page_retire(heap, page);
}

/* The caches off for a thread dropping data (lum_heap_free_run_check): cached, the first blocks
 * the run freed of each class keep their pages from emptying, and a thread that then goes idle
 * keeps them resident for good, as no other thread may touch its caches (bench burst: ~400
 * pages of 64 KiB, every block on them free, 27 MiB still resident 3 s after freeing 1 GiB).  Each
 * class's cached blocks go back to their pages one at a time (a fork meanwhile finds at most
 * the one in hand on no list, as one caught inside a free would), and its cache stays off
 * (lum_cache_off: each free goes to its page) until the class's next malloc, which its current
 * page taken away sends to lum_malloc_slow to turn it on again.  An empty current page (kept so
 * when it emptied: page_retire, empty_big) is kept on as a retained page where the heap's budget
 * allows, or else stays current, the cache off until it is used up: released here, its carve,
 * however shallow, would be taken for the class's depth (segment.c: note_depth). */
static LUM_NOINLINE void heap_caches_off(struct lum_heap *heap)
{
    for (unsigned c = 0; c < LUM_CLASSES; c++) {
        if (!lum_cache_max[c]) continue;
        lum_block *b;
        while ((b = heap->cache[c]) != NULL) {
            LUM_OWN_SET(heap->cache[c], b->next);
            LUM_OWN_ADD(heap->cache_room[c], 1);
            lum_page_free_own(heap, lum_page_of(b), b);
        }
        LUM_OWN_SET(heap->cache_room[c], 0);
        struct lum_page *cur = heap->current[c];
        if (cur == &lum_empty_page) continue;
        if (!cur->used) {
            if (!page_retain(heap, cur)) continue;
            if (cur == heap->empty_big) heap->empty_big = NULL;
        }
        lum_heap_set_current(heap, c, &lum_empty_page);
    }
}

/* One in 256 frees that found their class's cache full (or off): with no malloc since the one
 * before, 256 earlier, the thread is dropping data, not churning it (no steady workload of
 * bench's comes near: a malloc of any class in between is enough), and its caches go off. */
LUM_NOINLINE void lum_heap_free_run_check(struct lum_heap *heap, struct lum_page *page, void *p)
{
    uint64_t allocs = heap->tc.alloc_count;
    if (allocs == heap->free_run_allocs) heap_caches_off(heap);
    heap->free_run_allocs = allocs;
    lum_page_free_own(heap, page, p);
}

/* Returns every cached block to its page (thread exit, explicit purge), so pages can empty, and
 * turns each cache on (a purge after a run of frees turned them off: the run's next check turns
 * them off again).  One block at a time, as heap_caches_off: lum_purge runs it with no lock
 * held, and a fork in another thread meanwhile found a whole class's chain taken off the cache
 * and on no page (the child counted its blocks live for good, pinning their pages); now at most
 * the one in hand, as any free caught half-way. */
void lum_heap_cache_flush(struct lum_heap *heap)
{
    for (unsigned c = 0; c < LUM_CLASSES; c++) {
        lum_block *b;
        while ((b = heap->cache[c]) != NULL) {
            LUM_OWN_SET(heap->cache[c], b->next);
            LUM_OWN_ADD(heap->cache_room[c], 1); /* a statistics read meanwhile: not cached */
            lum_heap_local_free(heap, lum_page_of(b), b);
        }
        LUM_OWN_SET(heap->cache_room[c], (int8_t)lum_cache_max[c]);
    }
}

/* The whole inbox in one exchange: a fork in another thread while the chain is in hand leaves
 * the child its blocks on no list, counted live for good (a leak in the child alone, as for
 * lum_page_collect's chain and forward_inbox's); a pop a block would cost a CAS each. */
static void drain_inbox(struct lum_heap *heap)
{
    if (!atomic_load_explicit(&heap->inbox, memory_order_relaxed)) return;
    lum_block *b = atomic_exchange_explicit(&heap->inbox, NULL, memory_order_acquire);
    while (b) {
        lum_block *next = lum_remote_next(b);
        struct lum_page *page = lum_page_of(b);
        if (atomic_load_explicit(&page->owner, memory_order_relaxed) == heap)
            lum_heap_local_free(heap, page, b);
        else /* the page changed hands after the sender looked: forward it */
            forward_remote(page, b);
        b = next;
    }
}

/* ---- page supply ---- */



/* Collects the blocks other threads freed into one of heap's pages, counting their bytes for
 * heap_release_idle. */
static inline uint32_t heap_collect(struct lum_heap *heap, struct lum_page *page)
{
    /* lum_page_collect's own first test, here: most looks find nothing, and skip the call */
    if ((uintptr_t)atomic_load_explicit(&page->thread_free, memory_order_relaxed) <= 1) return 0;
    uint32_t n = lum_page_collect(page);
    heap->remote_collected += (size_t)n * page->block_size;
    return n;
}

static bool page_has_room(struct lum_heap *heap, struct lum_page *page)
{
    if (page->free) return true;
    if (heap_collect(heap, page)) return true;
    return lum_page_refill(page);
}

/* Moves an abandoned page to heap's avail list (caller holds lum_abandoned_lock). */
static void adopt_locked(struct lum_heap *heap, struct lum_page *page)
{
    abandoned_unlink(page);
    atomic_store_explicit(&page->owner, heap, memory_order_release);
    LUM_OWN_SET(page->in_full, 0);
    lum_list_push_front(&heap->avail[page->cls], page);
    lum_page_set_fast(page, heap);
}

/* A thread's mark on the abandoned pages it frees into (freed_by): its kernel thread ID's low
 * bits, never 0 (no freer).  Two threads may share one: the other then adopts a dense page it
 * did not free into, as any thread with a page of the class already may. */
static inline uint16_t heap_tag(const struct lum_heap *heap)
{
    uint16_t tag = (uint16_t)heap->tid;
    return tag ? tag : 1;
}

/* Abandoned pages with live blocks looked at for one that is at most half full, or that the
 * caller freed into. */
#define LUM_ADOPT_LOOK 4

/* Takes an abandoned page of cls onto heap's avail list, for a thread that needs room in the
 * class.  Ownership and list change together under the lock, so a fork never sees a page that
 * belongs to a heap but sits on no list.
 * An empty page first (the newest: the most likely still cached); then, unless `any`, a page
 * with live blocks only when they fill at most half of it or when the caller freed into it last
 * (abandoned_note_freer: it frees the rest, most likely).  The blocks of a denser page are
 * somebody's data, often about to be freed by the thread that took them over: freed in place
 * while the page stays ownerless (free_into_abandoned), they leave it for a later look here.
 * Taken by the first thread to need the class, every one of those frees went to that thread's
 * pages as a remote free, to wait there until it came round to the page (larson, where each
 * generation of threads frees what the last one left: 1.3-1.6 MiB of freed blocks waited at
 * the peak, and the pages in use crept by a generation's holes).  Denser pages, if they have
 * any room, are taken only by the thread that last freed into them (freed_by), or (`any`) by a
 * thread that already has a page of the class and would otherwise map a new one: data nobody
 * frees keeps its holes in use at the cost of one page per class and thread. */
static struct lum_page *adopt_abandoned(struct lum_heap *heap, unsigned cls, bool any)
{
    /* unlocked peek: a stale answer only delays adoption to the next slow path */
    if (!__atomic_load_n(&lum_abandoned[cls].head, __ATOMIC_RELAXED)) return NULL;
    lum_lock(&lum_abandoned_lock);
    struct lum_page *page = lum_abandoned[cls].tail; /* empty ones sit at the back */
    if (page && page->abandoned != LUM_ABANDONED_EMPTY) {
        struct lum_page *q = lum_abandoned[cls].head;
        uint16_t tag = heap_tag(heap);
        page = NULL;
        for (unsigned i = 0; q && i < LUM_ADOPT_LOOK; q = q->next, i++) {
            lum_page_collect(q); /* frees that reached it while nobody owned it */
            if (q->used < q->capacity && (any || q->freed_by == tag || q->used * 2 <= q->capacity)) {
                page = q;
                break;
            }
        }
    }
    if (page) adopt_locked(heap, page);
    lum_unlock(&lum_abandoned_lock);
    if (page) lum_page_collect(page);
    return page;
}

/* A block freed into an abandoned page with live blocks (caller holds lum_abandoned_lock): the
 * page is marked as the freeing thread's (freed_by) and goes to the front of its list, where
 * adopt_abandoned looks, and that thread takes it, dense or not, when it next needs room in the
 * class.  It is most likely the one that took over the page's data (larson: each generation
 * frees what the last one left), so its frees into the page become local ones, and its new
 * blocks fill the holes they leave instead of a new page (larson's peak RSS 17.5 -> 16.1 MiB,
 * medians of 9).
 * Taken when it needs room, not at the free (see below), it is a page the thread is about to
 * allocate from, and so looks at.  Taken also before the thread carved further into its own
 * pages, it took larson to 14.7 MiB, but the pages it passed over, left on its avail list with
 * room, were looked at again only once the abandoned pages ran out: other threads' frees into
 * them could wait without end (found in review; not kept).  Out of line: inlined in
 * free_foreign, it cost every remote free two more saved registers; the
 * freeing thread's heap is read here (free_foreign's, in lum_tls_heap), not passed, for the
 * same reason. */
static LUM_NOINLINE void abandoned_note_freer(struct lum_page *page)
{
    if (page->abandoned != LUM_ABANDONED_WITH_BLOCKS || page->used <= 1) return;
    page->freed_by = heap_tag(lum_tls_heap);
    struct lum_page_list *list = &lum_abandoned[page->cls];
    if (list->head == page) return;
    lum_list_remove(list, page);
    lum_list_push_front(list, page);
}

/* A free into a page nobody owns (its thread exited): in place, under the lock that guards
 * ownerless pages; the page stays abandoned until a thread needs room in its class
 * (adopt_abandoned).  It was once taken over by a freeing thread that allocates the class
 * (mimalloc's reclaim-on-free), to collect what others free there when it next looked for
 * room; but a thread served by its cache and current page never looks, and the page's other
 * blocks, freed by other threads, waited on its thread_free for as long as the thread lived:
 * short-lived producers handing blocks to two consumers that also allocate grew to 1.75 GB in
 * 6 s while holding 4 MB.  False when the page is not abandoned (being abandoned right now:
 * the caller sends the block on as a remote free). */
static bool free_into_abandoned(struct lum_page *page, lum_block *b)
{
    lum_lock(&lum_abandoned_lock);
    if (!page->abandoned) {
        lum_unlock(&lum_abandoned_lock);
        return false;
    }
    lum_page_collect(page);
    lum_page_push_free(page, b);
    abandoned_note_freer(page);
    if (LUM_OWN_SUB(page->used, 1) == 0) {
        /* now empty: filed again as an empty page, or released over the bound, the lock held
         * throughout (see abandon_locked) */
        abandoned_unlink(page);
        if (!abandon_locked(page, page->cls, lum_now_ms())) lum_page_release(page, false);
    }
    lum_unlock(&lum_abandoned_lock);
    return true;
}

/* Free blocks a parked page gathers before it goes back to the avail list.  Taken back at its
 * first free (as it was), a page came back to malloc with one or two free blocks: on a heap
 * where long-lived blocks are spread over many pages (bench fragment) one malloc in seven went
 * to the slow path for a page switch and a park, and every first free into a parked page took
 * the slow path too.  A sixteenth of the page bounds the free blocks left waiting (heap_next_page
 * still takes them before mapping more). */
static uint32_t page_unpark_at(const struct lum_page *page)
{
    return page->capacity / 16 > 1 ? page->capacity / 16 : 1;
}

/* Moves a page with no room to the back of the full list.  The owner's frees into it stay on
 * the fast path: park_bias makes the free that brings its free blocks to page_unpark_at find
 * used == 0 and call lum_page_empty, which takes it back.  The full mark sends remote frees to
 * the inbox, which takes it back at once.  False when remote frees arrived meanwhile: they are
 * collected and the page has room. */
static bool page_park_full(struct lum_heap *heap, struct lum_page *page)
{
    if (!page_mark_full(page)) {
        heap_collect(heap, page);
        return false;
    }
    lum_list_remove(&heap->avail[page->cls], page);
    lum_list_push_back(&heap->full[page->cls], page);
    LUM_OWN_SET(page->in_full, 1);
    /* all blocks are carved (page_has_room failed) and none is free: used is every block */
    uint32_t at = page_unpark_at(page);
    LUM_OWN_SET(page->park_bias, page->used > at ? page->used - at : 0);
    LUM_OWN_SUB(page->used, page->park_bias);
    return true;
}

/* Parked pages looked at before mapping a new one. */
#define LUM_UNPARK_TRIES 4

/* Before a new page is mapped: a parked page with free blocks, though fewer than it waits for
 * (the head of the full list has waited longest; pages held full by long-lived blocks go to
 * the back), so waiting costs no memory.  NULL when those looked at have none. */
static struct lum_page *heap_unpark_any(struct lum_heap *heap, unsigned cls)
{
    struct lum_page_list *full = &heap->full[cls];
    for (unsigned i = 0; i < LUM_UNPARK_TRIES && full->head; i++) {
        struct lum_page *page = full->head;
        if (page->free) {
            page_unfull(heap, page);
            return page;
        }
        if (full->head == full->tail) break;
        lum_list_remove(full, page);
        lum_list_push_back(full, page);
    }
    return NULL;
}

static bool grow_sampled(struct lum_heap *heap, struct lum_page *page, unsigned cls, size_t asked);
static bool grow_takes_sample(struct lum_heap *heap, unsigned cls, struct sample_state *saved);
static bool regrow_sampled(struct lum_heap *heap, struct lum_page *page, size_t size, size_t asked);

/* Whether a block of class from may grow in place into cls, as far as the heap goes: only
 * where malloc would take a new page for it.  Blocks other threads freed count as free here,
 * as malloc would find them: a buffer grown by one thread and freed by another left the
 * class's current page empty with its block uncollected, the growth then made the grown page
 * current, and the old one stayed empty on the avail list, out of decay's reach (30 such rounds
 * held 34 pages, 9.2 MiB after a purge, where the copy held 6, 2.1 MiB; found in review).
 * Parked pages' remote frees come through the inbox: none may wait there either. */
static bool grow_may_take(struct lum_heap *heap, unsigned cls, unsigned from)
{
    if (cls > from && heap->current[cls] != &lum_empty_page) heap_collect(heap, heap->current[cls]);
    return cls > from && !heap->current[cls]->free && !atomic_load_explicit(&heap->inbox, memory_order_relaxed);
}

/* A grown page, ordinary and off every list, made cls's current page of heap and counted. */
static void grown_current(struct lum_heap *heap, struct lum_page *page, unsigned cls)
{
    lum_list_push_front(&heap->avail[cls], page);
    lum_page_set_fast(page, heap);
    lum_heap_set_current(heap, cls, page);
    lum_heap_count_alloc(heap, lum_class_size[cls]);
}

/* realloc to size of a block alone on its page (over 64 KiB), grown in place into a bigger such
 * class (lum_page_grow): true when done.  Only the owner's page with that one block live, and
 * only where malloc would have taken a new page for it: not where the class's current page has
 * a free block (resident already: copying there faults nothing in), or the slow path has
 * something else to do with the size (failure injection, large-block warnings).  The page then
 * becomes the new class's current page, as a page taken for the block would: parked full at
 * the class's next allocation, and when its block is freed, retired or kept as the class's
 * (lum_page_empty).  Left on no list of a class the heap allocates, it went to the abandoned
 * lists when it emptied, its memory with it (python3 with PYTHONMALLOC=malloc peaked 2.7 MiB
 * higher).  Counted as realloc's malloc and free of the two sizes would be.
 * A grown block the next sample point falls in grows to its sampled class instead, and its
 * page becomes a sampled page as it stands (grow_sampled).  Refused (a copy to a sampled page
 * of a fresh span, the old span given back), every sampled step of CPython's growth chains
 * faulted a whole block in: python3 took 14% more page faults with default sampling than
 * without (bench python: 11.7k against 10.2k).  asked: the size the program asked for, which
 * a sample records (size may be padded). */
bool lum_heap_grow_block(struct lum_heap *heap, struct lum_page *page, size_t size, size_t asked)
{
    if (page->block_size <= LUM_SLICE_SIZE || size > LUM_SMALL_MAX || size > lum_opt.large_threshold ||
        lum_fail_is_armed() || lum_warns_large(size))
        return false;
    if (page->kind == LUM_PAGE_SAMPLED) return regrow_sampled(heap, page, size, asked);
    if (page->kind != LUM_PAGE_SMALL) return false;
    unsigned old = page->cls;
    unsigned cls = lum_size_class(size);
    if (!grow_may_take(heap, cls, old) ||
        atomic_load_explicit(&page->owner, memory_order_relaxed) != heap || lum_page_live(page) != 1 ||
        page->carved != 1 || page->retained || (uintptr_t)atomic_load_explicit(&page->thread_free, memory_order_relaxed) > 1)
        return false;
    struct sample_state saved;
    bool sample = grow_takes_sample(heap, cls, &saved);
    if (!lum_page_grow(page, sample ? lum_sampled_class(cls) : cls)) {
        if (sample) sample_state_restore(heap, saved);
        return false;
    }
    if (heap->current[old] == page) lum_heap_set_current(heap, old, &lum_empty_page);
    lum_list_remove(page->in_full ? &heap->full[old] : &heap->avail[old], page);
    if (page->in_full) page_unmark_full(page);
    LUM_OWN_SET(page->used, 1);
    LUM_OWN_SET(page->in_full, 0);
    lum_count_free(heap, lum_class_size[old]);
    if (sample) return grow_sampled(heap, page, cls, asked);
    grown_current(heap, page, cls);
    return true;
}

/* Pages of other classes looked at before a new page is mapped. */
#define LUM_IDLE_LOOK 64

/* An empty page of the heap's avail list for cls back to its segment. */
static void avail_page_release(struct lum_heap *heap, unsigned cls, struct lum_page *page)
{
    lum_list_remove(&heap->avail[cls], page);
    lum_page_set_fast(page, NULL);
    lum_page_release(page, false);
}

/* Before a page for cls is mapped: the empty pages of other classes go back to their segments,
 * so that the heap's memory follows what it holds live rather than the sum of each class's own
 * peak.  These are pages emptied by other threads' frees: nobody counts those as they arrive,
 * so such a page stays on its list, resident, until its owner looks at it again (bench xthread,
 * where every free is remote).  Pages kept on purpose (retained: a ring's next page) stay. */
static void heap_release_idle(struct lum_heap *heap, unsigned cls)
{
    /* only where other threads' frees could have emptied a page since the last look: a thread
     * whose blocks all come back by its own frees retires its empty pages as they empty */
    if (heap->remote_collected < LUM_SLICE_SIZE) return;
    heap->remote_collected = 0;
    unsigned looked = 0;
    for (unsigned c = 0; c < LUM_CLASSES && looked < LUM_IDLE_LOOK; c++) {
        struct lum_page *q = c == cls ? NULL : heap->avail[c].head;
        while (q && looked < LUM_IDLE_LOOK) {
            struct lum_page *next = q->next;
            looked++;
            if (q != heap->current[c] && !q->retained && (heap_collect(heap, q), q->used == 0))
                avail_page_release(heap, c, q);
            q = next;
        }
    }
}

/* lum_purge, for the calling thread (the others' are theirs to touch): its empty pages go back,
 * the current ones and those kept for its next pages (retained) included, which held ~0.5 MiB
 * resident after a program freed everything and called malloc_trim.  Its cache is flushed
 * first, so that its pages can empty.  Its inbox is drained before the walk: it holds the first
 * of other threads' frees into each of its parked pages, which takes the page off the full list
 * that the walk leaves alone (a thread whose parked pages another thread emptied kept them all
 * through malloc_trim: 125 of 126 pages, 8.8 MiB). */
void lum_heap_release_empty(struct lum_heap *heap)
{
    drain_inbox(heap);
    for (unsigned c = 0; c < LUM_CLASSES; c++) {
        struct lum_page *q = heap->avail[c].head;
        while (q) {
            struct lum_page *next = q->next;
            if ((heap_collect(heap, q), q->used == 0)) {
                if (heap->current[c] == q) lum_heap_set_current(heap, c, &lum_empty_page);
                if (heap->empty_big == q) heap->empty_big = NULL;
                retained_forget(heap, q);
                avail_page_release(heap, c, q);
            }
            q = next;
        }
    }
}

/* The current page for cls has nothing left: find the next page with room. */
static LUM_NOINLINE struct lum_page *heap_next_page(struct lum_heap *heap, unsigned cls)
{
    bool adopted = false; /* the page found came off the abandoned lists */
    struct lum_page *page = heap->current[cls];
    if (page != &lum_empty_page) {
        if (page->free || heap_collect(heap, page)) return page;
        drain_inbox(heap);
        if (page->free) return page;
        /* Holes in the class's other pages before fresh memory in this one: carving touches
         * memory the process never had, while blocks freed elsewhere are resident already
         * (larson: a new thread's own pages grew while the pages it adopted from the previous
         * generation filled with holes; -9% peak RSS, -1.5% instructions).  Only a page with
         * four carves' worth of free blocks (carved - used: its local list), or the switches
         * cost more than the carving (with one: larson +3.4% instructions); and not for blocks
         * over 2 KiB, carved one at a time, where the look would cost every slow path
         * (ring +1.9%).  Other threads' frees count too, collected first: a producer whose
         * blocks all die on a consumer thread otherwise carved every page to its end while the
         * pages behind it held the freed blocks (bench xthread with its queue of 256 batches:
         * 1.6 MiB more carved at the peak, peak RSS 20.0 -> 19.0 MiB). */
        uint32_t carve = page->block_size >= 4096 ? 1 : 4096 / page->block_size;
        struct lum_page *q = carve > 1 ? page->next : NULL;
        for (unsigned i = 0; q && i < 4; q = q->next, i++) {
            heap_collect(heap, q);
            if (q->free && q->carved - q->used >= 4 * carve) {
                page = q;
                goto found;
            }
        }
        if (lum_page_refill(page)) return page;
        if (!page_park_full(heap, page)) return page;
        lum_heap_set_current(heap, cls, &lum_empty_page);
    } else {
        drain_inbox(heap);
    }
    while ((page = heap->avail[cls].head) != NULL)
        if (page_has_room(heap, page) || !page_park_full(heap, page)) goto found;
    while ((page = adopt_abandoned(heap, cls, false)) != NULL)
        if (page_has_room(heap, page) || !page_park_full(heap, page)) {
            adopted = true;
            goto found;
        }
    if ((page = heap_unpark_any(heap, cls)) != NULL) goto found;
    /* denser abandoned pages before fresh memory, once this heap has a page of the class */
    if (heap->full[cls].head || heap->avail[cls].head)
        while ((page = adopt_abandoned(heap, cls, true)) != NULL)
            if (page_has_room(heap, page) || !page_park_full(heap, page)) {
                adopted = true;
                goto found;
            }
    lum_abandoned_decay();
    heap_release_idle(heap, cls);
    page = lum_page_alloc(cls, LUM_PAGE_SMALL, heap);
    if (!page) {
        lum_heap_set_current(heap, cls, &lum_empty_page);
        return NULL;
    }
    lum_page_set_fast(page, heap);
    lum_list_push_front(&heap->avail[cls], page);
    lum_page_refill(page);
found:
    /* Only a page of this heap's own, with live blocks, and half of it or more free: one a
     * program emptied by dropping data, the next allocations about to take its blocks in a
     * row (python3 with PYTHONMALLOC=malloc: 90% of the blocks its sorts moved were on pages
     * three quarters free).  A page with a few holes is a ring's or a cache's steady churn,
     * where they are taken as they come and the walk cost more than it gave (bench ring, 8 B -
     * 4 KiB: 2.4% more CPU time sorting pages with 64 free blocks or more, none this way).
     * Pages adopted from threads that exited feed short-lived threads that take a few blocks
     * from each (bench threadchurn: sorting them was 11% of its instructions); they are sorted
     * when they come back as its own.  Empty pages, sorted or carved again from their start,
     * made no difference to python3 and cost threadchurn 14%. */
    if (!adopted && page->used && page->carved - page->used >= LUM_ORDER_MIN_FREE &&
        page->carved - page->used >= page->capacity / 2)
        lum_page_order_free(page);
    retained_forget(heap, page);
    if (heap->avail[cls].head != page) {
        lum_list_remove(&heap->avail[cls], page);
        lum_list_push_front(&heap->avail[cls], page);
    }
    lum_heap_set_current(heap, cls, page);
    return page;
}

static unsigned class_for_alignment(size_t size, size_t alignment)
{
    unsigned cls = lum_size_class(size < alignment ? alignment : size);
    /* Pages start on 64 KiB boundaries, so a block size that is a multiple of the alignment
     * gives aligned blocks with no per-block bookkeeping; powers of two are always classes. */
    while (lum_class_size[cls] & (alignment - 1)) cls++;
    return cls;
}

void *lum_alloc_failed(struct lum_heap *heap, size_t size, size_t alignment, int err)
{
    if (heap) LUM_OWN_ADD(heap->tc.failures, 1);
    lum_on_alloc_failure(heap ? &heap->tc : NULL, lum_requested(heap, size), alignment, err);
    errno = err;
    return NULL;
}

/* The weight factor of a sample of class cls, from the thread's table (see lum_sample_factor). */
static inline __attribute__((always_inline)) double sample_factor(struct lum_heap *heap, unsigned cls)
{
    /* the sample was drawn over the ordinary class's size: that is what its weight inverts */
    uint64_t t = lum_opt.sample_interval;
    if (LUM_UNLIKELY(heap->wf_interval != t)) {
        memset(heap->wf, 0, sizeof heap->wf);
        heap->wf_interval = t;
    }
    double f = heap->wf[cls];
    if (LUM_UNLIKELY(f == 0)) f = heap->wf[cls] = lum_sample_factor(lum_class_size[cls], t);
    return f;
}

/* Records the sample p of class cls, unwound from lum_on_sample_rec's caller: always_inline, as
 * the unwind walks every frame of ours (~40 instructions each). */
static inline __attribute__((always_inline)) void record_sample(struct lum_heap *heap, void *p, size_t size,
                                                                unsigned cls, struct lum_sample_rec *rec)
{
    lum_on_sample_rec(&heap->tc, p, size, lum_class_size[cls], rec);
}

/* A sampled block of class cls for this allocation when the next sample point falls inside
 * it; NULL when it does not, or when there is no memory for a sampled page (an unsampled block
 * beats a failure).  Out of line, in the warm text (lib/CMakeLists.txt): only aligned requests
 * and the large-warning option take it, lum_malloc_sample the rest. */
static LUM_NOINLINE void *sample_alloc(struct lum_heap *heap, size_t size, unsigned cls)
{
    unsigned scls = lum_sampled_class(cls);
    if (!take_sample(heap, lum_class_size[cls], lum_class_size[scls])) return NULL;
    struct lum_sample_rec *rec;
    void *p = lum_sampled_alloc(heap, scls, &rec);
    if (p) record_sample(heap, p, lum_requested(heap, size), cls, rec);
    return p;
}

/* The sample decision for a block realloc grows in place into class cls, as malloc's slow path
 * takes it (sample_alloc); saved: the point before it, for the caller to put back if the page
 * cannot grow, so that malloc then takes the same point.  A bool, not "the class grown to is
 * the sampled class": 128 and 256 KiB are their own sampled class, and growths into them that
 * were sampled went unrecorded (the point moved on). */
static bool grow_takes_sample(struct lum_heap *heap, unsigned cls, struct sample_state *saved)
{
    *saved = sample_state_save(heap);
    size_t bs = lum_class_size[cls];
    return saved->left < (int64_t)bs && take_sample(heap, bs, lum_class_size[lum_sampled_class(cls)]);
}

/* A grown block's page, a sampled page now: counted and recorded as sample_alloc's block would
 * be, for class cls at the size the program asked for. */
static void grown_sample_record(struct lum_heap *heap, struct lum_page *page, unsigned cls, size_t asked)
{
    lum_sampled_count(heap, page);
    record_sample(heap, page->start, asked, cls, lum_sampled_rec(page, page->start));
}

/* lum_heap_grow_block's grown block, of class cls, with the sample point in it, grown to its
 * sampled class: its page, off the heap's lists, becomes a sampled page with it (counted and
 * recorded as sample_alloc's block would be).  Without a record array (no metadata memory)
 * it stays an ordinary page of the bigger class, the sample dropped, as a failed sampled page
 * drops one. */
static LUM_NOINLINE bool grow_sampled(struct lum_heap *heap, struct lum_page *page, unsigned cls, size_t asked)
{
    lum_page_set_fast(page, NULL);
    page->next = page->prev = NULL;
    if (!lum_sampled_adopt(page)) {
        grown_current(heap, page, page->cls);
        return true;
    }
    grown_sample_record(heap, page, cls, asked);
    return true;
}

/* lum_heap_grow_block's growth of a sampled block alone on its page: in place, as its class's
 * ordinary block would grow (its own class, the record's), the page's kind following the grown
 * block's sample decision (lum_sampled_regrow).  Copied instead, a sample taken at the start of
 * one of CPython's growth chains moved the chain to a fresh page at its next step (bench python:
 * ~60 page faults a sample of 128-256 KiB). */
static LUM_NOINLINE bool regrow_sampled(struct lum_heap *heap, struct lum_page *page, size_t size, size_t asked)
{
    uint64_t own = lum_sampled_rec(page, page->start)->usable; /* 0: taken unsampled */
    if (page->capacity != 1 || page->used != 1 || !own) return false;
    unsigned cls = lum_size_class(size);
    size_t had = page->block_size;
    if (!grow_may_take(heap, cls, lum_size_class(own))) return false;
    struct sample_state saved;
    bool sample = grow_takes_sample(heap, cls, &saved);
    if (!lum_sampled_regrow(page, sample ? lum_sampled_class(cls) : cls, sample ? NULL : heap)) {
        /* a stale point take_sample drew again stays drawn: it was no point to sample at */
        if (sample) sample_state_restore(heap, saved);
        return false;
    }
    lum_count_free(heap, had);
    if (!sample) {
        grown_current(heap, page, cls);
        return true;
    }
    grown_sample_record(heap, page, cls, asked);
    return true;
}

/* lum_sample_locked under lum_sampled_lock, out of line for lum_malloc_sample's branch that
 * had to make (or take a spare) sampled page, one sample in many: inlined a second time there,
 * it made the hot text ~0.8 KiB longer, resident in every program (lib/CMakeLists.txt). */
static LUM_NOINLINE bool sample_locked_out(struct lum_thread_counters_v1 *tc, const uintptr_t *at, size_t size,
                                           size_t usable, double f, struct lum_sample_rec *rec,
                                           struct lum_sample_rest *rest)
{
    lum_lock(&lum_sampled_lock);
    bool done = lum_sample_locked(tc, at, size, usable, f, rec, rest);
    lum_unlock(&lum_sampled_lock);
    return done;
}

/* lum_sampled_class(cls) from the tables malloc's fast path reads (the heap's copies, and
 * lum_medium_class for 2 to 16 KiB), whose lines are in cache: lum_sampled_memo's are not at the
 * next sample. */
static inline __attribute__((always_inline)) unsigned sampled_class_hot(const struct lum_heap *heap, unsigned cls)
{
    size_t p = lum_sampled_size(heap->class_size[cls]);
    unsigned c = p <= LUM_SMALL_TABLE_MAX ? heap->slot_class[p / LUM_ALIGN] : lum_size_class(p);
    return LUM_LIKELY(c != LUM_SLOW_CLASS) ? c : lum_size_class(p); /* heap_slot_classes */
}

static LUM_NOINLINE void *malloc_sample_point(size_t size, struct lum_heap *heap, unsigned cls);

/* malloc's fast path found the next sample point inside this allocation's block: the common
 * case without lum_malloc_slow's checks and register saves (a few dozen instructions a
 * sample), anything unusual (first use, failure injection, its re-arming, a size to warn
 * about) through it.  Both callers have taken the block's size off sample_left already (the
 * fast path's subtraction is its test); a way to lum_malloc_slow gives it back.  The checks
 * before a sample, here in the hot text: every thread's first malloc comes here (its
 * empty heap's point is forced), and so does each 4 MiB of a thread's allocations with sampling
 * off, and neither takes a sample.  With them in the sample text, a program that never samples
 * made that whole mapping resident (bench churn with sampling off: 7 pages); the sample is
 * malloc_sample_point's, in the sample text (a jump more). */
LUM_NOINLINE void *lum_malloc_sample(size_t size, struct lum_heap *heap, unsigned cls)
{
    int64_t left = heap->sample_left;
    /* Forced: lum_malloc_slow sets sample_left anew, and lum_empty_heap's is LUM_SAMPLE_FORCED
     * for good (lum_heap_force_slow leaves it alone, nothing charges it): that check is the
     * first use's too. */
    if (LUM_UNLIKELY(lum_sample_forced(left))) return lum_malloc_slow(size, 0);
    /* left >= 0: no point inside the block after all (a check only) */
    if (LUM_UNLIKELY(left >= 0 || lum_fail_is_armed() || lum_warns_large(size) || point_stale(heap))) {
        /* the charge was the page's block_size, its class's size */
        heap->sample_left = left + (int64_t)lum_class_size[cls];
        return lum_malloc_slow(size, 0);
    }
    return malloc_sample_point(size, heap, cls);
}

static LUM_NOINLINE void *malloc_sample_point(size_t size, struct lum_heap *heap, unsigned cls)
{
    /* take_sample's work, its checks done above; the next point is drawn from where the
     * counter will stand after the sampled block (the ordinary block's charge is dropped) */
    unsigned scls = sampled_class_hot(heap, cls);
    /* the sizes from the heap's copy of the table, on lines malloc's fast path keeps in cache:
     * lum_class_size's lines are out of L1 by the next sample */
    heap->sample_left = next_point(heap, heap->class_size[scls]);
    double f = sample_factor(heap, cls);
    size_t usable = heap->class_size[cls];
    struct lum_sample_rec *rec;
    struct lum_sample_rest rest;
    struct lum_page *page;
    /* The walk starts in our caller: malloc jumps to lum_malloc_sample and it jumps here (tail
     * calls, no frame of their own: checked in the disassembly), so that is the
     * program's code, and none of lumalloc's frames is walked.  __builtin_frame_address gives
     * this function a standard frame: the caller's rbp at fp[0], the return address at fp[1]
     * (checked, in case a compiler lays it out otherwise).  Taken here, where the class's
     * figures are no longer needed: earlier, GCC kept it on the stack. */
    const uintptr_t *fp = __builtin_frame_address(0);
    if (fp[1] != (uintptr_t)__builtin_return_address(0)) fp = NULL;
    size_t asked = lum_requested(heap, size);
    void *p = lum_sampled_pop_locked(lum_sampled_slot(heap->class_size[scls]), &page);
    if (LUM_LIKELY(p != NULL)) {
        /* the sample recorded under the lock the block was taken under (sampler_fast.h) */
        rec = lum_sampled_rec(page, p);
        bool done = lum_sample_locked(&heap->tc, fp, asked, usable, f, rec, &rest);
        lum_unlock(&lum_sampled_lock);
        lum_sampled_count(heap, page);
        if (LUM_LIKELY(done)) return p;
    } else if ((p = lum_sampled_alloc(heap, scls, &rec)) != NULL) {
        if (sample_locked_out(&heap->tc, fp, asked, usable, f, rec, &rest)) return p;
    } else {
        return lum_malloc_slow(size, 0);
    }
    lum_sample_rest(&rest, &heap->tc, p, asked, usable, fp, f, rec);
    return p;
}

static void *late_alloc(size_t size, size_t alignment);

/* Everything malloc's fast path does not handle: first use, sampling, failure injection,
 * large and aligned requests, exhausted pages. */
LUM_NOINLINE void *lum_malloc_slow(size_t size, size_t alignment)
{
    struct lum_heap *heap = lum_tls_heap;
    /* after this thread's heap was torn down (a later key destructor allocates): a heap made
     * now and registered again would never be torn down once glibc's destructor rounds
     * (PTHREAD_DESTRUCTOR_ITERATIONS) are over, its record live for good and its pages kept */
    if (LUM_UNLIKELY(heap == &lum_empty_heap && lum_tls_exited)) return late_alloc(size, alignment);
    if (LUM_UNLIKELY(heap == &lum_empty_heap) && !(heap = lum_heap_get()))
        return lum_alloc_failed(NULL, size, alignment, ENOMEM);
    if (LUM_UNLIKELY(size > PTRDIFF_MAX || alignment > ((size_t)1 << 40)))
        return lum_alloc_failed(heap, size, alignment, ENOMEM);
    if (alignment <= LUM_ALIGN) alignment = 0;
    /* no sample at a stale point: a fresh one from here */
    if (LUM_UNLIKELY(point_stale(heap)) && !lum_sample_forced(heap->sample_left))
        heap->sample_left = next_sample_after(heap, 0);

    if (LUM_UNLIKELY(lum_fail_injected(heap, size))) return lum_alloc_failed(heap, size, alignment, ENOMEM);
    /* Here, before any list is touched: starting the background thread allocates (glibc's
     * pthread_create), and that nested malloc must find this heap consistent. */
    lum_background_poll();

    if (LUM_UNLIKELY(lum_warns_large(size) && size <= lum_opt.large_threshold))
        lum_on_large_warn(size); /* the large path warns by itself */
    if (size > lum_opt.large_threshold || size > LUM_SMALL_MAX || alignment > LUM_SLICE_SIZE)
        return lum_large_alloc_or_fail(heap, size, alignment, false);
    unsigned cls = alignment ? class_for_alignment(size, alignment) : lum_size_class(size);
    if (!lum_fail_is_armed() && heap->sample_left < (int64_t)lum_class_size[cls]) {
        /* A tail call: reached from malloc (its exhausted page), lum_malloc_sample walks from
         * malloc's caller, where the unwinder's memo holds, instead of from here (~250
         * instructions less a sample).  Its way back here is closed: the checks that send it
         * back hold, and a failed sampled page moves the next point on. */
        if (!alignment && heap == lum_tls_heap && !lum_sample_forced(heap->sample_left) &&
            !lum_warns_large(size)) {
            heap->sample_left -= (int64_t)lum_class_size[cls]; /* as the fast path enters it */
            return lum_malloc_sample(size, heap, cls);
        }
        void *p = sample_alloc(heap, size, cls);
        if (p) return p;
    }
    /* the class's first block since a run of frees turned its cache off (heap_caches_off); not
     * for a sample, which takes no page: a class with neither cache nor page counts as one this
     * heap allocates (page_retire) only while its cache is off */
    if (LUM_UNLIKELY(lum_cache_off(heap, cls))) LUM_OWN_SET(heap->cache_room[cls], (int8_t)lum_cache_max[cls]);
    struct lum_page *page = heap->current[cls];
    /* may need a new page: before, not during (the check is on the large cache alone) */
    if (!page->free && LUM_UNLIKELY(__atomic_load_n(&lum_large_cached, __ATOMIC_RELAXED) > LUM_DIRTY_FLOOR))
        lum_dirty_limit_check(false);
    int err;
    if (!page->free && (err = errno, !(page = heap_next_page(heap, cls)))) {
        if (lum_release_for_retry()) { /* the cache flushed back may have filled the current page */
            errno = err;
            page = heap->current[cls];
            if (!page->free) page = heap_next_page(heap, cls);
        }
        if (!page) {
            void *p = lum_sampled_take_unsampled(heap, cls);
            return p ? p : lum_alloc_failed(heap, size, alignment, ENOMEM);
        }
    }
    lum_block *b = page->free;
    page->free = lum_free_next(page, b);
    lum_block_handed_out(b);
    LUM_OWN_ADD(page->used, 1);
    lum_heap_count_alloc(heap, page->block_size);
    return b;
}

/* Out of line, with its buffer: in lum_free_slow they made every slow free (a sampled block's,
 * a large one's, another thread's) save four registers and make room first. */
static __attribute__((noinline, cold)) void free_invalid(void *p)
{
    char msg[96];
    static const char hex[] = "0123456789abcdef";
    uintptr_t v = (uintptr_t)p;
    char *m = msg;
    const char *prefix = "lumalloc: free of an address no allocation returned: 0x";
    while (*prefix) *m++ = *prefix++;
    for (int shift = 60; shift >= 0; shift -= 4) *m++ = hex[(v >> shift) & 15];
    *m++ = '\n';
    *m = 0;
    lum_write_err(msg);
    if (lum_opt.harden || LUM_HARDENED) abort();
}

/* Another thread's block (or ours on an adopted page). */
static LUM_NOINLINE void free_foreign(void *p, struct lum_page *page)
{
    struct lum_heap *heap = lum_tls_heap;
    if (heap == &lum_empty_heap && !lum_tls_exited) heap = lum_heap_get();
    lum_count_free(heap, page->block_size);
    if (heap && heap != &lum_empty_heap) {
        struct lum_heap *owner = atomic_load_explicit(&page->owner, memory_order_relaxed);
        /* our page without its fast owner: only between the owner's own steps that set or
         * clear the two apart (a new page's, a retired one's), so a signal handler's free */
        if (owner == heap) {
            lum_heap_local_free(heap, page, p);
            return;
        }
        if (owner == NULL && free_into_abandoned(page, p)) return;
    }
    free_remote(page, p);
}

/* Only tail calls, arguments in place: no registers saved, no frame, for whichever kind of
 * free comes here.  Another thread's block first, the common one in threaded programs. */
LUM_NOINLINE void lum_free_slow(void *p, struct lum_page *page)
{
    unsigned kind = page->kind;
    if (LUM_LIKELY(kind == LUM_PAGE_SMALL)) {
        free_foreign(p, page);
        return;
    }
    if (kind == LUM_PAGE_SAMPLED) {
        lum_sampled_free(p, page);
        return;
    }
    if (kind == LUM_PAGE_LARGE) {
        lum_large_free(p);
        return;
    }
    free_invalid(p);
}

/* ---- thread exit ---- */

/* A thread that vanished in a fork may have stopped between a free-list update and the
 * matching change to used: recount used from the list (live blocks = carved - free). */
static void page_recount(struct lum_page *page)
{
    /* A thread stopped inside lum_page_refill has linked blocks past `carved` without moving
     * it: those count as carved, or they would be carved (handed out) a second time. */
    uint32_t n = 0, top = page->carved;
    for (lum_block *b = page->free; b && n <= page->capacity; b = lum_free_next(page, b)) {
        n++;
        uint32_t idx = (uint32_t)(((uintptr_t)b - (uintptr_t)page->start) / page->block_size);
        if (idx >= top && idx < page->capacity) top = idx + 1;
    }
    LUM_OWN_SET(page->carved, top);
    LUM_OWN_SET(page->used, n <= top ? top - n : 0);
}

/* An exited thread's empty pages are kept, free lists and all, for the next thread that needs
 * their class (bounded, and for the decay time): a thread-per-request server then reuses the
 * same memory for the same classes.  Released to their segments instead, a slice would host
 * one class's page after another's, and the set of pages ever touched would creep over the
 * whole segment. */
static void abandon_list(struct lum_page_list *list, unsigned cls, uint64_t now)
{
    struct lum_page *page;
    while ((page = list->head) != NULL) {
        lum_list_remove(list, page);
        /* unconditionally: a fork child's dead thread may have stopped between marking a page
         * and moving it to the full list */
        page_unmark_full(page);
        LUM_OWN_SET(page->used, lum_page_live(page));
        lum_page_collect(page);
        lum_page_set_fast(page, NULL);
        LUM_OWN_SET(page->in_full, 0);
        page->retained = 0;
        page->next = page->prev = NULL;
        if (!abandon_page(page, cls, now)) lum_page_release(page, false);
    }
}


/* Hands every page to the abandoned lists (adopted by whichever thread next needs that class)
 * and recycles the heap record, leaving it as heap_forget_pages would (heap_create reuses it
 * without that pass).  Only for a live thread's orderly exit: a fork child rebuilds the records
 * of threads that did not survive with heap_forget_pages, as their lists may be torn. */
void lum_heap_abandon(struct lum_heap *heap)
{
    LUM_OWN_SET(heap->tc.state, LUM_THREAD_EXITED);
    lum_on_thread_exit(&heap->tc); /* before the record can be reused */
    /* The thread's own injector (lum_fail_after) dies with it: left armed, it kept every other
     * thread's allocations on the slow path, unsampled, for good.  Here, on the exiting
     * thread, not in lum_on_thread_exit, which a fork child also calls for the threads that
     * did not survive (it cancelled the surviving thread's).  Only when one is armed: the call
     * is in the warm text, which a program that only allocates small blocks never faults in. */
    if (LUM_UNLIKELY(lum_fail_is_armed())) lum_fail_cancel();
    /* Under the heap-list lock (first in fork's order), so a fork sees the heap either whole
     * or fully abandoned, never half of each. */
    lum_lock(&lum_heaps_lock);
    holding_heaps_lock = 1;
    drain_inbox(heap);
    lum_heap_cache_flush(heap);
    heap->retained_bytes = 0;
    uint64_t now = lum_now_ms();
    lum_heap_clear_current(heap); /* class by class, ~1,200 instructions an exit more */
    for (unsigned c = 0; c < LUM_CLASSES; c++) {
        heap->retained_count[c] = 0;
        /* most of a thread's 192 lists are empty: a call each cost ~14 instructions */
        if (heap->avail[c].head) abandon_list(&heap->avail[c], c, now);
        if (heap->full[c].head) abandon_list(&heap->full[c], c, now);
    }
    /* alive clears before the last drain, with a fence between: see free_remote */
    __atomic_store_n(&heap->alive, 0, __ATOMIC_RELAXED);
    atomic_thread_fence(memory_order_seq_cst);
    drain_inbox(heap); /* frees that raced with the abandonment: forwarded to the pages */
    /* what heap_create does not reset for a pooled record (heap_forget_pages' other fields are
     * reset above) */
    if (heap->empty_big) heap->empty_big = NULL; /* on the record's second page: see struct lum_heap */
    heap->remote_collected = 0;
    heap->next_pool = heap_pool;
    heap_pool = heap;
    heap->pooled = true;
    holding_heaps_lock = 0;
    lum_unlock(&lum_heaps_lock);
    abandoned_release_stale();
    __atomic_add_fetch(&lumalloc_registry.generation, 1, __ATOMIC_RELEASE);
}

/* An allocation after the thread's heap was torn down: a heap for this one allocation, let go
 * of at once (its page is abandoned with the block on it). */
static LUM_NOINLINE void *late_alloc(size_t size, size_t alignment)
{
    lum_tls_exited = 0;
    struct lum_heap *heap = lum_heap_get();
    lum_tls_exited = 1;
    if (!heap) return lum_alloc_failed(NULL, size, alignment, ENOMEM);
    pthread_setspecific(heap_key, NULL);
    void *p = lum_malloc_slow(size, alignment);
    lum_tls_heap = &lum_empty_heap;
    lum_heap_abandon(heap);
    return p;
}

static void heap_teardown(void *arg)
{
    struct lum_heap *heap = arg;
    if (heap != lum_tls_heap || heap == &lum_empty_heap) return;
    lum_tls_heap = &lum_empty_heap;
    lum_tls_exited = 1;
    lum_heap_abandon(heap);
}

size_t lum_abandoned_reclaim(bool all)
{
    size_t bytes = 0;
    uint64_t now = lum_now_ms();
    lum_lock(&lum_heaps_lock);
    holding_heaps_lock = 1;
    for (struct lum_heap *h = heap_pool; h; h = h->next_pool) forward_inbox(h);
    holding_heaps_lock = 0;
    lum_unlock(&lum_heaps_lock);
    lum_lock(&lum_abandoned_lock);
    /* before the walk, and fenced from its reads (a locked RMW): a free onto a page the walk has
     * passed sets it again, for the next look */
    __atomic_fetch_and(&abandoned_due, ~ABANDONED_FREED_INTO, __ATOMIC_SEQ_CST);
    for (unsigned c = 0; c < LUM_CLASSES; c++) {
        struct lum_page *page = lum_abandoned[c].head;
        while (page) {
            struct lum_page *next = page->next;
            lum_page_collect(page);
            if (page->used == 0 && (all || now - page->abandoned_ms >= lum_opt.decay_ms)) {
                abandoned_unlink(page);
                bytes += (size_t)page->slices * LUM_SLICE_SIZE;
                lum_page_release(page, false);
            } else if (page->used == 0 && page->abandoned == LUM_ABANDONED_WITH_BLOCKS) {
                /* emptied by others' frees since: filed as empty, so decay comes back for it */
                abandoned_unlink(page);
                abandoned_file(page, c, true);
            }
            page = next;
        }
    }
    lum_unlock(&lum_abandoned_lock);
    return bytes;
}

/* No empty abandoned page waits for its decay, nor any other thread's free onto an abandoned
 * page for a look (the background thread may stop looking). */
bool lum_abandoned_idle(void)
{
    return __atomic_load_n(&abandoned_due, __ATOMIC_RELAXED) == 0;
}

void lum_abandoned_decay(void)
{
    static uint64_t last_ms;
    uint64_t now = lum_now_ms(), last = __atomic_load_n(&last_ms, __ATOMIC_RELAXED);
    uint64_t period = lum_opt.decay_ms / 4 ? lum_opt.decay_ms / 4 : 1;
    if (now - last < period || lum_abandoned_idle()) return;
    if (!__atomic_compare_exchange_n(&last_ms, &last, now, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return;
    lum_abandoned_reclaim(false);
}

LUM_COLD_TEXT void lum_heaps_for_each_locked(void (*fn)(struct lum_heap *, void *), void *arg, uint64_t exited[2])
{
    for (struct lum_heap *h = all_heaps; h; h = h->next_all) fn(h, arg);
    if (exited) {
        exited[0] = LUM_PEEK(lumalloc_registry.global.exited_alloc_bytes);
        exited[1] = LUM_PEEK(lumalloc_registry.global.exited_free_bytes);
    }
}

LUM_COLD_TEXT void lum_heaps_for_each(void (*fn)(struct lum_heap *, void *), void *arg, uint64_t exited[2])
{
    lum_lock(&lum_heaps_lock);
    lum_heaps_for_each_locked(fn, arg, exited);
    lum_unlock(&lum_heaps_lock);
}

/* In a fork child only the forking thread lives on: the others' pages are abandoned so their
 * blocks can be freed and reused, and their heap records recycled. */
/* Marks a heap whose thread did not survive a fork (in the child, while it is rebuilt). */
#define LUM_HEAP_DEAD 2

/* Chains (through page->next) the small pages that heaps of dead threads own. */
static void collect_dead_pages(struct lum_segment *seg, void *arg)
{
    struct lum_page **chain = arg;
    for (unsigned i = 0; i < LUM_SLICES; i++) {
        struct lum_page *page = &seg->pages[i];
        if (!page->slices || page->kind != LUM_PAGE_SMALL || seg->slice_page[i] != page) continue;
        struct lum_heap *owner = atomic_load_explicit(&page->owner, memory_order_relaxed);
        if (!owner || (owner != &stale_owner && owner->alive != LUM_HEAP_DEAD)) continue;
        page->next = *chain;
        *chain = page;
    }
}

/* A dead thread's cached blocks go back on their pages' lists, where page_recount counts them
 * free (left cached, they would count as live, and their pages never empty).  A push or pop
 * stopped half-way leaves the list whole (its head moves last) with a count off by one: the
 * walk is bounded and stops at a block that is not one of the heap's own of that class. */
static void salvage_dead_cache(struct lum_heap *h)
{
    for (unsigned c = 0; c < LUM_CLASSES; c++) {
        lum_block *b = cache_take(h, c);
        for (unsigned n = 0; b && n <= LUM_CACHE_BLOCKS; n++) {
            struct lum_page *page = lum_page_of(b);
            uintptr_t off = (uintptr_t)b - (uintptr_t)page->start;
            if (page->kind != LUM_PAGE_SMALL || !page->slices || page->cls != c ||
                atomic_load_explicit(&page->owner, memory_order_relaxed) != h ||
                off >= (uintptr_t)page->carved * page->block_size || off % page->block_size)
                break;
            lum_block *next = b->next;
            lum_page_push_free(page, b);
            b = next;
        }
    }
}

/* In a fork child, the threads that did not survive may have stopped in the middle of an
 * update of their own page lists (those take no lock), and walking such a list can link a page
 * into two lists and hang the child.  So their pages are found from the segments' slice maps
 * instead, which change only under the segment lock that fork's prepare handler held, and are
 * recounted (a thread may have stopped mid-free) and abandoned one by one.  Every other small
 * page there is the surviving thread's or on an abandoned list: a page is owned from its
 * allocation (lum_page_alloc) until its release takes it out of the slice map (stale pages an
 * exiting thread gives back are stale_owner's meanwhile, taken here like a dead thread's), or
 * abandoned (abandon_locked). */
LUM_COLD_TEXT void lum_heaps_after_fork_child(void)
{
    struct lum_heap *me = lum_tls_heap;
    heap_pool = NULL;
    bool any_dead = false;
    for (struct lum_heap *h = all_heaps; h; h = h->next_all) {
        if (h != me && h->alive) {
            h->alive = LUM_HEAP_DEAD;
            any_dead = true;
            salvage_dead_cache(h);
        }
    }
    /* The slice maps are walked even with no other thread alive: the last one may have been
     * giving back its stale pages (stale_owner's) outside the locks, its heap already pooled. */
    struct lum_page *chain = NULL;
    lum_segments_for_each(collect_dead_pages, &chain);
    uint64_t now = lum_now_ms();
    while (chain) {
        struct lum_page *page = chain;
        chain = page->next;
        page->next = page->prev = NULL;
        LUM_OWN_SET(page->in_full, 0);
        page->retained = 0;
        lum_page_set_fast(page, NULL);
        page_recount(page);
        page_unmark_full(page);
        lum_page_collect(page);
        if (!abandon_page(page, page->cls, now)) lum_page_release(page, false);
    }
    for (struct lum_heap *h = all_heaps; h; h = h->next_all) {
        if (h == me) continue;
        if (h->alive == LUM_HEAP_DEAD) {
            LUM_OWN_SET(h->tc.state, LUM_THREAD_EXITED);
            lum_on_thread_exit(&h->tc);
            heap_forget_pages(h); /* its lists may be torn: its pages were taken from the segments */
            h->alive = 0;
        }
        forward_inbox(h); /* its pages have no owner now: blocks go on to them */
        h->next_pool = heap_pool;
        heap_pool = h;
        h->pooled = true;
    }
    if (any_dead) __atomic_add_fetch(&lumalloc_registry.generation, 1, __ATOMIC_RELEASE);
    if (me != &lum_empty_heap) {
        me->tid = (uint32_t)syscall(SYS_gettid);
        LUM_OWN_SET(me->tc.tid, me->tid);
    }
}
