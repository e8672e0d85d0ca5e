#!/usr/bin/env bash
# The whole test suite: set-up, build, then every unit and integration test through ctest.
# eBPF tests need root; with CI=true a missing capability fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd build
ctest --output-on-failure --timeout 900 "$@"
