/* Segments: 4 MiB aligned mappings cut into 64 KiB slices; pages are runs of slices.  All of
 * it under one lock: a thread comes here once per page (thousands of allocations), not per
 * allocation.  Free slices are returned to the OS by decay (lum_segments_purge). */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include "internal.h"
#include "options.h"
#include "observe.h"

lum_lock_t lum_segment_lock;
static struct lum_segment *segments;     /* every small segment */
static uint64_t last_purge_ms;
/* Free slices still resident (freed, not yet purged): what decay would give back.  Under the
 * segment lock; read racily by the dirty-limit check. */
static size_t dirty_bytes;
/* The part of them that is resident: the spans their pages left (slice_touched), 4 KiB for a
 * trimmed slice.  What the dirty limit weighs: sixteen trimmed slices count 64 KiB, not 1 MiB. */
static size_t dirty_resident;

#define ALL_SLICES (~(uint64_t)1) /* slice 0 is the header, never free */

/* The bits set in x (__builtin_popcountll is a call into libgcc on baseline x86-64). */
static inline unsigned popcount64(uint64_t x)
{
    x -= (x >> 1) & 0x5555555555555555ull;
    x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
    x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0full;
    return (unsigned)((x * 0x0101010101010101ull) >> 56);
}

/* A purge's outcome: madvised, whole slices (what committed and purged_bytes count); spans, the
 * part of them resident (what their records held); unmapped, segments settled whole. */
struct purge_out { size_t madvised, spans, unmapped; };

static void purge_locked(bool all, uint64_t now, struct purge_out *out);
static void purge_excess_locked(size_t target, uint64_t now, struct purge_out *out, uint64_t min_age);
static void purge_fragments_locked(unsigned n, size_t want, struct purge_out *out);
static size_t account_purge(const struct purge_out *out, uint32_t reason);

/* The bits of slices start .. start + len - 1 (len up to LUM_SLICES). */
static inline uint64_t slices_mask(unsigned start, unsigned len)
{
    return (len == 64 ? ~(uint64_t)0 : (((uint64_t)1 << len) - 1)) << start;
}

/* The first run of set bits in bits (not 0): its start and length.  Slice 0 (the header) is
 * never free, so a run of free slices ends in a zero bit once shifted down. */
static inline uint64_t first_run(uint64_t bits, unsigned *start, unsigned *len)
{
    *start = (unsigned)__builtin_ctzll(bits);
    *len = (unsigned)__builtin_ctzll(~(bits >> *start));
    return slices_mask(*start, *len);
}

static void segment_init(struct lum_segment *seg)
{
    seg->kind = LUM_SEG_SMALL;
    for (size_t i = 0; i <= LUM_SLICES; i++) seg->slice_page[i] = &lum_invalid_sentinel;
    seg->free_slices = ALL_SLICES;
    seg->purged_slices = ALL_SLICES; /* never touched: not resident, like a purged slice */
    seg->collapsed = 0;
    static uint32_t next_colour; /* under lum_segment_lock, like every segment_new */
    seg->colour = next_colour;
    next_colour = (next_colour + 1) % LUM_SEG_COLOURS;
    seg->pages = (struct lum_page *)(lum_seg_base(seg) + LUM_SEG_PAGES_AT(seg->colour));
}

static void segment_unmap(struct lum_segment *seg)
{
#if LUM_HARDENED
    lum_hardened_own((uintptr_t)lum_seg_base(seg), false);
#endif
    /* read before the header goes with the mapping: resident is what the slices record
     * touched, committed their whole slices (os.c) */
    size_t header = lum_seg_header_bytes(seg->colour);
    size_t resident = header + lum_span_bytes(seg, 1, LUM_SLICES - 1);
    size_t committed = header + (size_t)popcount64(~seg->purged_slices & ALL_SLICES) * LUM_SLICE_SIZE;
    lum_os_unmap(lum_seg_base(seg), LUM_SEGMENT_SIZE, resident);
    lum_os_account_slices(0, -(int64_t)(committed - resident));
}

static struct lum_segment *segment_new(void)
{
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
    struct lum_segment *seg = (struct lum_segment *)(base + LUM_HEADER_OFFSET);
    segment_init(seg);
    lum_os_account(0, (int64_t)lum_seg_header_bytes(seg->colour));
    seg->prev = NULL;
    seg->next = segments;
    if (segments) segments->prev = seg;
    segments = seg;
    return seg;
}

static void segment_remove(struct lum_segment *seg)
{
    if (seg->prev) seg->prev->next = seg->next; else segments = seg->next;
    if (seg->next) seg->next->prev = seg->prev;
}

/* Unmaps a wholly free segment, settling the accounting of its slices (segment_unmap); gives
 * the bytes given back as purged_bytes counts them: the header and every slice not purged. */
static size_t segment_release(struct lum_segment *seg)
{
    size_t resident = (size_t)popcount64(~seg->purged_slices & ALL_SLICES) * LUM_SLICE_SIZE +
                      lum_seg_header_bytes(seg->colour);
    __atomic_sub_fetch(&dirty_bytes, (size_t)popcount64(seg->free_slices & ~seg->purged_slices) * LUM_SLICE_SIZE, __ATOMIC_RELAXED);
    __atomic_sub_fetch(&dirty_resident, lum_span_bytes(seg, 1, LUM_SLICES - 1), __ATOMIC_RELAXED);
    segment_remove(seg);
    segment_unmap(seg);
    return resident;
}

/* Bit i of the result is set when bits i..i+n-1 of free are all set. */
static int find_run(uint64_t free, unsigned n)
{
    uint64_t x = free;
    for (unsigned i = 1; i < n && x; i++) x &= free >> i;
    return x ? __builtin_ctzll(x) : -1;
}

uint8_t lum_zero_distrust;

/* Whether MADV_DONTNEED zeroes what it gives back, tried once on a page of our own: qemu-user
 * (amd64 containers on arm64 hosts) has answered success and done nothing, and jemalloc probes
 * for it the same way (opt_trust_madvise). */
static int dontneed_known; /* 0: not tried, 1: zeroes, 2: does not (racy: two tries agree) */

static __attribute__((noinline)) bool dontneed_zeroes(void)
{
    volatile char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        /* not known: distrusted for good, and not tried again at every purge */
        __atomic_store_n(&dontneed_known, 2, __ATOMIC_RELAXED);
        return false;
    }
    p[0] = 1;
    bool zeroes = madvise((void *)p, 4096, MADV_DONTNEED) == 0 && p[0] == 0;
    munmap((void *)p, 4096);
    __atomic_store_n(&dontneed_known, zeroes ? 1 : 2, __ATOMIC_RELAXED);
    return zeroes;
}

