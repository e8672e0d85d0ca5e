#!/bin/bash
# Targets whose files or threads are not where a path or the PID says: the library (or static
# executable) replaced on disk after start, a container whose library path is another file on
# the host, a main thread that left with pthread_exit while the workers run; a thread name that
# is not UTF-8.
source "$(dirname "$0")/tools_common.inc"
if [ "$MODE" = static ]; then
    SHAPES=${SHAPES_STATIC:-}
    [ -x "$SHAPES" ] || skip "static shapes not built"
fi
[ -x "${SHAPES:-}" ] || fail "SHAPES not set (run through ctest)"

# snoop_samples PID SECONDS: allocsnoop's sample count over that long (its exit status must be 0)
snoop_samples() {
    "$ALLOCSNOOP" -p "$1" -d "$2" -q --json > "$TMP/snoop.jsonl" 2> "$TMP/snoop.err" ||
        { cat "$TMP/snoop.err"; fail "allocsnoop -p $1 exited non-zero"; }
    python3 -c '
import json, sys
s = [json.loads(l) for l in open(sys.argv[1]) if "\"summary\"" in l][0]
print(s["events"]["sample"])' "$TMP/snoop.jsonl"
}
# top_rates PID: alloctop's per-thread alloc rates over two intervals, checked non-zero
top_check() {
    "$ALLOCTOP" -p "$1" --json 0.5 2 > "$TMP/top.jsonl" 2> "$TMP/top.err" ||
        { cat "$TMP/top.err"; fail "alloctop -p $1 exited non-zero"; }
    python3 - "$TMP/top.jsonl" <<'PY' || fail "alloctop saw nothing of the target"
import json, sys
objs = [json.loads(l) for l in open(sys.argv[1])]
p = objs[-1]["processes"][0]
assert p["alive"], p
rates = [t["alloc_bps"] for t in p["threads"] if t["comm"].startswith("sh-")]
assert rates and all(r > 0 for r in rates), rates
print("ok   alloctop: worker rates %s" % [round(r) for r in rates])
PY
}

# run_copy DIR: copy of the probed file (library, or the executable when static) in DIR, and
# the target started from it in the background ($TP); args after DIR go to the shapes program.
run_copy() {
    local dir=$1; shift
    mkdir -p "$dir"
    if [ -n "$LIB" ]; then
        cp "$LIB" "$dir/liblumalloc.so.0"
        PROBED=$dir/liblumalloc.so.0
        LD_PRELOAD=$PROBED "$SHAPES" "$@" &
    else
        cp "$SHAPES" "$dir/shapes"
        PROBED=$dir/shapes
        "$PROBED" "$@" &
    fi
    TP=$!
    BG_PIDS="$BG_PIDS $TP"
}

echo "== the probed file replaced on disk after the target started ($MODE)"
run_copy "$TMP/upg" plain 8
sleep 0.5
cp "$PROBED" "$PROBED.new" && mv "$PROBED.new" "$PROBED" # an upgrade: a new inode at the path
grep -q "$PROBED (deleted)" "/proc/$TP/maps" || fail "the old file is not shown deleted in maps"
top_check "$TP"
n=$(snoop_samples "$TP" 1.5)
[ "$n" -gt 0 ] || fail "allocsnoop: no samples from a target whose file was replaced"
echo "ok   allocsnoop: $n samples"
kill "$TP" 2>/dev/null; wait "$TP" 2>/dev/null

echo "== a container whose probed path is another file on the host ($MODE)"
if ! unshare -m true 2>/dev/null; then
    echo "skip (no mount namespaces)"
