#!/usr/bin/env bash
# The main job: a demo service runs under lumalloc (LD_PRELOAD) and alloctop watches it live.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
lib=$PWD/build/lib/liblumalloc.so
seconds=${DEMO_SECONDS:-20}
LD_PRELOAD=$lib ./build/demo/demo_workload "$seconds" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
sleep 1
if [ -x build/tools/alloctop/alloctop ]; then
  # a few refreshes; in a terminal it redraws like top, piped it prints one table per interval
  build/tools/alloctop/alloctop -p "$pid" 2 $(( seconds / 2 - 1 )) || true
  # and what holds its memory, read from lumalloc's own profile (nothing attached): the leak
  build/tools/allocsnoop/allocsnoop --heap -p "$pid" --leaks 2 || true
else
  echo "demo: alloctop is not built (see tools/); showing the allocator's own report instead"
fi
wait $pid
