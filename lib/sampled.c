/* Sampled allocations live on pages of their own whose fast_heap is never set, so free()
 * recognises them with the ownership test it does anyway: no extra branch for ordinary frees.
 * Samples are rare (one per 512 KiB by default), so one lock guards these pages, and with them
 * the profiler's figures a sample or its free changes (see obs_internal.h), so that each takes
 * one lock. */
#include "internal.h"
#include "observe.h"
#include "probes.h"
#include "sampler_fast.h"

LUM_SAMPLE_DATA4 lum_lock_t lum_sampled_lock;
struct lum_page_list lum_sampled_pages[LUM_SAMPLED_SLOTS];
/* Emptied pages kept off the list for the class's next new pages: where sampled blocks live a
 * while (bench ring), pages fill and empty in turn, and making and releasing one costs ~800
 * instructions.  A class keeps at most SAMPLED_EMPTY_MAX empty pages, head or spares (see
 * keep_empty): with one, ring still made and released a page every ~50 samples, as its classes'
 * live samples came and went by a page or two; two save ~4 instructions a sample with the
 * bigger sampled pages (segment.c), 10 with 64 KiB ones.  A kept page of more than one slice
 * goes back once it has stayed empty a while (emptied_kept); one of a slice keeps what it
 * carved. */
#define SAMPLED_EMPTY_MAX 2
static struct lum_page *spare[LUM_SAMPLED_SLOTS]; /* linked through next */
static uint8_t spare_n[LUM_SAMPLED_SLOTS];
static inline void release_stale_maybe(void); /* see SAMPLED_RELEASE_DELAY_MS */

/* The slot of sampled class cls in the arrays above and below (lum_sampled_slot).  Every
 * sampled page is of a sampled class, so one slot's pages all have one capacity and their record
 * arrays one size: realloc's growth in place grows a page to the sampled class before it makes
 * the page sampled or keeps it so (heap.c: lum_heap_grow_block, regrow_sampled). */
static inline unsigned slot_of(unsigned cls)
{
    return lum_sampled_slot(lum_class_size[cls]);
}

static struct lum_page *spare_pop(unsigned slot)
{
    struct lum_page *p = spare[slot];
    spare[slot] = p->next;
    p->next = NULL;
    spare_n[slot]--;
    return p;
}

static void spare_push(unsigned slot, struct lum_page *p)
{
    p->next = spare[slot];
    spare[slot] = p;
    spare_n[slot]++;
}

/* Sampled blocks use the power-of-two classes only, and none under 256 bytes: at most 11
 * sampled pages in a process instead of one per class in use (a small program would spend
 * megabytes on them), at the cost of some slack in one block per 512 KiB allocated.  Small
 * sizes share the 256-byte page: a program of small objects touches one OS page for its
 * samples instead of one for each of 16, 32, 64, 128 and 256 (bench churn: 20 -> 4 KiB), and
 * at most 240 bytes of slack a live sample.  A power of two at or above an aligned class's
 * size is a multiple of its alignment too.  The rule: lum_sampled_size (internal.h). */

uint8_t lum_sampled_memo[LUM_CLASSES];

/* Record slot arrays (lum_sample_rec, one a block) of released sampled pages, for the class's
 * next page, linked through their first word: a page is released only when all its blocks are
 * free, so all its slots are empty.  A page keeps its array while it is the spare. */
static void *recs_free[LUM_SAMPLED_SLOTS];

_Static_assert(sizeof(struct lum_sample_rec) <= (size_t)1 << LUM_SAMPLE_SLOT_SHIFT, "a record fits its slot");

/* A page's slots, 64-aligned (LUM_SAMPLE_SLOT_SHIFT).  The metadata allocator puts blocks of a
 * page or more on a page and others on 16 bytes: those get 48 bytes more to align in (never
 * given back: a released page's array goes on recs_free, see sampled_page_release). */
static struct lum_sample_rec *recs_get(unsigned slot, uint32_t capacity)
{
    void *r = recs_free[slot];
    if (r) {
        recs_free[slot] = *(void **)r;
        ((struct lum_sample_rec *)r)->requested = 0;
        return r;
    }
    size_t size = (size_t)capacity << LUM_SAMPLE_SLOT_SHIFT;
    uintptr_t a = (uintptr_t)lum_meta_alloc(size < 4096 ? size + 48 : size);
    return a ? (struct lum_sample_rec *)((a + 63) & ~(uintptr_t)63) : NULL;
}

