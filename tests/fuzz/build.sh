#!/usr/bin/env bash
# Builds the libFuzzer harness: tests/fuzz/build.sh OUTDIR  ->  OUTDIR/fuzz_heap
# The allocator's sources are compiled with clang, -fsanitize=fuzzer-no-link,undefined (coverage
# inside the allocator, UB is fatal), with the same code-generation flags as lib/CMakeLists.txt;
# the harness with -fsanitize=fuzzer,undefined.  Needs clang and libFuzzer (Debian: clang-14,
# libclang-rt-14-dev).  Used by tests/integration/core_fuzz.sh and scripts/fuzz.sh.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
out=$1
mkdir -p "$out/obj"
CC=${CC:-clang}
san=${FUZZ_SANITIZE:-undefined}
flags=(-std=gnu11 -O1 -g -fPIC -fno-sanitize-recover=all -fno-omit-frame-pointer
       -I"$src/include" -I"$src/lib" $(pkg-config --cflags libunwind))
libflags=(-ftls-model=initial-exec -fno-semantic-interposition -fno-plt -fno-builtin-malloc
          -fno-builtin-free -fno-stack-protector -fvisibility=hidden)
ls "$src"/lib/*.c | xargs -P 2 -I{} sh -c \
  'f={}; exec "$0" "$@" -c "$f" -o "'"$out"'/obj/$(basename "$f" .c).o"' \
  "$CC" "${flags[@]}" "${libflags[@]}" -fsanitize=fuzzer-no-link,$san
"$CC" "${flags[@]}" -fsanitize=fuzzer,$san "$src/tests/fuzz/fuzz_heap.c" "$out"/obj/*.o \
  $(pkg-config --libs libunwind) -lm -lpthread -o "$out/fuzz_heap"
echo "built $out/fuzz_heap"
