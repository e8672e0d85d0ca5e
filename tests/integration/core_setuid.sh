#!/usr/bin/env bash
# A setuid program linked with lumalloc ignores LUMALLOC_* from its caller's environment, as
# glibc ignores its malloc tunables: LUMALLOC_PROF_DUMP let any user create or truncate a file as
# the program's owner.  Run as root (CI is): a setuid-root copy, run as nobody, must leave a
# root-only file alone and create none; run by root itself (not secure mode) it dumps, so the
# check would see a dump.
# Usage: core_setuid.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
fail() { echo "FAIL: $*"; exit 1; }
if [ "$(id -u)" != 0 ] || ! command -v setpriv > /dev/null; then
  [ "${CI:-}" = true ] && fail "needs root and setpriv in CI"
  echo "SKIP: needs root and setpriv"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
cp "$lib" "$work/liblumalloc.so.0"
cat > "$work/prog.c" << 'EOF'
#include <stdlib.h>
int main(void) { void *volatile p = malloc(100); free(p); return 0; }
EOF
cc -o "$work/prog" "$work/prog.c" "$work/liblumalloc.so.0" -Wl,-rpath,"$work"
chmod 4755 "$work/prog"
mkdir "$work/rootonly" && chmod 700 "$work/rootonly"
echo precious > "$work/rootonly/victim"

setpriv --reuid=65534 --regid=65534 --clear-groups \
  env LUMALLOC_PROF_DUMP="$work/rootonly/victim" LUMALLOC_PROF_SIGNAL=USR2 "$work/prog" \
  || fail "the setuid program failed"
[ "$(cat "$work/rootonly/victim")" = precious ] || fail "a user truncated a root-only file through LUMALLOC_PROF_DUMP"
setpriv --reuid=65534 --regid=65534 --clear-groups \
  env LUMALLOC_PROF_DUMP="$work/rootonly/new.txt" "$work/prog" || fail "the setuid program failed"
[ ! -e "$work/rootonly/new.txt" ] || fail "a user created a root-owned file through LUMALLOC_PROF_DUMP"

# control: not in secure mode, the variable is obeyed
LUMALLOC_PROF_DUMP="$work/rootonly/control.txt" "$work/prog"
[ -s "$work/rootonly/control.txt" ] || fail "the control run wrote no dump: the check above proves nothing"
echo "ok: LUMALLOC_* ignored in a setuid program"
