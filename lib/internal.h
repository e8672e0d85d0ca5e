/* lumalloc internals shared by the core's files.  Layout (see README, "Design"):
 *
 *   segment (4 MiB, 4 MiB-aligned) = 64 slices of 64 KiB; slice 0 holds this header.
 *   page    = a span of 1..16 slices serving one size class, owned by one thread heap.
 *   large   = its own mapping, 4 MiB-aligned, with a header laid out like a segment's so that
 *             free() finds its page struct the same way (every slot points at a sentinel).
 *
 * pointer -> segment is (p - 1) & ~(SEGMENT_SIZE - 1): the "- 1" lets a block aligned to
 * 4 MiB or more keep its header in the preceding 4 MiB chunk.
 */
#ifndef LUM_INTERNAL_H
#define LUM_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include "cold_text.h"
#include "counter.h"
#include "hidden.h"
#include "lock.h"
#include "lumalloc_probes.h"
#include "observe.h"

#define LUM_LIKELY(x) __builtin_expect(!!(x), 1)
#define LUM_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define LUM_NOINLINE __attribute__((noinline))
#define LUM_COLD __attribute__((noinline, cold))
#define LUM_EXPORT __attribute__((visibility("default")))

#define LUM_SEGMENT_SHIFT 22
#define LUM_SEGMENT_SIZE ((size_t)1 << LUM_SEGMENT_SHIFT)
#define LUM_SEGMENT_MASK (LUM_SEGMENT_SIZE - 1)
#define LUM_SLICE_SHIFT 16
#define LUM_SLICE_SIZE ((size_t)1 << LUM_SLICE_SHIFT)
#define LUM_SLICES (LUM_SEGMENT_SIZE / LUM_SLICE_SIZE) /* 64: one uint64_t bitmap */
#define LUM_MAX_PAGE_SLICES 16

/* Hardened builds (liblumalloc-hardened): encoded free lists, double/invalid free detection,
 * guard pages, randomised slot order.  The header moves one page into its slice so a guard page
 * can sit in front of it. */
#ifndef LUM_HARDENED
#define LUM_HARDENED 0
#endif
#define LUM_GUARD_SIZE ((size_t)4096)
#define LUM_HEADER_OFFSET (LUM_HARDENED ? LUM_GUARD_SIZE : 0)

#define LUM_ALIGN 16
#define LUM_CLASSES 96                  /* see scripts/gen_size_classes.py */
#define LUM_SMALL_MAX ((size_t)256 << 10) /* largest size class */
/* user data of a large block starts a page after its header (two with the hardened guard) */
#define LUM_LARGE_HEADER (4096 + LUM_HEADER_OFFSET)
#define LUM_SMALL_TABLE_MAX 1024
#define LUM_MEDIUM_TABLE_MAX 16384
#define LUM_MEDIUM_STEP 16
#define LUM_BIG_STEP 4096
#define LUM_RETAIN_EMPTY_PER_CLASS 2   /* empty pages a heap keeps per class before releasing */
#define LUM_RETAIN_EMPTY_BYTES ((size_t)1 << 20)
#define LUM_KEEP_SPAN_AFTER 4         /* pages of a class released in a row before spans are kept */
#define LUM_CACHE_BLOCKS 16            /* most blocks a heap's cache keeps per class */
#define LUM_ORDER_MIN_FREE 64         /* free blocks for a page's list to be put in address order */

typedef struct lum_block { struct lum_block *next; } lum_block;

enum lum_page_kind {
    LUM_PAGE_SMALL = 0,   /* ordinary size-class page */
    LUM_PAGE_SAMPLED = 1, /* holds sampled allocations: every free takes the slow path */
    LUM_PAGE_LARGE = 2,   /* sentinel for large blocks */
    LUM_PAGE_INVALID = 3, /* sentinel for addresses no block can start at */
};

struct lum_heap;

/* page->abandoned */
#define LUM_ABANDONED_WITH_BLOCKS 1
#define LUM_ABANDONED_EMPTY 2 /* kept for the next thread that needs the class, for the decay time */

/* Aligned so that the hot fields never straddle two cache lines (88 bytes would, one page in
 * four): 3% fewer L1 misses on bench ring under callgrind's cache model. */
struct __attribute__((aligned(32))) lum_page {
    /* Hot fields first: the fast paths touch only this cache line.
     * fast_heap is read by free() on every thread and written by the owner: relaxed atomics
     * (plain moves on x86) make that race well defined; any thread but the owner sees the
     * owner or NULL, never its own heap, and takes the slow path either way. */
    _Atomic(struct lum_heap *) fast_heap; /* == owner while it may free here with no bookkeeping */
    lum_block *free;
    uint32_t used;              /* blocks handed out and not yet returned to this page's lists */
    uint32_t block_size;
    uint8_t cls;
    uint8_t kind;
    uint8_t in_full;            /* on the owner's full list */
    uint8_t retained;           /* empty, kept by its heap for reuse (counted in retained_*) */
    uint8_t abandoned;          /* LUM_ABANDONED_*: on lum_abandoned[cls] (under lum_abandoned_lock) */
    uint8_t slices;             /* span length; 0 when the page struct is not in use */
    union {
        uint16_t abandoned_exits; /* thread exits so far when it was filed as empty abandoned */
        /* Abandoned with live blocks: the tag (heap.c, heap_tag) of the thread that last freed a
         * block into it, 0 for none yet; that thread adopts it first (adopt_abandoned). */
        uint16_t freed_by;
    };
    uint32_t capacity;          /* blocks the span can hold */
    uint32_t carved;            /* blocks carved from the span so far (the rest is untouched) */
    uint8_t *start;
    _Atomic(struct lum_heap *) owner; /* NULL while abandoned */
    /* Blocks freed by threads other than the owner (while it is abandoned, only those that do
     * not go onto its list in place under lum_abandoned_lock: frees from threads with no heap
     * left, blocks forwarded from an exited owner's inbox, frees racing the abandonment; heap.c,
     * free_foreign), collected by the owner, or under lum_abandoned_lock while abandoned;
     * LUM_TF_FULL (heap.c) while it is parked on the owner's full list. */
    _Atomic(lum_block *) thread_free;
    struct lum_page *next, *prev;     /* in the owner's per-class lists or a global list */
    union {
        uint64_t abandoned_ms;        /* when it went on the abandoned list (decay of empty ones) */
        /* While parked on its owner's full list (in_full; never abandoned then): live blocks
         * not counted in used, so that the free fast path's `--used == 0` fires when the page
         * has gathered enough free blocks to be worth taking back (heap.c, page_park_full). */
        uint32_t park_bias;
        uint64_t emptied_ms;          /* a sampled page: when it last emptied (sampled.c) */
    };
    /* A sampled page's record slots, one a block (sampled.c); NULL on other pages. */
    struct lum_sample_rec *recs;
#if LUM_HARDENED
    uintptr_t key;                    /* free-list pointer encoding */
#endif
};

