#!/bin/bash
# Targets whose files or threads are not where a path or the PID says: the library (or static
# executable) replaced on disk after start, a container whose library path is another file on
# the host, a main thread that left with pthread_exit while the workers run, a target that execs,
# one in its own PID namespace; a thread name that is not UTF-8.
source "$(dirname "$0")/tools_common.inc"
# wait_shapes PID EXE [LIB]: the shapes program at PID runs EXE (with LIB mapped) and both its
# workers are named: every case's check reads the workers ("sh-" threads), and the first reading
# of some must already hold them.  Fails the test after 5 s (more under load: it counts polls).
wait_shapes() {
    wait_mapped "$@"
    for _ in $(seq 100); do
        [ "$(cat "/proc/$1/task/"*/comm 2>/dev/null | LC_ALL=C grep -ac '^sh-')" -ge 2 ] && return 0
        sleep 0.05
    done
    fail "process $1: its two workers not named within 5 s (threads: $(cat "/proc/$1/task/"*/comm 2>/dev/null | tr '\n' ' '))"
}
# The shapes program in the background (preloaded in the modes that preload), ready: its PID in TP.
start_shapes() {
    if [ -n "$LIB" ]; then LD_PRELOAD=$LIB "$SHAPES" "$@" & else "$SHAPES" "$@" & fi
    TP=$!
    BG_PIDS="$BG_PIDS $TP"
    wait_shapes "$TP" "$SHAPES" "$LIB"
}
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
# stop_target: the target in TP ended and reaped
stop_target() { kill "$TP" 2>/dev/null; wait "$TP" 2>/dev/null; }
# expect_samples WHAT: alloctop sees the target in TP, and allocsnoop samples from it
expect_samples() {
    top_check "$TP"
    local n
    n=$(snoop_samples "$TP" 1.5)
    [ "$n" -gt 0 ] || fail "allocsnoop: no samples from $1"
    echo "ok   allocsnoop: $n samples"
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
# the target started from it in the background ($TP), ready; args after DIR go to the shapes
# program.
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
    if [ -n "$LIB" ]; then wait_shapes "$TP" "$SHAPES" "$PROBED"; else wait_shapes "$TP" "$PROBED"; fi
}

echo "== the probed file replaced on disk after the target started ($MODE)"
run_copy "$TMP/upg" plain 8
cp "$PROBED" "$PROBED.new" && mv "$PROBED.new" "$PROBED" # an upgrade: a new inode at the path
grep -q "$PROBED (deleted)" "/proc/$TP/maps" || fail "the old file is not shown deleted in maps"
expect_samples "a target whose file was replaced"
# -B/-b follow the file at the path now, which the target does not map: said, not silently empty
OLDCOPY="warning: 1 process (pid $TP) maps an older, deleted $(readlink -f "$PROBED"), which the probes are not on: use -p PID"
"$ALLOCTOP" -B "$PROBED" 0.3 1 > /dev/null 2> "$TMP/old_top.err" || { cat "$TMP/old_top.err"; fail "alloctop -B"; }
grep -qF "alloctop: $OLDCOPY" "$TMP/old_top.err" || { cat "$TMP/old_top.err"; fail "alloctop -B: no word of the old file's process"; }
"$ALLOCSNOOP" -b "$PROBED" -d 0.3 -q > /dev/null 2> "$TMP/old_snoop.err" || { cat "$TMP/old_snoop.err"; fail "allocsnoop -b"; }
grep -qF "allocsnoop: $OLDCOPY" "$TMP/old_snoop.err" || { cat "$TMP/old_snoop.err"; fail "allocsnoop -b: no word of the old file's process"; }
echo "ok   $(cat "$TMP/old_snoop.err")"
stop_target

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
        ready=("$SHAPES" "$TMP/ctr/liblumalloc.so.0")
    else
        cp "$SHAPES" "$TMP/ctr/shapes"
        cp "$SHAPES" "$TMP/ctr/inside"
        unshare -m --propagation private sh -c \
            "mount --bind '$TMP/ctr/inside' '$TMP/ctr/shapes' && exec '$TMP/ctr/shapes' plain 8" &
        ready=("$TMP/ctr/shapes")
    fi
    TP=$!
    BG_PIDS="$BG_PIDS $TP"
    wait_shapes "$TP" "${ready[@]}"  # the paths as the container sees them
    # Before: the probes went on the host's file, which the container does not run: 0 events.
    expect_samples "the container's process"
    stop_target
