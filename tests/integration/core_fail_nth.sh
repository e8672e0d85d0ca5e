#!/usr/bin/env bash
# The failure injector over real programs: LUMALLOC_FAIL_NTH=k (the k-th allocation of the process
# fails, once) for a range of k over sort, sed, grep, sqlite3, git and python3 under
# LD_PRELOAD=liblumalloc.so with LUMALLOC_DIAG=all.  For every k the program must either succeed
# with exactly the output it gives under glibc, or fail cleanly: a non-zero exit status (or
# python's deliberate abort after "Fatal Python error"), never another signal (no SIGSEGV, no
# SIGBUS), never a hang (timeout).  Whenever k is within the program's allocations the
# diagnostics report of the injected failure must be on stderr.
# Usage: core_fail_nth.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
# Debian's interpreter itself: a version manager's python3 on PATH may be a bash shim, and the
# k-th allocation would then fail in one of the shim's bash processes instead of in python3.
py=/usr/bin/python3
[ -x "$py" ] || py=$(command -v python3)

seq 1 3000 | python3 -c 'import random, sys; l = sys.stdin.read().split(); random.Random(5).shuffle(l); print("\n".join(l))' > "$work/in.txt"
git init -q "$work/repo"
( cd "$work/repo" && for i in 1 2 3; do echo "$i" > f$i; git add f$i; \
  GIT_AUTHOR_DATE='1700000000 +0000' GIT_COMMITTER_DATE='1700000000 +0000' \
  git -c user.name=t -c user.email=t@e commit -q -m "c$i"; done )

total_runs=0 clean_failures=0
sweep() { # name, strict|lenient, k-list, command...
  local name=$1 mode=$2 ks=$3; shift 3
  "$@" > "$work/ref.out" 2> "$work/ref.err" || fail "$name fails under glibc"
  local reports=0 fails=0 differ=0
  for k in $ks; do
    local rc=0
    LD_PRELOAD=$lib LUMALLOC_FAIL_NTH=$k LUMALLOC_DIAG=all timeout -s KILL 20 "$@" \
      > "$work/out" 2> "$work/err" || rc=$?
    total_runs=$((total_runs + 1))
    grep -q "failed: ENOMEM (injected)" "$work/err" && reports=$((reports + 1))
    if [ "$rc" = 0 ]; then
      if ! cmp -s "$work/out" "$work/ref.out"; then
        differ=$((differ + 1))
        [ "$mode" = strict ] && { head -c 600 "$work/err"; fail "$name k=$k: exit 0 with different output"; }
      fi
    elif [ "$rc" = 137 ]; then
      fail "$name k=$k: hung (killed after 20 s)"
    elif [ "$rc" -gt 128 ]; then
      if [ "$rc" = 134 ] && grep -q "Fatal Python error" "$work/err"; then
        fails=$((fails + 1)) # python's own abort on a failed allocation during start-up
      else
        head -c 1500 "$work/err"; fail "$name k=$k: killed by signal $((rc - 128))"
      fi
    else
      fails=$((fails + 1))
    fi
  done
  # k = 1..5 are within any of these programs' allocations: each of those runs shows a report
  [ "$reports" -ge 5 ] || fail "$name: only $reports runs printed the injected-failure report"
  clean_failures=$((clean_failures + fails))
  echo "ok: $name: $(wc -w <<< "$ks") runs, $fails clean failures, $reports reports, $differ silent wrong outputs ($mode)"
}

dense() { seq 1 "$1"; seq "$(( $1 + 1 ))" "$3" "$2"; } # 1..N, then every STEP up to MAX
sweep sort strict "$(dense 60 2000 37)" sort -n "$work/in.txt"
sweep sed lenient "$(dense 40 400 13)" sed -e 's/1/one/g' -e '/7/d' "$work/in.txt"
sweep grep lenient "$(dense 40 400 13)" grep -c -E '^(1|2)[0-9]*5$' "$work/in.txt"
# -init /dev/null: no ~/.sqliterc lookup, whose getpwuid() crashes inside glibc 2.36 when its NSS
# allocation fails (nss_database.c:402 dereferences NULL), a glibc bug, not the allocator's
sweep sqlite3 strict "$(dense 50 3000 61)" sqlite3 -init /dev/null :memory: \
  "create table t(a, b); with recursive n(i) as (select 1 union all select i+1 from n where i < 2000) insert into t select i, printf('%0*d', i % 50, i) from n; create index tb on t(b); select count(*), sum(a), max(length(b)) from t;"
sweep git strict "$(dense 40 3000 97)" git -C "$work/repo" log --stat --format=%s
sweep python3 lenient "$(dense 30 6000 131)" "$py" -c 'import json, collections; d = {str(i): list(range(i % 7)) for i in range(500)}; print(len(json.dumps(d)), collections.Counter(len(v) for v in d.values()).most_common(2))'
echo "fail_nth: $total_runs runs, $clean_failures clean failures, no crash, no hang"
