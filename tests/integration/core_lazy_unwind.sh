#!/usr/bin/env bash
# lumalloc unwinds with its own .eh_frame reader and names functions with its own ELF symbol
# reader: libunwind is not a link dependency, and under LD_PRELOAD=liblumalloc.so a process maps
# neither libunwind nor liblzma, with sampling off, on from the start, or switched on at run time
# (in a fork child too), while its samples get stacks, nor after writing a report that names
# churn(), a static function only .symtab knows.
# Usage: core_lazy_unwind.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

readelf -d "$lib" | grep -q 'NEEDED.*libunwind' && fail "liblumalloc.so still has a DT_NEEDED entry for libunwind"

cat > "$work/prog.c" <<'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
static int mapped(const char *what)
{
    char line[512];
    int n = 0;
    FILE *f = fopen("/proc/self/maps", "r");
    while (fgets(line, sizeof line, f)) n += strstr(line, what) != NULL;
    fclose(f);
    return n > 0;
}
static void churn(void)
{
    for (int i = 0; i < 20000; i++) {
        char *volatile p = malloc(1000);
        p[0] = 1;
        free(p);
    }
}
/* frames unwound so far (lum_prof_get_stats: struct lum_prof_stats, unwind_frames is 9th) */
static unsigned long long frames_unwound(void)
{
    unsigned long long st[16] = {0};
    void (*get)(void *) = (void (*)(void *))dlsym(RTLD_DEFAULT, "lum_prof_get_stats");
    if (!get) return 0;
    get(st);
    return st[8];
}
int main(int argc, char **argv)
{
    (void)argc;
    if (!strcmp(argv[1], "off") || !strcmp(argv[1], "on")) { /* whatever sampling does */
        churn();
        if (!strcmp(argv[1], "on") && frames_unwound() < 100) return 9;
        if (mapped("libunwind") || mapped("liblzma")) return 1;
        if (!strcmp(argv[1], "on")) { /* a report that names functions, written in-process */
            int (*dump)(const char *, int) = (int (*)(const char *, int))dlsym(RTLD_DEFAULT, "lum_prof_dump");
            if (!dump || dump(argv[2], 0) != 0) return 10;
            if (mapped("libunwind") || mapped("liblzma")) return 11;
        }
        return 0;
    }
    /* "late": sampling off at start, switched on at run time; first sample in a fork child */
    int (*set)(const char *, const char *) = (int (*)(const char *, const char *))dlsym(RTLD_DEFAULT, "lum_options_set");
    if (!set || set("sample_interval", "64k") != 0) return 7;
    pid_t pid = fork();
    if (pid == 0) {
        churn();
        if (frames_unwound() < 100) exit(9);
        exit(mapped("libunwind") || mapped("liblzma") ? 3 : 0);
    }
    int st;
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st)) return 4;
    if (WEXITSTATUS(st)) return WEXITSTATUS(st);
    churn();
    return mapped("libunwind") || mapped("liblzma") ? 5 : 0;
}
EOF
cc -O1 -o "$work/prog" "$work/prog.c" -ldl

rc=0
timeout 60 env LUMALLOC_SAMPLE_INTERVAL=0 LD_PRELOAD="$lib" "$work/prog" off || rc=$?
[ "$rc" = 0 ] || fail "sampling off: libunwind or liblzma mapped (exit $rc)"
echo "ok   sampling off: neither libunwind nor liblzma mapped"

rc=0
timeout 60 env LUMALLOC_SAMPLE_INTERVAL=64k LUMALLOC_PROF_DUMP="$work/prof.txt" LD_PRELOAD="$lib" "$work/prog" on "$work/inproc.txt" || rc=$?
[ "$rc" = 0 ] || fail "sampling on: exit $rc (1: libunwind or liblzma mapped while sampling, 9: no frames unwound, 10: no report, 11: mapped by the report)"
echo "ok   sampling on: neither libunwind nor liblzma mapped, while sampling nor by a report"
for f in prof.txt inproc.txt; do
    grep -q 'churn' "$work/$f" || { cat "$work/$f"; fail "no stack through churn() in $f"; }
    grep -Eq '^ +[0-9]+ bytes .* [1-9][0-9]* samples' "$work/$f" || { cat "$work/$f"; fail "no samples in $f"; }
done
echo "ok   stacks unwound, and named in-process and at exit"

rc=0
timeout 60 env LUMALLOC_SAMPLE_INTERVAL=0 LUMALLOC_PROF_DUMP="$work/late.txt" LD_PRELOAD="$lib" "$work/prog" late || rc=$?
[ "$rc" = 0 ] || fail "sampling on at run time: exit $rc (9: no frames unwound in the fork child, 3: mapped in the fork child, 5: in the parent)"
grep -q 'churn' "$work/late.txt" || { cat "$work/late.txt"; fail "no stack through churn() after sampling was switched on"; }
echo "ok   sampling switched on at run time: stacks in a fork child and its parent, nothing mapped"