/* Gives pages back the configured way (LUMALLOC_PURGE); their slices stay mapped.  Their
 * records are trimmed whatever the outcome (what is resident is then only misreported), but
 * calloc must no longer take trimmed memory for zero (lum_zero_distrust) where it may not be:
 * MADV_FREE may leave the old bytes, and MADV_DONTNEED fails on a locked mapping (a process
 * under mlockall(MCL_FUTURE): every purge fails, with EINVAL) or may not work at all.  errno
 * is the program's: free() may end here, and must not change it (POSIX.1-2024; glibc keeps it). */
static void return_pages(void *p, size_t len)
{
    int saved_errno = errno;
    bool lazy = lum_opt.purge_mode == LUM_PURGE_FREE;
    int known = __atomic_load_n(&dontneed_known, __ATOMIC_RELAXED);
    bool zeroed = madvise(p, len, lazy ? MADV_FREE : MADV_DONTNEED) == 0 && !lazy &&
                  (known ? known == 1 : dontneed_zeroes());
    if (!zeroed && !(__atomic_load_n(&lum_zero_distrust, __ATOMIC_RELAXED) & LUM_DISTRUST_KEPT))
        __atomic_fetch_or(&lum_zero_distrust, LUM_DISTRUST_KEPT, __ATOMIC_RELAXED);
    errno = saved_errno;
}

/* Where the span recorded for slices idx..idx+n-1 ends, in bytes from their start (0: none). */
static size_t recorded_span(const struct lum_segment *seg, unsigned idx, unsigned n)
{
    size_t end = 0;
    for (unsigned i = 0; i < n; i++)
        if (seg->slice_touched[idx + i]) end = (size_t)i * LUM_SLICE_SIZE + (size_t)seg->slice_touched[idx + i] * 4096;
    return end;
}

/* What a page on slices idx.. has resident from its start, rounded to 4 KiB: its own carve,
 * or the span it took over (recorded on its slices) when that reaches further. */
static size_t resident_span(const struct lum_segment *seg, unsigned idx, const struct lum_page *page)
{
    size_t touched = (size_t)page->carved * page->block_size, end = recorded_span(seg, idx, page->slices);
    return ((touched > end ? touched : end) + 4095) & ~(size_t)4095;
}

/* Blocks over 64 KiB have a page each (scripts/gen_size_classes.py): a sampled page of their
 * class is one of its ordinary pages, but for its kind, and shares its spans (span_tag).  Apart,
 * the sampled pages' spans went back without the credit their class earned (keep_big_span):
 * with default sampling, bench buffers faulted 22k times, 10k with sampling off. */
static bool one_block_pages(unsigned cls)
{
    return lum_class_size[cls] > LUM_SLICE_SIZE;
}

#define SPAN_TAG_NONE LUM_CLASSES
#define SPAN_TAGS (2 * LUM_CLASSES + 1)
_Static_assert(SPAN_TAGS <= UINT8_MAX + 1, "a span tag fits a slice's byte (slice_cls)");

/* Per span tag (a class, ordinary or sampled): how deep (4 KiB pages, saturating) its last
 * page given back or uncarved had carved, so that a page of the class taking over another
 * class's span keeps as much of it as the class is likely to carve again.  Written without the
 * lock (one racy byte: a stale depth only moves one decision). */
static uint8_t class_depth[SPAN_TAGS];

/* Whose span a slice holds: an ordinary page's class, a sampled page's class after those (its
 * blocks are as big, and a sampled page of the class takes it over as it is; over 64 KiB the
 * class itself, one_block_pages), or SPAN_TAG_NONE for any other kind. */
static unsigned span_tag(unsigned cls, enum lum_page_kind kind)
{
    if (kind == LUM_PAGE_SMALL || (kind == LUM_PAGE_SAMPLED && one_block_pages(cls))) return cls;
    return kind == LUM_PAGE_SAMPLED ? SPAN_TAG_NONE + 1 + cls : SPAN_TAG_NONE;
}

/* A span tag of blocks over 16 KiB: their spans may stay when their pages go back
 * (span_kept). */
static bool big_span(unsigned tag)
{
    if (tag == SPAN_TAG_NONE) return false;
    unsigned cls = tag < SPAN_TAG_NONE ? tag : tag - SPAN_TAG_NONE - 1;
    return lum_class_size[cls] > LUM_MEDIUM_TABLE_MAX;
}

static void note_depth(const struct lum_page *page)
{
    unsigned tag = span_tag(page->cls, (enum lum_page_kind)page->kind);
    if (tag == SPAN_TAG_NONE || !page->carved) return; /* uncarved: told already */
    size_t pages = ((size_t)page->carved * page->block_size + 4095) / 4096;
    __atomic_store_n(&class_depth[tag], (uint8_t)(pages > UINT8_MAX ? UINT8_MAX : pages), __ATOMIC_RELAXED);
}

/* What a page of span tag keeps of a span it takes over: what the class last carved, at least
 * the first 4 KiB. */
static size_t class_depth_bytes(unsigned tag)
{
    unsigned pages = tag != SPAN_TAG_NONE ? __atomic_load_n(&class_depth[tag], __ATOMIC_RELAXED) : 0;
    return (size_t)(pages ? pages : 1) * 4096;
}

/* Trims the spans recorded for slices idx..idx+n-1 to at most bytes from their start (what is
 * beyond is being returned); gives the bytes the records lost, which leave resident.  Never
 * raises a record: what was not touched is not resident.  The slices' owner (a page's, or the
 * lock holder's for free ones) writes; statistics read in-use slices racily (counter.h). */
static size_t trim_span(struct lum_segment *seg, unsigned idx, unsigned n, size_t bytes)
{
    size_t lost = 0;
    for (unsigned i = 0; i < n; i++, bytes = bytes > LUM_SLICE_SIZE ? bytes - LUM_SLICE_SIZE : 0) {
        unsigned keep = bytes >= LUM_SLICE_SIZE ? LUM_SLICE_SIZE / 4096 : (unsigned)((bytes + 4095) / 4096);
        unsigned had = seg->slice_touched[idx + i];
        if (had <= keep) continue;
        lost += (size_t)(had - keep) * 4096;
        LUM_OWN_SET(seg->slice_touched[idx + i], (uint8_t)keep);
    }
    return lost;
}

/* A page's carve reaches end (bytes from its start) before the blocks are linked: the slices it
 * reaches record the 4 KiB pages up to end, and what they had not recorded becomes resident (a
 * page fault's worth, paid beside it).  Their records thus always cover the page's carve (and
 * any span it took over), which is what it holds resident.  In huge-page mode they are whole
 * from the start (lum_page_alloc).  The page's owner (or the lock standing in for it) calls,
 * with no segment lock.  Returns how far from the page's start the records of the slices the
 * carve reaches went before it (0: nowhere): past that, up to end, the memory has not been
 * written since it was mapped or purged, and reads as zero (with MADV_DONTNEED; see
 * lum_page_refill, which calloc relies on). */
