/* Shared by the programs that core_bss_pages.sh, core_meta_pages.sh and core_text_mappings.sh
 * build: which physical page backs an address (/proc/self/pagemap), and a thread body that
 * runs small blocks through the allocator, sampled as a program's are. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* the page frame of the page at p: 0 absent, 1 present but unreadable frame (not root) */
static inline uint64_t page_frame(int pm, uintptr_t p)
{
    uint64_t e = 0;
    if (pread(pm, &e, 8, (off_t)(p / 4096 * 8)) != 8 || !(e >> 63)) return 0;
    e &= ((uint64_t)1 << 55) - 1;
    return e ? e : 1;
}

/* ~100 MiB through the small classes (~200 samples at the default interval), 64 blocks of
 * 16-1023 B live at a time, each written whole; with_calloc: about half of them from calloc. */
static inline unsigned long churn_small(uintptr_t seed, int with_calloc)
{
    uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 1;
    void *keep[64] = {0};
    unsigned long sum = 0;
    for (int i = 0; i < 200000; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        int k = (int)(s & 63);
        free(keep[k]);
        size_t sz = 16 + (s >> 8) % 1008;
        keep[k] = with_calloc && ((s >> 40) & 1) ? calloc(1, sz) : malloc(sz);
        memset(keep[k], (int)i, sz);
        sum += ((unsigned char *)keep[k])[0];
    }
    for (int k = 0; k < 64; k++) free(keep[k]);
    return sum;
}

/* rounds of n threads that start, run fn (arg: a seed of their own) and exit; then fn here */
static inline int run_rounds(int rounds, int n, void *(*fn)(void *))
{
    for (int round = 0; round < rounds; round++) {
        pthread_t t[16];
        for (int i = 0; i < n && i < 16; i++)
            if (pthread_create(&t[i], NULL, fn, (void *)(uintptr_t)(round * n + i + 1))) return 2;
        for (int i = 0; i < n && i < 16; i++) pthread_join(t[i], NULL);
    }
    fn((void *)99);
    return 0;
}
