#!/bin/bash
# allocsnoop --heap: the live heap of a process read from lumalloc's own profile, with nothing
# attached before: the leak and the large leaks found with their stacks and sizes, what was
# allocated since start in the sites' true shares, folded (live bytes) and pprof agreeing; read
# again while the process allocates hard; the process runs on undisturbed.
source "$(dirname "$0")/tools_common.inc"

# expect_one_line PATTERN [VAR=VALUE...]: --heap of a workload started with those variables
# fails with one line matching PATTERN.
expect_one_line() {
    local pat=$1 out rc P; shift
    env "$@" LD_PRELOAD="$LIB" "$WORKLOAD" -m 2 -l 3000 -o /dev/null & P=$!
    BG_PIDS=$P
    sleep 0.5
    out=$("$ALLOCSNOOP" --heap -p "$P" 2>&1 >/dev/null); rc=$?
    [ $rc -ne 0 ] && [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] && printf '%s' "$out" | grep -q "$pat" ||
        fail "--heap ($*): rc $rc, '$out'"
    echo "ok   $out"
    kill $P
}

if [ "$MODE" = fake ]; then
    # A library without the profile (this stand-in, or a lumalloc from before it).
    expect_one_line "has no lumalloc_profile symbol"
    exit 0
fi

wait_for() { # wait_for FILE: the workload writes its truth when its work is done
    for _ in $(seq 100); do [ -s "$1" ] && return 0; sleep 0.1; done
    fail "no $1"
}

echo "== allocsnoop --heap of a process it never attached to ($MODE)"
# -m 128: ~1700 samples for the smallest site, so its share is within 10% but 1 time in ~10^5
# (at -m 16 it missed 1 run in 9)
LD_PRELOAD=$LIB "$WORKLOAD" -m 128 -L 16 -G 2 -l 4000 -o "$TMP/truth.json" & P=$!
BG_PIDS=$P
wait_for "$TMP/truth.json"
"$ALLOCSNOOP" --heap -p "$P" --json --folded "$TMP/heap.folded" --pprof "$TMP/heap.pb" > "$TMP/heap.jsonl" \
    2> "$TMP/heap.err" || { rc=$?; cat "$TMP/heap.err"; fail "allocsnoop --heap exited $rc"; }
python3 "$HERE/tools_check.py" heap "$TMP/truth.json" "$TMP/heap.jsonl" "$TMP/heap.folded" "$TMP/heap.pb" ||
    fail "allocsnoop --heap checks"
# The text report names the leak under its heading, and a second reading of the idle process
# gives the same live figures (reading changes nothing in it).
"$ALLOCSNOOP" --heap -p "$P" > "$TMP/heap.txt" 2>&1 || fail "allocsnoop --heap (text)"
grep -q "^Live heap now" "$TMP/heap.txt" && grep -q "#1  leak_site" "$TMP/heap.txt" ||
    { cat "$TMP/heap.txt"; fail "text report"; }
"$ALLOCSNOOP" --heap -p "$P" --json > "$TMP/heap2.jsonl" 2>&1 || fail "allocsnoop --heap again"
cmp <(grep '"type":"live"' "$TMP/heap.jsonl") <(grep '"type":"live"' "$TMP/heap2.jsonl") ||
    fail "a second reading of the idle process differs"
echo "ok   text report; a second reading is the same"

echo "== alloctop -H: the same profile by site, and its growth ($MODE)"
# With the probes (default) and without any BPF (--no-bpf): the view needs none.
"$ALLOCTOP" -p "$P" -H -j 0.3 2 > "$TMP/top.jsonl" 2> "$TMP/top.err" || { cat "$TMP/top.err"; fail "alloctop -H"; }
"$ALLOCTOP" --no-bpf -p "$P" -H -j 0.3 2 > "$TMP/top_nobpf.jsonl" 2> "$TMP/top.err" ||
    { cat "$TMP/top.err"; fail "alloctop --no-bpf -H"; }
for f in top top_nobpf; do
    python3 - "$TMP/truth.json" "$TMP/$f.jsonl" <<'PY' || fail "alloctop -H checks ($f)"
import json, sys
truth = json.load(open(sys.argv[1]))
last = json.loads(open(sys.argv[2]).read().strip().split("\n")[-1])
proc = [p for p in last["processes"] if p["pid"] == truth["pid"]][0]
sites = proc["heap"]["sites"]
leak = [s for s in sites if s["caller"] == "leak_site"]
large = [s for s in sites if s["caller"] == "large_leak_site"]
assert sites[0]["caller"] == "leak_site", "top live site %s" % sites[0]
assert abs(leak[0]["live_bytes"] / truth["leak_bytes"] - 1) <= 0.25, (leak, truth["leak_bytes"])
assert abs(large[0]["live_bytes"] / truth["large_leak_bytes"] - 1) <= 0.01, (large, truth["large_leak_bytes"])
# the process is idle: nothing grew between the two readings
assert all(s["growth_bps"] == 0 and s["alloc_bps"] == 0 for s in sites), sites
print("ok   %s: leak_site %d live (truth %d), large_leak_site %d, no growth"
      % (sys.argv[2].split("/")[-1], leak[0]["live_bytes"], truth["leak_bytes"], large[0]["live_bytes"]))
PY
done
wait $P || fail "the workload exited $? after being read"

echo "== allocsnoop --heap while the process allocates ($MODE)"
LD_PRELOAD=$LIB "$WORKLOAD" -m 256 -p 300 -l 200 -o "$TMP/truth2.json" & P=$!
BG_PIDS=$P
sleep 0.2
n=0
while kill -0 "$P" 2>/dev/null && [ ! -s "$TMP/truth2.json" ] && [ $n -lt 40 ]; do
    "$ALLOCSNOOP" --heap -p "$P" --json --leaks 1000 > "$TMP/busy.jsonl" 2> "$TMP/busy.err" || {
        rc=$?
        # the process may have finished between the check and the read
        [ -s "$TMP/truth2.json" ] && break
        cat "$TMP/busy.err"; fail "allocsnoop --heap of a busy process exited $rc"
    }
    # Each reading whole, and none going back on the one before: stacks and each site's sampled
    # allocations only grow, nothing is live below zero.
    python3 - "$TMP/busy.jsonl" "$TMP/busy.prev" <<'PY' || fail "reading $n of the busy process"
import json, os, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
heap = [r for r in recs if r["type"] == "heap"]
assert len(heap) == 1 and heap[0]["stacks"] > 0 and not heap[0]["truncated"], heap
sites = {r["function"]: r for r in recs if r["type"] == "site"}
assert sites, "no sites"
assert all(r["bytes"] >= 0 for r in recs if r["type"] == "live"), "negative live bytes"
if os.path.exists(sys.argv[2]):
    prev = [json.loads(l) for l in open(sys.argv[2])]
    ph = [r for r in prev if r["type"] == "heap"][0]
    assert heap[0]["stacks"] >= ph["stacks"], (ph["stacks"], heap[0]["stacks"])
    for r in prev:
        if r["type"] == "site":
            assert sites[r["function"]]["samples"] >= r["samples"], (r, sites.get(r["function"]))
PY
    cp "$TMP/busy.jsonl" "$TMP/busy.prev"
    n=$((n + 1))
done
wait $P || fail "the busy workload exited $? after $n readings"
[ $n -ge 3 ] || fail "only $n readings while it ran"
echo "ok   $n readings while it allocated; it ran to the end"

if [ "$MODE" = real ]; then
    echo "== LUMALLOC_PROF=off: one line"
    expect_one_line "LUMALLOC_PROF=off" LUMALLOC_PROF=off
fi