size_t lum_page_touch(struct lum_page *page, size_t end)
{
    struct lum_segment *seg = lum_segment_of(page->start);
    unsigned idx = (unsigned)(((uintptr_t)page->start - (uintptr_t)lum_seg_base(seg)) >> LUM_SLICE_SHIFT);
    size_t from = (size_t)page->carved * page->block_size;
    /* Nothing new to carve: a sampled block's page becoming its smaller ordinary class's on the
     * same slices (lum_page_grow), whose records already cover the old, bigger block.  End
     * counts as recorded, so nothing there is taken for fresh memory. */
    if (end <= from) return end;
    size_t first = from >> LUM_SLICE_SHIFT, last = (end - 1) >> LUM_SLICE_SHIFT, added = 0;
    if (last >= page->slices) last = (size_t)page->slices - 1;
    size_t recorded = recorded_span(seg, idx + (unsigned)first, (unsigned)(last + 1 - first));
    if (recorded) recorded += first * LUM_SLICE_SIZE;
    unsigned want[LUM_SLICES];
    for (size_t i = first; i <= last; i++) {
        size_t in = end - i * LUM_SLICE_SIZE;
        want[i] = in >= LUM_SLICE_SIZE ? LUM_SLICE_SIZE / 4096 : (unsigned)((in + 4095) / 4096);
        unsigned had = seg->slice_touched[idx + i];
        if (want[i] > had) added += (size_t)(want[i] - had) * 4096;
    }
    if (!added) return recorded;
    /* resident first, the records after (release): a statistics snapshot that reads a raised
     * record reads resident after it (stats.c), and finds it raised too, so that its active is
     * not above its resident for bytes counted in one and not yet in the other */
    lum_os_account_slices((int64_t)added, 0);
    for (size_t i = first; i <= last; i++)
        if (want[i] > seg->slice_touched[idx + i])
            __atomic_store_n(&seg->slice_touched[idx + i], (uint8_t)want[i], __ATOMIC_RELEASE);
    return recorded;
}

/* Huge-page mode: the slices of a page taken are resident whole (a huge page backs them), and
 * their records say so; gives the bytes the records gained.  Caller holds lum_segment_lock. */
static size_t fill_span(struct lum_segment *seg, unsigned idx, unsigned n)
{
    size_t added = 0;
    for (unsigned i = 0; i < n; i++) {
        added += (size_t)(LUM_SLICE_SIZE / 4096 - seg->slice_touched[idx + i]) * 4096;
        LUM_OWN_SET(seg->slice_touched[idx + i], (uint8_t)(LUM_SLICE_SIZE / 4096));
    }
    return added;
}

/* Whether a page of a big class going back keeps its span, by how the spans it kept were used:
 * each one a page of big blocks took over earns SPAN_CREDIT_REUSE more kept (up to
 * SPAN_CREDIT_MAX), and with no credit one release in 8 keeps its span to try again.  A ring
 * of buffers takes back nearly every span it keeps; python3 took back few of its big classes'
 * spans, and keeping them all raised its peak RSS 0.5-0.7 MiB (of 30): this keeps one in 8 of
 * those, and a ring of 256 buffers of 16-256 KiB, each written (bench/src/buffers.c), faults
 * 12k times in 200k steps, 10k keeping all, mimalloc 9.6k.  Per span tag: span_credit,
 * span_probe (releases since one was kept).  Racy bytes, as class_run's. */
#define SPAN_CREDIT_MAX 32
#define SPAN_CREDIT_REUSE 4u
static uint8_t span_credit[SPAN_TAGS], span_probe[SPAN_TAGS];

/* A span kept for tag was taken over by a page of big blocks. */
static void credit_big_span(unsigned tag)
{
    unsigned credit = __atomic_load_n(&span_credit[tag], __ATOMIC_RELAXED) + SPAN_CREDIT_REUSE;
    __atomic_store_n(&span_credit[tag], (uint8_t)(credit > SPAN_CREDIT_MAX ? SPAN_CREDIT_MAX : credit), __ATOMIC_RELAXED);
}

static bool keep_big_span(unsigned tag)
{
    uint8_t credit = __atomic_load_n(&span_credit[tag], __ATOMIC_RELAXED);
    if (credit) {
        __atomic_store_n(&span_credit[tag], (uint8_t)(credit - 1), __ATOMIC_RELAXED);
        return true;
    }
    uint8_t probe = __atomic_load_n(&span_probe[tag], __ATOMIC_RELAXED);
    __atomic_store_n(&span_probe[tag], (uint8_t)(probe + 1 < 8 ? probe + 1 : 0), __ATOMIC_RELAXED);
    return probe + 1 >= 8;
}

/* The next page on a run of slices carves lazily from its start, and finds resident whatever
 * the pages before it carved there.  A page of the same class is likely to carve as deep: it
 * takes that span as it is, and faults none of it in again (bench sqlite: a phase frees ~500
 * pages of one class and the next carves as many again; python with PYTHONMALLOC=malloc, ~200
 * a round).  A page of another class may carve far less and leave the rest resident and idle,
 * while the classes that carve deep take fresh slices, so the touched part of every slice that
 * changed hands crept to the whole span (larson: each generation of threads recycles the last
 * one's pages across classes): it keeps as much as its class carved last time (class_depth, at
 * least 4 KiB) and gets the rest returned (but a page of an ordinary class over 16 KiB keeps
 * it all, see below); this gives the bytes to madvise from *keep on (0: none).  Returning all
 * past the first 4 KiB, as this did, had most of it faulted in again at once (python with
 * PYTHONMALLOC=malloc: 93% of those pages within ~50 ms).  Spans are kept when a class empties
 * page after page (class_run) or its blocks are over 16 KiB (span_kept); a page released now
 * and then returns its span at once (note_span), as it would sit idle (bench ring, fragment,
 * larson: +0.2-0.5 MiB peak RSS when every span was kept).  What is returned leaves resident
 * (*lost: the bytes the slices' records lose), and decay purges free slices whole.  Not in
 * huge-page mode, where it would split the huge page.  tag: span_tag's.  Caller holds
 * lum_segment_lock. */
static size_t inherit_span(struct lum_segment *seg, unsigned idx, unsigned n, unsigned tag, size_t *keep,
                           size_t *lost)
{
    size_t end = recorded_span(seg, idx, n);
    bool same = true;
    unsigned giver = SPAN_TAG_NONE;
    for (unsigned i = 0; i < n; i++)
        if (seg->slice_touched[idx + i]) {
            same &= seg->slice_cls[idx + i] == tag && tag != SPAN_TAG_NONE;
            if (giver == SPAN_TAG_NONE) giver = seg->slice_cls[idx + i];
        }
    *keep = class_depth_bytes(tag);
    *lost = 0;
    /* the class that kept the span (its first slice's) earns credit when a page of big
     * blocks, of any class, takes it over (one of blocks over 64 KiB takes a span of another
     * class's as often as of its own), as a whole or in part */
    if (end && big_span(tag) && big_span(giver)) credit_big_span(giver);
    /* A page of blocks over 16 KiB has its blocks written whole, as a rule: what it keeps past
     * its class's depth is its slices' slack, and trimmed, the next page of a bigger class
     * faulted it in again (bench buffers, 200k steps, sampling off: 19.9k page faults, 12.8k
     * kept; mimalloc 9.6k).  Its span goes back whole when its page does (span_kept).  Not a
     * sampled page of 16-64 KiB blocks: it holds a sample or two on up to 4 slices. */
    if (same || end <= *keep || lum_opt.thp || (big_span(tag) && tag < SPAN_TAG_NONE)) return 0;
    *lost = trim_span(seg, idx, n, *keep);
    return end - *keep;
}

