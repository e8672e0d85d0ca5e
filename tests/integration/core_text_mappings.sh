#!/usr/bin/env bash
# liblumalloc.so maps its code in four executable mappings (lib/cold_text.ld): the hot text,
# the sample text (what runs only when a sample is taken: the stack walk, the point's draw,
# sampled pages), the warm text (what small programs seldom run: large blocks, realloc's and
# memalign's kin, the background thread, fork...) and the cold text (reports, options given,
# failure injection).  The kernel makes every cached page of a touched 64 KiB window of a
# mapping resident, so:
#  - a program that allocates nothing (start-up and exit alone, /bin/true) faults in the hot
#    text only;
#  - a program that only mallocs, callocs and frees small blocks, in threads, with sampling
#    off, faults nothing in the sample text either, nor in the cold text (the option's parsing
#    is warm code), also when its threads allocate more than 4 MiB each: a thread's count then
#    looks again through the sampler's entry (lum_malloc_sample), whose checks are hot text, as
#    are those of every thread's first malloc (before, both faulted the sample text in);
#  - the same with sampling on faults the sample text in, and nothing in the warm and cold
#    mappings (/proc/self/pagemap: no page present); a realloc then faults the warm one in,
#    and the cold one stays out.
# Every page of the hot and sample mappings is resident in a sampling program, and in every
# bench workload: 6 pages of hot text at most (7 before segment.c was built -Os), 7 of sample
# text.  Before the sample text had a mapping of its own the hot
# text was 14 pages (17 before fork's lock handling, the background thread's start, realloc's
# growth in place and the loader walk of static programs went to the warm text, and the stack
# walk and the sampler's draws were built -O2), all resident in /bin/true too.
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
enum { HOT, SAMPLE, WARM, COLD, MAPPINGS };
static const char *const names[MAPPINGS] = {"hot", "sample", "warm", "cold"};
static char maps[1 << 16];
/* present pages of liblumalloc's n-th executable mapping; -1: none.  Reads /proc/self/maps by
 * read(2) into a static buffer: no allocation (one could take a sample) before the checks. */
static long present(int n)
{
    int fd = open("/proc/self/maps", O_RDONLY), pm = open("/proc/self/pagemap", O_RDONLY);
    size_t len = 0;
    ssize_t r;
    while (fd >= 0 && len < sizeof maps - 1 && (r = read(fd, maps + len, sizeof maps - 1 - len)) > 0) len += (size_t)r;
    maps[len] = 0;
    long got = -1;
    int seen = 0;
    for (char *line = maps; pm >= 0 && line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        unsigned long lo, hi;
        char perm[8];
        char *end = strchr(line, '\n');
        if (end) *end = 0;
        int mine = strstr(line, "liblumalloc") && sscanf(line, "%lx-%lx %7s", &lo, &hi, perm) == 3 && perm[2] == 'x';
        if (end) *end = '\n';
        if (!mine || seen++ != n) continue;
        got = 0;
        for (unsigned long p = lo; p < hi; p += 4096) {
            uint64_t e = 0;
            if (pread(pm, &e, 8, (off_t)(p / 4096 * 8)) == 8 && (e >> 63)) got++;
        }
    }
    if (fd >= 0) close(fd);
    if (pm >= 0) close(pm);
    return got;
}
static void report(void)
{
    long p[MAPPINGS];
    for (int i = 0; i < MAPPINGS; i++) p[i] = present(i);
    char line[128];
    int k = snprintf(line, sizeof line, "%s %ld %s %ld %s %ld %s %ld\n", names[0], p[0], names[1], p[1], names[2],
                     p[2], names[3], p[3]);
    if (write(1, line, (size_t)k) != k) exit(9);
}
static void *worker(void *arg)
{
    return (void *)churn_small((uintptr_t)arg, 1);
}
/* ~6 MiB of small blocks, malloc and calloc, 32 live: with sampling off a thread's count runs
 * 4 MiB before it looks again (LUM_SAMPLE_RECHECK), through the sampler's entry */
