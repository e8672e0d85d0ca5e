/* Large blocks: one mapping each, 4 MiB-aligned, header in the first 4 KiB (laid out like a
 * segment so free() finds it by address mask).  Freed blocks, and the tails realloc cuts off,
 * stay resident in a bounded cache of address ranges; growth by realloc moves page tables
 * with mremap instead of copying bytes, unless a cached range can take the block. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include "internal.h"
#include "observe.h"
#include "options.h"

lum_lock_t lum_large_lock;
size_t lum_large_cached; /* bytes in the cache (internal.h) */
size_t lum_large_live_blocks; /* mallinfo2's hblks (internal.h) */

/* The cache holds freed address ranges, still resident, rather than whole mappings, with
 * their records here rather than in a header: a block that realloc shrinks leaves its tail
 * in place as a range (no syscall; the pages serve the next block instead of being dropped
 * and faulted in again), a cached range larger than a block serves it from its head and
 * keeps the rest, and one smaller is grown into it.  Bench large (blocks of 64 KiB..32 MiB,
 * vectors grown by half and shrunk back): the ranges dropped by shrinking and by trimming
 * cached mappings to size were faulted in again. */
#define CACHE_SLOTS 32
/* a smaller rest stays with the block it belongs to (or goes with it) */
#define PIECE_MIN ((size_t)64 << 10)

struct piece {
    uint8_t *addr;
    size_t len;
    uint64_t freed_ms;
    /* the mapping the range is part of: ranges of one origin that touch are in one VMA, so
     * mremap may treat them as one (it refuses ranges across VMAs) */
    uint64_t origin;
};
static struct piece pieces[CACHE_SLOTS]; /* oldest first */
static unsigned npieces;
static uint64_t origins;

static size_t page_round(size_t n) { return (n + 4095) & ~(size_t)4095; }
static bool seg_aligned(const void *p) { return ((uintptr_t)p & (LUM_SEGMENT_SIZE - 1)) == 0; }
static uint64_t new_origin(void) { return __atomic_add_fetch(&origins, 1, __ATOMIC_RELAXED); }

static void unmap_range(uint8_t *addr, size_t len)
{
#if LUM_HARDENED
    lum_hardened_own((uintptr_t)addr, false); /* hardened ranges are whole mappings */
#endif
    lum_os_unmap(addr, len, len);
}

/* Caller holds the lock. */
static void piece_remove(unsigned i)
{
    __atomic_sub_fetch(&lum_large_cached, pieces[i].len, __ATOMIC_RELAXED);
    memmove(&pieces[i], &pieces[i + 1], (npieces - i - 1) * sizeof pieces[0]);
    __atomic_store_n(&npieces, npieces - 1, __ATOMIC_RELAXED);
}

/* Caller holds the lock: moves the oldest ranges to out until keep bytes remain. */
static unsigned evict_locked(size_t keep, struct piece *out)
{
    unsigned n = 0;
    while (npieces && lum_large_cached > keep) {
        out[n++] = pieces[0];
        piece_remove(0);
    }
    return n;
}

static void unmap_pieces(const struct piece *p, unsigned n)
{
    for (unsigned i = 0; i < n; i++) unmap_range(p[i].addr, p[i].len);
}

/* Keeps a freed, resident range for reuse; false (nothing done) when it is larger than the
 * cache may hold. */
