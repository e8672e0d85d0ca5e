#!/bin/bash
# The tools as an SRE uses them on a live service: events shown as they happen, not all at the
# end; a reader that goes away (`| head`) stops the tool; a thread ID or a repeated PID means
# the process, once; a -c command killed by a signal gives 128 + the signal; -m leaves the
# events without a size alone; the final table after Ctrl-C has fresh rates; in a terminal the
# table fits the window.
source "$(dirname "$0")/tools_common.inc"

start_workload() { # start_workload ARGS...: a paced workload in the background, its PID in $WPID
    LD_PRELOAD=$LIB "$WORKLOAD" "$@" -o /dev/null &
    WPID=$!
    BG_PIDS="$BG_PIDS $WPID"
    wait_loaded "$WPID"
    sleep 0.3
}

echo "== allocsnoop shows sample events while the target runs ($MODE)"
start_workload -m 32 -p 300 -l 500
# Arrival times of the lines, relative to the first one.  Sample events wake the reader only
# when the ring is a quarter full, so a reader that never looked without a wake-up got them all
# at exit, seconds late.
timeout -s INT 2.5 "$ALLOCSNOOP" -p "$WPID" -e sample 2> "$TMP/live.err" | python3 -c '
import sys, time
first = None; windows = set(); n = 0
for line in sys.stdin:
    now = time.monotonic()
    if first is None: first = now
    n += 1
    windows.add(int((now - first) / 0.4))
print(n, len(windows))' > "$TMP/live.txt"
read -r nlines nwin < "$TMP/live.txt"
[ "$nlines" -gt 20 ] || { cat "$TMP/live.err"; fail "allocsnoop printed $nlines lines"; }
[ "$nwin" -ge 3 ] || fail "allocsnoop's lines came in $nwin bursts of 0.4 s: not live"
echo "ok   $nlines lines over $nwin windows of 0.4 s"
kill "$WPID" 2>/dev/null; wait "$WPID" 2>/dev/null

echo "== a reader that goes away stops the tools ($MODE)"
start_workload -m 256 -p 1000 -l 3000
for cmd in "$ALLOCSNOOP -p $WPID" "$ALLOCSNOOP -p $WPID --json" "$ALLOCTOP -p $WPID 0.2"; do
    timeout 20 $cmd 2>/dev/null | head -2 > /dev/null
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 124 ] || fail "'$cmd | head' still running after 20 s"
    echo "ok   $cmd | head -2: exited ($rc)"
done
kill -0 "$WPID" 2>/dev/null || fail "the workload exited early: the check proves nothing"
kill "$WPID" 2>/dev/null; wait "$WPID" 2>/dev/null

echo "== -p with a thread ID, or a PID twice, watches the process once ($MODE)"
start_workload -m 64 -p 400 -l 500
TID=$(ls "/proc/$WPID/task" | grep -v "^$WPID\$" | head -1)
[ -n "$TID" ] || fail "no worker thread in $WPID"
"$ALLOCTOP" -p "$TID" 0.2 1 > "$TMP/tid.txt" 2> "$TMP/tid.err" || { cat "$TMP/tid.err"; fail "alloctop -p TID"; }
grep -q "thread of process $WPID" "$TMP/tid.err" || fail "no warning that $TID is a thread: $(cat "$TMP/tid.err")"
grep -q "^PID $WPID " "$TMP/tid.txt" || fail "alloctop -p $TID does not show process $WPID"
"$ALLOCTOP" -p "$WPID,$WPID" -p "$WPID" 0.2 1 > "$TMP/dup.txt" 2>&1 || fail "alloctop -p PID,PID"
[ "$(grep -c "^PID $WPID " "$TMP/dup.txt")" -eq 1 ] || fail "process shown $(grep -c "^PID $WPID " "$TMP/dup.txt") times"
echo "ok   thread ID and repeated PID"

echo "== the final table after Ctrl-C has this interval's rates ($MODE)"
# An interval longer than the run: before the fix the final table showed the baseline only.
timeout -s INT 1.5 "$ALLOCTOP" -p "$WPID" --json 30 > "$TMP/final.jsonl" 2> "$TMP/final.err"
python3 - "$TMP/final.jsonl" <<'PY' || fail "final table"
import json, sys
objs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
assert objs and objs[-1]["final"], "no final report"
rates = [t["alloc_bps"] for p in objs[-1]["processes"] for t in p["threads"]]
assert any(r > 0 for r in rates), rates
print("ok   final report with rates %s" % [round(r) for r in rates if r > 0][:3])
PY
kill "$WPID" 2>/dev/null; wait "$WPID" 2>/dev/null

echo "== in a terminal, alloctop's frame fits the window ($MODE)"
start_workload -m 64 -p 400 -l 500
python3 - "$ALLOCTOP" "$WPID" <<'PY' || fail "alloctop's frame does not fit a 20x60 terminal"
import fcntl, os, pty, select, signal, struct, sys, termios, time
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], [sys.argv[1], "-p", sys.argv[2], "--sites", "0.5"])
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 60, 0, 0))
os.kill(pid, signal.SIGWINCH)
buf, t0 = b"", time.time()
while time.time() - t0 < 2.5:
    if select.select([fd], [], [], 0.2)[0]:
        try: buf += os.read(fd, 65536)
        except OSError: break
os.write(fd, b"q")
try:
    while select.select([fd], [], [], 1)[0]:
        buf += os.read(fd, 65536)
except OSError: pass
os.waitpid(pid, 0)
frames = buf.split(b"\x1b[H\x1b[2J")
assert len(frames) > 2, "no redraws"
lines = frames[-2].decode(errors="replace").split("\r\n")
# Before: the process line alone was ~110 columns, and the frame scrolled its top away.
assert len(lines) <= 20 and max(len(l) for l in lines) <= 60, (len(lines), max(len(l) for l in lines))
print("ok   %d lines, widest %d columns" % (len(lines), max(len(l) for l in lines)))
PY
kill "$WPID" 2>/dev/null; wait "$WPID" 2>/dev/null

echo "== -m filters allocations only: thread events pass ($MODE)"
"$ALLOCSNOOP" -c "$WORKLOAD -m 8 -o /dev/null" ${LIB:+--preload "$LIB"} -e thread -m 1K --json -q \
    > "$TMP/thr.jsonl" 2>&1 || fail "allocsnoop -e thread -m 1K"
python3 - "$TMP/thr.jsonl" <<'PY' || fail "-m dropped thread events"
import json, sys
s = [json.loads(l) for l in open(sys.argv[1]) if '"type":"summary"' in l][0]
assert s["events"]["thread_start"] > 0 and s["events"]["thread_exit"] > 0, s["events"]
print("ok   %d thread_start events with -m 1K" % s["events"]["thread_start"])
PY

if [ -n "$LIB" ]; then
    echo "== a -c command killed by a signal: exit status 128 + signal ($MODE)"
    for tool in "$ALLOCTOP" "$ALLOCSNOOP"; do
        "$tool" --preload "$LIB" -c "sh -c 'kill -SEGV \$\$'" > /dev/null 2>&1
        rc=$?
        [ "$rc" -eq 139 ] || fail "$(basename "$tool") -c with a command killed by SIGSEGV exited $rc"
    done
    echo "ok   139"
fi
echo "PASS"
