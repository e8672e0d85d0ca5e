#!/bin/bash
# One clear line and a non-zero exit for each usage error.
source "$(dirname "$0")/tools_common.inc"

expect_err() { # expect_err PATTERN CMD...
    local pat=$1; shift
    local out rc
    out=$("$@" 2>&1 >/dev/null); rc=$?
    [ $rc -ne 0 ] || fail "'$*' exited 0"
    [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] || fail "'$*' printed more than one line: $out"
    printf '%s\n' "$out" | grep -q "$pat" || fail "'$*': '$out' does not match '$pat'"
    echo "ok   $*: $out"
}
for tool in "$ALLOCTOP" "$ALLOCSNOOP"; do
    expect_err "no such process" "$tool" -p 999999999
    sleep 30 & SP=$!; BG_PIDS=$SP
    expect_err "does not use lumalloc.*LD_PRELOAD" "$tool" -p "$SP"
    kill $SP
    expect_err "not linked with lumalloc.*--preload" "$tool" -c "/bin/true"
    expect_err "command not found" "$tool" -c "/nonexistent/cmd"
    expect_err "need root" setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all "$tool" -p 1
done
# Capabilities without ptrace rights over another user's process.
LD_PRELOAD=$LIB "$WORKLOAD" -d 5000 -m 1 -o /dev/null & WP=$!; BG_PIDS=$WP
sleep 0.2
CAPS="setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=+bpf,+perfmon --ambient-caps=+bpf,+perfmon"
if $CAPS true 2>/dev/null; then
    expect_err "needs CAP_SYS_PTRACE" $CAPS "$ALLOCTOP" --no-bpf -p "$WP" 0.2 1
    expect_err "Permission denied (run as root)" $CAPS "$ALLOCTOP" -p "$WP" 0.2 1
    expect_err "Permission denied (run as root)" $CAPS "$ALLOCSNOOP" -p "$WP" -d 1
else
    echo "note: setpriv cannot raise ambient capabilities here; capability-only cases not run"
fi
kill "$WP"
echo "PASS"