struct lum_segment {
    /* Must stay first and identical in struct lum_large: free() indexes it blindly. */
    struct lum_page *slice_page[LUM_SLICES + 1];
    uint32_t kind;              /* LUM_SEG_SMALL or LUM_SEG_LARGE */
    uint64_t free_slices;       /* bit i: slice i is not part of any page */
    uint64_t purged_slices;     /* bit i: slice i was returned to the OS and is not resident */
    /* on the cache line of the two above: lum_page_alloc reads all three of every segment */
    struct lum_segment *next, *prev;
    uint64_t freed_at_ms[LUM_SLICES]; /* when a free slice was freed (decay) */
    uint64_t empty_since_ms;    /* when the segment last became wholly free (0: it is not) */
    uint32_t collapsed;         /* MADV_COLLAPSE done (huge-page mode) */
    /* Per slice, while it is resident: how many of its 4 KiB pages some page ever carved into
     * (0-16), and the span tag of the last page that kept its span on it (segment.c,
     * span_tag: an ordinary class, LUM_CLASSES + 1 + a sampled class of 64 KiB or less,
     * LUM_CLASSES none).  A released page leaves its carved span resident for the next page of
     * its class on these slices; a page of another class has what its class does not carve
     * returned first, unless its blocks are over 16 KiB (segment.c, inherit_span).  A page in
     * use raises its slices' counts as it carves (lum_page_touch, the owner alone, no lock;
     * statistics read them with LUM_PEEK): resident_bytes is the sum of these counts over all
     * segments' slices, plus headers, large blocks and metadata (huge-page mode: whole slices). */
    uint8_t slice_touched[LUM_SLICES];
    uint8_t slice_cls[LUM_SLICES];
    /* The page structs, further into slice 0 by the segment's colour (segment.c). */
    struct lum_page *pages;
    uint32_t colour;
};

/* Every segment is 4 MiB-aligned, so a header at a fixed offset in each would fall on the same
 * sets of a cache that indexes by the low 16 address bits (a 512 KiB 8-way L2): free() reads a
 * page struct and its slice map entry, and with seven segments (bench ring, 25 MiB) those lines
 * fought over 8 ways per set with each other and with the blocks.  Segments take turns at
 * LUM_SEG_COLOURS offsets, 8 KiB apart, for their page structs, which slice 0 has room for (it
 * holds nothing else).  Colour 0 shares the header's first 4 KiB page; the others take one more. */
#define LUM_SEG_COLOURS (LUM_HARDENED ? 6 : 7) /* what slice 0 has room for */
#define LUM_SEG_COLOUR_STEP ((size_t)8192)
#define LUM_SEG_PAGES_AT(colour) \
    ((LUM_HEADER_OFFSET + sizeof(struct lum_segment) + 63) / 64 * 64 + (size_t)(colour) * LUM_SEG_COLOUR_STEP)
_Static_assert(LUM_SEG_PAGES_AT(LUM_SEG_COLOURS - 1) + LUM_SLICES * sizeof(struct lum_page) <=
                   LUM_SLICE_SIZE - (LUM_HARDENED ? LUM_GUARD_SIZE : 0),
               "every colour's page structs fit in slice 0 (before its hardened guard)");

/* the 4 KiB pages of slice 0 that a segment's metadata touches */
static inline size_t lum_seg_header_bytes(uint32_t colour)
{
    size_t pages_at = LUM_SEG_PAGES_AT(colour), pages_end = pages_at + LUM_SLICES * sizeof(struct lum_page);
    size_t fixed_end = LUM_HEADER_OFFSET + sizeof(struct lum_segment);
    size_t first = (pages_at / 4096) * 4096;
    /* the fixed part's pages, and the page structs' (some of which may be the same) */
    size_t fixed_pages = (fixed_end + 4095) / 4096 * 4096;
    size_t struct_pages = (pages_end + 4095) / 4096 * 4096 - first;
    return first < fixed_pages ? (pages_end + 4095) / 4096 * 4096 : fixed_pages + struct_pages;
}

#define LUM_SEG_SMALL 1
#define LUM_SEG_LARGE 2

struct lum_large {
    struct lum_page *slice_page[LUM_SLICES + 1];
    uint32_t kind;
    uint32_t sampled;
    void *map_base;             /* start of the mapping (the header sits LUM_HEADER_OFFSET in) */
    size_t map_size;            /* bytes mapped from map_base (the gap before user may be unmapped) */
    size_t usable;
    size_t requested;
    uint8_t *user;
    uint64_t origin;            /* its mapping: see struct piece in large.c */
    uint32_t cached;            /* in the cache: a free of it now is a double free */
};

struct lum_page_list { struct lum_page *head, *tail; };

#define LUM_DIRECT_SLOTS (LUM_SMALL_TABLE_MAX / LUM_ALIGN + 1)
#define LUM_SLOW_CLASS LUM_CLASSES /* no class: see struct lum_heap's slot_class */

/* The fields malloc's and free's fast paths read: first in struct lum_heap (their comments
 * are there), and all that lum_empty_heap has (heap.c). */
#define LUM_HEAP_FAST_FIELDS \
    lum_block *cache[LUM_CLASSES + 1]; \
    int8_t cache_room[LUM_CLASSES]; \
    uint8_t slot_class[LUM_DIRECT_SLOTS]; \
    uint32_t class_size[LUM_CLASSES + 1]; \
    struct lum_page *current[LUM_CLASSES + 1]; \
    struct lum_thread_counters_v1 tc; \
    int64_t sample_left;

