#!/usr/bin/env bash
# Builds bench_moe_cpu (Release, build-bench/), runs it and the PyTorch peer, prints the table.
#
#   bench/run_cpu.sh                 # ~3-4 minutes on a 2-core machine
#   REPETITIONS=1 bench/run_cpu.sh   # quicker, noisier
#
# Results land in build-bench/results/ (moe_cpu.json, torch_cpu.json, torch_cpu_passive.json,
# table.txt). Other work on the machine shows up in the timings: the summary prints the best
# repetition of each figure too, and the load average at the start.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build-bench}
out=$build/results
repetitions=${REPETITIONS:-5}
python=/usr/bin/python3

cmake -S "$root" -B "$build" -G Ninja -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_EXAMPLES=OFF \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --target bench_moe_cpu
mkdir -p "$out"

# Both sides get two threads; the C++ backend is told 2 explicitly, Eigen's floor and torch via these.
export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2

echo "== bench_moe_cpu (GPT-2 shape: fixed iterations; small shape: --benchmark_min_time)"
# The GPT-2-shape benchmarks set their iteration counts in the binary (a forward takes ~0.3 s).
"$build/bench/bench_moe_cpu" \
  --benchmark_min_time=0.5 \
  --benchmark_repetitions="$repetitions" \
  --benchmark_display_aggregates_only=true \
  --benchmark_out="$out/moe_cpu.json" --benchmark_out_format=json

echo "== torch_moe_cpu.py (as specified: torch.set_num_threads(2), default environment)"
"$python" "$root/bench/torch_moe_cpu.py" --threads 2 >"$out/torch_cpu.json"
# The same with OMP_WAIT_POLICY=PASSIVE: by default torch's OpenMP threads spin after each
# parallel region while OpenBLAS's own pthreads run the GEMMs, and on 2 cores they fight.
echo "== torch_moe_cpu.py with OMP_WAIT_POLICY=PASSIVE (the stronger peer, for information)"
OMP_WAIT_POLICY=PASSIVE "$python" "$root/bench/torch_moe_cpu.py" --threads 2 >"$out/torch_cpu_passive.json"

echo
echo "== summary"
"$python" "$root/bench/report_cpu.py" "$out/moe_cpu.json" "$out/torch_cpu.json" "$out/torch_cpu_passive.json" |
  tee "$out/table.txt"