static void *light_worker(void *arg)
{
    void *keep[32] = {0};
    unsigned long sum = 0;
    for (unsigned i = 0; i < 12000; i++) {
        unsigned k = (i * 7 + (unsigned)(uintptr_t)arg) & 31;
        size_t sz = 16 + (i * 131) % 1008;
        free(keep[k]);
        keep[k] = i & 1 ? calloc(1, sz) : malloc(sz);
        memset(keep[k], (int)i, sz);
        sum += ((unsigned char *)keep[k])[0];
    }
    for (int k = 0; k < 32; k++) free(keep[k]);
    return (void *)sum;
}
int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    report();
    for (int i = 0; i < MAPPINGS; i++)
        if (present(i) < 0) return 3; /* four mappings */
    if (present(HOT) > 6 || present(SAMPLE) > 7) return 8; /* whole, once touched */
    if (!strcmp(mode, "idle")) /* no allocation: start-up alone */
        return present(SAMPLE) || present(WARM) || present(COLD) ? 10 : 0;
    int light = !strcmp(mode, "nosample");
    if (run_rounds(3, 3, light ? light_worker : worker)) return 2; /* threads that start, (sample) and exit */
    report();
    if (light) return present(SAMPLE) ? 11 : present(COLD) ? 14 : 0;
    if (present(HOT) > 6 || present(SAMPLE) > 7) return 8;
    if (present(SAMPLE) <= 0) return 12;
    /* callocs of page-sized blocks (lazy clearing) and pages of one block going back (the
     * first purge probes MADV_DONTNEED) are hot too */
    for (int i = 0; i < 8; i++) {
        char *volatile c = calloc(1, 8192), *volatile d = calloc(1, 100000 + 20000 * (size_t)i); /* one-block pages, not large blocks (warm) */
        if (!c || !d || c[8191] || d[99999]) return 13;
        free(c);
        free(d);
    }
    if (present(WARM) != 0) return 4;
    if (present(COLD) != 0) return 5;
    char *volatile p = malloc(100);
    p = realloc(p, 200000); /* realloc is warm: the check sees a warm fault */
    free(p);
    if (present(WARM) <= 0) return 6;
    if (present(COLD) != 0) return 7;
    return 0;
}
EOF
cc -O1 -I"$(dirname "$0")" -o "$work/prog" "$work/prog.c" -lpthread

. "$(dirname "$0")/run_with_defaults.inc"
check() {
    case $rc in
        0) ;;
        3) fail "liblumalloc.so is not mapped as four executable mappings (hot, sample, warm, cold)" ;;
        4) fail "malloc/calloc/free in threads faulted pages of the warm text in" ;;
        5) fail "malloc/calloc/free in threads faulted pages of the cold text in" ;;
        6) fail "realloc left the warm text untouched: the check cannot see it" ;;
        7) fail "realloc faulted the cold text in" ;;
        8) fail "more than 6 pages of hot or 7 of sample text: code small programs never run belongs in the warm text, code only a sample runs in the sample text (lib/CMakeLists.txt)" ;;
        10) fail "a program that allocates nothing faulted text other than the hot text in" ;;
        11) fail "with sampling off, malloc/calloc/free in threads faulted the sample text in" ;;
        13) fail "calloc of page-sized blocks returned memory that is not zero" ;;
        14) fail "with an option given (sampling off), the cold text was faulted in: parsing an option is warm code (lib/CMakeLists.txt)" ;;
        12) fail "with sampling on, nothing faulted the sample text in: the check cannot see it" ;;
        *) fail "the program failed ($rc)" ;;
    esac
}
run_with_defaults "$lib" "$work/prog"
check
# an option given: sampling off (the option's parsing runs warm code, none of the cold)
rc=0
env $(env | sed -n 's/^\(LUMALLOC_[A-Z_]*\)=.*/-u \1/p') LUMALLOC_SAMPLE_INTERVAL=0 LD_PRELOAD="$lib" "$work/prog" nosample || rc=$?
check
rc=0
env $(env | sed -n 's/^\(LUMALLOC_[A-Z_]*\)=.*/-u \1/p') LD_PRELOAD="$lib" "$work/prog" idle || rc=$?
check
echo "PASS"