struct lum_heap {
    /* cache: blocks this thread freed into its own pages, per class, handed out again before any
     * page's list, last freed first (lum_cache_max bounds each class).  A page's own list
     * recycles only that page's blocks, so where frees land on other pages of the class than
     * the current one (any queue-like lifetime) malloc handed out blocks freed long ago, out of
     * cache; from here it gets the one freed last.  Cached blocks still count in their page's
     * used.  Slot LUM_CLASSES is lum_empty_page's class and stays empty.  cache_room counts
     * down from lum_cache_max (one test on the free path, no table); free decrements it first
     * and tests the sign, so it reads -1 for a moment when the cache is full. */
    /* slot_class and class_size: lum_small_class and lum_class_size, copied into every record
     * (heap_create) so that malloc's fast path finds a size's class and the class's
     * block size at an offset from the heap pointer it holds already, where the shared tables
     * would cost a load of their address each, and a page pointer per slot (mimalloc's "direct
     * pages", what this replaced) a dependent load more before the cache: malloc went from 20
     * instructions to 19.  lum_empty_heap's are zero: class 0, whose cache there is empty and
     * whose current page is lum_empty_page.  current[] is never NULL: lum_empty_page when there
     * is none.  Class LUM_CLASSES (LUM_SLOW_CLASS) is no class: its cache is always empty, its
     * size 0 and its page lum_empty_page, so that a size slot_class maps to it takes the slow
     * path from the fast path's own tests (the large warning below 1 KiB, lum_size_limits_apply). */
    /* sample_left: the bytes this thread may still allocate before the sampler's next point on
     * its stream of allocated (usable) bytes: an allocation whose block would take it below 0
     * holds the point, and is sampled.  Every move of tc.alloc_bytes moves it the other way
     * (lum_heap_count_alloc).  A countdown beside the exact counter, not a point on it, so
     * that malloc's fast path subtracts in memory and branches on the sign (GCC will not
     * branch on "<= 0" straight from a subtraction in memory): one instruction less than
     * adding to the counter and comparing with a point.  Special values: LUM_SAMPLE_FORCED,
     * LUM_SAMPLE_OFF. */
    LUM_HEAP_FAST_FIELDS
    _Atomic(lum_block *) inbox; /* blocks freed by other threads, drained by the owner */
    uint64_t rng;
    uint32_t sample_epoch; /* lum_sample_epoch when the point in sample_left was drawn */
    /* The two flags every sample reads, on sample_left's line (in the hole beside
     * sample_epoch): sample_recheck was with tid, and lum_requested read pad_want on the
     * record's second page, two lines out of cache at each sample (bench ring, callgrind: ~0.9
     * D1 misses a sample). */
    bool sample_recheck; /* sample_left is no point, only where to draw again (LUM_SAMPLE_RECHECK) */
    bool padding;        /* pad_want is set (see there) */
    /* lum_sample_factor of each class's size at interval wf_interval, 0 until asked: per
     * thread, so no lock or race when the interval changes (the table is then cleared). */
    uint64_t wf_interval;
    double wf[LUM_CLASSES];
    uint32_t tid;
    /* The byte-sized fields share one word with tid: the 16 bytes of padding they cost apart
     * would push the 4 KiB class's list onto the record's second page (see avail). */
    uint8_t alive;
    bool pooled; /* in heap_pool: no thread has the record (under lum_heaps_lock) */
    uint8_t empty_big_cls;      /* empty_big's class, checked before the page is read */
    uint8_t retained_count[LUM_CLASSES];
    uint8_t free_run_tick; /* see free_run_allocs */
    size_t retained_bytes;
    size_t remote_collected; /* bytes of other threads' frees collected since heap_release_idle looked */
    /* Frees past a full cache count down free_run_tick; at each 256th, free_run_allocs holds
     * the malloc count at the one before (lum_heap_free_run_check). */
    uint64_t free_run_allocs;
    struct lum_heap *next_all;  /* every heap ever made (they are recycled, never unmapped) */
    struct lum_heap *next_pool;
    /* Last, and the full lists at the very end: a record is 4 KiB-aligned (meta.c) and its
     * first page ends within avail, at the lists of the classes above 4 KiB with today's
     * tables, so a thread that uses none of those and never parks a full page leaves the
     * second page untouched.  The 4 KiB class itself must stay on the first page: stdio's
     * buffers are 4 KiB, and most programs allocate one (checked below heap.c's includes). */
    struct lum_page_list avail[LUM_CLASSES]; /* current page first; pages with free blocks */
    struct lum_page_list full[LUM_CLASSES];
    /* The emptied current page of > 1 slice kept (lum_page_empty): with the lists of those
     * classes (blocks of 10 KiB and up), on the second page. */
    struct lum_page *empty_big;
    /* realloc allocates more than it was asked for, to grow in place next time (lum_realloc):
     * while it does, an allocation of pad_want bytes is one of pad_asked for samples, warnings
     * and failure reports (lum_requested).  Matched on the size, so that an allocation nested
     * in between (a signal handler's) is taken at its own. */
    size_t pad_want, pad_asked;
};

extern LUM_HIDDEN struct lum_page lum_empty_page;
extern LUM_HIDDEN struct lum_page lum_large_sentinel;
extern LUM_HIDDEN struct lum_page lum_invalid_sentinel;
/* The heap of a thread that has none yet (or no longer) holds the fast fields alone (heap.c):
 * seen as a struct lum_heap, whose first fields they are, by a cast, and only ever compared
 * against before any other field is read. */
struct lum_heap_fast { LUM_HEAP_FAST_FIELDS };
extern LUM_HIDDEN struct lum_heap_fast lum_empty_heap_fast;
#define lum_empty_heap (*(struct lum_heap *)&lum_empty_heap_fast)
extern __thread struct lum_heap *lum_tls_heap __attribute__((tls_model("initial-exec")));

/* What the program asked for, for an allocation of size bytes (see pad_want). */
static inline size_t lum_requested(const struct lum_heap *heap, size_t size)
{
    return heap && heap != &lum_empty_heap && heap->padding && heap->pad_want == size && size ? heap->pad_asked
                                                                                                : size;
}

