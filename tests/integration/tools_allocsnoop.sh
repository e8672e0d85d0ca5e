#!/bin/bash
# allocsnoop: sites named in the right proportions (+-10%), the leak found with its stack,
# folded and pprof outputs that parse and agree; event filters; several PIDs.
source "$(dirname "$0")/tools_common.inc"

echo "== allocsnoop -c ($MODE)"
"$ALLOCSNOOP" -c "$WORKLOAD -m 128 -G 2 -l 300 -o $TMP/truth.json" --preload "$LIB" --json -q \
    --folded "$TMP/out.folded" --pprof "$TMP/out.pb" > "$TMP/snoop.jsonl" 2> "$TMP/snoop.err" ||
    { cat "$TMP/snoop.err"; fail "allocsnoop exited $?"; }
python3 "$HERE/tools_check.py" allocsnoop "$TMP/truth.json" "$TMP/snoop.jsonl" "$TMP/out.folded" "$TMP/out.pb" ||
    fail "allocsnoop checks"

if command -v protoc > /dev/null; then
    # Independent check of the encoder: protoc decodes it with profile.proto's schema.
    protoc --proto_path="$HERE" --decode=perftools.profiles.Profile tools_profile.proto < "$TMP/out.pb" \
        > "$TMP/out.pb.txt" 2> "$TMP/protoc.err" || { cat "$TMP/protoc.err"; fail "protoc cannot decode the profile"; }
    n=$(grep -c '^sample {' "$TMP/out.pb.txt")
    [ "$n" -gt 0 ] || fail "protoc sees no samples"
    [ "$(grep -c '^string_table:' "$TMP/out.pb.txt")" -gt 4 ] || fail "protoc sees no string table"
    echo "ok   protoc decodes the profile ($n samples)"
fi

echo "== allocsnoop filters, stacks, two PIDs ($MODE)"
LD_PRELOAD=$LIB "$WORKLOAD" -d 2500 -m 16 -l 300 -o /dev/null &
P1=$!
LD_PRELOAD=$LIB "$WORKLOAD" -d 2500 -m 16 -l 300 -o /dev/null &
P2=$!
BG_PIDS="$P1 $P2"
sleep 0.4
"$ALLOCSNOOP" -p "$P1,$P2" -e large,failure -U -d 10 > "$TMP/ev.txt" 2>&1 || fail "allocsnoop -p"
wait $P1 $P2
grep -q "^ *[0-9.]* *$P1 .*alloc_failure" "$TMP/ev.txt" || fail "no failure event from $P1"
grep -q "^ *[0-9.]* *$P2 .*alloc_failure" "$TMP/ev.txt" || fail "no failure event from $P2"
grep -q "large_alloc" "$TMP/ev.txt" || fail "no large_alloc event"
grep -Eq "^ *[0-9.]+ +[0-9]+ +[0-9]+ +sample " "$TMP/ev.txt" && fail "sample events despite -e large,failure"
grep -q "#[0-9]* *fail_site" "$TMP/ev.txt" || fail "failure stack does not name fail_site"
grep -q "#[0-9]* *large_site" "$TMP/ev.txt" || fail "large stack does not name large_site"
# nothing sampled with -e large,failure: no site ranked by sampled bytes ("0.0%  0 B ... 0 samples")
grep -Eq " 0 samples " "$TMP/ev.txt" && { grep -A3 "Top allocation" "$TMP/ev.txt"; fail "sites with 0 samples listed"; }
echo "== allocsnoop -b: every process mapping the library ($MODE)"
"$ALLOCSNOOP" -b "${LIB:-$WORKLOAD}" -e failure -U -d 4 > "$TMP/bw.txt" 2>&1 &
SN=$!
sleep 1.5
# -l: the processes stay a moment after their last event, as a service does.  One that exits
# before allocsnoop reads its first event cannot be symbolised (its maps are gone; -c is the way
# for short-lived commands), and a workload exiting at once made this check fail 1 run in ~10.
LD_PRELOAD=$LIB "$WORKLOAD" -m 2 -L 0 -l 500 -o /dev/null & Q1=$!
LD_PRELOAD=$LIB "$WORKLOAD" -m 2 -L 0 -l 500 -o /dev/null & Q2=$!
wait $Q1 $Q2
wait $SN || fail "allocsnoop -b"
for q in $Q1 $Q2; do
    grep -q "^ *[0-9.]* *$q .*alloc_failure" "$TMP/bw.txt" || { cat "$TMP/bw.txt"; fail "-b: no failure from $q"; }
