#!/usr/bin/env bash
# liblumalloc.so's .bss is laid out (lib/cold_text.ld, lib/CMakeLists.txt) so that the
# variables every program writes are one run after .data, followed by the arrays of which a
# program writes the first entries only (the unwinder's caches) and then what only cold code
# writes: a program of small blocks, in threads that start and exit, with sampling on (its
# stacks run through two objects, itself and libc), writes 2 pages of it past .data's page.
# Big arrays in the middle of that run cost a page each: 7 pages were written before, 3 while
# the sampled pages' lists were kept per class rather than per sampled class (lib/internal.h,
# LUM_SAMPLED_SLOTS) and the unwinder's caches began a page further on.  Pages
# written are those present in /proc/self/pagemap with a frame other than the shared zero page
# (a read of an untouched page maps that one, and costs nothing).
# Usage: core_bss_pages.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

cat > "$work/prog.c" <<'EOF'
#define _GNU_SOURCE
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "page_frames.h"
static uintptr_t bss_lo, bss_hi; /* the library's .bss past the file's last page */
static int find_lib(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size, (void)arg;
    if (!strstr(info->dlpi_name, "liblumalloc")) return 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_W)) continue;
        uintptr_t a = info->dlpi_addr + ph->p_vaddr;
        bss_lo = (a + ph->p_filesz + 4095) & ~(uintptr_t)4095;
        bss_hi = (a + ph->p_memsz + 4095) & ~(uintptr_t)4095;
    }
    return 1;
}
static void *worker(void *arg)
{
    return (void *)churn_small((uintptr_t)arg, 0);
}
int main(void)
{
    if (run_rounds(2, 2, worker)) return 2; /* threads that start, sample and exit */
    dl_iterate_phdr(find_lib, NULL);
    int pm = open("/proc/self/pagemap", O_RDONLY);
    volatile char *z = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!bss_lo || bss_hi <= bss_lo || pm < 0 || z == MAP_FAILED) return 3;
    (void)z[0]; /* maps the zero page */
    uint64_t zero = page_frame(pm, (uintptr_t)z);
    if (zero <= 1) return 4; /* frames unreadable: cannot tell the zero page */
    int written = 0;
    printf("bss pages written:");
    for (uintptr_t p = bss_lo; p < bss_hi; p += 4096) {
        uint64_t f = page_frame(pm, p);
        if (f && f != zero) written++, printf(" +0x%lx", (unsigned long)(p - bss_lo));
    }
    printf(" (%d of %lu)\n", written, (unsigned long)((bss_hi - bss_lo) / 4096));
    return written <= 2 ? 0 : 5;
}
EOF
cc -O1 -I"$(dirname "$0")" -o "$work/prog" "$work/prog.c" -lpthread

. "$(dirname "$0")/run_with_defaults.inc"
run_with_defaults "$lib" "$work/prog"
case $rc in
    0) ;;
    3) fail "liblumalloc.so's .bss not found" ;;
    4) [ "${CI:-}" = true ] && fail "page frames unreadable (CI runs as root: they must be readable)"
       echo "SKIP: page frames unreadable (needs root)"; exit 0 ;;
    5) fail "a program of small blocks wrote more than 2 pages of the library's .bss" ;;
    *) fail "the program failed ($rc)" ;;
esac
echo "PASS"