/* A record slot array for the next page of the class in slot; under lum_sampled_lock. */
static void recs_put(unsigned slot, struct lum_sample_rec *recs)
{
    *(void **)recs = recs_free[slot];
    recs_free[slot] = recs;
}

/* Gives back a sampled page with its record slots; under lum_sampled_lock. */
static void sampled_page_release(struct lum_page *page)
{
    recs_put(slot_of(page->cls), page->recs);
    page->recs = NULL;
    lum_page_release(page, false);
}

unsigned lum_sampled_class_slow(unsigned cls)
{
    unsigned c = lum_size_class(lum_sampled_size(lum_class_size[cls]));
    __atomic_store_n(&lum_sampled_memo[cls], (uint8_t)(c + 1), __ATOMIC_RELAXED);
    return c;
}

/* A page with nothing left to hand out goes to the back, so the next pop finds a page with
 * free blocks first instead of walking past the full ones.  A free into a full page leaves it
 * where it is, among the full pages in the order they filled: bringing it to the front (as
 * before) handed its one free block out at the next sample, and the page went to the back again
 * (ring, sampled blocks freed oldest first: two list moves a sample, ~25 instructions).  Left
 * there, its turn comes when the pages before it have filled, by when the oldest have had most
 * of their blocks freed, or all (then they are kept empty or released, see keep_empty). */
void lum_sampled_emptied(struct lum_page *page, unsigned slot)
{
    if (page->carved >= page->capacity && page->next) {
        lum_list_remove(&lum_sampled_pages[slot], page);
        lum_list_push_back(&lum_sampled_pages[slot], page);
    }
}

/* Pops a block of class cls from the sampled pages; a new sampled page is made only when
 * may_grow.  Counts the allocation for heap. */
static inline __attribute__((always_inline)) lum_block *sampled_pop(struct lum_heap *heap, unsigned cls, bool may_grow,
                                                                   struct lum_sample_rec **rec)
{
    unsigned slot = slot_of(cls);
    lum_lock(&lum_sampled_lock);
    release_stale_maybe();
    /* Full pages at the head go to the back, behind the pages that have had frees since they
     * filled, so that the core's inline pop (lum_sampled_pop_locked, the head only) finds a
     * free block next time; first: the first page moved, where the turn ends. */
    struct lum_page *page, *first = NULL;
    while ((page = lum_sampled_pages[slot].head) != NULL && page != first) {
        if (page->free || lum_page_refill(page)) break;
        /* a page of one block (over 64 KiB): every other page of the list is full too (an
         * emptied one leaves it, keep_empty), one for each live sample of the class */
        if (!page->next || page->capacity == 1) {
            page = NULL;
            break;
        }
        lum_list_remove(&lum_sampled_pages[slot], page);
        lum_list_push_back(&lum_sampled_pages[slot], page);
        if (!first) first = page;
    }
    if (page == first) page = NULL;
    if (!page && may_grow && spare[slot]) {
        page = spare_pop(slot);
        lum_list_push_front(&lum_sampled_pages[slot], page);
        if (!page->free) lum_page_refill(page);
    } else if (!page && may_grow && (page = lum_page_alloc(cls, LUM_PAGE_SAMPLED, NULL)) != NULL) {
        if (!(page->recs = recs_get(slot, page->capacity))) {
            lum_page_release(page, false);
            page = NULL;
        } else {
            lum_list_push_front(&lum_sampled_pages[slot], page);
            lum_page_refill(page);
        }
    }
    if (!page) {
        lum_unlock(&lum_sampled_lock);
        return NULL;
    }
    lum_block *b = page->free;
    page->free = lum_free_next(page, b);
    lum_block_handed_out(b);
    LUM_OWN_ADD(page->used, 1);
    if (!page->free) lum_sampled_emptied(page, slot);
    lum_unlock(&lum_sampled_lock);
    lum_heap_count_alloc(heap, page->block_size);
    *rec = lum_sampled_rec(page, b);
    return b;
}

void *lum_sampled_alloc(struct lum_heap *heap, unsigned scls, struct lum_sample_rec **rec)
{
    lum_block *b = sampled_pop(heap, scls, true, rec);
    if (b) LUM_OWN_ADD(heap->tc.sampled_count, 1);
    return b;
}

bool lum_sampled_adopt(struct lum_page *page)
{
    lum_lock(&lum_sampled_lock);
    struct lum_sample_rec *recs = recs_get(slot_of(page->cls), page->capacity);
    if (recs) {
        page->recs = recs;
        /* as lum_page_alloc makes a sampled page: nobody's */
        lum_page_change_kind(page, LUM_PAGE_SAMPLED, NULL);
        /* full: behind the pages with free blocks, as sampled_pop leaves them */
        lum_list_push_back(&lum_sampled_pages[slot_of(page->cls)], page);
    }
    lum_unlock(&lum_sampled_lock);
    return recs != NULL;
}