static bool cache_put(uint8_t *addr, size_t len, uint64_t origin)
{
    /* LUMALLOC_DECAY_MS=0: free memory goes back at once, a large block's too */
    if (len > lum_opt.large_cache / 2 || !lum_opt.decay_ms) return false;
    struct piece evict[CACHE_SLOTS];
    unsigned n = 0;
    lum_lock(&lum_large_lock);
#if !LUM_HARDENED
    /* A range that touches a cached range of its mapping joins it: the block a cached range
     * served from its head goes back beside the rest it left.  Kept apart, the pieces only
     * shrank, and a block larger than each grew the largest with new memory: one temporary
     * buffer of 256 KiB-5 MB at a time, written whole, faulted 117 pages a buffer (glibc 2, as
     * its heap coalesces). */
    for (unsigned i = 0; i < npieces; i++) {
        struct piece *q = &pieces[i];
        if (q->origin != origin || (q->addr + q->len != addr && addr + len != q->addr)) continue;
        if (q->addr < addr) addr = q->addr;
        len += q->len;
        piece_remove(i);
        i = (unsigned)-1; /* the joined range may touch another */
    }
    if (len > lum_opt.large_cache) {
        lum_unlock(&lum_large_lock);
        unmap_range(addr, len);
        return true;
    }
#endif
    if (lum_large_cached + len > lum_opt.large_cache)
        n = evict_locked(lum_opt.large_cache - len, evict);
    if (npieces == CACHE_SLOTS) {
        evict[n++] = pieces[0];
        piece_remove(0);
    }
    pieces[npieces] = (struct piece){ addr, len, lum_now_ms(), origin };
    __atomic_store_n(&npieces, npieces + 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&lum_large_cached, len, __ATOMIC_RELAXED);
    lum_unlock(&lum_large_lock);
    unmap_pieces(evict, n);
    lum_background_note_dirty();
    return true;
}

/* Unmaps the oldest cached ranges until keep bytes remain. */
static void cache_trim(size_t keep)
{
    struct piece old[CACHE_SLOTS];
    lum_lock(&lum_large_lock);
    unsigned n = evict_locked(keep, old);
    lum_unlock(&lum_large_lock);
    unmap_pieces(old, n);
}

/* The highest resident total the program's own memory (all but the cache) has reached. */
static size_t live_high;

/* Before fresh memory is handed out: cached ranges may keep the resident total up to what
 * live memory alone has reached (and LUM_DIRTY_FLOOR over it), no further.  So reuse never
 * raises the peak: bench large peaked with 50 MiB cached as its live blocks reached 354 MiB,
 * where the next fresh blocks would have served from ranges freed on the way there.  leaving:
 * live bytes about to be cached (a block realloc copies out of), resident meanwhile but no
 * part of the live memory's mark. */
static size_t make_room(size_t fresh, size_t leaving)
{
    size_t cached = __atomic_load_n(&lum_large_cached, __ATOMIC_RELAXED);
    /* the coarse figure this was tuned with (whole slices for pages): lum_committed_bytes */
    uint64_t resident = __atomic_load_n(&lum_committed_bytes, __ATOMIC_RELAXED);
    size_t live = resident > cached ? (size_t)(resident - cached) : 0;
    size_t after = live + fresh, high = __atomic_load_n(&live_high, __ATOMIC_RELAXED);
    /* live is read from two figures other threads move meanwhile: a range taken out of the
     * cache and unmapped between the two loads makes it short by that range, and after less
     * than leaving; unchecked, the mark wrapped to ~2^64 and high + LUM_DIRTY_FLOOR below
     * back to a few MiB, so that every later make_room emptied the cache */
    size_t mark = after > leaving ? after - leaving : 0;
    if (mark > high) high = mark;
    if (after > high + LUM_DIRTY_FLOOR)
        cache_trim(0);
    else if (cached > high + LUM_DIRTY_FLOOR - after)
        cache_trim(high + LUM_DIRTY_FLOOR - after);
    return mark;
}

/* Raises the mark to what make_room measured, once the memory it made room for is mapped: a
 * request the kernel refused (malloc(1 << 50)) would have left the mark there for good, and
 * the cache untrimmed from then on. */
static void note_live_high(size_t mark)
{
    size_t high = __atomic_load_n(&live_high, __ATOMIC_RELAXED);
    while (mark > high && !__atomic_compare_exchange_n(&live_high, &high, mark, true, __ATOMIC_RELAXED,
                                                       __ATOMIC_RELAXED)) {
    }
}

/* Moves len bytes at src into a fresh 4 MiB-aligned mapping of map_size bytes (map_size >=
 * len: the rest is new memory); NULL when the kernel will not (src is unmapped then). */