/* ---- size classes (size_class.c) ---- */
extern LUM_HIDDEN const uint8_t lum_small_class[LUM_SMALL_TABLE_MAX / LUM_ALIGN + 1];
extern LUM_HIDDEN const uint8_t lum_medium_class[LUM_MEDIUM_TABLE_MAX / LUM_MEDIUM_STEP + 1];
extern LUM_HIDDEN const uint8_t lum_big_class[LUM_SMALL_MAX / LUM_BIG_STEP + 1];
extern LUM_HIDDEN const uint32_t lum_class_size[LUM_CLASSES];
extern LUM_HIDDEN const uint8_t lum_class_slices[LUM_CLASSES];
extern LUM_HIDDEN const uint8_t lum_cache_max[LUM_CLASSES];

static inline unsigned lum_size_class(size_t size)
{
    if (LUM_LIKELY(size <= LUM_SMALL_TABLE_MAX))
        return lum_small_class[(size + LUM_ALIGN - 1) / LUM_ALIGN];
    if (size <= LUM_MEDIUM_TABLE_MAX) return lum_medium_class[(size + LUM_MEDIUM_STEP - 1) / LUM_MEDIUM_STEP];
    return lum_big_class[(size + LUM_BIG_STEP - 1) / LUM_BIG_STEP]; /* size <= LUM_SMALL_MAX */
}

static inline void lum_page_set_fast(struct lum_page *page, struct lum_heap *heap)
{
    atomic_store_explicit(&page->fast_heap, heap, memory_order_relaxed);
}

static inline struct lum_heap *lum_page_fast(const struct lum_page *page)
{
    return atomic_load_explicit(&((struct lum_page *)page)->fast_heap, memory_order_relaxed);
}

/* free()'s test: is heap the page's fast owner?  The same relaxed load, but GCC will not fold an
 * atomic load into the compare (one instruction more on every free); an aligned 8-byte read by
 * cmp is just as atomic on x86-64.  ThreadSanitizer cannot see into asm: it gets the load. */
static inline bool lum_page_fast_is(const struct lum_page *page, const struct lum_heap *heap)
{
#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
    bool equal;
    __asm__("cmpq %1, %2" : "=@cce"(equal) : "r"(heap), "m"(page->fast_heap));
    return equal;
#else
    return lum_page_fast(page) == heap;
#endif
}

/* Blocks handed out from a page and not yet back (used leaves out park_bias while parked). */
static inline uint32_t lum_page_live(const struct lum_page *page)
{
    return page->used + (page->in_full ? page->park_bias : 0);
}

/* sample_left while every allocation must take the slow path (failure injection, an interval
 * change, lum_empty_heap for good): far below anything a drawn point leaves (a point passed
 * leaves at most one allocation's size below 0), and far enough above INT64_MIN that
 * allocations counted against it before the slow path resets it cannot wrap it. */
#define LUM_SAMPLE_FORCED (INT64_MIN / 2)
/* sample_left for an allocation too large to take a point after it: in effect never. */
#define LUM_SAMPLE_OFF INT64_MAX
/* No countdown runs longer than LUM_SAMPLE_RECHECK bytes: a point drawn further away (or none,
 * with sampling off) stops there with sample_recheck set, and is drawn again from there (no
 * bias: the exponential distribution is memoryless).  So a thread that never leaves its fast
 * path still sees, within 4 MiB of its allocations, an interval changed at run time or failure
 * injection armed by another thread; it costs a slow-path visit per 4 MiB, none at 512 KiB
 * but one time in 3000. */
#define LUM_SAMPLE_RECHECK ((int64_t)4 << 20)
/* Moved when the sampling interval changes (lum_heap_interval_changed): a point drawn before is
 * not taken, and its thread draws again at the next point or slow-path visit, so that a
 * sample's weight is always that of the interval its point was drawn with. */
extern LUM_HIDDEN uint32_t lum_sample_epoch;

/* Outside malloc's fast path a drawn point leaves sample_left at -1 or more (every path that
 * counts bytes asks the sampler first); the fast path takes at most one small block's size
 * more off before lum_malloc_sample looks.  INT32_MIN: a bound far from both that fits in an
 * instruction's immediate. */
static inline bool lum_sample_forced(int64_t left)
{
    return left < INT32_MIN;
}

/* The thread handed out a block of `bytes` (outside malloc's fast path, which does the same
 * inline): its exact counters and its sampling countdown, the latter in unsigned arithmetic so
 * that no run of counts is undefined behaviour (with sampling off it only goes down from
 * INT64_MAX, 8 EiB away from wrapping). */
static inline void lum_heap_count_alloc(struct lum_heap *heap, uint64_t bytes)
{
    LUM_OWN_ADD(heap->tc.alloc_count, 1);
    LUM_OWN_ADD(heap->tc.alloc_bytes, bytes);
    heap->sample_left = (int64_t)((uint64_t)heap->sample_left - bytes);
}

static inline void lum_heap_set_current(struct lum_heap *heap, unsigned cls, struct lum_page *page)
{
    heap->current[cls] = page;
}

/* A class's cache turned off by a run of frees (heap.c: heap_caches_off): no room and nothing in
 * it, in a class that has one.  The owner's view; statistics read the two fields relaxed. */
static inline bool lum_cache_off(const struct lum_heap *heap, unsigned cls)
{
    return heap->cache_room[cls] == 0 && !heap->cache[cls] && lum_cache_max[cls];
}

static inline void lum_heap_clear_current(struct lum_heap *heap)
{
    for (unsigned c = 0; c < LUM_CLASSES; c++) heap->current[c] = &lum_empty_page;
}

/* ---- pointer -> metadata ---- */
static inline uintptr_t lum_segment_base(const void *p)
{
    return ((uintptr_t)p - 1) & ~(uintptr_t)LUM_SEGMENT_MASK;
}

static inline struct lum_segment *lum_segment_of(const void *p)
{
    return (struct lum_segment *)(lum_segment_base(p) + LUM_HEADER_OFFSET);
}

static inline uint8_t *lum_seg_base(const struct lum_segment *seg)
{
    return (uint8_t *)seg - LUM_HEADER_OFFSET;
}

