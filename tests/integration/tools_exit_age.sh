#!/bin/bash
# allocsnoop: the blocks of a process that exited are aged as of its exit (its memory went then),
# however long it was quiet before it, and not as of when tracing stopped.  The case -o exists
# for: a program that allocates, idles, then exits while the tool keeps running (-b).  Without
# the exit time its last event was the reference: blocks ~0 s old, and -o left them out.
source "$(dirname "$0")/tools_common.inc"
if [ "$MODE" = static ]; then
    SHAPES=${SHAPES_STATIC:-}
    [ -x "$SHAPES" ] || skip "static shapes not built"
fi
[ -x "${SHAPES:-}" ] || fail "SHAPES not set (run through ctest)"
IDLE=3   # seconds each process does nothing between its allocations and its exit
AFTER=3  # seconds allocsnoop keeps running after both exited

echo "== a process quiet before its exit: its blocks aged at the exit ($MODE)"
# Two allocsnoops at once, one with -o IDLE-1: the same processes for both.  -b runs until
# stopped; -v says when its probes are attached (then the processes start).
probed=${LIB:-$SHAPES}
OLDER=$((IDLE - 1))
snoop() { # OUT -o
    "$ALLOCSNOOP" -v -b "$probed" -q --json -o "$2" > "$TMP/$1.jsonl" 2> "$TMP/$1.err" &
}
snoop all 0; SN_ALL=$!
snoop older $OLDER; SN_OLDER=$!
BG_PIDS="$SN_ALL $SN_OLDER"
for out in all older; do
    for _ in $(seq 100); do grep -q "samples through" "$TMP/$out.err" && break; sleep 0.1; done
    grep -q "samples through" "$TMP/$out.err" || { cat "$TMP/$out.err"; fail "allocsnoop -b ($out) did not attach"; }
    # a kernel whose sched_process_exit allocsnoop cannot use (it says so under -v) has no exit
    # dates to test: the last event stands in, as documented
    if grep -qE "exit program does not load|cannot attach to sched_process_exit" "$TMP/$out.err"; then
        kill -TERM $SN_ALL $SN_OLDER 2>/dev/null
        skip "no sched_process_exit program here: $(grep -m1 -E 'exit program|sched_process_exit' "$TMP/$out.err")"
    fi
done
# one single-threaded; in the other the main thread leaves first and another thread ends the
# process: it is gone when its last thread is, not its leader
if [ -n "$LIB" ]; then LD_PRELOAD=$LIB "$SHAPES" idle $IDLE & else "$SHAPES" idle $IDLE & fi
P1=$!
if [ -n "$LIB" ]; then LD_PRELOAD=$LIB "$SHAPES" idle $IDLE leader & else "$SHAPES" idle $IDLE leader & fi
P2=$!
BG_PIDS="$BG_PIDS $P1 $P2"
wait $P1 || fail "idle exited $?"
wait $P2 || fail "idle leader exited $?"
sleep $AFTER
kill -TERM $SN_ALL $SN_OLDER
wait $SN_ALL || { cat "$TMP/all.err"; fail "allocsnoop -b exited non-zero"; }
wait $SN_OLDER || { cat "$TMP/older.err"; fail "allocsnoop -b -o $OLDER exited non-zero"; }
BG_PIDS=
python3 - "$TMP/all.jsonl" "$TMP/older.jsonl" "$P1" "$P2" "$IDLE" "$AFTER" "$OLDER" <<'PY' || fail "ages of exited processes"
import json, sys
idle, after, minage = float(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7])
pids = {int(sys.argv[3]): "idle", int(sys.argv[4]): "idle leader"}
def read(path):
    out = {}
    for l in open(path):
        if not l.startswith("{"):
            continue
        r = json.loads(l)
        if r["type"] in ("live", "live_large") and r["pid"] in pids and "old_site" in r["stack"]:
            out.setdefault((r["pid"], r["type"]), []).append(r)
    return out
every, older = read(sys.argv[1]), read(sys.argv[2])
for pid, name in pids.items():
    for t in ("live", "live_large"):
        assert (pid, t) in every, "%s: no %s stack through old_site: %s" % (name, t, sorted(every))
        # allocated, then idle for `idle` s, then the exit: that old (small slack for the
        # clocks); had the tool's stop been the reference, `after` s older still
        for r in every[(pid, t)]:
            assert idle - 0.1 <= r["oldest_s"] < idle + after - 0.5, "%s: %s" % (name, r)
        assert (pid, t) in older, "%s: -o %g left out old_site's %s: %s" % (name, minage, t, sorted(older))
        for r in older[(pid, t)]:
            assert r["oldest_s"] >= idle - 0.1, "%s: %s" % (name, r)
    print("ok   %s: old_site's blocks %.2f s old at its exit, kept by -o %g"
          % (name, max(r["oldest_s"] for r in every[(pid, "live")]), minage))
PY
echo "PASS"