/* Per class: its ordinary pages released since one was last taken from a segment (saturating).
 * A class that empties page after page (a phase dropping its data: bench sqlite ~500 pages of
 * one class, python with PYTHONMALLOC=malloc ~200 a round) usually fills as many again soon:
 * past LUM_KEEP_SPAN_AFTER in a row, their spans stay for its next pages, which then carve
 * without a page fault.  A page now and then (a ring of objects, threads taking and giving
 * back pages of a class in turn) goes back trimmed, as its span would sit idle.  Written under
 * lum_segment_lock, read before it (a stale count only moves one decision). */
static uint8_t class_run[LUM_CLASSES];

/* Notes the span a page carved on its slices for the next page on them (inherit_span): its
 * records already cover its carve (lum_page_touch); or (keep false) gives the bytes past its
 * first 4 KiB to return at once (0: none), and in *lost what leaves resident with them.  Not
 * in huge-page mode, where it would split the huge page (the slices stay resident whole).
 * Called before the slices are free. */
static size_t note_span(struct lum_segment *seg, unsigned idx, const struct lum_page *page, bool keep,
                        size_t *lost)
{
    *lost = 0;
    if (lum_opt.thp) return 0;
    if (!keep) {
        /* the slices may hold an older span (kept for a class that did not come back) */
        size_t touched = resident_span(seg, idx, page);
        *lost = trim_span(seg, idx, page->slices, 4096);
        /* what stays is no class's span (span_run would credit a class for it) */
        for (unsigned i = 0; i < page->slices; i++) seg->slice_cls[idx + i] = SPAN_TAG_NONE;
        return touched > 4096 ? touched - 4096 : 0;
    }
    uint8_t tag = (uint8_t)span_tag(page->cls, (enum lum_page_kind)page->kind);
    for (unsigned i = 0; i < page->slices; i++) seg->slice_cls[idx + i] = tag;
    return 0;
}

/* Sampled pages of big classes span more slices than their class's pages: at 64 KiB a 16 KiB
 * class's page held four blocks, and a program whose samples of it live a while (bench ring)
 * filled, turned and emptied one every few samples (~50 instructions a sample).  16 blocks a
 * page, up to 4 slices; carved lazily, so what no block uses stays untouched.  Over 64 KiB,
 * one block a page, as the class's own (one_block_pages). */
#define SAMPLED_PAGE_BLOCKS 16
#define SAMPLED_PAGE_SLICES_MAX 4

static unsigned page_slices(unsigned cls, enum lum_page_kind kind)
{
    unsigned n = lum_class_slices[cls];
    if (kind != LUM_PAGE_SAMPLED || one_block_pages(cls)) return n;
    size_t want = ((size_t)SAMPLED_PAGE_BLOCKS * lum_class_size[cls] + LUM_SLICE_SIZE - 1) / LUM_SLICE_SIZE;
    if (want > SAMPLED_PAGE_SLICES_MAX) want = SAMPLED_PAGE_SLICES_MAX;
    return want > n ? (unsigned)want : n;
}

/* Where a run of n of the slices in candidates starts on a span of tag: its first slice holds
 * the span, the others hold it too or nothing (a page need not carve its last slices: a block of
 * 81920 B touches 20 of its page's 32 pages); -1: none. */
static int span_run(const struct lum_segment *seg, uint64_t candidates, unsigned tag, unsigned n)
{
    /* the runs of n candidates first: the per-slice records are read only where one starts */
    uint64_t starts = candidates;
    for (unsigned i = 1; i < n && starts; i++) starts &= candidates >> i;
    for (; starts; starts &= starts - 1) {
        unsigned at = (unsigned)__builtin_ctzll(starts), i = 0;
        if (!seg->slice_touched[at] || seg->slice_cls[at] != tag) continue;
        while (++i < n && (!seg->slice_touched[at + i] || seg->slice_cls[at + i] == tag)) {}
        if (i == n) return (int)at;
    }
    return -1;
}

/* The shortest run of set bits in bits that is at least n long: its start (-1: none), and in
 * *len its length. */
static int shortest_run(uint64_t bits, unsigned n, unsigned *len)
{
    int at = -1;
    *len = LUM_SLICES;
    while (bits) {
        unsigned start, l;
        bits &= ~first_run(bits, &start, &l);
        if (l >= n && (at < 0 || l < *len)) {
            at = (int)start;
            *len = l;
            if (l == n) break;
        }
    }
    return at;
}

/* Where a page of n slices goes: the fullest segment with a run on a span of tag's (by_span),
 * else the shortest run of resident free slices that fits (of runs as short, the fullest
 * segment's), else the fullest segment with a run of any free slices; the run's first slice,
 * *out its segment (-1 and NULL: none fits).  The shortest resident run, not the first: a page
 * cut from the start of a longer run left the rest too short for the next big page while a run
 * of its own length stood free, and that page then took memory not resident, for which the
 * fragment purge gave back the runs too short (bench buffers: 13.5k -> 12.9k page faults in
 * 60k steps, 18.9k -> 15.5k in 300k, its madvise calls 309 -> 198; peak RSS as it was).  Not
 * for memory not resident: the shortest such run, in an emptier segment, drew pages away from
 * the fullest (python with PYTHONMALLOC=malloc, +0.1 MiB peak RSS).  One walk over the
 * segments for all three: their headers share their cache sets (4 MiB apart), and a walk a
 * choice, with __builtin_popcountll a libgcc call, was 6% of bench buffers' time (a page for
 * every block over 64 KiB).  Caller holds lum_segment_lock. */
