#!/usr/bin/env bash
# A short libFuzzer run of tests/fuzz/fuzz_heap.c (30 s): the harness interprets each input as a
# program of malloc/calloc/realloc/aligned_alloc/posix_memalign/memalign/valloc/free/free_sized/
# malloc_usable_size operations over a table of live blocks, verifies every block's pattern and the
# API's promises, and runs lum_heap_check; the allocator's sources are compiled into the fuzzer
# with coverage and UBSan (tests/fuzz/build.sh).  Any crash, abort, UB report or timeout fails.
# Long runs: scripts/fuzz.sh.  Usage: core_fuzz.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
build=$(realpath "$2")
fail() { echo "FAIL: $*"; exit 1; }
if ! command -v clang >/dev/null || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  [ "${CI:-}" = true ] && fail "clang with libFuzzer is missing (apt-get install clang libclang-rt-14-dev)"
  echo "SKIP: clang with libFuzzer is missing (apt-get install clang libclang-rt-14-dev)"; exit 0
fi
out=$build/fuzz
bash "$src/tests/fuzz/build.sh" "$out" > "$out.build.log" 2>&1 || { tail -30 "$out.build.log"; fail "fuzzer build"; }
rm -rf "$out/corpus" "$out/artifacts"
mkdir -p "$out/corpus" "$out/artifacts"
seed=${FUZZ_SEED:-$RANDOM}
echo "fuzzing for ${FUZZ_SECONDS:-30} s, -seed=$seed"
rc=0
LUMALLOC_SAMPLE_INTERVAL=128k UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  timeout -s KILL $(( ${FUZZ_SECONDS:-30} + 60 )) "$out/fuzz_heap" -seed="$seed" \
  -max_total_time="${FUZZ_SECONDS:-30}" -timeout=10 -max_len=4096 -rss_limit_mb=3000 \
  -artifact_prefix="$out/artifacts/" "$out/corpus" > "$out/fuzz.log" 2>&1 || rc=$?
if [ "$rc" != 0 ]; then
  grep -vE "^#[0-9]+ +(NEW|REDUCE|pulse)" "$out/fuzz.log" | tail -40
  ls "$out/artifacts"
  fail "fuzz_heap exited with $rc (reproduce: $out/fuzz_heap $out/artifacts/<crash file>)"
fi
runs=$(grep -oE "Done [0-9]+ runs" "$out/fuzz.log" | grep -oE "[0-9]+")
[ "${runs:-0}" -gt 1000 ] || { tail -20 "$out/fuzz.log"; fail "only ${runs:-0} runs"; }
grep -q "runtime error" "$out/fuzz.log" && { grep -A10 "runtime error" "$out/fuzz.log" | head -30; fail "UBSan report"; }
echo "ok: $runs inputs, $(ls "$out/corpus" | wc -l) in the corpus, no failure"
