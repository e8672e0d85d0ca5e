/* Per-page free lists: carving fresh blocks lazily (so an untouched page costs no RSS) and
 * collecting blocks freed while the page had no owner. */
#include "internal.h"

/* Carve at most one OS page at a time: a fresh page is faulted in as it is used, and a class a
 * thread barely uses costs it 4 KiB, not more. */
#define CARVE_BYTES 4096

bool lum_page_refill(struct lum_page *page)
{
    if (page->carved >= page->capacity) return false;
    uint32_t n = CARVE_BYTES / page->block_size;
    if (n == 0) n = 1;
    if (n > page->capacity - page->carved) n = page->capacity - page->carved;
    size_t bs = page->block_size;
    uint8_t *first = page->start + (size_t)page->carved * bs;
    /* resident counts what the carve touches, first: a thread stopped here in a fork child has
     * its blocks counted (heap.c, page_recount) */
    lum_page_touch(page, (size_t)(page->carved + n) * bs);
#if LUM_HARDENED
    /* randomised slot order: the next block handed out is not the neighbour of the last */
    uint32_t order[CARVE_BYTES / LUM_ALIGN];
    for (uint32_t i = 0; i < n; i++) order[i] = i;
    uint64_t r = lum_hardened_random();
    for (uint32_t i = n - 1; i > 0; i--) {
        r ^= r << 13; r ^= r >> 7; r ^= r << 17;
        uint32_t j = (uint32_t)(r % (i + 1));
        uint32_t t = order[i]; order[i] = order[j]; order[j] = t;
    }
    for (uint32_t i = 0; i < n; i++) {
        lum_block *b = (lum_block *)(first + (size_t)order[i] * bs);
        lum_free_set_next(page, b, page->free);
        page->free = b;
    }
#else
    uint8_t *p = first;
    for (uint32_t i = 1; i < n; i++, p += bs) ((lum_block *)p)->next = (lum_block *)(p + bs);
    ((lum_block *)p)->next = page->free;
    page->free = (lum_block *)first;
#endif
    LUM_OWN_ADD(page->carved, n);
    return true;
}

uint32_t lum_page_collect(struct lum_page *page)
{
    /* nothing, or only the owner's full mark (1: heap.c), which stays */
    if ((uintptr_t)atomic_load_explicit(&page->thread_free, memory_order_relaxed) <= 1) return 0;
    lum_block *list = atomic_exchange_explicit(&page->thread_free, NULL, memory_order_acquire);
    uint32_t n = 0;
    /* thread_free is linked plainly (pushed by other threads); re-link onto the page list */
    while (list) {
        lum_block *next = list->next;
#if LUM_HARDENED
        lum_hardened_check_free(page, list);
#endif
        lum_free_set_next(page, list, page->free);
        page->free = list;
        list = next;
        n++;
    }
    LUM_OWN_SUB(page->used, n);
    return n;
}