static int choose_run(unsigned n, unsigned tag, bool by_span, struct lum_segment **out)
{
    enum { BY_SPAN, RESIDENT, ANY, CHOICES };
    /* RESIDENT: the run's length, then the segment's free slices; the others: those alone */
    unsigned best_score[CHOICES] = {~0u, ~0u, ~0u};
    struct lum_segment *best[CHOICES] = {NULL, NULL, NULL};
    int best_idx[CHOICES] = {-1, -1, -1};
    unsigned first = by_span ? BY_SPAN : RESIDENT, found = CHOICES;
    for (struct lum_segment *s = segments; s; s = s->next) {
        uint64_t free = s->free_slices;
        unsigned nfree = popcount64(free);
        if (nfree < n) continue;
        uint64_t resident = free & ~s->purged_slices;
        /* a choice after one already found cannot win */
        for (unsigned c = first; c < CHOICES && c <= found; c++) {
            unsigned len = n, score;
            int at;
            /* what the segment scores at best, before its runs are looked at */
            if ((c == RESIDENT ? n * (LUM_SLICES + 1) + nfree : nfree) >= best_score[c]) continue;
            if (c == RESIDENT) {
                at = shortest_run(resident, n, &len);
                score = len * (LUM_SLICES + 1) + nfree;
            } else {
                at = c == BY_SPAN ? span_run(s, resident, tag, n) : find_run(free, n);
                score = nfree;
            }
            if (at < 0 || score >= best_score[c]) continue;
            best[c] = s;
            best_idx[c] = at;
            best_score[c] = score;
            if (c < found) found = c;
        }
    }
    *out = found < CHOICES ? best[found] : NULL;
    return found < CHOICES ? best_idx[found] : -1;
}

struct lum_page *lum_page_alloc(unsigned cls, enum lum_page_kind kind, struct lum_heap *owner)
{
    unsigned n = page_slices(cls, kind);
    struct lum_segment *seg;
    int idx = -1;
    lum_lock(&lum_segment_lock);
    /* Pack densely (as TCMalloc's Temeraire does for huge pages): take the fullest segment that
     * fits, so emptier ones drain and go back whole; and prefer slices still resident, which
     * cost no page faults, there the shortest run that fits first and fullness only between
     * runs as short (choose_run). */
    unsigned tag = span_tag(cls, kind);
    idx = choose_run(n, tag, big_span(tag) && !lum_opt.thp, &seg);
    struct purge_out limit_out = {0, 0, 0};
    bool mapped_new = false;
    if (idx < 0) {
        /* Free slices exist but no run fits: before mapping more, give them back if they
         * outgrew the live heap (see lum_dirty_limit). */
        size_t limit = lum_dirty_limit(lum_segments_dirty_bytes()), dirty = lum_segments_dirty_resident();
        if (dirty > limit)
            purge_excess_locked(limit / 2, lum_now_ms(), &limit_out, lum_dirty_min_age(dirty, limit));
        seg = segment_new();
        mapped_new = true;
        if (!seg) {
            lum_unlock(&lum_segment_lock);
            account_purge(&limit_out, LUM_PURGE_LIMIT);
            return NULL;
        }
        idx = find_run(seg->free_slices, n);
    }
    uint64_t mask = slices_mask((unsigned)idx, n);
    bool cold = mapped_new || (mask & seg->purged_slices);
    /* not in huge-page mode, where it would split huge pages */
    struct purge_out fragment_out = {0, 0, 0};
    if (cold && !lum_opt.thp)
        purge_fragments_locked(n, (size_t)popcount64(mask & seg->purged_slices) * LUM_SLICE_SIZE, &fragment_out);
    __atomic_sub_fetch(&dirty_resident, lum_span_bytes(seg, (unsigned)idx, n), __ATOMIC_RELAXED);
    size_t keep = 0, lost = 0;
    size_t tail = inherit_span(seg, (unsigned)idx, n, tag, &keep, &lost);
    if (kind == LUM_PAGE_SMALL) __atomic_store_n(&class_run[cls], 0, __ATOMIC_RELAXED);
    __atomic_sub_fetch(&dirty_bytes, (size_t)popcount64(mask & ~seg->purged_slices) * LUM_SLICE_SIZE, __ATOMIC_RELAXED);
    seg->free_slices &= ~mask;
    seg->empty_since_ms = 0;
    /* Purged slices count in committed whole again (os.c); resident grows only as the page
     * carves (lum_page_touch), but for a huge page, resident whole at once. */
    uint64_t refaulted = seg->purged_slices & mask;
    seg->purged_slices &= ~mask;
    int64_t gained = lum_opt.thp ? (int64_t)fill_span(seg, (unsigned)idx, n) : 0;
    lum_os_account_slices(gained - (int64_t)lost, (int64_t)popcount64(refaulted) * (int64_t)LUM_SLICE_SIZE);
    /* Filled in before the slices point at it and before the lock goes: a fork child (whose
     * prepare handler holds this lock) finds every page in a segment whole, and owned.  Owned
     * from here, not once the caller has it: a child made in between found an ordinary page
     * with no owner (its collector takes a dead thread's pages by owner) and on no abandoned
     * list, and it stayed there unused for the child's life (test_fork_orphan_pages: 24 of the
     * 39 pages so lost in 6000 children). */
    struct lum_page *page = &seg->pages[idx];
    page->start = lum_seg_base(seg) + (size_t)idx * LUM_SLICE_SIZE;
#if LUM_HARDENED
    page->key = (uintptr_t)lum_hardened_random() | 1;
#endif
    page->cls = (uint8_t)cls;
    page->kind = (uint8_t)kind;
    page->block_size = lum_class_size[cls];
    page->capacity = (uint32_t)(((size_t)n * LUM_SLICE_SIZE) / page->block_size);
    LUM_OWN_SET(page->carved, 0);
    page->free = NULL;
    LUM_OWN_SET(page->used, 0);
    LUM_OWN_SET(page->in_full, 0);
    page->retained = 0;
    page->abandoned = 0;
    lum_page_set_fast(page, NULL);
    page->next = page->prev = NULL;
    atomic_store_explicit(&page->owner, owner, memory_order_release);
    atomic_store_explicit(&page->thread_free, NULL, memory_order_relaxed);
    for (unsigned i = 0; i < n; i++) seg->slice_page[idx + i] = page;
    page->slices = (uint8_t)n;
    lum_unlock(&lum_segment_lock);
    /* nobody carves the page before it is returned: its span can go back outside the lock */
    if (tail) return_pages(page->start + keep, tail);
    account_purge(&limit_out, LUM_PURGE_LIMIT);
    account_purge(&fragment_out, LUM_PURGE_FRAGMENT);
    /* Freed large blocks can never become pages: with memory that was not resident taken
     * anyway (a new segment, or free slices purged or never touched), keeping them would hold
     * both resident until decay (bench python, PYTHONMALLOC=malloc: ~2 MiB of them at its peak;
     * checked at new segments only, 1.5 MiB once pages of big blocks took fewer slices).  A
     * large block asked for later grows whatever the cache then has.  (Keeping
     * them up to the dirty limit instead saved python with PYTHONMALLOC=malloc 1.3k of its 15k
     * page faults, but redis-server, whose rehashed tables never fit again, peaked 1 MiB
     * higher; keeping those freed over 50 or 200 ms ago, the same.)  As much as the page holds
     * goes, not the whole cache, so the resident total stays where it was: emptied whole, bench
     * python's string builders and lists of 0.3-1.1 MB were faulted in again after each new
     * segment (10.0k -> 9.6k page faults, peak RSS unchanged; redis-server's peak too). */
    if (cold && lum_large_cache_bytes()) lum_large_cache_give((size_t)n * LUM_SLICE_SIZE);
    return page;
}

