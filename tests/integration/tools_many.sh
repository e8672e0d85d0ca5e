#!/bin/bash
# Many processes, many threads: allocsnoop -b and alloctop -B over short-lived processes let go of
# each one's files and BPF map entries once it is gone.  (Final reports of many threads:
# tools_final.sh.)
source "$(dirname "$0")/tools_common.inc"
if [ "$MODE" = static ]; then
    SHAPES=${SHAPES_STATIC:-}
    [ -x "$SHAPES" ] || skip "static shapes not built"
fi
[ -x "${SHAPES:-}" ] || fail "SHAPES not set (run through ctest)"

# The probed file as -b/-B take it: the preloaded library, or the static executable.
BINARY=$(readlink -f "${LIB:-$SHAPES}")

echo "== allocsnoop -b over many short-lived processes: files closed once they are gone ($MODE)"
# ~58 descriptors are the tool's own (its exec programs among them), each process's files ~4
# more: without closing those of the processes gone, the 24 would need ~96 more.  At 96 the
# headroom was ~9 processes, and a loaded machine, which releases them later, ran out.
(ulimit -n 128; exec "$ALLOCSNOOP" -b "$BINARY" -q --json -d 12 --leaks 0 > "$TMP/fd.jsonl" 2> "$TMP/fd.err") &
SP=$!
sleep 1.5
: > "$TMP/fd.pids"
for batch in 1 2 3 4 5 6 7 8; do
    for k in 1 2 3; do
        if [ -n "$LIB" ]; then LD_PRELOAD=$LIB "$SHAPES" plain 0.3 & else "$SHAPES" plain 0.3 & fi
        echo $! >> "$TMP/fd.pids"
    done
    wait $(tail -3 "$TMP/fd.pids")
    sleep 0.7
done
kill -INT $SP; wait $SP || { cat "$TMP/fd.err"; fail "allocsnoop -b exited non-zero"; }
python3 - "$TMP/fd.jsonl" "$TMP/fd.pids" <<'PY' || { cat "$TMP/fd.err"; fail "processes not symbolised"; }
import json, sys
pids = [int(x) for x in open(sys.argv[2])]
sites = {}
for l in open(sys.argv[1]):
    o = json.loads(l)
    if o["type"] == "site":
        sites.setdefault(o["pid"], []).append(o["function"])
traced = [p for p in pids if p in sites]
bad = [p for p in traced if "worker" not in sites[p]]
assert len(traced) >= 20, "only %d of %d processes traced" % (len(traced), len(pids))
assert not bad, "process #%d of %d not symbolised: %s" % (pids.index(bad[0]) + 1, len(pids), sites[bad[0]][:3])
print("ok   %d processes traced, all symbolised" % len(traced))
PY

echo "== alloctop -B --sites over many short-lived processes: their sites are dropped ($MODE)"
# Each process has 2000 stacks; 12 of them fill the sites map (16384) unless those of the
# processes gone are deleted, and the process after them has no sites.
"$ALLOCTOP" -B "$BINARY" --sites --json 0.3 > "$TMP/bs.jsonl" 2> "$TMP/bs.err" &
AP=$!
BG_PIDS="$BG_PIDS $AP"
sleep 1.5
for i in $(seq 1 12); do
    if [ -n "$LIB" ]; then LD_PRELOAD=$LIB "$SHAPES" stacks 2000; else "$SHAPES" stacks 2000; fi
    sleep 0.4
done
if [ -n "$LIB" ]; then LD_PRELOAD=$LIB "$SHAPES" plain 2 & else "$SHAPES" plain 2 & fi
TP=$!
sleep 1.5
kill -INT $AP; wait $AP || { cat "$TMP/bs.err"; fail "alloctop -B exited non-zero"; }
wait $TP
python3 - "$TMP/bs.jsonl" "$TP" <<'PY' || fail "alloctop -B --sites"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tp = int(sys.argv[2])
last = [p for o in rows for p in o["processes"] if p["pid"] == tp]
assert last, "the last process was not shown"
fns = [s["function"] for s in last[-1].get("sites", [])]
lost = rows[-1]["lost"]
assert lost["sites_full"] == 0, lost
assert "worker" in fns, "the last process's sites: %s (lost %s)" % (fns, lost)
print("ok   last process's sites %s, lost %s" % (fns[:2], lost))
PY

echo "PASS"
