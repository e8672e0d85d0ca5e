#!/usr/bin/env bash
# Out of memory with real limits (the in-process RLIMIT_AS cases are in tests/test_oom.c):
#  1. `ulimit -v`: python3 under LD_PRELOAD=liblumalloc.so with LUMALLOC_DIAG=all asks for more
#     than the limit: MemoryError (malloc returned NULL), the process goes on allocating and exits
#     0, and stderr holds the diagnostics report of that failure.
#  2. A memory cgroup (v2 memory.max, or v1 memory.limit_in_bytes) of 64 MiB, created under this
#     process's own cgroup and removed afterwards: a program whose working set (32 MiB, half the
#     limit; glibc peaks at ~38 MiB RSS) churns through small, medium and large blocks (450 MiB in
#     all) and must finish, first with glibc (the limit is fair), then under lumalloc (freed memory
#     is reused or returned, never accumulates past the limit); one that needs 200 MiB must be stopped by the
#     kernel's OOM killer (SIGKILL) promptly, not hang.  (A cgroup limit is enforced at page-fault
#     time, so malloc cannot return NULL there: that is what the RLIMIT_AS cases are for.)
#  3. The alloc_failure USDT probe: bpftrace attached by PID counts exactly the failed
#     allocations a program makes (real failures: sizes no mapping can satisfy), with errno ENOMEM.
# Without root, the cgroup memory controller or bpftrace a part is skipped, unless CI=true: then a
# missing capability that should exist (memory controller listed, bpftrace installed) fails.
# Usage: core_oom.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
src=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
cg=
cleanup() {
  if [ -n "$cg" ] && [ -d "$cg" ]; then
    for p in $(cat "$cg/cgroup.procs" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    sleep 0.2; rmdir "$cg" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }
failed=0
skip_or_fail() { # message; should-exist (1/0)
  if [ "${CI:-}" = true ] && [ "$2" = 1 ]; then fail "$1"; fi
  echo "SKIP: $1"
}

# ---- 1. ulimit -v ----
rc=0
( ulimit -v 700000
  LD_PRELOAD=$lib LUMALLOC_DIAG=all timeout -s KILL 60 python3 -c '
try:
    x = bytearray(3 * 10**9)
    print("allocated?!")
except MemoryError:
    print("MemoryError")
keep = [bytes(1000 + i % 300) for i in range(20000)]
try:
    y = [bytearray(50 * 10**6) for _ in range(100)]
except MemoryError:
    print("MemoryError again")
y = None
z = bytearray(200 * 10**6)
print("recovered", len(keep), len(z))
' ) > "$work/py.out" 2> "$work/py.err" || rc=$?
[ "$rc" = 0 ] || { cat "$work/py.out"; head -20 "$work/py.err"; fail "python3 under ulimit -v exited with $rc"; }
[ "$(cat "$work/py.out")" = "$(printf 'MemoryError\nMemoryError again\nrecovered 20000 200000000')" ] \
  || { cat "$work/py.out"; fail "python3 under ulimit -v: unexpected output"; }
grep -q "lumalloc: allocation of 3000000" "$work/py.err" && grep -q "failed: ENOMEM in thread" "$work/py.err" \
  || { head -20 "$work/py.err"; fail "no diagnostics report on stderr with LUMALLOC_DIAG=all"; }
grep -q "^  process: mapped" "$work/py.err" || fail "the report lacks the process section"
echo "ok: ulimit -v: MemoryError, recovery, diagnostics report ($(grep -c 'failed: ENOMEM' "$work/py.err") failures reported)"

# ---- 2. memory cgroup ----
cat > "$work/churn.c" <<'C'
/* churn WORKSET_MIB: phases of small, medium and large blocks, each filling the working set,
 * checked and freed; hog MIB: touch that much and hold it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv)
{
    size_t mib = strtoul(argv[2], 0, 0) << 20;
    if (!strcmp(argv[1], "hog")) {
        for (size_t done = 0; done < mib; done += 1 << 20) {
            char *p = malloc(1 << 20);
            if (!p) { puts("NULL"); return 2; }
            memset(p, 1, 1 << 20);
        }
        puts("hog survived");
        return 0;
    }
    static const size_t sizes[] = {48, 700, 5000, 60000, 200000, 1 << 20, 3 << 20};
    static void *blocks[1 << 20];
    unsigned long check = 0;
    for (int round = 0; round < 2; round++)
        for (unsigned s = 0; s < sizeof sizes / sizeof *sizes; s++) {
            size_t n = sizes[s], count = mib / (n + 16);
            for (size_t i = 0; i < count; i++) {
                unsigned char *p = blocks[i] = malloc(n);
                if (!p) { printf("NULL at %zu x %zu\n", i, n); return 3; }
                memset(p, (int)(i + s), n);
            }
            for (size_t i = 0; i < count; i++) {
                unsigned char *p = blocks[i];
                check += p[0] + p[n - 1];
                if (p[n / 2] != (unsigned char)(i + s)) { puts("corrupt"); return 4; }
                free(p);
            }
        }
    printf("churn done %lu\n", check);
    return 0;
}
C
gcc -O2 -o "$work/churn" "$work/churn.c" || fail "cannot build the churn program"
ref=$("$work/churn" churn 32) || fail "churn under glibc"

cg_setup() { # sets cg and the limit files, or returns 1 with a reason in $why
  why=
  if [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
    local own; own=$(awk -F: '$1 == "0" {print $3}' /proc/self/cgroup)
    local parent=/sys/fs/cgroup$own
    # a v2 process cgroup cannot also have children with controllers: fall back to the root
    grep -qw memory "$parent/cgroup.subtree_control" 2>/dev/null || parent=/sys/fs/cgroup
    grep -qw memory "$parent/cgroup.subtree_control" || echo +memory > "$parent/cgroup.subtree_control" 2>/dev/null || true
    cg=$parent/lumalloc-test-$$
    mkdir "$cg" 2>/dev/null || { why="cannot create $cg"; cg=; return 1; }
    echo 64M > "$cg/memory.max" && echo 0 > "$cg/memory.swap.max" 2>/dev/null || true
    [ "$(cat "$cg/memory.max")" = 67108864 ] || { why="cannot set memory.max"; return 1; }
    return 0
  fi
  if [ -d /sys/fs/cgroup/memory ] && [ -f /sys/fs/cgroup/memory/memory.limit_in_bytes ]; then
    local own; own=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3}' /proc/self/cgroup)
    cg=/sys/fs/cgroup/memory${own%/}/lumalloc-test-$$
    mkdir "$cg" 2>/dev/null || { why="cannot create $cg"; cg=; return 1; }
    echo $((64 << 20)) > "$cg/memory.limit_in_bytes" || { why="cannot set memory.limit_in_bytes"; return 1; }
    [ -f "$cg/memory.memsw.limit_in_bytes" ] && { echo $((64 << 20)) > "$cg/memory.memsw.limit_in_bytes" 2>/dev/null || true; }
    return 0
  fi
  why="no memory cgroup controller (neither cgroup v2 with memory nor a v1 memory hierarchy)"
  return 1
}
in_cg() { # command... : runs it inside the cgroup
  sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' sh "$cg" "$@"
}
should_exist=0
{ grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null || [ -d /sys/fs/cgroup/memory ]; } && should_exist=1
if [ "$(id -u)" != 0 ]; then
  skip_or_fail "not root: cannot create a memory cgroup" "$should_exist"
elif ! cg_setup; then
  skip_or_fail "memory cgroup: $why" "$should_exist"
else
  rc=0
  out=$(in_cg timeout -s KILL 90 "$work/churn" churn 32 2>&1) || rc=$?
  [ "$rc" = 0 ] || fail "churn of a 32 MiB working set in a 64 MiB cgroup fails even with glibc: exit $rc ($out)"
  rc=0
  out=$(in_cg env LD_PRELOAD="$lib" timeout -s KILL 90 "$work/churn" churn 32 2>&1) || rc=$?
  if [ "$rc" != 0 ]; then # go on with the other parts, fail at the end
    echo "FAIL: churn of a 32 MiB working set in a 64 MiB cgroup under lumalloc: exit $rc ($out) (glibc: fine)"
    failed=1
  else
    [ "$out" = "$ref" ] || fail "churn output differs: $out vs $ref"
    echo "ok: 32 MiB working set churned through 7 size classes twice in a 64 MiB cgroup ($cg)"
  fi
  rc=0
  start=$(date +%s)
  out=$(in_cg env LD_PRELOAD="$lib" timeout -s KILL 60 "$work/churn" hog 200 2>&1) || rc=$?
  [ "$rc" = 137 ] || fail "a 200 MiB hog in a 64 MiB cgroup: exit $rc ($out), expected the OOM killer's SIGKILL"
  [ $(( $(date +%s) - start )) -lt 50 ] || fail "the hog was killed by the timeout, not the OOM killer"
  echo "ok: a 200 MiB hog in the 64 MiB cgroup is OOM-killed in $(( $(date +%s) - start )) s, no hang"
fi

# ---- 3. alloc_failure probe ----
cat > "$work/failer.c" <<'C'
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int lum_probe_semaphore(const char *probe);
int main(void)
{
    printf("READY %d\n", (int)getpid());
    fflush(stdout);
    for (int i = 0; i < 600 && lum_probe_semaphore("alloc_failure") == 0; i++) usleep(50000);
    if (lum_probe_semaphore("alloc_failure") == 0) { puts("no tracer"); return 2; }
    /* bpftrace raises the semaphore before its uprobe is live: give the attach time to finish */
    usleep(1000000);
    int failed = 0;
    for (int i = 0; i < 5; i++) { errno = 0; if (!malloc(((size_t)1 << 47) + (size_t)i * 4096) && errno == ENOMEM) failed++; }
    /* more than the 47-bit user address space: no mapping can satisfy these */
    void *p;
    for (int i = 0; i < 2; i++) if (posix_memalign(&p, 4096, (size_t)1 << 48) == ENOMEM) failed++;
    printf("FAILED %d\n", failed);
    fflush(stdout);
    sleep(1);
    return 0;
}
C
if ! command -v bpftrace >/dev/null; then
  skip_or_fail "bpftrace not installed" 1
elif [ "$(id -u)" != 0 ]; then
  skip_or_fail "not root: bpftrace cannot attach" 0
else
  gcc -O1 -o "$work/failer" "$work/failer.c" "$lib" -Wl,-rpath,"$(dirname "$lib")" || fail "cannot build the failer"
  "$work/failer" > "$work/failer.out" 2>&1 &
  fpid=$!
  for _ in $(seq 100); do grep -q READY "$work/failer.out" && break; sleep 0.1; done
  timeout -s INT 30 bpftrace -p "$fpid" -e "
usdt:$lib:lumalloc:alloc_failure { @n++; @errno[arg2] = count(); @size[arg0] = count(); }
interval:s:1 { if (@n >= 7) { exit(); } }" > "$work/bt.out" 2>&1 || true
  rc=0; wait "$fpid" || rc=$?
  grep -q "FAILED 7" "$work/failer.out" || { cat "$work/failer.out" "$work/bt.out"; fail "the failer did not fail 7 allocations (rc $rc)"; }
  n=$(awk '/^@n:/ {print $2}' "$work/bt.out")
  [ "$n" = 7 ] || { cat "$work/bt.out"; fail "bpftrace counted ${n:-no} alloc_failure probes, expected 7"; }
  grep -q "^@errno\[12\]: 7" "$work/bt.out" || { cat "$work/bt.out"; fail "alloc_failure errno argument is not ENOMEM"; }
  grep -q "^@size\[140737488355328\]: 1" "$work/bt.out" || { cat "$work/bt.out"; fail "alloc_failure size argument"; }
  echo "ok: bpftrace counted the 7 alloc_failure probes, errno ENOMEM, sizes right"
fi
[ "$failed" = 0 ] || exit 1
echo "oom: all parts passed"