done
grep -q "#0 *fail_site" "$TMP/bw.txt" || fail "-b: stacks not symbolised"

echo "== allocsnoop -b: a PID given to a later process ($MODE)"
# The first process is released (gone over a second); the second, forced onto its PID through
# ns_last_pid, was taken for it: never snapshotted, its sites "[unknown]" and merged into the
# first's under the same pid.  Each must be its own, symbolised.
"$ALLOCSNOOP" -b "${LIB:-$WORKLOAD}" --json -q > "$TMP/reuse.jsonl" 2> "$TMP/reuse.err" &
SN=$!
sleep 1.5
LD_PRELOAD=$LIB "$WORKLOAD" -m 2 -L 0 -l 300 -o /dev/null & X=$!
wait $X
sleep 2.5 # allocsnoop releases a process gone for a second, looking once a second
Y=
for _ in $(seq 20); do
    echo $((X - 1)) > /proc/sys/kernel/ns_last_pid 2>/dev/null || break
    LD_PRELOAD=$LIB "$WORKLOAD" -m 2 -L 0 -l 300 -o /dev/null & Y=$!
    wait $Y
    [ "$Y" = "$X" ] && break # else another process took the PID first: again
done
sleep 0.5
kill -INT $SN; wait $SN || { cat "$TMP/reuse.err"; fail "allocsnoop -b (PID reuse)"; }
if [ "$Y" = "$X" ]; then
    n=$(grep -c "\"type\":\"site\",\"pid\":$X,\"function\":\"site_a\"" "$TMP/reuse.jsonl")
    [ "$n" = 2 ] || { grep '"type":"site"' "$TMP/reuse.jsonl"; fail "-b: PID $X reused: site_a shown $n times, not once per process"; }
    grep -q "\"type\":\"site\",\"pid\":$X,\"function\":\"\[unknown\]" "$TMP/reuse.jsonl" &&
        { grep '"type":"site"' "$TMP/reuse.jsonl"; fail "-b: PID $X reused: the later process not symbolised"; }
    echo "ok   -b: two processes with PID $X, each symbolised and shown apart"
else
    [ "${CI:-}" = true ] && fail "could not give a process PID $X again through ns_last_pid"
    echo "note: could not give a process PID $X again (ns_last_pid); PID reuse not checked"
fi

echo "== the tools stop when their reader is gone, the target idle ($MODE)"
# The README: they detach and exit when the reader goes away.  Noticed only at a write, they ran
# on while the target had nothing to say (allocsnoop: until it exited; alloctop: to its next table).
LD_PRELOAD=$LIB "$WORKLOAD" -d 30000 -m 1 -o /dev/null & IP=$!
BG_PIDS="$BG_PIDS $IP"
wait_loaded "$IP"
timeout 15 "$ALLOCSNOOP" -p "$IP" | head -1 > /dev/null
rc=${PIPESTATUS[0]}
[ "$rc" != 124 ] || fail "allocsnoop ran on for 15 s after its reader left, the target idle"
# alloctop: the first table at 4 s; the next write would be at 8 s
timeout 7 "$ALLOCTOP" -p "$IP" 4 | head -1 > /dev/null
rc=${PIPESTATUS[0]}
[ "$rc" != 124 ] || fail "alloctop ran on to its next table after its reader left"
kill -0 "$IP" 2>/dev/null || fail "the idle target exited: nothing checked"
kill "$IP"; wait "$IP" 2>/dev/null
echo "ok   both stopped with their reader"

echo "== allocsnoop --min-size ($MODE)"
"$ALLOCSNOOP" -c "$WORKLOAD -m 16 -o /dev/null" --preload "$LIB" -e sample -m 3000 --json > "$TMP/ms.jsonl" 2>&1 ||
    fail "allocsnoop --min-size"