static uint8_t *move_range(uint8_t *src, size_t len, size_t map_size)
{
    uint8_t *dst = lum_os_map_aligned(map_size, LUM_SEGMENT_SIZE);
    if (dst && lum_os_remap(src, len, map_size, MREMAP_MAYMOVE | MREMAP_FIXED, dst) == MAP_FAILED) {
        lum_os_unmap(dst, map_size, 0);
        dst = NULL;
    }
    if (!dst) {
        unmap_range(src, len);
        return NULL;
    }
    /* dst's reservation became the block: its cached pages plus new memory handed out */
    lum_os_account(-(int64_t)map_size, 0);
    lum_os_account((int64_t)(map_size - len), (int64_t)(map_size - len));
    return dst;
}

/* A mapping for a large block of *map_size bytes from the cache, NULL when it has none; sets
 * *map_size to what the block really gets (a rest too small to keep comes with it), *origin,
 * and *reused to how many bytes from its start were cached (the rest is new memory, zero).  Best fit: a range that starts 4 MiB-aligned serves in place from its head (no
 * syscall), any other is moved to an aligned address (mremap moves page tables, not bytes).
 * When none is large enough, the largest is grown (mremap keeps its pages); the rest are
 * unmapped unless they add up to a block as large, which they may serve next: a program whose
 * buffers only grow would hold them next to the new memory until decay, where glibc's heap
 * serves the larger block from the freed memory (bench python, PYTHONMALLOC=malloc: its
 * 344 KiB buffers, then 1.1 MiB ones).  Only a range of grow_from bytes or more is grown;
 * leaving as for make_room. */
static uint8_t *cache_take(size_t *map_size, uint64_t *origin, size_t *reused, size_t grow_from,
                           size_t leaving)
{
    if (!__atomic_load_n(&npieces, __ATOMIC_RELAXED)) return NULL; /* peek: the lock decides */
    size_t want = *map_size;
    struct piece evict[CACHE_SLOTS], got = { 0 };
    unsigned n = 0;
    enum { IN_PLACE, MOVE, GROW } how = IN_PLACE;
    lum_lock(&lum_large_lock);
    int fit = -1, fit_aligned = -1, largest = -1;
    for (unsigned i = 0; i < npieces; i++) {
        size_t len = pieces[i].len;
        if (len >= want) {
            if (fit < 0 || len < pieces[fit].len) fit = (int)i;
            if (seg_aligned(pieces[i].addr) && (fit_aligned < 0 || len < pieces[fit_aligned].len))
                fit_aligned = (int)i;
        }
        if (largest < 0 || len > pieces[largest].len) largest = (int)i;
    }
    if (LUM_HARDENED) {
        /* hardened mappings end in a guard page: they are reused whole, never cut or grown */
        if (fit >= 0) {
            got = pieces[fit];
            piece_remove((unsigned)fit);
        }
    } else if (fit_aligned >= 0 || fit >= 0) {
        struct piece *p = &pieces[fit_aligned >= 0 ? fit_aligned : fit];
        got = *p;
        how = fit_aligned >= 0 ? IN_PLACE : MOVE;
        /* cut only a range of twice the block or more: a little more room for a block is a
         * range kept whole for the next, larger one (what comes back joins what stayed, see
         * cache_put; a cut in two that then served a larger block grew one with new memory) */
        if (p->len - want >= PIECE_MIN && p->len - want >= want) {
            got.len = want;
            __atomic_sub_fetch(&lum_large_cached, want, __ATOMIC_RELAXED);
            p->len -= want;
            if (how == IN_PLACE) p->addr += want; /* the rest stays: a range like any other */
            else got.addr = p->addr + p->len;     /* moved from the tail: the head stays */
        } else {
            piece_remove((unsigned)(p - pieces));
        }
    } else if (largest >= 0 && pieces[largest].len >= grow_from) {
        got = pieces[largest];
        how = GROW;
        piece_remove((unsigned)largest);
        if (lum_large_cached < want) n = evict_locked(0, evict);
    }
    lum_unlock(&lum_large_lock);
    unmap_pieces(evict, n);
    if (!got.addr) return NULL;
    *reused = got.len;
    if (how == IN_PLACE) {
        *map_size = got.len;
        *origin = got.origin;
        return got.addr;
    }
    size_t mark = how == GROW ? make_room(want - got.len, leaving) : 0;
    if (how == GROW && seg_aligned(got.addr)) {
        if (lum_os_remap(got.addr, got.len, want, 0, NULL) != MAP_FAILED) {
            note_live_high(mark);
            lum_os_account((int64_t)(want - got.len), (int64_t)(want - got.len));
            *origin = got.origin;
            return got.addr;
        }
        if (errno == EFAULT) {
            /* the range spans mappings (part of it madvised or locked): a move would fail too */
            unmap_range(got.addr, got.len);
            return NULL;
        }
    }
    uint8_t *dst = move_range(got.addr, got.len, how == GROW ? want : got.len);
    if (!dst) return NULL;
    note_live_high(mark);
    *map_size = how == GROW ? want : got.len;
    *origin = new_origin();
    return dst;
}

