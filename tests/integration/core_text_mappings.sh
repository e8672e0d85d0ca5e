#!/usr/bin/env bash
# liblumalloc.so maps its code in three executable mappings (lib/cold_text.ld): the hot text,
# the warm text (what small programs seldom run: large blocks, realloc's and memalign's kin,
# the background thread, fork...) and the cold text (reports, options given, failure
# injection).  The kernel makes every cached page of a touched 64 KiB window of a mapping
# resident, so a program that only mallocs, callocs and frees small blocks, in threads, with
# sampling on, must fault nothing in the warm and cold mappings (/proc/self/pagemap: no page
# present); a realloc then faults the warm one in, and the cold one stays out.  Every page of
# the hot mapping is resident in such a program, and in every bench workload: it may hold 14
# pages at most (17 before fork's lock handling, the background thread's start, realloc's growth
# in place and the loader walk of static programs went to the warm text, and the stack walk and
# the sampler's draws were built -O2).
# Usage: core_text_mappings.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

cat > "$work/prog.c" <<'EOF'
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "page_frames.h"
/* present pages of liblumalloc's n-th executable mapping (0 hot, 1 warm, 2 cold); -1: none */
static long present(int n)
{
    char line[512];
    long got = -1;
    int seen = 0, pm = open("/proc/self/pagemap", O_RDONLY);
    FILE *f = fopen("/proc/self/maps", "r");
    while (f && pm >= 0 && fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        char perm[8];
        if (!strstr(line, "liblumalloc") || sscanf(line, "%lx-%lx %7s", &lo, &hi, perm) != 3 || perm[2] != 'x')
            continue;
        if (seen++ != n) continue;
        got = 0;
        for (unsigned long p = lo; p < hi; p += 4096) {
            uint64_t e = 0;
            if (pread(pm, &e, 8, (off_t)(p / 4096 * 8)) == 8 && (e >> 63)) got++;
        }
    }
    if (f) fclose(f);
    if (pm >= 0) close(pm);
    return got;
}
static void *worker(void *arg)
{
    return (void *)churn_small((uintptr_t)arg, 1);
}
int main(void)
{
    if (run_rounds(3, 3, worker)) return 2; /* threads that start, sample and exit */
    printf("hot %ld warm %ld cold %ld\n", present(0), present(1), present(2));
    fflush(stdout);
    if (present(0) <= 0 || present(1) < 0 || present(2) < 0) return 3; /* three mappings */
    if (present(0) > 14) return 8;
    if (present(1) != 0) return 4;
    if (present(2) != 0) return 5;
    char *volatile p = malloc(100);
    p = realloc(p, 200000); /* realloc is warm: the check sees a warm fault */
    free(p);
    if (present(1) <= 0) return 6;
    if (present(2) != 0) return 7;
    return 0;
}
EOF
cc -O1 -I"$(dirname "$0")" -o "$work/prog" "$work/prog.c" -lpthread

. "$(dirname "$0")/run_with_defaults.inc"
run_with_defaults "$lib" "$work/prog"
case $rc in
    0) ;;
    3) fail "liblumalloc.so is not mapped as three executable mappings (hot, warm, cold)" ;;
    4) fail "malloc/calloc/free in threads faulted pages of the warm text in" ;;
    5) fail "malloc/calloc/free in threads faulted pages of the cold text in" ;;
    6) fail "realloc left the warm text untouched: the check cannot see it" ;;
    7) fail "realloc faulted the cold text in" ;;
    8) fail "more than 14 pages of hot text resident: code small programs never run belongs in the warm text (lib/CMakeLists.txt)" ;;
    *) fail "the program failed ($rc)" ;;
esac
echo "PASS"
