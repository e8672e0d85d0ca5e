/* Internal memory for metadata (heaps, profiler tables): size-segregated free lists over mmap'd
 * chunks, so nothing inside the allocator ever calls malloc. */
#include <string.h>
#include "internal.h"

#define META_CHUNK ((size_t)1 << 20)
#define META_CLASSES 24 /* powers of two from 16 B to 128 MiB; larger go straight to mmap */

lum_lock_t lum_meta_lock;
static void *meta_free_list[META_CLASSES];
static uint8_t *meta_bump, *meta_end;

static unsigned meta_class(size_t size)
{
    unsigned c = 0;
    while (((size_t)16 << c) < size) c++;
    return c;
}

void *lum_meta_alloc(size_t size)
{
    if (size == 0) size = 1;
    unsigned c = meta_class(size);
    size_t bytes = (size_t)16 << c;
    if (c >= META_CLASSES || bytes > META_CHUNK / 4) {
        void *p = lum_os_map((size + 4095) & ~(size_t)4095);
        if (p) {
            lum_os_account(0, (int64_t)((size + 4095) & ~(size_t)4095));
            lum_count_global(&lumalloc_registry.global.metadata_bytes, (int64_t)((size + 4095) & ~(size_t)4095));
            lum_os_name(p, (size + 4095) & ~(size_t)4095, "lumalloc-meta");
        }
        return p;
    }
    lum_lock(&lum_meta_lock);
    void *p = meta_free_list[c];
    if (p) {
        meta_free_list[c] = *(void **)p;
        lum_unlock(&lum_meta_lock);
        memset(p, 0, bytes);
        return p;
    }
    /* Blocks of a page or more start on a page: a heap record (8 KiB class, 5.5 KiB used)
     * then touches the pages it uses and no neighbour's (the gap is address space only). */
    uint8_t *at = meta_bump;
    if (at && bytes >= 4096) at = (uint8_t *)(((uintptr_t)at + 4095) & ~(uintptr_t)4095);
    if (!meta_bump || (size_t)(meta_end - at) < bytes) {
        uint8_t *chunk = lum_os_map(META_CHUNK);
        if (!chunk) { lum_unlock(&lum_meta_lock); return NULL; }
        lum_os_name(chunk, META_CHUNK, "lumalloc-meta");
        lum_os_account(0, (int64_t)META_CHUNK);
        lum_count_global(&lumalloc_registry.global.metadata_bytes, (int64_t)META_CHUNK);
        meta_bump = at = chunk;
        meta_end = chunk + META_CHUNK;
    }
    p = at;
    meta_bump = at + bytes;
    lum_unlock(&lum_meta_lock);
    return p; /* fresh mmap memory is zero */
}

void lum_meta_free(void *p, size_t size)
{
    if (!p) return;
    if (size == 0) size = 1;
    unsigned c = meta_class(size);
    size_t bytes = (size_t)16 << c;
    if (c >= META_CLASSES || bytes > META_CHUNK / 4) {
        size_t len = (size + 4095) & ~(size_t)4095;
        lum_count_global(&lumalloc_registry.global.metadata_bytes, -(int64_t)len);
        lum_os_unmap(p, len, len);
        return;
    }
    lum_lock(&lum_meta_lock);
    *(void **)p = meta_free_list[c];
    meta_free_list[c] = p;
    lum_unlock(&lum_meta_lock);
}