/* realloc's growth of a block alone on its page (blocks over 64 KiB, one_block_pages) into a
 * bigger such class, in place: the page takes the free slices right after its own, if it needs
 * more, and becomes a page of cls.  CPython grows its lists and string builders by steps
 * (realloc pads them by half: 48 -> 128 -> 192 -> 224 -> 256 KiB and back, a few times a
 * second in bench python); each step took a page elsewhere, faulted all of it in and gave the
 * old span back (its class had no span credit), ~150 page faults a chain.  In place, only what
 * the block adds is new, and no copy.  False (nothing changed) when the slices are not free
 * and resident (see below).
 * The caller owns the page and its one block; its fields change under the segment lock, like a
 * page's allocation, so that a fork child (whose prepare handler holds it) sees the page whole,
 * either class.  The resident records cover the bigger block at once, as a carve of it would
 * (lum_page_touch); the slices it takes keep the span they hold, as a page of blocks over 16
 * KiB takes one (inherit_span).  A sampled page's block (of a power-of-two class) may become
 * one of a smaller class on the same slices, its ordinary class's (sampled.c's regrow): the
 * page keeps its slices, and nothing changes but the class. */
bool lum_page_grow(struct lum_page *page, unsigned cls)
{
    struct lum_segment *seg = lum_segment_of(page->start);
    unsigned idx = (unsigned)(((uintptr_t)page->start - (uintptr_t)lum_seg_base(seg)) >> LUM_SLICE_SHIFT);
    unsigned n = page->slices, m = lum_class_slices[cls];
    if (idx + m > LUM_SLICES) return false;
    lum_lock(&lum_segment_lock);
    if (m > n) {
        uint64_t mask = slices_mask(idx + n, m - n);
        /* Only slices still resident: a page that would take purged ones comes from
         * lum_page_alloc, which looks for resident ones first and takes as much out of the large
         * cache when it takes memory that is not (a random realloc mix of 1000-300000 B on 3
         * threads faulted 1.7x as often, its large blocks mapped afresh, when a growth here took
         * purged slices and emptied the large cache as lum_page_alloc then did). */
        if ((seg->free_slices & ~seg->purged_slices & mask) != mask) {
            lum_unlock(&lum_segment_lock);
            return false;
        }
        __atomic_sub_fetch(&dirty_resident, lum_span_bytes(seg, idx + n, m - n), __ATOMIC_RELAXED);
        __atomic_sub_fetch(&dirty_bytes, (size_t)(m - n) * LUM_SLICE_SIZE, __ATOMIC_RELAXED); /* none purged */
        seg->free_slices &= ~mask;
        int64_t gained = lum_opt.thp ? (int64_t)fill_span(seg, idx + n, m - n) : 0;
        lum_os_account_slices(gained, 0);
        for (unsigned i = n; i < m; i++) seg->slice_page[idx + i] = page;
        page->slices = (uint8_t)m;
    }
    /* from the old carve (one block of the old size) to the new block's end */
    lum_page_touch(page, lum_class_size[cls]);
    page->cls = (uint8_t)cls;
    page->block_size = lum_class_size[cls];
    page->capacity = (uint32_t)(((size_t)m * LUM_SLICE_SIZE) / page->block_size);
    lum_unlock(&lum_segment_lock);
    return true;
}

/* Returns the free, not yet purged slices in candidates to the OS, in as few madvise calls as
 * their runs allow; gives the bytes their spans held resident.  Caller holds lum_segment_lock. */
static size_t purge_slices_locked(struct lum_segment *seg, uint64_t candidates, struct purge_out *out)
{
    size_t held = 0;
    while (candidates) {
        unsigned start, len;
        uint64_t mask = first_run(candidates, &start, &len);
        return_pages(lum_seg_base(seg) + (size_t)start * LUM_SLICE_SIZE, (size_t)len * LUM_SLICE_SIZE);
        seg->purged_slices |= mask;
        size_t spans = trim_span(seg, start, len, 0);
        __atomic_sub_fetch(&dirty_resident, spans, __ATOMIC_RELAXED);
        candidates &= ~mask;
        out->madvised += (size_t)len * LUM_SLICE_SIZE;
        out->spans += spans;
        held += spans;
        __atomic_sub_fetch(&dirty_bytes, (size_t)len * LUM_SLICE_SIZE, __ATOMIC_RELAXED);
    }
    return held;
}

void lum_page_change_kind(struct lum_page *page, enum lum_page_kind kind, struct lum_heap *owner)
{
    /* The slice-map walkers (stats, lum_heap_check) read kind and owner under the lock, and an
     * ordinary page without an owner outside it is one lum_heap_check reports: the owner goes
     * before an ordinary page's kind, after a sampled one's. */
    lum_lock(&lum_segment_lock);
    if (kind == LUM_PAGE_SMALL) atomic_store_explicit(&page->owner, owner, memory_order_relaxed);
    page->kind = (uint8_t)kind;
    if (kind != LUM_PAGE_SMALL) atomic_store_explicit(&page->owner, owner, memory_order_relaxed);
    lum_unlock(&lum_segment_lock);
}

/* Segments a cold page looks at for fragments to give back (purge_fragments_locked): 128 MiB
 * of heap, the newest first, where a ring of buffers like bench's churns. */
#define FRAGMENT_WALK_MAX 32
/* ...and the runs it gives back, each a madvise under lum_segment_lock (and with
 * MADV_DONTNEED in a threaded process, TLB shootdowns): what is left waits for decay. */
#define FRAGMENT_CALLS_MAX 8

/* A page of n slices about to fault in want bytes (slices not resident: a new segment, or
 * purged ones) because no run of resident free slices fits it: the resident free slices in
 * runs too short for it go back instead, up to as much as it will hold, so that what is
 * resident stays what it was rather than grow by every such page.  Once blocks of many sizes
 * have come and gone, the free slices are such fragments between pages in use, each kept
 * until decay.  A ring of 256 buffers of 16-256 KiB, each written (bench buffers), found no
 * run of 4 free slices among ~40 resident ones at times; each page it then took elsewhere
 * grew its resident memory for good, and the free slices held 7-9 MiB at its peak (300k
 * steps: peak RSS 41.5 -> 38.7 MiB, for 13.3k -> 18.9k page faults, 100 -> ~300 madvise
 * calls).  Caller holds lum_segment_lock. */