else
    mkdir -p "$TMP/ctr"
    if [ -n "$LIB" ]; then
        cp "$LIB" "$TMP/ctr/liblumalloc.so.0"   # the host's file at that path
        cp "$LIB" "$TMP/ctr/inside.so"          # the container's, bind-mounted over it
        unshare -m --propagation private sh -c \
            "mount --bind '$TMP/ctr/inside.so' '$TMP/ctr/liblumalloc.so.0' &&
             LD_PRELOAD='$TMP/ctr/liblumalloc.so.0' exec '$SHAPES' plain 8" &
    else
        cp "$SHAPES" "$TMP/ctr/shapes"
        cp "$SHAPES" "$TMP/ctr/inside"
        unshare -m --propagation private sh -c \
            "mount --bind '$TMP/ctr/inside' '$TMP/ctr/shapes' && exec '$TMP/ctr/shapes' plain 8" &
    fi
    TP=$!
    BG_PIDS="$BG_PIDS $TP"
    sleep 0.5
    top_check "$TP"
    n=$(snoop_samples "$TP" 1.5)
    # Before: the probes went on the host's file, which the container does not run: 0 events.
    [ "$n" -gt 0 ] || fail "allocsnoop: no samples from the container's process"
    echo "ok   allocsnoop: $n samples"
    kill "$TP" 2>/dev/null; wait "$TP" 2>/dev/null
fi

echo "== the main thread left with pthread_exit, attached after ($MODE)"
if [ -n "$LIB" ]; then LD_PRELOAD=$LIB "$SHAPES" mainexit 200 8 & else "$SHAPES" mainexit 200 8 & fi
TP=$!
BG_PIDS="$BG_PIDS $TP"
sleep 0.6
[ "$(awk '{print $3}' "/proc/$TP/stat")" = Z ] || fail "the leader is not a zombie: the check proves nothing"
top_check "$TP"
start=$(date +%s.%N)
n=$(snoop_samples "$TP" 1.5)
took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
[ "$n" -gt 0 ] || fail "allocsnoop: no samples after the leader left"
awk -v t="$took" 'BEGIN { exit !(t >= 1.4) }' || fail "allocsnoop stopped after ${took}s of -d 1.5"
echo "ok   allocsnoop: $n samples over ${took}s"
kill "$TP" 2>/dev/null; wait "$TP" 2>/dev/null

echo "== the main thread leaves with pthread_exit while attached ($MODE)"
if [ -n "$LIB" ]; then LD_PRELOAD=$LIB "$SHAPES" mainexit 1000 8 & else "$SHAPES" mainexit 1000 8 & fi
TP=$!
BG_PIDS="$BG_PIDS $TP"
sleep 0.3
"$ALLOCTOP" -p "$TP" --json 0.5 6 > "$TMP/me.jsonl" 2> "$TMP/me.err" &
AP=$!
"$ALLOCSNOOP" -p "$TP" -d 3 --json > "$TMP/me_snoop.jsonl" 2> "$TMP/me_snoop.err" ||
    { cat "$TMP/me_snoop.err"; fail "allocsnoop exited non-zero"; }
wait $AP || { cat "$TMP/me.err"; fail "alloctop exited non-zero"; }
python3 - "$TMP/me.jsonl" "$TMP/me_snoop.jsonl" <<'PY' || fail "a tool stopped following the process when its leader left"
import json, sys
top = [json.loads(l) for l in open(sys.argv[1])]
assert len(top) == 6 and not any(o["final"] for o in top), [o["final"] for o in top]
last = top[-1]["processes"][0]
assert last["alive"], "alloctop: process shown exited"
rates = [t["alloc_bps"] for t in last["threads"] if t["comm"].startswith("sh-")]
assert rates and all(r > 0 for r in rates), rates
ev = [json.loads(l) for l in open(sys.argv[2])]
late = [e for e in ev if e.get("type") == "event" and e["event"] == "sample" and e["ts"] > 2.0]
assert late, "allocsnoop: no samples after the leader left"
print("ok   alloctop: 6 live intervals, allocsnoop: %d samples after 2 s" % len(late))
PY
kill "$TP" 2>/dev/null; wait "$TP" 2>/dev/null