/* Resident bytes the records of slices idx..idx+n-1 hold (slice_touched).  Relaxed loads: a
 * page in use raises its slices' records without the segment lock (lum_page_touch), and the
 * statistics read them while it carves. */
static inline size_t lum_span_bytes(const struct lum_segment *seg, unsigned idx, unsigned n)
{
    size_t pages = 0;
    for (unsigned i = 0; i < n; i++) pages += LUM_PEEK(seg->slice_touched[idx + i]);
    return pages * 4096;
}

#if LUM_HARDENED
bool lum_hardened_owned(uintptr_t base);
#endif

static inline struct lum_page *lum_page_of(const void *p)
{
    uintptr_t base = lum_segment_base(p);
#if LUM_HARDENED
    /* never read metadata through a pointer we did not hand out */
    extern struct lum_page lum_invalid_sentinel;
    if (LUM_UNLIKELY(!lum_hardened_owned(base))) return &lum_invalid_sentinel;
#endif
    struct lum_segment *seg = (struct lum_segment *)(base + LUM_HEADER_OFFSET);
    return seg->slice_page[((uintptr_t)p - base) >> LUM_SLICE_SHIFT];
}

/* ---- page free lists: plain, or encoded in hardened builds ---- */
#if LUM_HARDENED
LUM_COLD void lum_hardened_fail(const char *what, const void *p, size_t size);
static inline lum_block *lum_free_next(const struct lum_page *page, const lum_block *b)
{
    uintptr_t v = (uintptr_t)b->next ^ page->key ^ ((uintptr_t)b >> 4);
    if (v && (v - (uintptr_t)page->start >= (uintptr_t)page->slices * LUM_SLICE_SIZE ||
              (v - (uintptr_t)page->start) % page->block_size))
        lum_hardened_fail("free list corrupted (a freed block was written to) near", b, page->block_size);
    return (lum_block *)v;
}
static inline void lum_free_set_next(const struct lum_page *page, lum_block *b, lum_block *next)
{
    b->next = (lum_block *)((uintptr_t)next ^ page->key ^ ((uintptr_t)b >> 4));
}
void lum_hardened_check_free(const struct lum_page *page, const void *p);
/* p is the start of a block of page that is not on its free list; else fails with the message
 * interior or freed. */
void lum_hardened_check_block(const struct lum_page *page, const void *p, const char *interior, const char *freed);
/* A block handed out must not keep its encoded next pointer: the double-free filter would take
 * it for a free block (and walk the free list) at every free of a block whose owner never
 * writes its first word. */
static inline void lum_block_handed_out(lum_block *b) { b->next = NULL; }
#else
static inline void lum_block_handed_out(lum_block *b) { (void)b; }
static inline lum_block *lum_free_next(const struct lum_page *page, const lum_block *b)
{
    (void)page;
    return b->next;
}
static inline void lum_free_set_next(const struct lum_page *page, lum_block *b, lum_block *next)
{
    (void)page;
    b->next = next;
}
#endif

/* Links of the lists other threads push blocks onto (a page's thread_free, a heap's inbox).
 * Hardened: encoded with the key of the page of the block holding the link, as a page's own
 * lists are, and checked when followed to be a carved block of a page of blocks; plain, a
 * write into a block freed by another thread sent the owner to an address of the writer's
 * choosing (a live block handed out twice, stores into the program's globals). */
#if LUM_HARDENED
static inline void lum_remote_set_next(const struct lum_page *page, lum_block *b, lum_block *next)
{
    lum_free_set_next(page, b, next);
}
static inline lum_block *lum_remote_next(const lum_block *b)
{
    const struct lum_page *page = lum_page_of(b);
    uintptr_t v = (uintptr_t)b->next ^ page->key ^ ((uintptr_t)b >> 4);
    if (v) {
        const struct lum_page *to = lum_page_of((const void *)v);
        uintptr_t off = v - (uintptr_t)to->start;
        if ((to->kind != LUM_PAGE_SMALL && to->kind != LUM_PAGE_SAMPLED) || !to->block_size ||
            off % to->block_size || off >= (uintptr_t)to->carved * to->block_size)
            lum_hardened_fail("free list corrupted (a block freed by another thread was written to) near", b,
                              page->block_size);
    }
    return (lum_block *)v;
}
#else
static inline void lum_remote_set_next(const struct lum_page *page, lum_block *b, lum_block *next)
{
    (void)page;
    b->next = next;
}
static inline lum_block *lum_remote_next(const lum_block *b) { return b->next; }
#endif

/* Returns block b to its page's free list (the owner, or the sampled-page lock, holds the page). */
static inline void lum_page_push_free(struct lum_page *page, lum_block *b)
{
#if LUM_HARDENED
    lum_hardened_check_free(page, b);
#endif
    lum_free_set_next(page, b, page->free);
    page->free = b;
}

void lum_page_empty(struct lum_heap *heap, struct lum_page *page);

/* A block of this heap's own page onto the page's list, not the cache (free past a full cache,
 * a cache flushed): the page goes to lum_page_empty when that was its last block. */
static inline void lum_page_free_own(struct lum_heap *heap, struct lum_page *page, lum_block *b)
{
    lum_page_push_free(page, b);
    if (LUM_UNLIKELY(LUM_OWN_SUB(page->used, 1) == 0)) lum_page_empty(heap, page);
}


/* ---- os.c ---- */
void *lum_os_map(size_t size);
void *lum_os_map_aligned(size_t size, size_t alignment);
void lum_os_unmap(void *p, size_t size, size_t resident);
void lum_os_account(int64_t mapped, int64_t resident);
void lum_os_account_slices(int64_t resident, int64_t committed);
/* resident_bytes as it was before pages counted only what they carved: whole slices from when a
 * page takes them (os.c).  The dirty limit and the large cache weigh live memory with it. */
extern LUM_HIDDEN size_t lum_committed_bytes;
void lum_os_name(void *p, size_t size, const char *name);
void lum_os_populate(void *p, size_t size);
void *lum_os_remap(void *old, size_t old_size, size_t new_size, int flags, void *new_addr);
uint64_t lum_now_ms(void);
void lum_write_err(const char *msg);
void lum_os_guard(void *p, size_t size);
#if LUM_HARDENED
void lum_hardened_own(uintptr_t base, bool owned);
uint64_t lum_hardened_random(void);
#endif