bool lum_sampled_regrow(struct lum_page *page, unsigned to, struct lum_heap *owner)
{
    lum_lock(&lum_sampled_lock);
    unsigned old = page->cls;
    /* under the lock: the page is on its class's list, as everything reading it finds it */
    if (!lum_page_grow(page, to)) {
        lum_unlock(&lum_sampled_lock);
        return false;
    }
    lum_list_remove(&lum_sampled_pages[slot_of(old)], page);
    struct lum_sample_rec *recs = page->recs;
    if (owner) {
        page->recs = NULL;
        lum_page_change_kind(page, LUM_PAGE_SMALL, owner);
    } else {
        lum_list_push_back(&lum_sampled_pages[slot_of(to)], page);
    }
    lum_unlock(&lum_sampled_lock);
    /* the old sample ends, as the block's free would end it (probes included) */
    lum_on_sample_free_rec(page->start, recs);
    if (owner) {
        lum_lock(&lum_sampled_lock);
        recs_put(slot_of(old), recs);
        lum_unlock(&lum_sampled_lock);
    }
    return true;
}

/* Near the memory limit a class may have free slots only on sampled pages: hand one out as an
 * ordinary (unsampled) block rather than fail.  Its free still passes through
 * lum_on_sample_free, which ignores addresses it has no sample for. */
void *lum_sampled_take_unsampled(struct lum_heap *heap, unsigned cls)
{
    struct lum_sample_rec *rec; /* empty, and left so: the free finds no sample */
    return sampled_pop(heap, lum_sampled_class(cls), false, &rec);
}

/* An empty page of more than one slice (classes of 8-64 KiB: SAMPLED_PAGE_BLOCKS blocks, up
 * to 4 slices; those over 64 KiB go back at once, see lum_sampled_free) kept with its class
 * holds its slices out of every other page's reach while it waits, though it carved only a
 * block or two: bench python's empty sampled pages of 16, 32 and 64 KiB held 12 of its two
 * segments' 126 slices, the heap overflowed into a third segment, and every page then taken on
 * its never-touched slices emptied the large cache (lum_page_alloc), whose blocks came back
 * faulted in: 4-5% more page faults than sampling off.  Such a page goes back once it has
 * stayed empty SAMPLED_RELEASE_DELAY_MS: a ring of such blocks, which empties a page and needs
 * it again a moment later, keeps it (bench/src/pairs at 10000 B, 1M steps, released at once:
 * 1.6k page faults against 0.4k), and a class sampled now and then gives its slices back.
 * (Until the pages over 64 KiB went back at once, this uncarved those instead: their memory
 * then came back faulted in at the class's next sample, 14% more page faults in bench
 * python.)  Looked at on the sampled pages' own slow paths (a sampled free, a new sampled
 * page) and by every purge (lum_sampled_purge). */
#define SAMPLED_RELEASE_DELAY_MS 20
/* The earliest time an empty page is to go back; 0: none.  Written under lum_sampled_lock;
 * relaxed atomics because the purges read it first without the lock.  On the lock's line
 * (LUM_SAMPLE_DATA): in .bss it was a line of its own that every sampled free read (0.8 D1
 * misses a sample on bench ring, callgrind). */
LUM_SAMPLE_DATA static uint64_t release_due;
static inline uint64_t due_get(void) { return __atomic_load_n(&release_due, __ATOMIC_RELAXED); }
static inline void due_set(uint64_t t) { __atomic_store_n(&release_due, t, __ATOMIC_RELAXED); }

/* A page that just became empty and stays with its class (head or spare). */
static void emptied_kept(struct lum_page *page)
{
    if (page->slices < 2) return;
    __atomic_store_n(&page->emptied_ms, lum_now_ms(), __ATOMIC_RELAXED); /* as abandoned_ms */
    if (!due_get()) due_set(page->emptied_ms + SAMPLED_RELEASE_DELAY_MS);
}

/* Whether a kept page of more than one slice is to go back now: empty long enough, or all
 * (a purge); else notes when it will be. */
static bool stale(const struct lum_page *page, uint64_t now, bool all)
{
    if (!page || page->used || page->slices < 2) return false;
    uint64_t due = page->emptied_ms + SAMPLED_RELEASE_DELAY_MS;
    if (all || now >= due) return true;
    if (!due_get() || due < due_get()) due_set(due);
    return false;
}