static void purge_fragments_locked(unsigned n, size_t want, struct purge_out *out)
{
    size_t got = 0;
    /* A growing heap of thousands of segments takes cold pages all the time, most often with
     * no fragment anywhere: nothing resident free is the common answer, read from one counter.
     * The walk is bounded too (each segment's header is a cache and TLB miss): a kept span
     * longer than the page counts as resident free but is no fragment, and would otherwise
     * have every cold page walk them all. */
    if (!__atomic_load_n(&dirty_resident, __ATOMIC_RELAXED))
        return;
    unsigned looked = 0, calls = 0;
    for (struct lum_segment *seg = segments; seg && got < want && looked < FRAGMENT_WALK_MAX && calls < FRAGMENT_CALLS_MAX;
         seg = seg->next, looked++) {
        uint64_t free = seg->free_slices, resident = free & ~seg->purged_slices;
        if (!resident) continue;
        for (uint64_t runs = free; runs && got < want && calls < FRAGMENT_CALLS_MAX;) {
            unsigned start, len;
            uint64_t run = first_run(runs, &start, &len);
            runs &= ~run;
            /* a run whose spans hold nothing (an uncarved or trimmed page's) is not worth a
             * system call under the lock: it gives nothing back */
            if (len < n && (resident & run) && lum_span_bytes(seg, start, len)) {
                got += purge_slices_locked(seg, resident & run, out);
                calls++;
            }
        }
    }
}

/* Returns free, not yet purged slices that have been free for min_age ms (0: all of them) to
 * the OS, in as few madvise calls as the runs allow, and unmaps segments that have been wholly
 * free as long.  Caller holds lum_segment_lock. */
static void purge_older_locked(uint64_t min_age, uint64_t now, struct purge_out *out)
{
    struct lum_segment *seg = segments;
    while (seg) {
        struct lum_segment *next = seg->next;
        if (seg->free_slices == ALL_SLICES &&
            now - seg->empty_since_ms >= min_age) {
            /* a wholly free segment is unmapped whole: one call, and no header left behind */
            out->unmapped += segment_release(seg);
            seg = next;
            continue;
        }
        uint64_t candidates = seg->free_slices & ~seg->purged_slices;
        if (min_age) {
            uint64_t c = candidates;
            while (c) {
                int i = __builtin_ctzll(c);
                c &= c - 1;
                if (now - seg->freed_at_ms[i] < min_age) candidates &= ~((uint64_t)1 << i);
            }
        }
        purge_slices_locked(seg, candidates, out);
        seg = next;
    }
}

static void purge_locked(bool all, uint64_t now, struct purge_out *out)
{
    purge_older_locked(all ? 0 : lum_opt.decay_ms, now, out);
}

/* Over the dirty limit: free slices go back oldest first, those decay would take anyway first,
 * then ever younger ones (halving the age), until what stays is within target (half the
 * limit) or the age reaches min_age (lum_dirty_min_age: those freed since stay).  The youngest
 * were freed by a phase that is likely to fill them again: purging them all (as this did)
 * madvised ~2.6k pages in a python3 run (PYTHONMALLOC=malloc), over half of them faulted in
 * again within 100 ms.  Caller holds lum_segment_lock. */
static void purge_excess_locked(size_t target, uint64_t now, struct purge_out *out, uint64_t min_age)
{
    for (uint64_t age = lum_opt.decay_ms;; age /= 2) {
        if (age < min_age) age = min_age;
        purge_older_locked(age, now, out);
        if (lum_segments_dirty_resident() <= target || age <= min_age) return;
    }
}

/* madvised slices stay mapped: their spans go from resident to retained, and the slices leave
 * committed whole; unmapped segments were settled by segment_release.  Returns the bytes given
 * back (whole slices and segments; purged_bytes counts the same). */
static size_t account_purge(const struct purge_out *out, uint32_t reason)
{
    size_t given = out->madvised + out->unmapped;
    if (!given) return 0;
    lum_os_account_slices(-(int64_t)out->spans, -(int64_t)out->madvised);
    lum_count_global(&lumalloc_registry.global.purged_bytes, (int64_t)given);
    lum_count_global(&lumalloc_registry.global.purge_events, 1);
    lum_on_purge(given, reason);
    return given;
}

/* An empty page kept for its class gives back the memory its blocks touched and carves afresh
 * when next used: for blocks this big a kept page holds as much resident as a page's worth of
 * small blocks, which no other class can reuse (see the callers).  The caller owns the page and
 * nothing points into it. */
void lum_page_uncarve(struct lum_page *page)
{
    struct lum_segment *seg = lum_segment_of(page->start);
    unsigned idx = (unsigned)(((uintptr_t)page->start - (uintptr_t)lum_seg_base(seg)) >> LUM_SLICE_SHIFT);
    note_depth(page);
    /* a span it took over from an earlier page of its class goes too (its own slices: no lock) */
    size_t touched = resident_span(seg, idx, page);
    /* the carve before the list, as in lum_page_release: a fork child that finds the list
     * still whole counts its blocks carved and free */
    LUM_OWN_SET(page->carved, 0);
    atomic_signal_fence(memory_order_seq_cst);
    page->free = NULL;
    if (!touched || lum_opt.thp) return;
    return_pages(page->start, touched);
    lum_os_account_slices(-(int64_t)trim_span(seg, idx, page->slices, 0), 0);
}

/* Whether a page going back keeps its span for the next page of its class (may_keep_span: its
 * heap allocates the class).  A class emptying page after page keeps them (class_run).  A page
 * of blocks over 16 KiB holds a few of them, over 64 KiB one: a ring of such buffers empties a
 * page and takes one again at every swing in how many it holds live, and sampling makes the
 * swings (a sampled block lives on a sampled page), so the span returned at once was faulted
 * in again soon after, whole.  With default sampling a ring of 256 blocks of 250 KB, each
 * written, ran 2.2x as long as sampling off (595k page faults in 200k steps, each peer ~16k):
 * now 1.0-1.1x.  Kept, the class's next page (or the sampled class's) takes the span as it is
 * (lum_page_alloc looks for it first), or any page of big blocks does, and decay or the dirty
 * limit returns what stays free; keep_big_span keeps them while they are taken back. */
static bool span_kept(const struct lum_page *page, bool may_keep_span)
{
    /* sampled pages go back from the sampler, which takes their class again at its next sample */
    bool sampled = page->kind == LUM_PAGE_SAMPLED;
    unsigned tag = span_tag(page->cls, (enum lum_page_kind)page->kind);
    /* a sampled page of one block goes back as soon as it empties (sampled.c): its span is
     * what the class's next page, either kind, would fault in again; decay returns it if not */
    if (sampled && one_block_pages(page->cls) && page->carved && !lum_opt.thp) return true;
    if ((may_keep_span || sampled) && page->carved && !lum_opt.thp && big_span(tag) && keep_big_span(tag))
        return true;
    return may_keep_span && page->kind == LUM_PAGE_SMALL &&
           __atomic_load_n(&class_run[page->cls], __ATOMIC_RELAXED) >= LUM_KEEP_SPAN_AFTER;
}