/* ---- meta.c: internal memory that never goes through malloc ---- */
void *lum_meta_alloc(size_t size);
void lum_meta_free(void *p, size_t size);

/* ---- segment.c (global lock: lum_segment_lock) ---- */
extern LUM_HIDDEN lum_lock_t lum_segment_lock;
struct lum_page *lum_page_alloc(unsigned cls, enum lum_page_kind kind, struct lum_heap *owner);
void lum_page_release(struct lum_page *page, bool may_keep_span);
void lum_page_uncarve(struct lum_page *page);
size_t lum_page_touch(struct lum_page *page, size_t end);
/* Whether memory past the slices' records may hold bytes (lum_page_refill: calloc then clears
 * every block whole).  LUM_DISTRUST_KEPT, for good: a page given back may have kept its bytes
 * (MADV_FREE; a MADV_DONTNEED that failed, as on a locked mapping; or one that said it worked
 * and did not, as under qemu-user, which the first purge probes), or this is a fork child (a
 * thread may have lowered records whose madvise had not run when the memory was copied).
 * LUM_DISTRUST_FORK, while fork holds the allocator's locks (set in its prepare handler, cleared
 * in the parent's; a child keeps it): the child's atfork handlers registered before lumalloc's
 * may allocate before its own sets the first.  The slices change
 * hands under lum_segment_lock after the purge that sets it, so a carve on them reads it set. */
enum { LUM_DISTRUST_KEPT = 1, LUM_DISTRUST_FORK = 2 };
extern LUM_HIDDEN uint8_t lum_zero_distrust;
bool lum_page_grow(struct lum_page *page, unsigned cls);
/* A page that stays where it is changes kind and owner (realloc's growth of sampled blocks):
 * under lum_segment_lock, as every change of kind. */
void lum_page_change_kind(struct lum_page *page, enum lum_page_kind kind, struct lum_heap *owner);
size_t lum_segments_purge(bool all, uint32_t reason);
size_t lum_segments_purge_excess(size_t target, uint64_t min_age);
void lum_segments_for_each(void (*fn)(struct lum_segment *, void *), void *arg);
/* The same, then after(arg) still under the segment lock. */
void lum_segments_for_each_then(void (*fn)(struct lum_segment *, void *), void (*after)(void *), void *arg);

/* ---- page.c ---- */
bool lum_page_refill(struct lum_page *page);
/* The block the thread's last carve of a single block made from memory no block had used, and
 * how many bytes from its start may hold data (past them it reads as zero): calloc clears only
 * those of a block it gets from that carve (lum_page_refill says when it is one). */
struct lum_fresh_carve {
    void *block;
    size_t dirty;
};
extern __thread struct lum_fresh_carve lum_tls_fresh __attribute__((tls_model("initial-exec")));
uint32_t lum_page_collect(struct lum_page *page);
void lum_page_order_free(struct lum_page *page);

/* ---- heap.c ---- */
void *lum_malloc_slow(size_t size, size_t alignment);
/* malloc's fast path when the allocation reaches the thread's next sample point: heap is the
 * thread's, cls size's class (passed, not looked up again: ~8 instructions a sample). */
void *lum_malloc_sample(size_t size, struct lum_heap *heap, unsigned cls);
void lum_free_slow(void *p, struct lum_page *page);
struct lum_heap *lum_heap_get(void);
void lum_heap_local_free(struct lum_heap *heap, struct lum_page *page, lum_block *b);
bool lum_heap_grow_block(struct lum_heap *heap, struct lum_page *page, size_t size, size_t asked);
void lum_heap_cache_flush(struct lum_heap *heap);
void lum_global_init(void);
extern LUM_HIDDEN _Atomic int lum_initialized;
extern LUM_HIDDEN size_t lum_fast_limit;
void lum_size_limits_apply(void);
/* Set at initialisation and by lum_options_set, while other threads allocate: relaxed (a plain
 * load). */
static inline size_t lum_fast_limit_get(void) { return __atomic_load_n(&lum_fast_limit, __ATOMIC_RELAXED); }
void lum_heap_force_slow(void);
/* lum_heap_get, or NULL after the thread's heap was torn down (its last key destructors: a heap
 * made then would never be torn down; lum_malloc_slow serves those itself). */
struct lum_heap *lum_heap_get_unless_exited(void);
bool lum_release_for_retry(void);
/* A large block of size bytes for heap (zero: cleared), mapped once more after
 * lum_release_for_retry when the mapping fails, and the failure reported when that fails too;
 * a success after the retry leaves errno as it was, as any success. */
void *lum_large_alloc_or_fail(struct lum_heap *heap, size_t size, size_t alignment, bool zero);
/* Whether the armed failure injector fails this allocation of size bytes (counted); while it is
 * armed, the thread's allocations all come to the slow path, where it is asked. */
static inline bool lum_fail_injected(struct lum_heap *heap, size_t size)
{
    if (LUM_LIKELY(!lum_fail_is_armed())) return false;
    heap->sample_left = LUM_SAMPLE_FORCED;
    return lum_fail_should_inject(size);
}
void lum_heap_interval_changed(void);
bool lum_heap_take_sample(struct lum_heap *heap, size_t window, size_t advance);
void lum_heap_abandon(struct lum_heap *heap);
extern struct lum_registry_v1 lumalloc_registry;
extern LUM_HIDDEN lum_lock_t lum_heaps_lock;
extern LUM_HIDDEN lum_lock_t lum_abandoned_lock;
extern LUM_HIDDEN struct lum_page_list lum_abandoned[LUM_CLASSES];
/* fn on every heap record under lum_heaps_lock; exited (if not NULL) gets the exited threads'
 * alloc and free bytes read under the same lock, which heap_create folds a reused record's into:
 * read outside it, a fold in between counted that record twice or not at all. */
void lum_heaps_for_each(void (*fn)(struct lum_heap *, void *), void *arg, uint64_t exited[2]);
/* The same with lum_heaps_lock held by the caller. */
void lum_heaps_for_each_locked(void (*fn)(struct lum_heap *, void *), void *arg, uint64_t exited[2]);
/* Blocks other threads freed into page and its owner has not collected (on its thread_free
 * list), and fn on the page of each block waiting in heap's inbox (a live heap's).  Both take
 * the list off to read it and put it back, with lum_heaps_lock held (heap.c). */