/* Takes up to need bytes from the head of the cached range at addr, of origin, for the block
 * that ends there (a rest too small to keep comes too); returns the bytes taken, 0 if none. */
static size_t cache_take_next(uint8_t *addr, size_t need, uint64_t origin)
{
    if (!__atomic_load_n(&npieces, __ATOMIC_RELAXED)) return 0;
    size_t took = 0;
    lum_lock(&lum_large_lock);
    for (unsigned i = 0; i < npieces; i++) {
        struct piece *p = &pieces[i];
        if (p->addr != addr || p->origin != origin) continue;
        if (p->len >= need && p->len - need >= PIECE_MIN) {
            took = need;
            p->addr += need;
            p->len -= need;
            __atomic_sub_fetch(&lum_large_cached, need, __ATOMIC_RELAXED);
        } else {
            took = p->len;
            piece_remove(i);
        }
        break;
    }
    lum_unlock(&lum_large_lock);
    return took;
}

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

/* What realloc faults in of a block's growth ahead of its writes (see lum_large_realloc). */
#define LUM_POPULATE_MAX ((size_t)2 << 20)

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
    uint8_t *base = NULL;
    uint64_t origin = 0;
    size_t reused = 0; /* bytes from base that held data: calloc zeroes their part */
    /* A cached range comes 4 MiB-aligned (cache_take), so its byte at offset has any alignment
     * up to that: posix_memalign'd buffers (64 KiB, 2 MiB for huge pages) are reused too. */
    int caller_errno = errno; /* the hint mmap's EEXIST and the like are no news to the caller */
    lum_background_maybe_start(usable); /* before anything is touched: it may allocate */
    if (alignment <= LUM_SEGMENT_SIZE && (base = cache_take(&map_size, &origin, &reused, 0, 0)) != NULL) {
        l = (struct lum_large *)(base + LUM_HEADER_OFFSET);
        header_init(l); /* a range cut from a cached one has none */
        usable = map_size - offset - TRAILER;
    } else {
        reused = 0; /* a cached range that could not be moved into place set it */
        lum_dirty_limit_check(true);
        size_t mark = make_room(map_size, 0);
        base = map_for(map_size, offset, alignment);
        if (!base) return NULL;
        note_live_high(mark);
        origin = new_origin();
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
    size_t asked = lum_requested(heap, size);
    l->requested = asked;
    l->user = base + offset;
    l->sampled = sampled;
    l->cached = 0;
    l->origin = origin;
    /* only what was cached: a range grown to size has new memory after it, zero already and
     * not necessarily ever written (a memset of it would fault it all in) */
    if (zero && reused > offset) memset(l->user, 0, size < reused - offset ? size : reused - offset);
    lum_count_global(&lumalloc_registry.global.large_live_bytes, (int64_t)usable);
    __atomic_add_fetch(&lum_large_live_blocks, 1, __ATOMIC_RELAXED);
    lum_heap_count_alloc(heap, usable);
    LUM_OWN_ADD(heap->tc.large_count, 1);
    LUM_OWN_ADD(heap->tc.large_bytes, usable);
    lum_on_large_alloc(&heap->tc, l->user, asked, usable);
    if (sampled) {
        LUM_OWN_ADD(heap->tc.sampled_count, 1);
        lum_on_sample(&heap->tc, l->user, asked, usable);
    }
    errno = caller_errno;
    return l->user;
}

