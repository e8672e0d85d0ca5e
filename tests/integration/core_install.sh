#!/usr/bin/env bash
# cmake --install gives a usable package: find_package(lumalloc) and pkg-config both build and
# link a program that uses the lum_ API.  Usage: core_install.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
[ -n "${LUM_TEST_TRACE:-}" ] && set -x
build=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build" --prefix "$work/prefix" > /dev/null
cat > "$work/use.c" <<'C'
#include <lumalloc.h>
#include <stdio.h>
int main(void) {
    char *p = lum_malloc(100);
    p[99] = 1;
    printf("%d\n", lum_malloc_usable_size(p) >= 100);
    lum_free(p);
    return 0;
}
C
mkdir -p "$work/cm"
cat > "$work/cm/CMakeLists.txt" <<C
cmake_minimum_required(VERSION 3.20)
project(use C)
find_package(lumalloc REQUIRED)
add_executable(use $work/use.c)
target_link_libraries(use lumalloc::lumalloc)
# a fully static program: the archive's target asks for the .eh_frame index the unwinder reads,
# which gcc leaves out of -static links
add_executable(use_static_exe $work/use.c)
target_link_libraries(use_static_exe lumalloc::lumalloc_static)
target_link_options(use_static_exe PRIVATE -static)
C
cmake -S "$work/cm" -B "$work/cm/b" -DCMAKE_PREFIX_PATH="$work/prefix" > /dev/null
make -C "$work/cm/b" > /dev/null
[ "$(LD_LIBRARY_PATH=$work/prefix/lib "$work/cm/b/use")" = 1 ] || { echo "FAIL: find_package consumer"; exit 1; }
[ "$("$work/cm/b/use_static_exe")" = 1 ] || { echo "FAIL: static find_package consumer"; exit 1; }
readelf -lW "$work/cm/b/use_static_exe" | grep -q GNU_EH_FRAME ||
  { echo "FAIL: a -static consumer of lumalloc::lumalloc_static has no PT_GNU_EH_FRAME (one-frame stacks)"; exit 1; }
echo "ok: find_package(lumalloc), shared and -static"
export PKG_CONFIG_PATH=$work/prefix/lib/pkgconfig
gcc -o "$work/use_pc" "$work/use.c" $(pkg-config --cflags --libs lumalloc)
[ "$(LD_LIBRARY_PATH=$work/prefix/lib "$work/use_pc")" = 1 ] || { echo "FAIL: pkg-config consumer"; exit 1; }
# the archive: nothing but libc (lumalloc has no libunwind dependency)
gcc -o "$work/use_static" "$work/use.c" $(pkg-config --cflags lumalloc) "$work/prefix/lib/liblumalloc.a" \
  -lm -lpthread -ldl
[ "$("$work/use_static")" = 1 ] || { echo "FAIL: static consumer"; exit 1; }
gcc -static -o "$work/use_pc_static" "$work/use.c" $(pkg-config --cflags --libs --static lumalloc | sed 's/-llumalloc/-l:liblumalloc.a/')
readelf -lW "$work/use_pc_static" | grep -q GNU_EH_FRAME ||
  { echo "FAIL: pkg-config --static gives no --eh-frame-hdr"; exit 1; }
echo "ok: pkg-config, shared and static"
# every installed header stands alone, in C and (a service written in C++ includes them too) C++
for h in "$work"/prefix/include/lumalloc*.h; do
  echo "#include <$(basename "$h")>" > "$work/alone.c"
  gcc -std=gnu11 -Wall -Wextra -Werror -I"$work/prefix/include" -c "$work/alone.c" -o /dev/null ||
    { echo "FAIL: $(basename "$h") does not compile alone (C)"; exit 1; }
  if command -v g++ > /dev/null; then
    cp "$work/alone.c" "$work/alone.cc"
    g++ -Wall -Wextra -Werror -I"$work/prefix/include" -c "$work/alone.cc" -o /dev/null ||
      { echo "FAIL: $(basename "$h") does not compile alone (C++)"; exit 1; }
  fi
done
echo "ok: every installed header compiles alone"
