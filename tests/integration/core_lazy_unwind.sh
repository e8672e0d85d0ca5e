#!/usr/bin/env bash
# libunwind is not a link dependency: under LD_PRELOAD=liblumalloc.so a process with sampling
# off maps neither libunwind nor liblzma; with sampling on it is loaded at start-up (so the first
# samples neither wait nor go without a stack); sampling switched on at run time loads it at the
# first sample, in a fork child whose parent never did too; stacks are unwound and named.
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
int main(int argc, char **argv)
{
    (void)argc;
    if (!strcmp(argv[1], "off")) { /* sampling off: never loaded */
        churn();
        return mapped("libunwind") || mapped("liblzma") ? 1 : 0;
    }
    if (!strcmp(argv[1], "on")) { /* sampling on from the start: loaded by then */
        if (!mapped("libunwind")) return 2;
        churn();
        return 0;
    }
    /* "late": sampling off at start, switched on at run time; first sample in a fork child */
    if (mapped("libunwind")) return 6;
    int (*set)(const char *, const char *) = (int (*)(const char *, const char *))dlsym(RTLD_DEFAULT, "lum_options_set");
    if (!set || set("sample_interval", "64k") != 0) return 7;
    pid_t pid = fork();
    if (pid == 0) {
        churn();
        exit(mapped("libunwind") ? 0 : 3);
    }
    int st;
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st)) return 4;
    if (WEXITSTATUS(st)) return WEXITSTATUS(st);
    if (mapped("libunwind")) return 8;
    churn();
    return mapped("libunwind") ? 0 : 5;
}
EOF
cc -O1 -o "$work/prog" "$work/prog.c" -ldl

rc=0
timeout 60 env LUMALLOC_SAMPLE_INTERVAL=0 LD_PRELOAD="$lib" "$work/prog" off || rc=$?
[ "$rc" = 0 ] || fail "sampling off: libunwind or liblzma mapped (exit $rc)"
echo "ok   sampling off: neither libunwind nor liblzma mapped"

rc=0
timeout 60 env LUMALLOC_SAMPLE_INTERVAL=64k LUMALLOC_PROF_DUMP="$work/prof.txt" LD_PRELOAD="$lib" "$work/prog" on || rc=$?
[ "$rc" = 0 ] || fail "sampling on: exit $rc (2: not loaded at start-up)"
echo "ok   sampling on: loaded at start-up"
rc=0
timeout 60 env LUMALLOC_SAMPLE_INTERVAL=0 LD_PRELOAD="$lib" "$work/prog" late || rc=$?
[ "$rc" = 0 ] || fail "sampling on at run time: exit $rc (6: loaded before, 3: not in the fork child, 8: in the parent before its first sample, 5: not in the parent after)"
echo "ok   sampling switched on at run time: loaded at the first sample, in a fork child and in its parent"
grep -q 'churn' "$work/prof.txt" || { cat "$work/prof.txt"; fail "no stack through churn() in the profile"; }
echo "ok   stacks unwound and named"
