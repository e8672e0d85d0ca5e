/* lum_heap_check: walks the allocator's metadata and checks its invariants.  Pages owned by
 * other running threads change under our feet, so their free lists are checked only for the
 * calling thread, abandoned pages and sampled pages; the slice maps of every segment always,
 * and that every ordinary page in them has an owner or is abandoned. */
#include <stdio.h>
#include "internal.h"
#include "lumalloc.h"

struct check { int problems; int verbose; struct lum_heap *me; };

static void report(struct check *c, const char *what, const void *where)
{
    c->problems++;
    if (c->verbose) {
        char buf[160];
        snprintf(buf, sizeof buf, "lumalloc: heap check: %s at %p\n", what, where);
        lum_write_err(buf);
    }
}

static void check_free_list(struct check *c, struct lum_page *page)
{
    uint32_t n = 0;
    size_t span = (size_t)page->slices * LUM_SLICE_SIZE;
    for (lum_block *b = page->free; b; b = lum_free_next(page, b)) {
        uintptr_t off = (uintptr_t)b - (uintptr_t)page->start;
        if (off >= span || off % page->block_size) { report(c, "free-list entry outside its page or misaligned", b); return; }
        if ((off / page->block_size) >= page->carved) { report(c, "free-list entry in uncarved space", b); return; }
        if (++n > page->capacity) { report(c, "free list longer than the page (cycle?)", page); return; }
    }
    if (lum_page_live(page) + n > page->carved) report(c, "used + free exceeds carved blocks", page);
}

static void check_segment(struct lum_segment *seg, void *arg)
{
    struct check *c = arg;
    if (seg->kind != LUM_SEG_SMALL) { report(c, "segment with a bad kind", seg); return; }
    if (seg->free_slices & 1) report(c, "header slice marked free", seg);
    if (seg->slice_page[0] != &lum_invalid_sentinel) report(c, "header slice maps to a page", seg);
    /* every page struct below is reached through seg->pages: a wild one would send the checks
     * (and page_alloc) anywhere */
    if (seg->colour >= LUM_SEG_COLOURS || (uint8_t *)seg->pages != lum_seg_base(seg) + LUM_SEG_PAGES_AT(seg->colour)) {
        report(c, "page structs not where the segment's colour puts them", seg);
        return;
    }
    for (unsigned i = 1; i < LUM_SLICES;) {
        struct lum_page *page = seg->slice_page[i];
        bool free_bit = (seg->free_slices >> i) & 1;
        if (page == &lum_invalid_sentinel) {
            if (!free_bit) report(c, "slice neither free nor in a page", lum_seg_base(seg) + i * LUM_SLICE_SIZE);
            i++;
            continue;
        }
        if (free_bit) report(c, "free slice mapped to a page", lum_seg_base(seg) + i * LUM_SLICE_SIZE);
        if (page != &seg->pages[i]) { report(c, "slice map does not point at the span's head", page); i++; continue; }
        if (page->slices == 0 || i + page->slices > LUM_SLICES) { report(c, "page span out of range", page); i++; continue; }
        for (unsigned j = 1; j < page->slices; j++)
            if (seg->slice_page[i + j] != page) report(c, "span slice points elsewhere", page);
        if (page->block_size != lum_class_size[page->cls]) report(c, "block size does not match class", page);
        if (page->start != lum_seg_base(seg) + (size_t)i * LUM_SLICE_SIZE) report(c, "page start wrong", page);
        if (LUM_PEEK(page->carved) > page->capacity) report(c, "carved beyond capacity", page); /* the owner's */
        struct lum_heap *owner = atomic_load(&page->owner);
        if (page->kind == LUM_PAGE_SMALL && owner == c->me) check_free_list(c, page);
        if (page->kind == LUM_PAGE_SMALL && lum_page_fast(page) && lum_page_fast(page) != owner)
            report(c, "fast path owner differs from owner", page);
        /* one nobody will ever use or release (heap.c, abandon_locked) */
        if (page->kind == LUM_PAGE_SMALL && !owner && !page->abandoned)
            report(c, "page with no owner on no abandoned list", page);
        i += page->slices;
    }
}

static void check_sampled(struct lum_page *page, void *arg)
{
    check_free_list(arg, page);
}

void lum_sampled_for_each(void (*fn)(struct lum_page *, void *), void *arg);

LUM_EXPORT int lum_heap_check(int verbose)
{
    struct check c = { 0, verbose, lum_tls_heap };
    /* the slice maps with the abandoned lists held: a page goes without an owner between its
     * lists only under their lock */
    lum_lock(&lum_abandoned_lock);
    lum_segments_for_each(check_segment, &c);
    for (unsigned cls = 0; cls < LUM_CLASSES; cls++)
        for (struct lum_page *p = lum_abandoned[cls].head; p; p = p->next) {
            if (atomic_load(&p->owner)) report(&c, "abandoned page with an owner", p);
            if (p->cls != cls) report(&c, "abandoned page on the wrong class list", p);
        }
    lum_unlock(&lum_abandoned_lock);
    lum_sampled_for_each(check_sampled, &c);
    struct lum_heap *me = lum_tls_heap;
    if (me != &lum_empty_heap)
        for (unsigned cls = 0; cls < LUM_CLASSES; cls++) {
            struct lum_page *cur = me->current[cls];
            if (cur != &lum_empty_page && (cur->cls != cls || atomic_load(&cur->owner) != me))
                report(&c, "current page of another class or owner", cur);
        }
    return c.problems;
}
