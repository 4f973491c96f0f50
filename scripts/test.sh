#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs every test, in two configurations:
#   1. Release (-O3 -march=native, OpenMP), the configuration users build;
#   2. AddressSanitizer + UndefinedBehaviorSanitizer (-O1 -g1: line tables for the reports, and
#      compiles 2.5x faster than -O2 -g; host code only: the CUDA backend's cases run there on the
#      emulated device, the GPU binary is built in 1 only).
# Usage: scripts/test.sh [release|sanitize]   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

jobs=$(nproc)
run_config() {
  local name=$1; shift
  echo "== tests: $name =="
  cmake -S . -B "build-$name" -G Ninja -DMOE_BUILD_TESTS=ON -DMOE_BUILD_BENCH=ON -DMOE_BUILD_EXAMPLES=ON "$@" >/dev/null
  cmake --build "build-$name" -j "$jobs"
  ctest --test-dir "build-$name" --output-on-failure -j 1
}

what=${1:-all}
if [[ $what == all || $what == release ]]; then
  run_config release -DCMAKE_BUILD_TYPE=Release
fi
if [[ $what == all || $what == sanitize ]]; then
  # Every test again with the library code instrumented (the parity test's C++ side included).
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_config sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG" \
      -DMOE_SANITIZE=ON -DMOE_BUILD_BENCH=OFF -DMOE_ENABLE_CUDA=OFF
fi
echo "== all test configurations passed =="