size_t lum_large_usable(const void *p)
{
    return header_of(p)->usable;
}

/* p names a live large block: false for a block already in the cache, or an address inside
 * one, which the hardened library and LUMALLOC_HARDEN report and abort on (a realloc of a freed
 * block handed the same memory to two owners). */
static bool large_live(const struct lum_large *l, const void *p, bool realloc)
{
    if (LUM_LIKELY(!l->cached && p == l->user))
        return true;
    if (lum_opt.harden || LUM_HARDENED) {
#if LUM_HARDENED
        lum_hardened_fail(l->cached ? (realloc ? "realloc of a freed block" : "double free of")
                                    : (realloc ? "invalid realloc (not the start of a block) at"
                                               : "invalid free (not the start of a block) at"),
                          p, l->usable);
#else
        lum_write_err(l->cached ? (realloc ? "lumalloc: realloc of a freed large block\n"
                                           : "lumalloc: double free of a large block\n")
                                : (realloc ? "lumalloc: invalid realloc inside a large block\n"
                                           : "lumalloc: invalid free inside a large block\n"));
        abort();
#endif
    }
    return false;
}

void lum_large_free(void *p)
{
    struct lum_large *l = header_of(p);
    if (LUM_UNLIKELY(!large_live(l, p, false)))
        return;
    /* Claimed here, not just tested: two threads freeing the block at once both passed the test
     * above, and its range went into the cache twice (two later blocks on one memory). */
    if (LUM_UNLIKELY(__atomic_exchange_n(&l->cached, 1, __ATOMIC_ACQ_REL))) {
        large_live(l, p, false); /* reports the double free where checks are on */
        return;
    }
    struct lum_heap *heap = lum_tls_heap;
    if (l->sampled) lum_on_sample_free(p, l->usable);
    lum_on_large_free(p, l->usable);
    lum_count_free(heap, l->usable);
    lum_count_global(&lumalloc_registry.global.large_live_bytes, -(int64_t)l->usable);
    __atomic_sub_fetch(&lum_large_live_blocks, 1, __ATOMIC_RELAXED);
    uint8_t *base = l->map_base;
    size_t map_size = l->map_size;
    /* whatever the block's alignment: the range is reused from its 4 MiB-aligned start;
     * cached (set above) stays while the range keeps its head: a second free is caught */
    if (cache_put(base, map_size, l->origin)) return;
    l->cached = 0;
    unmap_range(base, map_size);
}

void lum_large_cache_give(size_t bytes)
{
#if LUM_HARDENED
    (void)bytes;
    cache_trim(0); /* hardened ranges are whole mappings, guard pages and all: never cut */
#else
    struct piece out[CACHE_SLOTS];
    unsigned n = 0;
    lum_lock(&lum_large_lock);
    while (bytes && npieces) {
        unsigned big = 0;
        for (unsigned i = 1; i < npieces; i++)
            if (pieces[i].len > pieces[big].len) big = i;
        struct piece *p = &pieces[big];
        if (p->len >= bytes + PIECE_MIN) {
            /* the tail goes: the head stays where it is, and still serves a block in place */
            p->len -= bytes;
            __atomic_sub_fetch(&lum_large_cached, bytes, __ATOMIC_RELAXED);
            out[n++] = (struct piece){ p->addr + p->len, bytes, 0, 0 };
            break;
        }
        bytes = bytes > p->len ? bytes - p->len : 0;
        out[n++] = *p;
        piece_remove(big);
    }
    lum_unlock(&lum_large_lock);
    unmap_pieces(out, n);
#endif
}

size_t lum_large_cache_purge(void)
{
    return lum_large_cache_purge_idle(0);
}

/* Unmaps the cached ranges freed min_age ms ago or longer (the oldest are first); gives their
 * bytes. */
