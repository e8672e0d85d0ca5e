#!/usr/bin/env bash
# Long reliability run (not part of CI): repeats the stress and real-program tests for a while.
#   scripts/soak.sh [MINUTES] [BUILD_DIR]        defaults: 60 minutes, ./build
# Each round: tests/test_stress with LUM_STRESS_SCALE=10 (each phase ~10x longer, ~90 s),
# test_oom, test_failure_sweep, then one of the real-program scripts in turn (redis, sqlite/git,
# fail_nth, python).  Stops at the first failure and keeps its log in BUILD_DIR/soak/.  For long
# fuzzing use scripts/fuzz.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
minutes=${1:-60}
build=$(realpath "${2:-$root/build}")
lib=$build/lib/liblumalloc.so
[ -x "$build/tests/test_stress" ] && [ -f "$lib" ] || { echo "build first: cmake -S $root -B $build && make -C $build"; exit 2; }
mkdir -p "$build/soak"
end=$(( $(date +%s) + minutes * 60 ))
programs=(core_programs_redis core_programs_sqlite_git core_fail_nth core_programs_python)
round=0
while [ "$(date +%s)" -lt "$end" ]; do
  round=$((round + 1))
  log=$build/soak/round-$round.log
  run() { "$@" >> "$log" 2>&1 || { echo "round $round FAILED: $* (log: $log)"; tail -30 "$log"; exit 1; }; }
  LUM_STRESS_SCALE=10 run "$build/tests/test_stress"
  run "$build/tests/test_oom"
  run "$build/tests/test_failure_sweep"
  p=${programs[$(( (round - 1) % ${#programs[@]} ))]}
  run bash "$root/tests/integration/$p.sh" "$lib" "$build"
  echo "round $round ok ($(grep -h '^# mixed' "$log" | head -1); $p)"
  rm -f "$log"
done
echo "soak: $round rounds in $minutes minutes, no failure"
