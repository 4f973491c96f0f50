#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs every test, in three configurations:
#   1. Release (-O3 -march=native, OpenMP), the configuration users build; the code only tests run
#      (--device emulated, the example models' and the emulated device's test files, the GPU tests'
#      host code) at -O1 (CMakeLists.txt's moe_test_code_options): a quarter of its compiling at -O3;
#   2. AddressSanitizer + UndefinedBehaviorSanitizer, float-cast-overflow included (-Og -g1: line tables for the reports; -Og
#      compiles 1.8x faster than -O1 under the sanitizers and the tests ran as fast; host code only:
#      the CUDA backend's cases run there on the emulated device, the GPU binary is built in 1 only);
#   3. Clang (Debian's clang 14 at -O1, with LLVM's OpenMP): the headers compile with the other
#      compiler users have, and the unit tests, the package consumer and the parity tests pass
#      (examples and benchmarks are left to 1: they add build time, not coverage of the headers).
#      -O1 builds in half the time of -O3 and the tests ran as fast; the package consumer still
#      builds and runs a layer at clang's -O3 (its own project, Release).
# Usage: scripts/test.sh [release|sanitize|clang]   (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

jobs=$(nproc)
run_config() {
  local name=$1; shift
  echo "== tests: $name =="
  cmake -S . -B "build-$name" -G Ninja -DMOE_BUILD_TESTS=ON -DMOE_BUILD_BENCH=ON -DMOE_BUILD_EXAMPLES=ON "$@" >/dev/null
  cmake --build "build-$name" -j "$jobs"
  ctest --test-dir "build-$name" --output-on-failure -j "$jobs"
}

what=${1:-all}
if [[ $what == all || $what == release ]]; then
  run_config release -DCMAKE_BUILD_TYPE=Release
fi
if [[ $what == all || $what == sanitize ]]; then
  # Every test again with the library code instrumented (the parity test's C++ side included).
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_config sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-Og -g1 -DNDEBUG" \
      -DMOE_SANITIZE=ON -DMOE_BUILD_BENCH=OFF -DMOE_ENABLE_CUDA=OFF
fi
if [[ $what == all || $what == clang ]]; then
  run_config clang -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG" -DCMAKE_CXX_COMPILER=clang++ -DMOE_BUILD_BENCH=OFF \
    -DMOE_BUILD_EXAMPLES=OFF -DMOE_ENABLE_CUDA=OFF
fi
echo "== all test configurations passed =="