uint32_t lum_page_remote_pending(struct lum_page *page);
void lum_heap_inbox_pages(struct lum_heap *heap, void (*fn)(struct lum_page *, void *), void *arg);
void lum_heap_release_empty(struct lum_heap *heap);
void *lum_alloc_failed(struct lum_heap *heap, size_t size, size_t alignment, int err);

/* ---- sampled.c ---- */
extern LUM_HIDDEN lum_lock_t lum_sampled_lock;
/* A block of sampled class scls (lum_sampled_class), counted; the caller records the sample. */
void *lum_sampled_alloc(struct lum_heap *heap, unsigned scls, struct lum_sample_rec **rec);
/* Bytes a sampled block's record slot takes (struct lum_sample_rec is 48), in 64-aligned arrays
 * (sampled.c): a slot on one cache line, which a sample writes and its free reads, where 48-byte
 * slots straddled two one time in two (bench ring under callgrind: -0.5 D1 misses a sample and
 * -0.5 a sampled free). */
#define LUM_SAMPLE_SLOT_SHIFT 6
/* The record slot of block p of sampled page page (sampled blocks are powers of two). */
static inline struct lum_sample_rec *lum_sampled_rec(const struct lum_page *page, const void *p)
{
    uintptr_t i = ((uintptr_t)p - (uintptr_t)page->start) >> __builtin_ctz(page->block_size);
    return (struct lum_sample_rec *)((uintptr_t)page->recs + (i << LUM_SAMPLE_SLOT_SHIFT));
}
/* The size a sampled block of a class of block size s takes: the power of two at or above
 * it, 256 bytes at least (sampled.c says why); every such power is a class of its own.  The
 * sampled class is that size's class. */
static inline size_t lum_sampled_size(size_t s)
{
    return s <= 256 ? 256 : (size_t)1 << (64 - __builtin_clzll((uint64_t)s - 1));
}
/* The sampling path asks on every sample: remembered per class (as class + 1, 0 = not yet
 * known; racing threads store the same value). */
extern LUM_HIDDEN uint8_t lum_sampled_memo[LUM_CLASSES];
unsigned lum_sampled_class_slow(unsigned cls);
static inline unsigned lum_sampled_class(unsigned cls)
{
    unsigned c = __atomic_load_n(&lum_sampled_memo[cls], __ATOMIC_RELAXED);
    return c ? c - 1 : lum_sampled_class_slow(cls);
}
void lum_sampled_free(void *p, struct lum_page *page);
/* Empty sampled pages of big blocks give back their memory: all, or those empty long enough. */
void lum_sampled_purge(bool all);
void *lum_sampled_take_unsampled(struct lum_heap *heap, unsigned cls);
/* An ordinary page of one block (over 64 KiB), off its heap's lists and fast path, becomes a
 * sampled page as it stands (realloc's growth in place); false: no record array for it. */
bool lum_sampled_adopt(struct lum_page *page);
/* A sampled page of one block (over 64 KiB) whose block realloc grows in place to class to: it
 * stays a sampled page (owner NULL: to is the new sample's class; the caller records it) or
 * becomes owner's ordinary page, off every list; the old sample ends either way.  False, with
 * nothing changed, when the page cannot grow (lum_page_grow). */
bool lum_sampled_regrow(struct lum_page *page, unsigned to, struct lum_heap *owner);
/* The sampled classes are the powers of two from 256 bytes to LUM_SMALL_MAX (lum_sampled_size):
 * their pages' lists, spares and record arrays are kept by slot, 11 of them, not by class (96),
 * which took 3.1 KiB of .bss where 0.4 KiB do: with the 2.8 KiB less, the unwinder's caches
 * (lib/CMakeLists.txt, LUMALLOC_LATE_BSS) start early enough that a program sampled through two
 * objects writes their first entries on the page before, one page of .bss less (bench churn,
 * cachescratch, threadchurn: 3 -> 2 pages written past .data's page). */
#define LUM_SAMPLED_SLOTS 11
_Static_assert(LUM_SMALL_MAX == (size_t)256 << 10, "slots for the powers of two from 2^8 to 2^18");
/* The slot of the sampled class whose blocks are block_size bytes. */
static inline unsigned lum_sampled_slot(size_t block_size)
{
    return (unsigned)__builtin_ctzll(block_size) - 8;
}
extern LUM_HIDDEN struct lum_page_list lum_sampled_pages[LUM_SAMPLED_SLOTS];
/* Under lum_sampled_lock: page, the head of its class's list (slot), handed out its last free block. */
void lum_sampled_emptied(struct lum_page *page, unsigned slot);
/* lum_sampled_alloc for the sampling path, inline: its common case (the head page has a free
 * block) without a call and the register saves of the whole pop (~15 instructions a sample).
 * The block comes back with lum_sampled_lock still held, so that the sample is recorded under
 * the same lock (see sampler_fast.h); the caller unlocks, then counts it (lum_sampled_count).
 * NULL, the lock released, when the head page has no free block: lum_sampled_alloc then. */
static inline __attribute__((always_inline)) lum_block *lum_sampled_pop_locked(unsigned slot,
                                                                              struct lum_page **pagep)
{
    lum_lock(&lum_sampled_lock);
    struct lum_page *page = lum_sampled_pages[slot].head;
    lum_block *b;
    if (LUM_UNLIKELY(!page || !(b = page->free))) {
        lum_unlock(&lum_sampled_lock);
        return NULL;
    }
    page->free = lum_free_next(page, b);
    lum_block_handed_out(b);
    LUM_OWN_ADD(page->used, 1);
    if (LUM_UNLIKELY(!page->free)) lum_sampled_emptied(page, slot);
    *pagep = page;
    return b;
}

static inline void lum_sampled_count(struct lum_heap *heap, const struct lum_page *page)
{
    lum_heap_count_alloc(heap, page->block_size);
    LUM_OWN_ADD(heap->tc.sampled_count, 1);
}

