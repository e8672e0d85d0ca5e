#!/usr/bin/env bash
# Installs what lumalloc needs to build, test and benchmark on Debian 12 (as root), then
# configures and builds into ./build.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(
  build-essential cmake pkg-config clang llvm
  libunwind-dev libcmocka-dev systemtap-sdt-dev
  libbpf-dev bpftool bpftrace libelf-dev libdw-dev binutils
  valgrind python3 procps
  libjemalloc2 libgoogle-perftools4 libmimalloc2.0 heaptrack
  redis-server redis-tools sqlite3 gnuplot-nox
  git libpython3.11-testsuite libclang-rt-14-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" > /dev/null
fi
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
cmake --build build -j "$(nproc)"
