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
# ZP: a zombie (its parent sleeps without reaping it); KT: a kernel thread, if we see one (none
# in a container's PID namespace)
python3 -c 'import os, sys, time
p = os.fork()
if p == 0: os._exit(0)
print(p, flush=True); sys.stdout.close(); time.sleep(30)' > "$TMP/zombie" & ZPARENT=$!
for _ in $(seq 100); do [ -s "$TMP/zombie" ] && break; sleep 0.05; done
ZP=$(cat "$TMP/zombie")
for _ in $(seq 100); do grep -q '^State:.*Z' "/proc/$ZP/status" 2>/dev/null && break; sleep 0.05; done
KT=$(python3 -c 'import os
for p in os.listdir("/proc"):
    try:
        if p.isdigit() and int(open("/proc/%s/stat" % p).read().rsplit(")", 1)[1].split()[6]) & 0x200000:
            print(p); break
    except OSError: pass')
[ -n "$KT" ] || echo "note: no kernel thread in our PID namespace: that case not run"
expect_err "process $ZP has exited (a zombie" "$ALLOCSNOOP" --heap -p "$ZP"
for tool in "$ALLOCTOP" "$ALLOCSNOOP"; do
    expect_err "no target" "$tool"
    expect_err "unknown option '--bogus'" "$tool" --bogus
    expect_err "unknown option -Z" "$tool" -Z
    expect_err "option -p needs a value" "$tool" -p
    # long options named as typed (a long-only option's number was printed as a byte)
    expect_err "^[a-z]*: option '--preload' needs a value (see --help)$" "$tool" --preload
    expect_err "^[a-z]*: option '--pid' needs a value (see --help)$" "$tool" --pid
    expect_err "^[a-z]*: option '--help' takes no value (see --help)$" "$tool" --help=1
    expect_err "^[a-z]*: unknown option '--bogus' (see --help)$" "$tool" --bogus=3
    expect_err "give only one" "$tool" -p 1 -c /bin/true
    expect_err "no such process" "$tool" -p 999999999
    sleep 30 & SP=$!; BG_PIDS=$SP
    expect_err "does not use lumalloc.*LD_PRELOAD" "$tool" -p "$SP"
    kill $SP
    expect_err "not linked with lumalloc.*--preload" "$tool" -c "/bin/true"
    # an exited process not yet reaped, and a kernel thread, are not told to use LD_PRELOAD
    expect_err "process $ZP has exited (a zombie" "$tool" -p "$ZP"
    if [ -n "$KT" ]; then expect_err "process $KT (.*) is a kernel thread" "$tool" -p "$KT"; fi
    expect_err "command not found" "$tool" -c "/nonexistent/cmd"
    expect_err "need root" setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all "$tool" -p 1
done
# Numbers are checked whole (atof took "nan" as a number and "1x" as 1).
expect_err "invalid interval 'nan'" "$ALLOCTOP" -p 1 nan
expect_err "invalid interval '0'" "$ALLOCTOP" -p 1 0
expect_err "invalid count 'abc'" "$ALLOCTOP" -p 1 1 abc
expect_err "unexpected argument '3'" "$ALLOCTOP" -p 1 1 2 3
expect_err "invalid row count '-5'" "$ALLOCTOP" -r -5 -p 1
expect_err "invalid duration 'nan'" "$ALLOCSNOOP" -d nan -p 1
expect_err "invalid size '1e30'" "$ALLOCSNOOP" -m 1e30 -p 1
expect_err "invalid size '10kx'" "$ALLOCSNOOP" -m 10kx -p 1
expect_err "invalid leak report size 'abc'" "$ALLOCSNOOP" --leaks abc -p 1
expect_err "invalid ring buffer size" "$ALLOCSNOOP" --ringbuf-kib 4194304 -p 1
# --heap reads running processes, and takes none of a trace's options.
expect_err "give -p PID" "$ALLOCSNOOP" --heap -c /bin/true
expect_err "heap takes -p, -j" "$ALLOCSNOOP" --heap -e sample -p 1
expect_err "heap takes -p, -j" "$ALLOCSNOOP" --heap -d 5 -p 1
expect_err "heap takes -p, -j" "$ALLOCSNOOP" --heap -o 5 -p 1
expect_err "invalid --older" "$ALLOCSNOOP" -o -1 -p 1
expect_err "no event kinds in -e ''" "$ALLOCSNOOP" -e '' -p 1
expect_err "no event kinds in -e ','" "$ALLOCSNOOP" -e , -p 1
for o in --leaks --ringbuf-kib --pprof --folded; do
    expect_err "^allocsnoop: option '$o' needs a value (see --help)$" "$ALLOCSNOOP" -p 1 "$o"
done
expect_err "^allocsnoop: option '--json' takes no value (see --help)$" "$ALLOCSNOOP" -p 1 --json=1
expect_err "^alloctop: option '--no-bpf' takes no value (see --help)$" "$ALLOCTOP" -p 1 --no-bpf=3
# A report file that cannot be written is an error before tracing starts, not after.
expect_err "cannot write /nonexistent/dir/x.folded" "$ALLOCSNOOP" -p 1 --folded /nonexistent/dir/x.folded
expect_err "cannot write $TMP: Is a directory" "$ALLOCSNOOP" -p 1 --pprof "$TMP"
# ... and leaves an earlier report alone: a mistyped PID cost the previous capture.
echo previous > "$TMP/prev.pb"; echo previous > "$TMP/prev.folded"
expect_err "no such process" "$ALLOCSNOOP" --pprof "$TMP/prev.pb" --folded "$TMP/prev.folded" -p 999999999
[ "$(cat "$TMP/prev.pb")" = previous ] && [ "$(cat "$TMP/prev.folded")" = previous ] ||
    fail "a failed run truncated the report files it was given"
expect_err "no such process" "$ALLOCSNOOP" --pprof "$TMP/new.pb" -p 999999999
[ ! -e "$TMP/new.pb" ] || fail "a failed run left an empty report file"
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
kill "$WP" "$ZPARENT"
echo "PASS"