/* ---- background.c ---- */
void lum_background_maybe_start(size_t more_large);
/* lumalloc starts the background thread once it has mapped this much, or has this much in
 * large blocks, live (about to be freed) or cached (freed blocks' mappings, which only the
 * thread's decay empties while the program maps nothing new: python3 that had read a 25 MB
 * file kept 56 MiB resident for good).  malloc's slow path and the large path look. */
#define LUM_BG_START_BYTES ((uint64_t)64 << 20)
#define LUM_BG_START_LARGE ((uint64_t)16 << 20)
/* The thresholds in force: those, or in a fork child those above what it inherited (see
 * lum_background_after_fork_child). */
extern LUM_HIDDEN uint64_t lum_bg_start_bytes, lum_bg_start_large;
/* freed mappings kept resident: what lum_dirty_limit_check(false) looks at (its floor) */
extern LUM_HIDDEN size_t lum_large_cached;
static inline bool lum_background_due(size_t more_large)
{
    return __atomic_load_n(&lumalloc_registry.global.mapped_bytes, __ATOMIC_RELAXED) >= lum_bg_start_bytes ||
           __atomic_load_n(&lumalloc_registry.global.large_live_bytes, __ATOMIC_RELAXED) +
                   __atomic_load_n(&lum_large_cached, __ATOMIC_RELAXED) + more_large >= lum_bg_start_large;
}
/* For the malloc slow path: below the start thresholds (most processes, all their lives) two
 * loads instead of a call that reads four variables. */
static inline void lum_background_poll(void)
{
    if (LUM_UNLIKELY(lum_background_due(0)))
        lum_background_maybe_start(0);
}
void lum_background_note_dirty(void);
void lum_background_after_fork_child(void);
/* Returns abandoned pages whose blocks have all come back to their segments: every one (all),
 * or those abandoned at least the decay time ago. */
size_t lum_abandoned_reclaim(bool all);
/* Abandoned empty pages are kept for the next thread to need their class, for the decay
 * time: the slow path calls this to let them go when no background thread runs. */
void lum_abandoned_decay(void);
bool lum_abandoned_idle(void);
bool lum_segments_dirty(void);
size_t lum_segments_dirty_bytes(void);
size_t lum_segments_dirty_resident(void);
void lum_segments_collapse(void);
void lum_dirty_limit_check(bool large);
size_t lum_dirty_limit(size_t dirty);
uint64_t lum_dirty_min_age(size_t dirty, size_t limit);

/* ---- large.c ---- */
extern LUM_HIDDEN lum_lock_t lum_large_lock;
/* Live large blocks: one atomic beside large_live_bytes's on the large path, for mallinfo2's
 * hblks (glibc's count of mmapped chunks). */
extern LUM_HIDDEN size_t lum_large_live_blocks;
void *lum_large_alloc(struct lum_heap *heap, size_t size, size_t alignment, bool zero, bool may_sample);
void lum_large_free(void *p);
void *lum_large_realloc(void *p, size_t size);
size_t lum_large_usable(const void *p);
size_t lum_large_cache_purge(void);
/* Unmaps about bytes of the cache (a page is taking as much memory that was not resident): the
 * tail of its largest range, or whole ranges, largest first. */
void lum_large_cache_give(size_t bytes);
size_t lum_large_cache_purge_idle(uint64_t min_age);
size_t lum_large_cache_decay(void);
/* Inline: the segment path reads it, and nothing else of large.c's runs in a program without
 * large blocks (its text is warm, lib/CMakeLists.txt). */
static inline size_t lum_large_cache_bytes(void)
{
    return __atomic_load_n(&lum_large_cached, __ATOMIC_RELAXED);
}
/* 2 MiB, not 4: python3's large blocks kept that much more in the cache at its peak (bench
 * python 34.1 -> 31.9 MiB, for +20% minor faults, 10.2k -> 12.2k; no other row moved). */
#define LUM_DIRTY_FLOOR ((size_t)2 << 20)
#define LUM_DIRTY_HOT_MS 10 /* freed memory this recent stays over the dirty limit... */
#define LUM_DIRTY_HARD 4     /* ...unless it is over this many times the limit (lum_dirty_min_age) */

/* ---- counters ---- */
static inline void lum_count_global(uint64_t *field, int64_t delta)
{
    __atomic_fetch_add(field, (uint64_t)delta, __ATOMIC_RELAXED);
}

/* A free's bytes: to the thread's counters, or, for a thread without a heap (one whose heap was
 * torn down: pthread-key destructors that run after lumalloc's, glibc's __libc_thread_freeres),
 * to the process's exited threads' total, or live bytes (mallinfo2, lum_stats) would grow for
 * good with every such free. */
static inline void lum_count_free(struct lum_heap *heap, uint64_t bytes)
{
    if (heap && heap != &lum_empty_heap) {
        LUM_OWN_ADD(heap->tc.free_count, 1);
        LUM_OWN_ADD(heap->tc.free_bytes, bytes);
    } else {
        lum_count_global(&lumalloc_registry.global.exited_free_bytes, (int64_t)bytes);
    }
}

/* ---- list helpers ---- */
/* Heads are stored with relaxed atomics: the abandoned lists' heads are peeked without the
 * lock (a plain store on x86, like any other). */
static inline void lum_list_set_head(struct lum_page_list *l, struct lum_page *p)
{
    __atomic_store_n(&l->head, p, __ATOMIC_RELAXED);
}
static inline void lum_list_push_front(struct lum_page_list *l, struct lum_page *p)
{
    p->prev = NULL;
    p->next = l->head;
    if (l->head) l->head->prev = p; else l->tail = p;
    lum_list_set_head(l, p);
}
static inline void lum_list_push_back(struct lum_page_list *l, struct lum_page *p)
{
    p->next = NULL;
    p->prev = l->tail;
    if (l->tail) l->tail->next = p; else lum_list_set_head(l, p);
    l->tail = p;
}
static inline void lum_list_remove(struct lum_page_list *l, struct lum_page *p)
{
    if (p->prev) p->prev->next = p->next; else lum_list_set_head(l, p->next);
    if (p->next) p->next->prev = p->prev; else l->tail = p->prev;
    p->next = p->prev = NULL;
}

#endif
