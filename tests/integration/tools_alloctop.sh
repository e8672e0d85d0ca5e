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
sleep 0.5
"$ALLOCTOP" -p "$WPID" --json --sites 0.2 > "$TMP/top_p.jsonl" 2> "$TMP/top_p.err" ||
    { cat "$TMP/top_p.err"; fail "alloctop -p exited $?"; }
wait "$WPID" || fail "workload failed"
python3 "$HERE/tools_check.py" alloctop "$TMP/truth_p.json" "$TMP/top_p.jsonl" || fail "alloctop -p checks"

echo "== alloctop: exact final figures of a command that exits within the first interval ($MODE)"
"$ALLOCTOP" -c "$WORKLOAD -m 32 -o $TMP/truth_x.json" --preload "$LIB" --json 30 > "$TMP/top_x.jsonl" \
    2> "$TMP/top_x.err" || { cat "$TMP/top_x.err"; fail "alloctop -c (short) exited $?"; }
python3 "$HERE/tools_check.py" alloctop-exit "$TMP/truth_x.json" "$TMP/top_x.jsonl" || fail "exit-time figures"

echo "== alloctop batch table ($MODE)"
LD_PRELOAD=$LIB "$WORKLOAD" -d 600 -m 64 -l 600 -o /dev/null &
WPID=$!
BG_PIDS=$WPID
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
(sleep 1.2; printf s; sleep 1.2; printf q) |
    timeout 20 script -q -e -c "$ALLOCTOP -p $WPID 0.3" /dev/null > "$TMP/tty.txt" 2>&1 || fail "interactive alloctop"
kill -0 "$WPID" 2>/dev/null || fail "alloctop did not quit on 'q' before the target exited"
grep -q $'\033\[H\033\[2J' "$TMP/tty.txt" || fail "screen not cleared"
grep -q "top allocation sites" "$TMP/tty.txt" || fail "'s' did not show the sites"
grep -q "site_a <- worker" "$TMP/tty.txt" || fail "sites view lacks site_a"
kill "$WPID"
echo "PASS"