python3 - "$TMP/ms.jsonl" <<'PY' || fail "min-size filter"
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{"type":"event"')]
assert ev, "no events"
assert all(e["size"] >= 3000 for e in ev), "event below --min-size"
print("ok   %d sample events, all >= 3000 B" % len(ev))
PY
if [ "$MODE" = real ]; then
    echo "== -c finds liblumalloc.so through DT_NEEDED, and through LUMALLOC_LIB"
    "$ALLOCSNOOP" -c "$WORKLOAD_LINKED -m 8 -o /dev/null" -e failure -U > "$TMP/linked.txt" 2>&1 ||
        { cat "$TMP/linked.txt"; fail "allocsnoop -c on a linked executable"; }
    grep -q "#0 *fail_site" "$TMP/linked.txt" || fail "no failure events from the linked executable"
    LUMALLOC_LIB=$LIB "$ALLOCSNOOP" -c "$WORKLOAD -m 8 -o /dev/null" -e failure > "$TMP/env.txt" 2>&1 ||
        { cat "$TMP/env.txt"; fail "allocsnoop -c with LUMALLOC_LIB"; }
    [ "$(grep -c alloc_failure "$TMP/env.txt")" -ge 3 ] || fail "LUMALLOC_LIB not preloaded"
fi

echo "== samples batched where the library has sample_batch, per event otherwise; in order ($MODE)"
# The real library (preloaded or static) has sample_batch; the fake one only the per-event probes.
want=sample_batch; [ "$MODE" = fake ] && want=sample/sample_free
for how in default no-batch; do
    extra=; [ $how = no-batch ] && extra=--no-batch
    "$ALLOCSNOOP" -v $extra -c "$WORKLOAD -m 32 -o /dev/null" ${LIB:+--preload "$LIB"} --json -U \
        > "$TMP/order.$how.jsonl" 2> "$TMP/order.$how.err" || { cat "$TMP/order.$how.err"; fail "allocsnoop $extra"; }
    exp=$want; [ $how = no-batch ] && exp=sample/sample_free
    grep -q "samples through $exp\$" "$TMP/order.$how.err" ||
        fail "$how: expected samples through $exp: $(grep 'samples through' "$TMP/order.$how.err")"
    python3 - "$TMP/order.$how.jsonl" "$exp" <<'PY' || fail "$how: events"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ev = [l for l in lines if l["type"] == "event"]
summ = [l for l in lines if l["type"] == "summary"][0]
batched = sys.argv[2] == "sample_batch"
assert (summ["batches"] > 0) == batched, summ
assert summ["lost"]["ringbuf"] == 0 and summ["lost"]["batch"] == 0, summ
kinds = {}
for e in ev:
    kinds[e["event"]] = kinds.get(e["event"], 0) + 1
assert kinds.get("sample", 0) > 100 and kinds.get("sample_free", 0) > 50, kinds
for k in ("large_alloc", "alloc_failure", "thread_start", "thread_exit"):
    assert kinds.get(k, 0) > 0, (k, kinds)
assert sum(kinds.values()) == sum(summ["events"].values()), (kinds, summ["events"])
# Batched, one process's events come in the order they happened, whatever the kind (the
# library publishes its batch before any other probe fires).  Per event, threads on different
# CPUs race for ring-buffer slots, so only the batched path is held to it.
ts = [e["ts"] for e in ev]
if batched:
    assert all(a <= b for a, b in zip(ts, ts[1:])), "events out of order"
live = set()
for e in ev:
    if e["event"] == "sample":
        assert e["weight"] > 0 and e["usable"] >= e["size"], e
        live.add(e["ptr"])
    elif e["event"] == "sample_free" and batched:
        assert e["ptr"] in live, "free of a sample never seen: %s" % e
        live.discard(e["ptr"])
# A sample taken inside the profiler's own code (libunwind loading at the first unwind) has no
# stack, by the contract; the workload's have theirs.
stackless = [e for e in ev if e["event"] == "sample" and not e.get("stack")]
assert len(stackless) <= 16, "%d samples without a stack" % len(stackless)
names = {f for e in ev if e["event"] == "sample" for f in e.get("stack", [])}
assert {"site_a", "site_b", "site_c"} <= names, sorted(names)[:20]
print("ok   %s: %d events in order (%s), %d batches" % (sys.argv[2], len(ev), kinds, summ["batches"]))
PY
done

echo "== allocsnoop --older: the live reports leave out blocks younger than that ($MODE)"
# old_site keeps 8 MiB of 4 KiB blocks and a 3 MiB block; 3 s later young_site as much; 0.2 s
# later the process exits.  With -o 2 only old_site's are left, each stack with its oldest age
# (as of its exit: young_site's are ~0.2 s old then, old_site's ~3.2).  Ages are taken at the
# exit, so a target starved of CPU on a loaded machine (ctest -j2 beside the sanitizer builds)
# that exits late ages both: young_site's read 1.52 s once.  Hence the margins, and young
# checked against old (3 s apart whatever the exit's delay).
shapes=$SHAPES; [ "$MODE" = static ] && shapes=${SHAPES_STATIC:-}
for older in 0 2; do
    "$ALLOCSNOOP" -c "$shapes aging 3" ${LIB:+--preload "$LIB"} -q --json -o $older \
        > "$TMP/age.$older.jsonl" 2> "$TMP/age.err" || { cat "$TMP/age.err"; fail "allocsnoop -o $older"; }
done
python3 - "$TMP/age.0.jsonl" "$TMP/age.2.jsonl" <<'PY' || fail "--older"
import json, sys
def read(path):
    rows = [json.loads(l) for l in open(path) if l.startswith("{")]
    out = {}
    for r in rows:
        if r["type"] in ("live", "live_large"):
            site = "old" if "old_site" in r["stack"] else "young" if "young_site" in r["stack"] else None
            if site:
                out.setdefault((r["type"], site), []).append(r)
    return out
every, older = read(sys.argv[1]), read(sys.argv[2])
for t in ("live", "live_large"):
    for site in ("old", "young"):
        assert (t, site) in every, "no %s stack through %s_site without -o: %s" % (t, site, sorted(every))
    assert (t, "young") not in older, "-o 2 kept young_site's %s: %s" % (t, older.get((t, "young")))
    assert (t, "old") in older, "-o 2 lost old_site's %s" % t
    for r in every[(t, "old")] + older[(t, "old")]:
        assert r["oldest_s"] >= 2.9, r
    old_age = min(r["oldest_s"] for r in every[(t, "old")])
    for r in every[(t, "young")]:
        assert r["oldest_s"] < 2 and r["oldest_s"] <= old_age - 2.5, (r, old_age)
large = older[("live_large", "old")]
# usable sizes: the fake library's are glibc's (a page more for a mapped block)
assert len(large) == 1 and large[0]["blocks"] == 1 and 3 << 20 <= large[0]["bytes"] <= (3 << 20) + 65536, large
small = sum(r["bytes"] for r in older[("live", "old")] if r["bytes"] < 3 << 20 or r["samples"] > 1)
print("ok   -o 2: old_site's %.1f MiB sampled and its 3 MiB block, young_site's left out" % (small / 2**20))
PY

echo "== lost events are counted, never silently dropped ($MODE)"
LUMALLOC_SAMPLE_INTERVAL=1 "$ALLOCSNOOP" -c "$WORKLOAD -m 16 -o /dev/null" --preload "$LIB" --ringbuf-kib 4 -q --json \
    > "$TMP/lost.jsonl" 2>&1 || fail "allocsnoop --ringbuf-kib"
python3 - "$TMP/lost.jsonl" <<'PY' || fail "lost events not reported"
import json, sys
text = open(sys.argv[1]).read()
assert "warning: --ringbuf-kib 4 is small for batched samples" in text, "no warning about the tiny ring"
s = [json.loads(l) for l in text.splitlines() if '"type":"summary"' in l][0]
assert s["lost"]["ringbuf"] > 0, s
print("ok   %d events lost to a full ring buffer and reported (%d received)"
      % (s["lost"]["ringbuf"], sum(s["events"].values())))
PY
echo "PASS"
