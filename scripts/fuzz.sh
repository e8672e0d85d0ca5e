#!/usr/bin/env bash
# Long libFuzzer run of the heap harness (tests/fuzz/fuzz_heap.c).
#   scripts/fuzz.sh [SECONDS] [WORKERS]      defaults: 3600 s, 1 worker
# Builds into build/fuzz (tests/fuzz/build.sh; FUZZ_SANITIZE=undefined by default), keeps the
# corpus in build/fuzz/corpus between runs (it grows over runs), writes crashing inputs to
# build/fuzz/artifacts/.  Reproduce a crash: build/fuzz/fuzz_heap build/fuzz/artifacts/crash-...
# Options the allocator reads apply (e.g. LUMALLOC_SAMPLE_INTERVAL=64k exercises sampled pages
# more; LUMALLOC_LARGE_THRESHOLD=64k sends more sizes to the large path).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-3600}
workers=${2:-1}
out=${FUZZ_OUT:-$root/build/fuzz}
bash "$root/tests/fuzz/build.sh" "$out"
mkdir -p "$out/corpus" "$out/artifacts"
export LUMALLOC_SAMPLE_INTERVAL=${LUMALLOC_SAMPLE_INTERVAL:-128k}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
cd "$out"
exec ./fuzz_heap -max_total_time="$seconds" -timeout=20 -max_len=8192 -rss_limit_mb=4000 \
  -jobs="$workers" -workers="$workers" -print_final_stats=1 \
  -artifact_prefix="$out/artifacts/" "$out/corpus"