/* The empty pages (heads and spares: no other sampled page is empty) whose time has come, or
 * all (a purge), back to their segments; under lum_sampled_lock. */
static void release_stale_locked(uint64_t now, bool all)
{
    due_set(0);
    for (unsigned c = 0; c < LUM_SAMPLED_SLOTS; c++) {
        struct lum_page *head = lum_sampled_pages[c].head;
        if (stale(head, now, all)) {
            lum_list_remove(&lum_sampled_pages[c], head);
            sampled_page_release(head);
        }
        for (struct lum_page **at = &spare[c]; *at;) {
            struct lum_page *p = *at;
            if (!stale(p, now, all)) {
                at = &p->next;
                continue;
            }
            *at = p->next;
            p->next = NULL;
            spare_n[c]--;
            sampled_page_release(p);
        }
    }
}

static inline void release_stale_maybe(void)
{
    if (LUM_UNLIKELY(due_get())) {
        uint64_t now = lum_now_ms();
        if (now >= due_get()) release_stale_locked(now, false);
    }
}

void lum_sampled_purge(bool all)
{
    if (!due_get()) return; /* a hint: looked at again under the lock */
    lum_lock(&lum_sampled_lock);
    if (due_get()) release_stale_locked(lum_now_ms(), all);
    lum_unlock(&lum_sampled_lock);
}

/* An empty page off the list: the spare when the class has no empty page, else released (a
 * class keeps at most one empty page, as many as before the spare). */
static void keep_empty(unsigned slot, struct lum_page *page)
{
    struct lum_page *head = lum_sampled_pages[slot].head;
    if (spare_n[slot] + (head && head->used == 0) < SAMPLED_EMPTY_MAX) {
        spare_push(slot, page);
        emptied_kept(page);
    } else {
        sampled_page_release(page);
    }
}

void lum_sampled_free(void *p, struct lum_page *page)
{
    struct lum_heap *heap = lum_tls_heap;
    struct lum_sample_rec *rec = lum_sampled_rec(page, p);
#if LUM_HARDENED
    /* an address inside a block names no record: lum_page_push_free reports it below */
    if (((uintptr_t)p - (uintptr_t)page->start) & (page->block_size - 1)) rec = NULL;
#endif
    /* a tracer's free keeps the record's fields for its probe past the lock: out of line */
    if (LUM_PROBE_ON(sample_batch) || LUM_PROBE_ON(sample_free)) {
        if (rec) lum_on_sample_free_rec(p, rec);
        rec = NULL;
    }
    lum_count_free(heap, page->block_size);
    lum_lock(&lum_sampled_lock);
    /* the record's share of its stack's figures goes under the lock the page needs anyway */
    if (rec) lum_sample_free_locked(rec);
    unsigned slot = lum_sampled_slot(page->block_size);
    lum_page_push_free(page, p);
    if (LUM_OWN_SUB(page->used, 1) == 0) {
        if (page->capacity == 1) {
            /* A page of one block (over 64 KiB) goes back at once, its span kept resident
             * (span_kept), where the class's ordinary pages, the next sampled one, and growth
             * in place all take it.  Kept here as the class's spare and uncarved 20 ms later,
             * its memory left the ordinary pages' reach and came back faulted in at the next
             * sample of the size: python3 took 14% more page faults with default sampling
             * (11.5k against 10.2k), 12.0k at 256k. */
            lum_list_remove(&lum_sampled_pages[slot], page);
            sampled_page_release(page);
        } else if (lum_sampled_pages[slot].head != page) {
            lum_list_remove(&lum_sampled_pages[slot], page);
            keep_empty(slot, page);
        } else {
            emptied_kept(page);
            if (spare_n[slot] + 1 > SAMPLED_EMPTY_MAX) {
                /* the head is one of the class's empty pages now */
                sampled_page_release(spare_pop(slot));
            }
        }
    }
    release_stale_maybe();
    lum_unlock(&lum_sampled_lock);
}

LUM_COLD_TEXT void lum_sampled_for_each(void (*fn)(struct lum_page *, void *), void *arg)
{
    lum_lock(&lum_sampled_lock);
    for (unsigned c = 0; c < LUM_SAMPLED_SLOTS; c++) {
        for (struct lum_page *p = lum_sampled_pages[c].head; p; p = p->next) fn(p, arg);
        for (struct lum_page *p = spare[c]; p; p = p->next) fn(p, arg);
    }
    lum_unlock(&lum_sampled_lock);
}
