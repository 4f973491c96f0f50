#!/usr/bin/env bash
# Builds bench_gpt2_train (Release, build-bench/), runs it and the PyTorch peer
# bench/torch_gpt2_train.py in the same run, and prints tokens/s and the ratio ours / PyTorch.
#
#   bench/run_gpt2.sh                 # ~3 minutes on a 2-core machine
#   REPETITIONS=3 bench/run_gpt2.sh   # quicker, noisier
#
# Both sides: gpt2::Config::small(), B=16 x T=128, fp32, 2 threads, full training steps (forward,
# backward, gradient clipping, AdamW, zero_grad). Ours: the median over REPETITIONS repetitions
# (each a few steps); PyTorch: the median of its timed steps, run twice: as is, and with
# OMP_WAIT_POLICY=PASSIVE (Debian's torch runs its GEMMs on OpenBLAS's own threads while its
# OpenMP threads spin between parallel regions by default; on 2 cores they compete).
#
# Results land in build-bench/results/ (gpt2_train_<variant>.json, torch_gpt2_train_<variant>.json,
# torch_gpt2_train_passive_<variant>.json, gpt2_table.txt).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build-bench}
out=$build/results
repetitions=${REPETITIONS:-5}
torch_steps=${TORCH_STEPS:-9}
python=/usr/bin/python3

cmake -S "$root" -B "$build" -G Ninja -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_EXAMPLES=OFF -DMOE_BUILD_BENCH=ON \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --target bench_gpt2_train
mkdir -p "$out"

export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2
echo "== load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"

# Variant by variant, ours then PyTorch's two runs back to back, so that each comparison is taken
# under the same conditions (other work on the machine shows up in the timings).
for variant in self linear dense; do
  echo "== $variant: bench_gpt2_train (ours)"
  "$build/bench/bench_gpt2_train" --benchmark_filter="^Train/$variant/" \
    --benchmark_repetitions="$repetitions" \
    --benchmark_display_aggregates_only=true \
    --benchmark_out="$out/gpt2_train_$variant.json" --benchmark_out_format=json
  echo "== $variant: torch_gpt2_train.py (torch.set_num_threads(2), default environment)"
  "$python" "$root/bench/torch_gpt2_train.py" --threads 2 --steps "$torch_steps" --variant "$variant" \
    >"$out/torch_gpt2_train_$variant.json"
  echo "== $variant: torch_gpt2_train.py with OMP_WAIT_POLICY=PASSIVE"
  OMP_WAIT_POLICY=PASSIVE "$python" "$root/bench/torch_gpt2_train.py" --threads 2 --steps "$torch_steps" \
    --variant "$variant" >"$out/torch_gpt2_train_passive_$variant.json"
done
echo "== load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"

echo
echo "== summary (tokens/s, medians; ratio = ours / PyTorch)"
"$python" - "$out" <<'PY' | tee "$out/gpt2_table.txt"
import json, statistics, sys

out = sys.argv[1]
print("| variant | ours tokens/s | PyTorch (default) | ours / PyTorch | PyTorch (PASSIVE) | ours / PyTorch PASSIVE "
      "| ours best / worst rep |")
print("|---|---|---|---|---|---|---|")
for variant in ("self", "linear", "dense"):
    runs = [b["tokens/s"] for b in json.load(open(f"{out}/gpt2_train_{variant}.json"))["benchmarks"]
            if b.get("run_type") == "iteration"]
    ours = statistics.median(runs)
    t = json.load(open(f"{out}/torch_gpt2_train_{variant}.json"))["results"][0]["tokens_per_s"]
    p = json.load(open(f"{out}/torch_gpt2_train_passive_{variant}.json"))["results"][0]["tokens_per_s"]
    print(f"| {variant} | {ours:,.0f} | {t:,.0f} | {ours / t:.2f}x | {p:,.0f} | {ours / p:.2f}x "
          f"| {max(runs):,.0f} / {min(runs):,.0f} |")
PY
