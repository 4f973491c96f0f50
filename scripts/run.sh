#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine, builds the examples and runs the main job.
# Until the GPT-2 MoE example lands (its own issue), the main job is the minimal example:
# one Self-Routing MoE layer trained for a few steps, printing its routing statistics.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake -S . -B build-release -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_BENCH=OFF >/dev/null
cmake --build build-release --target minimal_moe -j "$(nproc)"
./build-release/examples/minimal_moe "$@"
