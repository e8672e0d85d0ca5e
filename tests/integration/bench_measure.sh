#!/usr/bin/env bash
# bench/src/measure, the launcher every benchmark cell runs under: its peak RSS must be the
# exact one (the bench's memory ratios rest on it), including a peak reached just before exit,
# and it must pass on exit codes, signals and its time cap faithfully.
# Usage: bench_measure.sh BUILD_DIR
set -euo pipefail
m="$1/bench/measure"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; cat "$work/out" 2>/dev/null; exit 1; }
field() { sed -n "s/^$1=//p" "$work/out"; }

# 1. A 64 MiB peak held for a while: every reading source agrees within the counters' error.
"$m" "$work/out" python3 -c 'import time; b = bytearray(64 << 20); time.sleep(0.2)'
[ "$(field status)" = 0 ] || fail "status"
for f in maxrss_kib polled_rss_kib; do
  v=$(field $f); [ "$v" -ge $((64 * 1024)) ] && [ "$v" -lt $((96 * 1024)) ] || fail "$f=$v for a 64 MiB peak"
done

# 2. A peak reached in the last moment before exit: 64 MiB populated by one mmap, then _exit at
#    once.  Readings every 0.5 ms catch it whole about half the time; the one taken in the exit
#    stop always does.  The program's own RSS before the mmap (exact, smaps_rollup) is the base.
base=$("$m" "$work/out" python3 -c '
import mmap, os
print(int([l for l in open("/proc/self/smaps_rollup") if l.startswith("Rss:")][0].split()[1]), flush=True)
m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
os._exit(0)')
v=$(field polled_rss_kib)
[ "$v" -ge $((base + 64 * 1024)) ] || fail "peak at exit missed: polled_rss_kib=$v, base $base KiB + 64 MiB"

# 3. Exit codes and signals pass through; a signal the program handles itself is delivered.
set +e
"$m" "$work/out" sh -c 'exit 3'; rc=$?
set -e
[ $rc = 3 ] && [ "$(field status)" = 3 ] || fail "exit 3: rc=$rc"
set +e
"$m" "$work/out" sh -c 'kill -TERM $$'; rc=$?
set -e
[ $rc = 143 ] && [ "$(field status)" = -15 ] || fail "SIGTERM: rc=$rc"
"$m" "$work/out" python3 -c '
import os, signal
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
os.kill(os.getpid(), signal.SIGUSR1)
assert got, "SIGUSR1 not delivered"'
[ "$(field status)" = 0 ] || fail "SIGUSR1 handled by the program"

# 4. The time cap: killed, reported as such, promptly.
set +e
"$m" -t 0.3 "$work/out" sleep 5; rc=$?
set -e
[ $rc = 137 ] && [ "$(field timeout)" = 1 ] && [ "$(field status)" = -9 ] || fail "cap: rc=$rc"
awk -v w="$(field wall)" 'BEGIN { exit !(w < 2) }' || fail "cap took $(field wall) s"
echo "bench_measure: ok"
