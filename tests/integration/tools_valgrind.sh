#!/bin/bash
# valgrind over the tools: no invalid access, no uninitialised use, no leak.  libbpf's bpf()
# syscalls are outside valgrind's model, so the BPF attach path is left out; what runs here is
# the tools' own code: the shared library's unit tests, alloctop reading a live target's
# registry (--no-bpf), and every error path.
source "$(dirname "$0")/tools_common.inc"
command -v valgrind > /dev/null || skip "valgrind not installed"
# one run is enough: the tools' code is the same whatever library the target uses
[ "$MODE" = real ] || { echo "ok: valgrind runs in the real mode only"; exit 0; }
VG="valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect"

run_vg() { # name, expected exit (or "nonzero"), command...
    local name=$1 want=$2; shift 2
    $VG "$@" > "$TMP/vg.out" 2> "$TMP/vg.err"
    local rc=$?
    [ $rc -ne 99 ] || { cat "$TMP/vg.err"; fail "valgrind found errors in $name"; }
    if [ "$want" = nonzero ]; then [ $rc -ne 0 ] || fail "$name exited 0"; else [ $rc -eq "$want" ] || { cat "$TMP/vg.err"; fail "$name exited $rc"; }; fi
    echo "ok   valgrind clean: $name"
}

UNIT=$(dirname "$ALLOCTOP")/../tools_unit_common
# its one BPF case is left out as the attach path is (TOOLS_UNIT_NO_BPF), and runs in tools_unit_common
export TOOLS_UNIT_NO_BPF=1
[ -x "$UNIT" ] && run_vg "tools_unit_common" 0 "$UNIT"
unset TOOLS_UNIT_NO_BPF

LD_PRELOAD=$LIB "$WORKLOAD" -d 100 -m 64 -l 20000 -o /dev/null &
WP=$!
BG_PIDS=$WP
sleep 0.3
run_vg "alloctop --no-bpf --json" 0 "$ALLOCTOP" --no-bpf -p "$WP" --json 0.5 3
grep -q '"tid"' "$TMP/vg.out" || fail "alloctop under valgrind printed no threads"
run_vg "alloctop --no-bpf table" 0 "$ALLOCTOP" --no-bpf -p "$WP" -C 0.5 2
kill $WP 2>/dev/null; wait $WP 2>/dev/null

for tool in "$ALLOCTOP" "$ALLOCSNOOP"; do
    run_vg "$(basename "$tool") no such pid" nonzero "$tool" -p 999999999
    run_vg "$(basename "$tool") bad option" nonzero "$tool" --bogus
    sleep 5 & SP=$!
    run_vg "$(basename "$tool") without lumalloc" nonzero "$tool" -p "$SP"
    kill $SP 2>/dev/null
done
echo "tools valgrind: all clean"