void lum_page_release(struct lum_page *page, bool may_keep_span)
{
    struct lum_segment *seg = lum_segment_of(page->start);
    unsigned idx = (unsigned)(((uintptr_t)page->start - (uintptr_t)lum_seg_base(seg)) >> LUM_SLICE_SHIFT);
    unsigned n = page->slices;
    uint64_t now = lum_now_ms();
    struct purge_out out = {0, 0, 0};
    /* Before the slices are free: no page can be carving them while their span goes back, and
     * their entries are nobody else's to touch until then. */
    bool small = page->kind == LUM_PAGE_SMALL;
    unsigned cls = page->cls;
    note_depth(page);
    bool keep = span_kept(page, may_keep_span);
    size_t lost = 0, tail = note_span(seg, idx, page, keep, &lost);
    /* The page is in the slice map (and owned, unless the caller holds lum_abandoned_lock, or
     * lum_sampled_lock for a sampled page) until the lock below, while its memory goes back
     * now: a fork child made in between (its prepare handler holds that lock, so a thread
     * waits here, in the window) finds it through the slice map (collect_dead_pages) and walked
     * a free list into zeroed memory (the hardened library aborted in 800 of 1169 children).
     * Left empty and uncarved first, the page is one the child's page_recount releases.  The
     * carve goes before the list: a child that finds the list still whole counts its blocks
     * carved and free, where one that found the list gone and the carve left would count every
     * block live, and keep the page with them for its life. */
    LUM_OWN_SET(page->carved, 0);
    atomic_signal_fence(memory_order_seq_cst);
    page->free = NULL;
    LUM_OWN_SET(page->used, 0);
    atomic_signal_fence(memory_order_seq_cst);
    if (tail) return_pages(page->start + 4096, tail);
    if (lost) lum_os_account_slices(-(int64_t)lost, 0);
    lum_lock(&lum_segment_lock);
    if (small && class_run[cls] < UINT8_MAX) __atomic_store_n(&class_run[cls], class_run[cls] + 1, __ATOMIC_RELAXED);
    for (unsigned i = 0; i < n; i++) {
        seg->slice_page[idx + i] = &lum_invalid_sentinel;
        seg->freed_at_ms[idx + i] = now;
    }
    uint64_t mask = slices_mask((unsigned)idx, n);
    seg->free_slices |= mask;
    __atomic_add_fetch(&dirty_bytes, (size_t)n * LUM_SLICE_SIZE, __ATOMIC_RELAXED);
    __atomic_add_fetch(&dirty_resident, lum_span_bytes(seg, idx, n), __ATOMIC_RELAXED);
    page->slices = 0;
    page->kind = LUM_PAGE_SMALL;
    atomic_store_explicit(&page->owner, NULL, memory_order_relaxed);
    /* A wholly free segment stays mapped until it has been so for the decay time: waves of
     * threads (or a ring of objects) that empty it and fill it again pay no page faults. */
    if (seg->free_slices == ALL_SLICES) seg->empty_since_ms = now;
    /* Decay runs on the allocator's own activity; the optional purger thread covers idle time.
     * A decay of 0 is "at once", as everywhere else (it once turned this purge off, and
     * then let one pass a millisecond: of the coarse clock's 4 ms ticks, what was freed after
     * the first release of a tick stayed). */
    if (!lum_opt.decay_ms || now - last_purge_ms >= lum_opt.decay_ms / 4) {
        last_purge_ms = now;
        purge_locked(false, now, &out);
    }
    lum_unlock(&lum_segment_lock);
    account_purge(&out, LUM_PURGE_DECAY);
    lum_background_note_dirty();
}

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

/* Huge-page mode: a segment that is nearly full is worth backing with huge pages now rather
 * than when khugepaged gets to it.  Collapsing takes milliseconds, so the candidates are chosen
 * under the lock and collapsed outside it (a segment unmapped meanwhile just fails the call). */
void lum_segments_collapse(void)
{
    static int unsupported;
    if (!lum_opt.thp || unsupported) return;
    uint8_t *todo[16];
    int n = 0;
    lum_lock(&lum_segment_lock);
    for (struct lum_segment *seg = segments; seg && n < 16; seg = seg->next) {
        /* a collapse faults in free slices too: skip segments with purged ones */
        if (seg->collapsed || popcount64(seg->free_slices) > LUM_SLICES / 8 ||
            (seg->free_slices & seg->purged_slices))
            continue;
        seg->collapsed = 1;
        todo[n++] = lum_seg_base(seg);
    }
    lum_unlock(&lum_segment_lock);
    for (int i = 0; i < n; i++)
        if (madvise(todo[i], LUM_SEGMENT_SIZE, MADV_COLLAPSE) != 0 && errno == EINVAL) {
            unsupported = 1; /* kernel before 6.1: khugepaged alone will do */
            break;
        }
}

/* In huge-page mode nothing is trimmed: every free slice is resident whole. */
size_t lum_segments_dirty_resident(void)
{
    return __atomic_load_n(lum_opt.thp ? &dirty_bytes : &dirty_resident, __ATOMIC_RELAXED);
}

size_t lum_segments_dirty_bytes(void)
{
    return __atomic_load_n(&dirty_bytes, __ATOMIC_RELAXED);
}

bool lum_segments_dirty(void)
{
    bool dirty = false;
    lum_lock(&lum_segment_lock);
    for (struct lum_segment *seg = segments; seg && !dirty; seg = seg->next)
        dirty = (seg->free_slices & ~seg->purged_slices) != 0 || seg->free_slices == ALL_SLICES;
    lum_unlock(&lum_segment_lock);
    return dirty;
}

size_t lum_segments_purge(bool all, uint32_t reason)
{
    lum_lock(&lum_segment_lock);
    uint64_t now = lum_now_ms();
    last_purge_ms = now;
    struct purge_out out = {0, 0, 0};
    purge_locked(all, now, &out);
    lum_unlock(&lum_segment_lock);
    return account_purge(&out, reason);
}

/* The dirty limit's purge for a large block about to be mapped (lum_dirty_limit_check). */
size_t lum_segments_purge_excess(size_t target, uint64_t min_age)
{
    lum_lock(&lum_segment_lock);
    struct purge_out out = {0, 0, 0};
    purge_excess_locked(target, lum_now_ms(), &out, min_age);
    lum_unlock(&lum_segment_lock);
    return account_purge(&out, LUM_PURGE_LIMIT);
}

LUM_COLD_TEXT void lum_segments_for_each_then(void (*fn)(struct lum_segment *, void *), void (*after)(void *), void *arg)
{
    lum_lock(&lum_segment_lock);
    for (struct lum_segment *seg = segments; seg; seg = seg->next) fn(seg, arg);
    if (after) after(arg);
    lum_unlock(&lum_segment_lock);
}

LUM_COLD_TEXT void lum_segments_for_each(void (*fn)(struct lum_segment *, void *), void *arg)
{
    lum_segments_for_each_then(fn, NULL, arg);
}