fi

echo "== the main thread left with pthread_exit, attached after ($MODE)"
start_shapes mainexit 200 8
for _ in $(seq 100); do  # the leader leaves 0.2 s after starting the workers
    [ "$(awk '{print $3}' "/proc/$TP/stat")" = Z ] && break
    sleep 0.05
done
[ "$(awk '{print $3}' "/proc/$TP/stat")" = Z ] || fail "the leader is not a zombie: the check proves nothing"
top_check "$TP"
start=$(date +%s.%N)
n=$(snoop_samples "$TP" 1.5)
took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
[ "$n" -gt 0 ] || fail "allocsnoop: no samples after the leader left"
awk -v t="$took" 'BEGIN { exit !(t >= 1.4) }' || fail "allocsnoop stopped after ${took}s of -d 1.5"
echo "ok   allocsnoop: $n samples over ${took}s"
stop_target

echo "== the main thread leaves with pthread_exit while attached ($MODE)"
# the leader leaves 2.5 s in: both tools must have attached before (1 s was too short once beside
# two CPU hogs and the other agents' jobs: the leader left while allocsnoop was attaching)
start_shapes mainexit 2500 12
"$ALLOCTOP" -p "$TP" --json 0.5 10 > "$TMP/me.jsonl" 2> "$TMP/me.err" &
AP=$!
"$ALLOCSNOOP" -p "$TP" -d 5 --json > "$TMP/me_snoop.jsonl" 2> "$TMP/me_snoop.err" ||
    { cat "$TMP/me_snoop.err"; fail "allocsnoop exited non-zero"; }
wait $AP || { cat "$TMP/me.err"; fail "alloctop exited non-zero"; }
python3 - "$TMP/me.jsonl" "$TMP/me_snoop.jsonl" <<'PY' || fail "a tool stopped following the process when its leader left"
import json, sys
top = [json.loads(l) for l in open(sys.argv[1])]
assert len(top) == 10 and not any(o["final"] for o in top), [o["final"] for o in top]
last = top[-1]["processes"][0]
assert last["alive"], "alloctop: process shown exited"
rates = [t["alloc_bps"] for t in last["threads"] if t["comm"].startswith("sh-")]
assert rates and all(r > 0 for r in rates), rates
ev = [json.loads(l) for l in open(sys.argv[2])]
late = [e for e in ev if e.get("type") == "event" and e["event"] == "sample" and e["ts"] > 3.5]
assert late, "allocsnoop: no samples after the leader left"
print("ok   alloctop: 10 live intervals, allocsnoop: %d samples after 3.5 s" % len(late))
PY
stop_target

echo "== the target execs itself while alloctop watches ($MODE)"
# the exec 2.5 s in: alloctop's first reading must come before it, on a loaded machine too (1 s
# was too short once beside the sanitizer builds under ctest -j2)
start_shapes exec 2500 8
"$ALLOCTOP" -p "$TP" --json 0.5 10 > "$TMP/exec.jsonl" 2> "$TMP/exec.err" || { cat "$TMP/exec.err"; fail "alloctop"; }
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
stop_target

