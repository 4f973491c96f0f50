#!/usr/bin/env bash
# The main job: sets up a fresh Debian 12 machine, builds the GPT-2 MoE example and compares the
# routing gates self, linear and random on the default corpus (Debian's fortunes, byte-level),
# writing the report to runs/compare/ and printing its table. About 10 minutes on 2 cores.
# Extra arguments go to `gpt2_moe compare` (e.g. --variants dense,self,linear,fixed-random,random).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake -S . -B build-run -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_BENCH=OFF >/dev/null
cmake --build build-run --target gpt2_moe -j "$(nproc)"
./build-run/examples/gpt2_moe compare "$@"
