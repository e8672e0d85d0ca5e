/* Thin wrappers over the kernel's memory calls, with the allocator's global accounting. */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>
#include "internal.h"

#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif

void *lum_os_map(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) return NULL;
    lum_os_account((int64_t)size, 0);
    return p;
}

/* Where the next aligned mapping probably fits: asking for it first usually costs one mmap
 * instead of an over-sized map and two trims. */
static _Atomic uintptr_t aligned_hint;

/* The hint after a mapping that ends at end: the next segment boundary, which suits every
 * alignment asked here (the end of a large block, rarely aligned, cost every next mapping an
 * mmap and a munmap at the hint before the over-sized map). */
static inline uintptr_t next_hint(uintptr_t end)
{
    return (end + LUM_SEGMENT_MASK) & ~(uintptr_t)LUM_SEGMENT_MASK;
}

void *lum_os_map_aligned(size_t size, size_t alignment)
{
    uintptr_t hint = atomic_load_explicit(&aligned_hint, memory_order_relaxed);
    if (hint && alignment <= LUM_SEGMENT_SIZE) {
        void *p = mmap((void *)hint, size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
        if (p != MAP_FAILED) {
            if (((uintptr_t)p & (alignment - 1)) == 0) {
                atomic_store_explicit(&aligned_hint, next_hint((uintptr_t)p + size), memory_order_relaxed);
                lum_os_account((int64_t)size, 0);
                return p;
            }
            munmap(p, size); /* old kernels treat the flag as a hint */
        }
    }
    if (size + alignment < size) return NULL;
    size_t over = size + alignment;
    uint8_t *raw = mmap(NULL, over, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    uint8_t *aligned = (uint8_t *)(((uintptr_t)raw + alignment - 1) & ~(uintptr_t)(alignment - 1));
    if (aligned > raw) munmap(raw, (size_t)(aligned - raw));
    size_t tail = (size_t)((raw + over) - (aligned + size));
    if (tail) munmap(aligned + size, tail);
    if (alignment <= LUM_SEGMENT_SIZE)
        atomic_store_explicit(&aligned_hint, next_hint((uintptr_t)aligned + size), memory_order_relaxed);
    lum_os_account((int64_t)size, 0);
    return aligned;
}

/* The accounting model: mapping adds address space (mapped, and retained until touched);
 * memory becomes resident when lumalloc touches it or hands it out, and goes back to retained
 * when purged.  A large block or a metadata chunk counts whole when handed out (the program or
 * the metadata writes it); a page of a size class counts what it has carved, 4 KiB at a time
 * (segment.c, lum_page_touch).  resident is thus lumalloc's share of RSS to 4 KiB granularity
 * for segment memory, without counting address space nobody has touched.
 *
 * lum_committed_bytes is the older, coarser figure the heuristics were tuned with (the dirty
 * limit, the large cache's room): a page's slices count whole from when a thread takes it, as
 * resident_bytes did before it tracked carving.  It moves with resident everywhere but for the
 * slices of pages (lum_os_account_slices).  Relaxed atomics; read racily. */
size_t lum_committed_bytes;

void lum_os_account(int64_t mapped, int64_t resident)
{
    if (mapped) lum_count_global(&lumalloc_registry.global.mapped_bytes, mapped);
    if (resident) {
        lum_count_global(&lumalloc_registry.global.resident_bytes, resident);
        __atomic_add_fetch(&lum_committed_bytes, (size_t)resident, __ATOMIC_RELAXED);
    }
    if (mapped - resident) lum_count_global(&lumalloc_registry.global.retained_bytes, mapped - resident);
}

/* Slices of pages: resident moves by what was touched or given back (retained the other way),
 * committed by whole slices taken or purged. */
void lum_os_account_slices(int64_t resident, int64_t committed)
{
    if (resident) {
        lum_count_global(&lumalloc_registry.global.resident_bytes, resident);
        lum_count_global(&lumalloc_registry.global.retained_bytes, -resident);
    }
    if (committed) __atomic_add_fetch(&lum_committed_bytes, (size_t)committed, __ATOMIC_RELAXED);
}

void lum_os_unmap(void *p, size_t size, size_t resident)
{
    munmap(p, size);
    lum_os_account(-(int64_t)size, -(int64_t)resident);
}

/* Named anonymous mappings show up as [anon:lumalloc-...] in /proc/PID/maps and smaps (5.17+). */
void lum_os_name(void *p, size_t size, const char *name)
{
    static int unsupported;
    if (unsupported) return;
    int caller_errno = errno; /* a name is a nicety: its failure is no news to malloc's caller */
    if (prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, (unsigned long)p, size, (unsigned long)name) != 0
        && errno == EINVAL)
        unsupported = 1;
    errno = caller_errno;
}

#if defined(__SANITIZE_THREAD__)
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
static char remap_order;
#endif

/* mremap, in an order ThreadSanitizer can see: it does not intercept mremap, so the shadow of
 * a range moved away keeps the accesses made there, and the block that later grows over the
 * address in place (or is cut from such a block) looks as if it raced with them.  The kernel
 * orders the calls (mmap_lock); each one here releases what its thread did before and
 * acquires what the calls before it released.  Nothing is emitted outside TSan builds. */
void *lum_os_remap(void *old, size_t old_size, size_t new_size, int flags, void *new_addr)
{
#if defined(__SANITIZE_THREAD__)
    __tsan_release(&remap_order);
#endif
    void *p = mremap(old, old_size, new_size, flags, new_addr);
#if defined(__SANITIZE_THREAD__)
    __tsan_acquire(&remap_order);
#endif
    return p;
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* Faults in [p, p + size) writable in one call (5.14+; before, the pages fault one by one as
 * they would have). */
void lum_os_populate(void *p, size_t size)
{
    static int unsupported;
    if (unsupported) return;
    /* a hint: its failure (ENOMEM in a cgroup at its limit) leaves the pages to fault as they
     * would have, and the successful realloc the caller's errno */
    int saved = errno;
    if (madvise(p, size, MADV_POPULATE_WRITE) != 0 && errno == EINVAL) unsupported = 1;
    errno = saved;
}

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif

/* A page that faults on any access: MADV_GUARD_INSTALL (6.13+) needs no VMA of its own;
 * mprotect is the fallback everywhere else. */
void lum_os_guard(void *p, size_t size)
{
    static int no_guard_advice;
    if (!no_guard_advice && madvise(p, size, MADV_GUARD_INSTALL) == 0) return;
    no_guard_advice = 1;
    mprotect(p, size, PROT_NONE);
}

uint64_t lum_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

void lum_write_err(const char *msg)
{
    size_t n = strlen(msg);
    while (n) {
        ssize_t w = write(2, msg, n);
        if (w <= 0) { if (w < 0 && errno == EINTR) continue; return; }
        msg += w;
        n -= (size_t)w;
    }
}