if [ -n "$LIB" ]; then
    echo "== the target execs into a program without lumalloc ($MODE)"
    # alloctop said "waiting for lumalloc's registry..." at every interval until the process exited
    LD_PRELOAD=$LIB sh -c 'sleep 1; exec env -u LD_PRELOAD sleep 4' & EP=$!
    BG_PIDS="$BG_PIDS $EP"
    for _ in $(seq 100); do grep -qF "$(basename "$LIB")" "/proc/$EP/maps" 2>/dev/null && break; sleep 0.05; done
    "$ALLOCTOP" -p "$EP" 0.5 6 > "$TMP/noexec.txt" 2> "$TMP/noexec.err" || { cat "$TMP/noexec.err"; fail "alloctop"; }
    grep -q "^alloctop: pid $EP exec'd into .*sleep, which does not use lumalloc" "$TMP/noexec.err" ||
        { cat "$TMP/noexec.err"; fail "no word that the new image has no lumalloc"; }
    [ "$(grep "^PID $EP" "$TMP/noexec.txt" | tail -1 | grep -c "exec'd into .*sleep, which does not use lumalloc")" = 1 ] ||
        { cat "$TMP/noexec.txt"; fail "the table does not say the new image has no lumalloc"; }
    echo "ok   $(tail -1 "$TMP/noexec.err")"
    kill "$EP" 2>/dev/null; wait "$EP" 2>/dev/null
fi

echo "== the target execs itself while allocsnoop watches ($MODE)"
# --no-batch: the library's batch of the last samples before the exec dies unpublished with the
# old image, so batched, the kept blocks might not be seen at all.
start_shapes exec 1000 4
"$ALLOCSNOOP" -p "$TP" -q -d 2.5 --no-batch --json > "$TMP/exec_snoop.jsonl" 2> "$TMP/exec_snoop.err" ||
    { cat "$TMP/exec_snoop.err"; fail "allocsnoop"; }
python3 - "$TMP/exec_snoop.jsonl" <<'PY' || fail "allocsnoop after the target's exec"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
s = [o for o in rows if o["type"] == "summary"][0]
assert s["events"]["sample"] > 100, s["events"]  # the 8 MiB kept were sampled
live = sum(o["bytes"] for o in rows if o["type"] == "live")
# Before: the 8 MiB the old image kept, reported live though the exec freed them.
assert live < 2 << 20, "%d bytes reported live after the exec" % live
print("ok   %d bytes live after exec, %d samples" % (live, s["events"]["sample"]))
PY
stop_target

echo "== a target in its own PID namespace: thread IDs as we see them ($MODE)"
if ! unshare -fp --mount-proc true 2>/dev/null; then
    echo "skip (no PID namespaces)"
else
    unshare -fp --mount-proc sh -c "${LIB:+LD_PRELOAD=$LIB }exec '$SHAPES' plain 6" &
    UP=$!
    BG_PIDS="$BG_PIDS $UP"
    TP=
    for _ in $(seq 100); do  # unshare forks the shell only once it has made the namespace
        TP=$(pgrep -P "$UP") && break
        sleep 0.05
    done
    [ -n "$TP" ] || fail "no target under unshare within 5 s"
    BG_PIDS="$BG_PIDS $TP"
    wait_shapes "$TP" "$SHAPES" "$LIB"
    ls "/proc/$TP/task" > "$TMP/ns.tids"
    "$ALLOCTOP" -p "$TP" --json 0.3 2 > "$TMP/ns_top.jsonl" 2> "$TMP/ns_top.err" || { cat "$TMP/ns_top.err"; fail "alloctop"; }
    "$ALLOCSNOOP" -p "$TP" -d 1 -e sample,thread --json > "$TMP/ns_snoop.jsonl" 2> "$TMP/ns_snoop.err" ||
        { cat "$TMP/ns_snoop.err"; fail "allocsnoop"; }
    python3 - "$TMP/ns.tids" "$TMP/ns_top.jsonl" "$TMP/ns_snoop.jsonl" <<'PY' || fail "namespace thread IDs"
import json, sys
tids = {int(x) for x in open(sys.argv[1])}
top = [json.loads(l) for l in open(sys.argv[2])][-1]["processes"][0]["threads"]
shown = {t["tid"]: t["comm"] for t in top}
# Before: 1, 2, 3 (the namespace's), names "?".
assert set(shown) <= tids, "alloctop: %s not among %s" % (shown, tids)
assert sorted(c for c in shown.values() if c.startswith("sh-")) == ["sh-w0", "sh-w1"], shown
ev = [json.loads(l) for l in open(sys.argv[3])]
st = {e["tid"] for e in ev if e.get("type") == "event" and e["event"] == "sample"}
assert st and st <= tids, "allocsnoop: sample tids %s not among %s" % (st, tids)
print("ok   alloctop %s, allocsnoop sample tids %s" % (shown, sorted(st)))
PY
    kill "$TP" 2>/dev/null; wait "$UP" 2>/dev/null
fi

if [ "$MODE" = static ]; then
    echo "== a stripped static executable ($MODE)"
    # strip keeps the probe notes but not the symbol table lumalloc_registry is in: alloctop said
    # "does not export lumalloc_registry (library too old?)" and, with -c, waited for it forever
    cp "$SHAPES" "$TMP/stripped"; strip "$TMP/stripped"
    "$TMP/stripped" plain 6 & TP=$!; BG_PIDS="$BG_PIDS $TP"
    wait_mapped "$TP" "$TMP/stripped"
    STRIPPED="is stripped: lumalloc_[a-z]* was in its symbol table; run a copy stripped with --keep-symbol=lumalloc_registry"
    for cmd in "$ALLOCTOP -p $TP 0.3 1" "$ALLOCSNOOP --heap -p $TP"; do
        out=$($cmd 2>&1 >/dev/null) && fail "'$cmd' on a stripped executable exited 0"
        [ "$(printf '%s\n' "$out" | wc -l)" = 1 ] && printf '%s\n' "$out" | grep -q "$STRIPPED" ||
            fail "'$cmd' on a stripped executable: $out"
        echo "ok   $out"
    done
    stop_target
    "$ALLOCTOP" -c "$TMP/stripped plain 1.5" 0.3 > "$TMP/strip_c.txt" 2> "$TMP/strip_c.err" || fail "alloctop -c (stripped)"
    grep -q "$STRIPPED" "$TMP/strip_c.err" || { cat "$TMP/strip_c.err"; fail "alloctop -c: no word of the stripped symbol"; }
    grep -q "waiting for lumalloc's registry" "$TMP/strip_c.txt" && fail "alloctop -c: waiting for a registry it cannot find"
    # the remedy the message gives works
    cp "$SHAPES" "$TMP/kept"
    strip --keep-symbol=lumalloc_registry --keep-symbol=lumalloc_batch --keep-symbol=lumalloc_profile "$TMP/kept"
    "$TMP/kept" plain 6 & TP=$!; BG_PIDS="$BG_PIDS $TP"
    wait_mapped "$TP" "$TMP/kept"
    "$ALLOCTOP" -p "$TP" --json 0.3 1 > "$TMP/kept.jsonl" 2> "$TMP/kept.err" || { cat "$TMP/kept.err"; fail "alloctop -p (kept symbols)"; }
    "$ALLOCSNOOP" --heap -p "$TP" > /dev/null 2> "$TMP/kept.err" || { cat "$TMP/kept.err"; fail "allocsnoop --heap (kept symbols)"; }
    echo "ok   stripped with the symbols kept: alloctop and --heap read it"
    stop_target
fi

echo "== a thread name cut inside a UTF-8 character: --json stays UTF-8 ($MODE)"
start_shapes badname 5
"$ALLOCTOP" -p "$TP" --json 0.3 1 > "$TMP/utf8.jsonl" 2> "$TMP/utf8.err" || { cat "$TMP/utf8.err"; fail "alloctop"; }
python3 - "$TMP/utf8.jsonl" <<'PY' || fail "alloctop --json is not UTF-8"
import json, sys
o = json.loads(open(sys.argv[1], "rb").read().decode("utf-8"))
names = [t["comm"] for t in o["processes"][0]["threads"]]
assert "sh-namexxxxxxx\ufffd" in names, names
print("ok   %s" % ascii(names))
PY
stop_target
echo "PASS"
