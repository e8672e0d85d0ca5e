#!/bin/bash
# The tools under stress: two tools on one target at once, a target that exits mid-run, invalid
# options, and report files that are never world-writable whatever the umask.
source "$(dirname "$0")/tools_common.inc"

echo "== alloctop and allocsnoop attached to one process at once ($MODE)"
LD_PRELOAD=$LIB "$WORKLOAD" -d 1500 -m 32 -l 1500 -o "$TMP/truth.json" &
WP=$!
BG_PIDS=$WP
sleep 0.3
"$ALLOCTOP" -p "$WP" --json 0.5 6 > "$TMP/top.jsonl" 2> "$TMP/top.err" &
TP=$!
"$ALLOCSNOOP" -p "$WP" -q -d 3 --folded "$TMP/both.folded" > "$TMP/snoop.txt" 2> "$TMP/snoop.err" &
SNP=$!
wait $TP || { cat "$TMP/top.err"; fail "alloctop exited non-zero beside allocsnoop"; }
wait $SNP || { cat "$TMP/snoop.err"; fail "allocsnoop exited non-zero beside alloctop"; }
wait $WP
python3 - "$TMP/top.jsonl" "$TMP/truth.json" <<'PY' || fail "alloctop figures beside allocsnoop"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
assert lines, "no JSON from alloctop"
truth = json.load(open(sys.argv[2]))
def total(obj, key):
    # the last interval's per-thread cumulative bytes, whatever nesting the tool uses
    found = []
    def walk(o):
        if isinstance(o, dict):
            if key in o and isinstance(o[key], (int, float)): found.append(o[key])
            for v in o.values(): walk(v)
        elif isinstance(o, list):
            for v in o: walk(v)
    walk(obj)
    return found
assert any(total(l, "tid") for l in lines), "no threads in alloctop's JSON"
print("ok   alloctop: %d JSON intervals beside allocsnoop" % len(lines))
PY
[ -s "$TMP/both.folded" ] || fail "allocsnoop wrote no folded stacks beside alloctop"
grep -q ";" "$TMP/both.folded" || fail "folded stacks have no frames"
echo "ok   allocsnoop: $(wc -l < "$TMP/both.folded") folded stacks beside alloctop"

echo "== the target exits in the middle of a run ($MODE)"
# long enough for the tool to attach on a loaded machine, well short of the tool's 30 s
LD_PRELOAD=$LIB "$WORKLOAD" -d 2500 -m 8 -l 200 -o /dev/null &
WP=$!
BG_PIDS=$WP
sleep 0.3
start=$(date +%s.%N)
"$ALLOCSNOOP" -p "$WP" -q -d 30 > "$TMP/exit.txt" 2> "$TMP/exit.err" || { cat "$TMP/exit.err"; fail "allocsnoop failed when its target exited"; }
took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
wait $WP || true
awk -v t="$took" 'BEGIN { exit !(t < 20) }' || fail "allocsnoop waited ${took}s for a target that had exited"
[ -s "$TMP/exit.txt" ] || fail "no final report after the target exited"
echo "ok   allocsnoop ended ${took}s after start with its report once the target exited"
"$ALLOCTOP" -p "$WP" --json 0.2 2 > /dev/null 2> "$TMP/gone.err" && fail "alloctop on an exited PID exited 0"
[ "$(wc -l < "$TMP/gone.err")" -eq 1 ] || fail "alloctop on an exited PID: $(cat "$TMP/gone.err")"
echo "ok   alloctop on the exited PID: $(cat "$TMP/gone.err")"

echo "== invalid options: one line, non-zero ($MODE)"
bad() { # bad CMD...
    local out rc
    out=$("$@" 2>&1 >/dev/null); rc=$?
    [ $rc -ne 0 ] || fail "'$*' exited 0"
    printf '%s\n' "$out" | head -1 | grep -Eq "^(alloctop|allocsnoop|.*/(alloctop|allocsnoop)):" ||
        fail "'$*': first line does not name the tool: $out"
    echo "ok   $(printf '%s\n' "$out" | head -1)"
}
bad "$ALLOCTOP" -s nosuchkey -p 1
bad "$ALLOCTOP" -p 1 abc
bad "$ALLOCTOP" -p 1 0
bad "$ALLOCTOP" --bogus
bad "$ALLOCSNOOP" --min-size=xyz -p 1
bad "$ALLOCSNOOP" -e nosuchevent -p 1
bad "$ALLOCSNOOP" -d -5 -p 1
bad "$ALLOCSNOOP" -p notapid

echo "== report files under umask 000 are not world-writable ($MODE)"
# The target outlives the tool's run: on a loaded machine, loading and attaching the BPF programs
# took longer than a target of 600 ms had left, and the attach then failed (no such process).
LD_PRELOAD=$LIB "$WORKLOAD" -d 10000 -m 8 -l 200 -o /dev/null &
WP=$!
BG_PIDS=$WP
sleep 0.2
(umask 000 && "$ALLOCSNOOP" -p "$WP" -q -d 3 --folded "$TMP/u.folded" --pprof "$TMP/u.pb" > /dev/null 2> "$TMP/u.err") ||
    { cat "$TMP/u.err"; fail "allocsnoop with umask 000"; }
kill $WP 2>/dev/null
wait $WP || true
for f in "$TMP/u.folded" "$TMP/u.pb"; do
    mode=$(stat -c %a "$f")
    [ "$mode" = 644 ] || fail "$f created with mode $mode under umask 000"
done
echo "ok   reports created 0644 under umask 000"
echo "tools stress: all passed"
