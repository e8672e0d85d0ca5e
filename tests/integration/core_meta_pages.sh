#!/usr/bin/env bash
# A thread's heap record is 6 KiB, 4 KiB-aligned (lib/meta.c), and laid out so that its first
# page holds everything a thread that allocates nothing above 4 KiB writes (struct lum_heap in
# lib/internal.h): the page lists of the bigger classes and the full lists come last, on the
# second page.  A program of small blocks, with sampling on and a stdio buffer (the 4 KiB
# class), must leave that second page out of its RSS: /proc/self/pagemap shows it absent or
# mapped to the shared zero page (a read of the untouched lists maps it, and costs nothing),
# never a page of its own.  The record is found through the registry the tools read: the
# newest thread's counters (threads_head) lie in the record's first page.
# Usage: core_meta_pages.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
src=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

cat > "$work/prog.c" <<'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "lumalloc_probes.h"
#include "page_frames.h"
int main(void)
{
    uint64_t s = 88172645463325252ULL;
    void *keep[32] = {0};
    unsigned long sum = 0;
    for (int i = 0; i < 100000; i++) { /* ~50 MiB through classes up to 1 KiB: ~100 samples */
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        int k = (int)(s & 31);
        free(keep[k]);
        size_t sz = 16 + (s >> 8) % 1008;
        keep[k] = malloc(sz);
        memset(keep[k], (int)i, sz);
        sum += ((unsigned char *)keep[k])[0];
    }
    for (int k = 0; k < 32; k++) free(keep[k]);
    printf("sum %lu\n", sum); /* stdout's buffer: a 4 KiB block */
    fflush(stdout);
    struct lum_registry_v1 *reg = dlsym(RTLD_DEFAULT, "lumalloc_registry");
    if (!reg || !reg->threads_head) return 2;
    uintptr_t second = ((uintptr_t)reg->threads_head & ~(uintptr_t)4095) + 4096;
    int pm = open("/proc/self/pagemap", O_RDONLY);
    volatile char *z = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pm < 0 || z == MAP_FAILED) return 3;
    (void)z[0]; /* maps the zero page */
    uint64_t zero = page_frame(pm, (uintptr_t)z), f = page_frame(pm, second);
    printf("heap record second page: frame %llu (zero page %llu)\n", (unsigned long long)f,
           (unsigned long long)zero);
    if (zero <= 1) return 4; /* frames unreadable: cannot tell the zero page */
    return f == 0 || f == zero ? 0 : 5;
}
EOF
cc -O1 -I"$src/include" -I"$(dirname "$0")" -o "$work/prog" "$work/prog.c" -ldl

. "$(dirname "$0")/run_with_defaults.inc"
run_with_defaults "$lib" "$work/prog"
case $rc in
    0) ;;
    2) fail "no thread in lumalloc_registry" ;;
    4) [ "${CI:-}" = true ] && fail "page frames unreadable (CI runs as root: they must be readable)"
       echo "SKIP: page frames unreadable (needs root)"; exit 0 ;;
    5) fail "a program of small blocks wrote its heap record's second page" ;;
    *) fail "the program failed ($rc)" ;;
esac
echo "PASS"