echo "== the target execs itself while alloctop watches ($MODE)"
if [ -n "$LIB" ]; then LD_PRELOAD=$LIB "$SHAPES" exec 1000 8 & else "$SHAPES" exec 1000 8 & fi
TP=$!
BG_PIDS="$BG_PIDS $TP"
sleep 0.3
"$ALLOCTOP" -p "$TP" --json 0.5 7 > "$TMP/exec.jsonl" 2> "$TMP/exec.err" || { cat "$TMP/exec.err"; fail "alloctop"; }
python3 - "$TMP/exec.jsonl" <<'PY' || fail "alloctop after the target's exec"
import json, sys
objs = [json.loads(l) for l in open(sys.argv[1])]
before = [t["comm"] for t in objs[0]["processes"][0]["threads"]]
assert any(c.startswith("sh-w") for c in before), before
last = objs[-1]["processes"][0]
threads = {t["comm"]: t["alloc_bps"] for t in last["threads"]}
# Before: the old image's threads, at their last rates, for good.
assert not any(c.startswith("sh-w") for c in threads), threads
new = [r for c, r in threads.items() if c.startswith("sh-x")]
assert new and all(r > 0 for r in new), threads
print("ok   after exec: %s" % sorted(threads))
PY
kill "$TP" 2>/dev/null; wait "$TP" 2>/dev/null

# The probed file as -b/-B take it: the preloaded library, or the static executable.
BINARY=$(readlink -f "${LIB:-$SHAPES}")

echo "== allocsnoop -b over many short-lived processes: files closed once they are gone ($MODE)"
# 42 descriptors are the tool's own, each process's files ~4 more: without closing those of the
# processes gone, the later ones could not be opened (no symbols).
(ulimit -n 96; exec "$ALLOCSNOOP" -b "$BINARY" -q --json -d 12 --leaks 0 > "$TMP/fd.jsonl" 2> "$TMP/fd.err") &
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

echo "== more threads at exit than the exit-time reading holds ($MODE)"
# 300 threads alive at exit, the BPF exit hook reads 256: the final report keeps the others'
# last figures and says it is truncated (before: 256 threads, the rest gone silently).
"$ALLOCTOP" ${LIB:+--preload "$LIB"} --json -c "$SHAPES many 300 2.5" 1 > "$TMP/many.jsonl" 2> "$TMP/many.err" ||
    { cat "$TMP/many.err"; fail "alloctop -c"; }
python3 - "$TMP/many.jsonl" <<'PY' || fail "final report of 300 threads"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
fin = [o for o in rows if o["final"]]
assert fin, "no final report"
p = fin[-1]["processes"][0]
assert not p["alive"], p["alive"]
assert len(p["threads"]) >= 300, "final report has %d threads" % len(p["threads"])
assert p["truncated"], "not marked truncated"
print("ok   final report: %d threads, truncated" % len(p["threads"]))
PY

echo "== a thread name cut inside a UTF-8 character: --json stays UTF-8 ($MODE)"
if [ -n "$LIB" ]; then LD_PRELOAD=$LIB "$SHAPES" badname 5 & else "$SHAPES" badname 5 & fi
TP=$!
BG_PIDS="$BG_PIDS $TP"
sleep 0.3
"$ALLOCTOP" -p "$TP" --json 0.3 1 > "$TMP/utf8.jsonl" 2> "$TMP/utf8.err" || { cat "$TMP/utf8.err"; fail "alloctop"; }
python3 - "$TMP/utf8.jsonl" <<'PY' || fail "alloctop --json is not UTF-8"
import json, sys
o = json.loads(open(sys.argv[1], "rb").read().decode("utf-8"))
names = [t["comm"] for t in o["processes"][0]["threads"]]
assert "sh-namexxxxxxx\ufffd" in names, names
print("ok   %s" % ascii(names))
PY
kill "$TP" 2>/dev/null; wait "$TP" 2>/dev/null
echo "PASS"
