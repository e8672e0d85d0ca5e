#!/bin/bash
# alloctop: exact per-thread figures (registry) within 5% of the workload's own counts, sites
# in the right proportions, both with -c (attached before exec) and -p (attached to a running
# process).
source "$(dirname "$0")/tools_common.inc"

echo "== alloctop -c ($MODE)"
"$ALLOCTOP" -c "$WORKLOAD -m 128 -p 60 -l 700 -o $TMP/truth_c.json" --preload "$LIB" --json --sites 0.2 \
    > "$TMP/top_c.jsonl" 2> "$TMP/top_c.err" || { cat "$TMP/top_c.err"; fail "alloctop -c exited $?"; }
python3 "$HERE/tools_check.py" alloctop "$TMP/truth_c.json" "$TMP/top_c.jsonl" || fail "alloctop -c checks"

echo "== alloctop -p ($MODE)"
LD_PRELOAD=$LIB "$WORKLOAD" -d 1500 -m 128 -p 60 -l 1000 -o "$TMP/truth_p.json" &
WPID=$!
BG_PIDS=$WPID
wait_loaded "$WPID"
sleep 0.5
"$ALLOCTOP" -p "$WPID" --json --sites 0.2 > "$TMP/top_p.jsonl" 2> "$TMP/top_p.err" ||
    { cat "$TMP/top_p.err"; fail "alloctop -p exited $?"; }
wait "$WPID" || fail "workload failed"
python3 "$HERE/tools_check.py" alloctop "$TMP/truth_p.json" "$TMP/top_p.jsonl" || fail "alloctop -p checks"

echo "== alloctop: exact final figures of a command that exits within the first interval ($MODE)"
"$ALLOCTOP" -c "$WORKLOAD -m 32 -o $TMP/truth_x.json" --preload "$LIB" --json 30 > "$TMP/top_x.jsonl" \
    2> "$TMP/top_x.err" || { cat "$TMP/top_x.err"; fail "alloctop -c (short) exited $?"; }
python3 "$HERE/tools_check.py" alloctop-exit "$TMP/truth_x.json" "$TMP/top_x.jsonl" || fail "exit-time figures"

echo "== alloctop -B: processes found by the file they map, started after alloctop ($MODE)"
"$ALLOCTOP" -B "${LIB:-$WORKLOAD}" --json --sites 0.3 14 > "$TMP/top_b.jsonl" 2> "$TMP/top_b.err" &
TB=$!
sleep 1.5
LD_PRELOAD=$LIB "$WORKLOAD" -m 64 -p 40 -l 400 -o "$TMP/truth_b1.json" & Q1=$!
LD_PRELOAD=$LIB "$WORKLOAD" -m 32 -p 40 -l 400 -o "$TMP/truth_b2.json" & Q2=$!
wait $Q1 $Q2
wait $TB || { cat "$TMP/top_b.err"; fail "alloctop -B exited $?"; }
python3 - "$TMP/top_b.jsonl" "$TMP/truth_b1.json" "$TMP/truth_b2.json" <<'PY' || fail "alloctop -B figures"
import json, sys
objs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for tp in sys.argv[2:]:
    truth = json.load(open(tp))
    last = None
    for o in objs:
        for p in o["processes"]:
            if p["pid"] == truth["pid"]:
                last = p
    assert last is not None, "pid %d never shown" % truth["pid"]
    assert not last["alive"], "pid %d not seen exiting" % truth["pid"]
    by_tid = {t["tid"]: t for t in last["threads"]}
    for w in truth["threads"]:
        got = by_tid[w["tid"]]["alloc_bytes"]
        assert abs(got / w["alloc_bytes"] - 1) <= 0.05, (w, got)
    assert last["sites"] and last["sites"][0]["function"] == "site_a", last["sites"][:2]
    print("ok   pid %d: exact per-thread figures at exit, top site site_a" % truth["pid"])
PY

echo "== alloctop batch table ($MODE)"
LD_PRELOAD=$LIB "$WORKLOAD" -d 600 -m 64 -l 600 -o /dev/null &
WPID=$!
BG_PIDS=$WPID
wait_loaded "$WPID"
sleep 0.3
"$ALLOCTOP" -p "$WPID" -s live -r 5 --sites 0.25 3 > "$TMP/table.txt" 2>&1 || fail "alloctop table"
wait "$WPID"
grep -q "TID COMM" "$TMP/table.txt" || fail "no table header"
grep -q "RSS" "$TMP/table.txt" || fail "no process totals"
[ "$(grep -c '^alloctop ' "$TMP/table.txt")" -ge 3 ] || fail "expected 3 intervals"
echo "== alloctop interactive: clears the screen, 's' shows sites, 'q' quits ($MODE)"
LD_PRELOAD=$LIB "$WORKLOAD" -d 300 -m 64 -p 150 -l 3000 -o /dev/null &
WPID=$!
BG_PIDS=$WPID
wait_loaded "$WPID"
(sleep 1.2; printf s; sleep 1.2; printf q) |
    timeout 20 script -q -e -c "$ALLOCTOP -p $WPID 0.3" /dev/null > "$TMP/tty.txt" 2>&1 ||
    { rc=$?; tail -c 600 "$TMP/tty.txt" | tr '\033' '^'; echo; fail "interactive alloctop (exit $rc)"; }
kill -0 "$WPID" 2>/dev/null || fail "alloctop did not quit on 'q' before the target exited"
grep -q $'\033\[H\033\[2J' "$TMP/tty.txt" || fail "screen not cleared"
grep -q "top allocation sites" "$TMP/tty.txt" || fail "'s' did not show the sites"
grep -q "site_a <- worker" "$TMP/tty.txt" || fail "sites view lacks site_a"
kill "$WPID"
echo "PASS"
