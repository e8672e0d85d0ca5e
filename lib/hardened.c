/* Hardened builds only (liblumalloc-hardened): detection of double and invalid frees, free-list
 * corruption and foreign pointers, each reported with the address and the block size before
 * abort(); guard pages and randomised slot order are set up by the segment and page code. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/random.h>
#include "internal.h"

#if LUM_HARDENED

/* One bit per 4 MiB of the 47-bit user address space (4 MiB of bitmap, reserved, not touched
 * until used): free() asks it before reading any metadata through a pointer. */
#define OWN_BITS ((uint64_t)1 << (47 - LUM_SEGMENT_SHIFT))
static uint64_t *_Atomic own_map;

static uint64_t *own_bitmap(void)
{
    uint64_t *map = atomic_load_explicit(&own_map, memory_order_acquire);
    if (map) return map;
    map = mmap(NULL, OWN_BITS / 8, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED) return NULL;
    uint64_t *expected = NULL;
    if (!atomic_compare_exchange_strong(&own_map, &expected, map)) {
        munmap(map, OWN_BITS / 8);
        map = expected;
    }
    return map;
}

void lum_hardened_own(uintptr_t base, bool owned)
{
    uint64_t *map = own_bitmap();
    uint64_t bit = base >> LUM_SEGMENT_SHIFT;
    if (!map || bit >= OWN_BITS) return;
    uint64_t mask = (uint64_t)1 << (bit & 63);
    if (owned)
        __atomic_fetch_or(&map[bit >> 6], mask, __ATOMIC_RELEASE);
    else
        __atomic_fetch_and(&map[bit >> 6], ~mask, __ATOMIC_RELEASE);
}

bool lum_hardened_owned(uintptr_t base)
{
    uint64_t *map = atomic_load_explicit(&own_map, memory_order_acquire);
    uint64_t bit = base >> LUM_SEGMENT_SHIFT;
    if (!map || bit >= OWN_BITS) return false;
    return (__atomic_load_n(&map[bit >> 6], __ATOMIC_ACQUIRE) >> (bit & 63)) & 1;
}

uint64_t lum_hardened_random(void)
{
    static _Atomic uint64_t state;
    uint64_t s = atomic_load_explicit(&state, memory_order_relaxed);
    if (!s) {
        uint64_t seed = 0;
        if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) != sizeof seed)
            seed = (uint64_t)(uintptr_t)&seed ^ __builtin_ia32_rdtsc();
        uint64_t expected = 0;
        atomic_compare_exchange_strong(&state, &expected, seed | 1);
    }
    /* splitmix64 over a shared counter: distinct values for concurrent callers */
    uint64_t z = atomic_fetch_add_explicit(&state, 0x9e3779b97f4a7c15ULL, memory_order_relaxed);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static char *put_hex(char *m, uintptr_t v)
{
    static const char hex[] = "0123456789abcdef";
    *m++ = '0';
    *m++ = 'x';
    for (int shift = 60; shift >= 0; shift -= 4) *m++ = hex[(v >> shift) & 15];
    return m;
}

static char *put_dec(char *m, size_t v)
{
    char tmp[24];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) *m++ = tmp[--n];
    return m;
}

void lum_hardened_fail(const char *what, const void *p, size_t size)
{
    char msg[256];
    char *m = msg;
    const char *prefix = "lumalloc: ";
    while (*prefix) *m++ = *prefix++;
    while (*what && m < msg + 160) *m++ = *what++;
    *m++ = ' ';
    m = put_hex(m, (uintptr_t)p);
    if (size) {
        const char *s = " (block size ";
        while (*s) *m++ = *s++;
        m = put_dec(m, size);
        *m++ = ')';
    }
    *m++ = '\n';
    *m = 0;
    lum_write_err(msg);
    abort();
}

void lum_hardened_check_free(const struct lum_page *page, const void *p)
{
    lum_hardened_check_block(page, p, "invalid free (not the start of a block) at", "double free of");
}

void lum_hardened_check_block(const struct lum_page *page, const void *p, const char *interior, const char *freed)
{
    uintptr_t off = (uintptr_t)p - (uintptr_t)page->start;
    if (off % page->block_size || off >= (uintptr_t)page->carved * page->block_size)
        lum_hardened_fail(interior, p, page->block_size);
    /* A free block's first word decodes to NULL or to a block of the same page; ordinary data
     * almost never does, so only then is the free list walked to confirm. */
    uintptr_t v = (uintptr_t)((const lum_block *)p)->next ^ page->key ^ ((uintptr_t)p >> 4);
    uintptr_t voff = v - (uintptr_t)page->start;
    if (v == 0 || (voff < (uintptr_t)page->slices * LUM_SLICE_SIZE && voff % page->block_size == 0)) {
        uint32_t n = 0;
        for (const lum_block *b = page->free; b && n <= page->capacity; b = lum_free_next(page, b), n++)
            if (b == p) lum_hardened_fail(freed, p, page->block_size);
    }
}

#endif
