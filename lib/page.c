/* Per-page free lists: carving fresh blocks lazily (so an untouched page costs no RSS) and
 * collecting blocks freed while the page had no owner. */
#include "internal.h"

/* Carve at most this many bytes at a time: a fresh page is faulted in as it is used. */
#define CARVE_BYTES 8192

bool lum_page_refill(struct lum_page *page)
{
    if (page->carved >= page->capacity) return false;
    uint32_t n = CARVE_BYTES / page->block_size;
    if (n == 0) n = 1;
    if (n > page->capacity - page->carved) n = page->capacity - page->carved;
    size_t bs = page->block_size;
    uint8_t *first = page->start + (size_t)page->carved * bs;
    uint8_t *p = first;
    for (uint32_t i = 1; i < n; i++, p += bs) ((lum_block *)p)->next = (lum_block *)(p + bs);
    ((lum_block *)p)->next = page->free;
    page->free = (lum_block *)first;
    page->carved += n;
    return true;
}

uint32_t lum_page_collect(struct lum_page *page)
{
    if (!atomic_load_explicit(&page->thread_free, memory_order_relaxed)) return 0;
    lum_block *list = atomic_exchange_explicit(&page->thread_free, NULL, memory_order_acquire);
    if (!list) return 0;
    uint32_t n = 1;
    lum_block *last = list;
    while (last->next) { last = last->next; n++; }
    last->next = page->free;
    page->free = list;
    page->used -= n;
    return n;
}