size_t lum_large_cache_purge_idle(uint64_t min_age)
{
    struct piece old[CACHE_SLOTS];
    unsigned n = 0;
    size_t bytes = 0;
    lum_lock(&lum_large_lock);
    /* under the lock: a range cached meanwhile by another thread is not from the future */
    uint64_t now = min_age ? lum_now_ms() : 0;
    while (npieces && (!min_age || now - pieces[0].freed_ms >= min_age)) {
        bytes += pieces[0].len;
        old[n++] = pieces[0];
        piece_remove(0);
    }
    lum_unlock(&lum_large_lock);
    unmap_pieces(old, n);
    return bytes;
}

/* Unmaps cached ranges that have waited longer than the decay time (oldest are first). */
size_t lum_large_cache_decay(void)
{
    return lum_large_cache_purge_idle(lum_opt.decay_ms);
}

/* Grows or shrinks a large block in place or by moving its pages; NULL means "copy instead". */
void *lum_large_realloc(void *p, size_t size)
{
    struct lum_large *l = header_of(p);
    if (LUM_UNLIKELY(!large_live(l, p, true)))
        return NULL;
    uint8_t *base = l->map_base;
    size_t offset = (size_t)((uint8_t *)p - base);
    if (size <= l->usable && size >= l->usable / 2) {
        l->requested = size;
        return p;
    }
    /* Hardened blocks carry guard pages that mremap would have to move too: copy instead. */
    if (LUM_HARDENED || offset != LUM_LARGE_HEADER || size <= lum_opt.large_threshold)
        return NULL;
    size_t usable = page_round(size);
    if (usable < size) return NULL;
    size_t map_size = offset + usable;
    struct lum_heap *heap = lum_tls_heap;
    struct lum_thread_counters_v1 *tc = heap != &lum_empty_heap ? &heap->tc : NULL;
    size_t old_usable = l->usable;
    uint64_t origin = l->origin;
    uint8_t *copy_to = NULL;
    void *moved = MAP_FAILED;
    if (map_size < l->map_size && l->map_size - map_size >= PIECE_MIN &&
        cache_put(base + map_size, l->map_size - map_size, l->origin)) {
        /* the tail stays where it is, resident, for the next block to take */
        l->map_size = map_size;
        moved = base;
    } else if (map_size > l->map_size) {
        /* what follows may be cached: the tail this block left, or the rest of the range it
         * was cut from; its pages serve without a syscall */
        l->map_size += cache_take_next(base + l->map_size, map_size - l->map_size, l->origin);
        if (l->map_size >= map_size) {
            map_size = l->map_size;
            usable = map_size - offset;
            moved = base;
        } else if (map_size - l->map_size >= l->map_size / 4) {
            /* Copying into a cached range costs less than faulting in the growth: memcpy
             * ~0.1 ns a byte here, a fault ~2.5 us a page (0.6 ns a byte), so from a quarter
             * of the block on (the kernel cannot add the cached pages to the block's own:
             * mremap will not resize a range across VMAs).  TCMalloc copies every time.  A
             * range smaller than the new size still pays when it is a quarter larger than
             * the block: it is grown, and only the rest is new. */
            size_t got = map_size, reused;
            if ((copy_to = cache_take(&got, &origin, &reused, l->map_size + l->map_size / 4, l->map_size)) != NULL) {
                map_size = got;
                usable = map_size - offset;
                moved = copy_to;
            }
        }
    }
    int caller_errno = errno;
    size_t mark = 0;
    if (moved == MAP_FAILED) {
        if (map_size > l->map_size) mark = make_room(map_size - l->map_size, 0);
        moved = lum_os_remap(base, l->map_size, map_size, 0, NULL);
        /* EFAULT: the block spans mappings (part of it madvised or locked), and a move would
         * fail the same way, after kernels before 6.11 had unmapped the destination: the
         * unmap of the reservation that follows could then hit another thread's new mapping
         * there.  Copied instead. */
        if (moved == MAP_FAILED && errno == EFAULT) {
            errno = caller_errno;
            return NULL;
        }
    }
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
        moved = lum_os_remap(base, l->map_size, map_size, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
        if (moved == MAP_FAILED) {
            lum_os_unmap(dst, map_size, 0);
            if (tc) lum_on_large_alloc(tc, p, l->requested, old_usable); /* still here after all */
            return NULL;
        }
        /* dst's reservation was replaced by the moved pages: undo its accounting, the delta
         * below covers the block */
        lum_os_account(-(int64_t)map_size, 0);
        origin = new_origin();
    } else {
        if (l->sampled) {
            lum_on_sample_free(p, old_usable);
            l->sampled = 0;
        }
        lum_on_large_free(p, old_usable);
    }
    if (copy_to) {
        struct lum_large *to = (struct lum_large *)(copy_to + LUM_HEADER_OFFSET);
        header_init(to);
        to->map_size = map_size; /* from the cache: resident already, nothing to account */
        to->sampled = 0;
        to->cached = 0;
        memcpy(copy_to + offset, p, old_usable < usable ? old_usable : usable);
        /* the old block goes to the cache as if freed (a free of p now is a double free);
         * once there another thread may take it: l is not read again */
        size_t old_map = l->map_size;
        uint64_t old_origin = l->origin;
        l->cached = 1;
        if (!cache_put(base, old_map, old_origin)) unmap_range(base, old_map);
    }
    note_live_high(mark);
    base = moved;
    l = (struct lum_large *)(base + LUM_HEADER_OFFSET);
    int64_t delta = (int64_t)map_size - (int64_t)l->map_size;
    /* A block grows when it is full, so the start of its new part will be written soon:
     * faulted in by one call it costs ~2.3 us a page, one fault at a time ~3.0 (this VM).
     * realloc_grow 1g 1m: sys 0.74 -> 0.57 s; bench large 0.34 -> 0.29 s.  No more than
     * LUM_POPULATE_MAX: a buffer that doubles when full is written up to somewhere in its new
     * half, and populated whole it held twice what was written (sed on a 30 MB line: 116 MB
     * resident, glibc 90).  Nor more than the block had: a program that reserves capacity
     * (1 MiB to 512 MiB) keeps the rest lazy, as with glibc. */
    if (delta >= (int64_t)PIECE_MIN && !copy_to) {
        size_t ahead = (size_t)delta < l->map_size ? (size_t)delta : l->map_size;
        lum_os_populate(base + l->map_size, ahead < LUM_POPULATE_MAX ? ahead : LUM_POPULATE_MAX);
    }
    lum_os_account(delta, delta);
    lum_count_global(&lumalloc_registry.global.large_live_bytes, (int64_t)usable - (int64_t)old_usable);
    /* For the profiler a realloc is a free and an allocation: the new block is sampled (or
     * not) like any allocation of its size, decided before the counters move. */
    bool sample_new = tc && lum_heap_take_sample(heap, usable, usable);
    if (tc) {
        LUM_OWN_ADD(tc->free_count, 1);
        LUM_OWN_ADD(tc->free_bytes, old_usable);
        lum_heap_count_alloc(heap, usable);
        LUM_OWN_ADD(tc->large_count, 1);
        LUM_OWN_ADD(tc->large_bytes, usable);
    } else {
        /* No heap (a key destructor after lumalloc's teardown): the later free of the block
         * counts its new size (lum_count_free), so the move counts here too, or allocated
         * (lum_stats, mallinfo2) is off by the growth for good, wrapping below zero. */
        lum_count_global(&lumalloc_registry.global.exited_free_bytes, (int64_t)old_usable);
        lum_count_global(&lumalloc_registry.global.exited_alloc_bytes, (int64_t)usable);
    }
    l->map_base = base;
    l->map_size = map_size;
    l->usable = usable;
    l->requested = size;
    l->user = base + offset;
    l->origin = origin;
    if (tc) {
        lum_on_large_alloc(tc, l->user, size, usable);
        if (sample_new) {
            l->sampled = 1;
            LUM_OWN_ADD(tc->sampled_count, 1);
            lum_on_sample(tc, l->user, size, usable);
        }
    }
    errno = caller_errno;
    return l->user;
}
