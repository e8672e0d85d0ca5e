/* lumalloc: the allocation API.  The standard names (malloc, free, ...) are provided by the
 * library when linked or LD_PRELOADed; these lum_-prefixed twins are always lumalloc's, so a
 * program can use both allocators side by side. */
#ifndef LUMALLOC_H
#define LUMALLOC_H

#include <stddef.h>
#include <stdio.h>
#include <malloc.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LUMALLOC_VERSION_MAJOR 0
#define LUMALLOC_VERSION_MINOR 1

void *lum_malloc(size_t size);
void *lum_calloc(size_t count, size_t size);
void *lum_realloc(void *ptr, size_t size);
void *lum_reallocarray(void *ptr, size_t count, size_t size);
void lum_free(void *ptr);
void lum_free_sized(void *ptr, size_t size);
void lum_free_aligned_sized(void *ptr, size_t alignment, size_t size);
void *lum_memalign(size_t alignment, size_t size);
int lum_posix_memalign(void **out, size_t alignment, size_t size);
void *lum_aligned_alloc(size_t alignment, size_t size);
void *lum_valloc(size_t size);
void *lum_pvalloc(size_t size);
size_t lum_malloc_usable_size(const void *ptr);
int lum_malloc_trim(size_t pad);
struct mallinfo2 lum_mallinfo2(void);
struct mallinfo lum_mallinfo(void); /* glibc's deprecated int form */
int lum_mallopt(int param, int value); /* accepted and ignored: glibc's tunables */
int lum_malloc_info(int options, FILE *fp); /* glibc-style XML with lumalloc's figures */

/* C23's sized frees, which glibc 2.36 does not declare yet; lumalloc provides them. */
void free_sized(void *ptr, size_t size);
void free_aligned_sized(void *ptr, size_t alignment, size_t size);

/* Returns free memory to the OS now: the calling thread's empty pages and cached blocks, every
 * free slice and empty segment, the cached large mappings and the pages exited threads left.
 * Other live threads' pages are theirs (their fast paths use them without a lock): what they
 * hold free goes back as they release it, and a thread that stays idle keeps its own (its
 * current page of each size class it used, and up to 1 MiB of empty pages).  Returns the bytes
 * released. */
size_t lum_purge(void);

/* Behaves as if the kernel had reported memory pressure: what lum_purge() releases, bar the
 * calling thread's own pages, goes back to the OS now (on the background thread if it runs).
 * For tests, and for programs with pressure signals of their own (cgroup v1
 * memory.pressure_level, an orchestrator's hint).  Returns the bytes released when done
 * synchronously, 0 when handed to the background thread. */
size_t lum_memory_pressure(void);

/* Non-zero once the background thread (decay and PSI) is running: bit 0 running, bit 1 a PSI
 * memory-pressure trigger is armed. */
int lum_background_running(void);

/* Walks all allocator metadata and checks its invariants.  Returns 0 when consistent, or the
 * number of problems found (each described on stderr when verbose is non-zero). */
int lum_heap_check(int verbose);

#ifdef __cplusplus
}
#endif
#endif
