/* Per-page free lists: carving fresh blocks lazily (so an untouched page costs no RSS) and
 * collecting the blocks other threads freed into the page (its thread_free list). */
#include <string.h>
#include "internal.h"

__thread struct lum_fresh_carve lum_tls_fresh __attribute__((tls_model("initial-exec")));

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
    size_t from = (size_t)page->carved * bs;
    uint8_t *first = page->start + from;
    /* resident counts what the carve touches, first: a thread stopped here in a fork child has
     * its blocks counted (heap.c, page_recount) */
    size_t recorded = lum_page_touch(page, from + (size_t)n * bs);
#if !LUM_HARDENED
    /* A block carved alone (4 KiB and up) is the one its owner's allocation takes next, from
     * the list it heads: past its slices' records before the carve it was never written since
     * the memory was mapped or given back with MADV_DONTNEED, and is zero but for the link
     * written below.  Python 3.11 callocs 128 and 256 KiB at start-up and uses little of them:
     * cleared whole, 96 pages resident for good (glibc's calloc knows fresh memory too).  Not
     * once any page given back may have kept its bytes, nor in a fork child
     * (lum_zero_distrust), nor for a page the thread does not own (a
     * sampled page's blocks are popped by any thread). */
    if (n == 1 && !__atomic_load_n(&lum_zero_distrust, __ATOMIC_RELAXED) &&
        atomic_load_explicit(&page->owner, memory_order_relaxed) == lum_tls_heap) {
        lum_tls_fresh.block = first;
        lum_tls_fresh.dirty = recorded > from + sizeof(lum_block) ? recorded - from : sizeof(lum_block);
    }
#else
    (void)recorded; /* hardened blocks are cleared whole: their lists are encoded, their order random */
#endif
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

/* A page's free list comes back in the order its blocks were freed, which for a program that
 * drops much of its data and builds it again is any order: the objects it then allocates one
 * after another, and walks in that order, lie scattered over the page instead of side by side,
 * a cache line and often a TLB entry apart each.  jemalloc hands a slab's lowest free region
 * out first and keeps that order by construction.  Here the list is put in address order once,
 * when the page becomes its heap's current page again: python3 with PYTHONMALLOC=malloc (bench
 * python-malloc, scale 0.3) takes 300-360 ms of user time instead of 380-440 (jemalloc
 * 340-405).  ~35 instructions a free block, so only for a page worth it (heap_next_page).
 * Not in hardened builds, whose lists are randomised on purpose. */
void lum_page_order_free(struct lum_page *page)
{
#if !LUM_HARDENED
    uint64_t bits[LUM_SLICE_SIZE / LUM_ALIGN / 64];
    uint32_t words = (page->carved + 63) / 64;
    if (!page->free || words > sizeof bits / sizeof bits[0]) return;
    memset(bits, 0, words * sizeof bits[0]);
    uint8_t *start = page->start;
    size_t bs = page->block_size;
    /* offset / bs as a multiplication, exact for a multiple of bs below 4 GiB (a page's
     * blocks are within 4 MiB) */
    uint64_t inverse = ((uint64_t)1 << 32) / bs + 1;
    size_t carved_bytes = (size_t)page->carved * bs;
    for (lum_block *b = page->free; b; b = b->next) {
        size_t offset = (size_t)((uintptr_t)b - (uintptr_t)start);
        uint64_t i = offset < carved_bytes ? (offset * inverse) >> 32 : UINT64_MAX;
        uint64_t bit = (uint64_t)1 << (i % 64);
        /* A list a stray write or a double free damaged (a link out of the page, a block met
         * twice: a loop) is left as it is, nothing changed yet: the walk ends, and nothing is
         * written outside bits. */
        if (i >= page->carved || (bits[i / 64] & bit)) return;
        bits[i / 64] |= bit;
    }
    /* From here the blocks' links are rewritten in place.  A fork child that copies the page
     * meanwhile follows the old links from the old head until it meets a block already
     * relinked, then the new ones: a list without loops or repeats, only shorter.  It counts
     * what it lacks as live, so at most one page's free blocks leak there, and none is handed
     * out twice. */
    lum_block *head = NULL;
    /* pushed from the highest address down, so the list runs upwards */
    for (uint32_t w = words; w-- > 0;) {
        for (uint64_t m = bits[w]; m;) {
            unsigned top = 63 - (unsigned)__builtin_clzll(m);
            m &= ~((uint64_t)1 << top);
            lum_block *b = (lum_block *)(start + ((size_t)w * 64 + top) * bs);
            b->next = head;
            head = b;
        }
    }
    page->free = head;
#else
    (void)page;
#endif
}

uint32_t lum_page_collect(struct lum_page *page)
{
    /* nothing, or only the owner's full mark (1: heap.c), which stays */
    if ((uintptr_t)atomic_load_explicit(&page->thread_free, memory_order_relaxed) <= 1) return 0;
    lum_block *list = atomic_exchange_explicit(&page->thread_free, NULL, memory_order_acquire);
    uint32_t n = 0;
    /* thread_free is linked as other threads push (lum_remote_set_next); re-link onto the page list */
    while (list) {
        lum_block *next = lum_remote_next(list);
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
