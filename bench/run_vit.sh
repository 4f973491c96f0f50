#!/usr/bin/env bash
# Builds bench_vit_train (Release, build-vitbench/), runs it and the PyTorch peer
# bench/torch_vit_train.py in the same run, and prints images/s and the ratio ours / PyTorch.
#
#   bench/run_vit.sh                 # ~2 minutes on a 2-core machine
#   REPETITIONS=3 bench/run_vit.sh   # quicker, noisier
#
# Both sides: vit::Config::small() (28x28x1, patch 7, T=17, L=6, H=128, F=256, MoE N=4 k=2 in
# blocks 1, 3, 5), B=64 images, fp32, 2 threads, full training steps (forward, backward, gradient
# clipping, AdamW, zero_grad). Ours: the median over REPETITIONS repetitions (each a few steps);
# PyTorch: the median of its timed steps, run twice: as is, and with OMP_WAIT_POLICY=PASSIVE
# (Debian's torch runs its GEMMs on OpenBLAS's own threads while its OpenMP threads spin between
# parallel regions by default; on 2 cores they compete). Ours runs a second time with
# OMP_WAIT_POLICY=PASSIVE too, for information: our own OpenMP threads spin-wait between parallel
# regions by default as well, which costs little on a quiet machine and a lot on a busy one.
#
# Results land in build-vitbench/results/ (vit_train_<variant>.json, vit_train_passive_<variant>.json,
# torch_vit_train_<variant>.json, torch_vit_train_passive_<variant>.json, vit_table.txt).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build-vitbench}
out=$build/results
repetitions=${REPETITIONS:-5}
torch_steps=${TORCH_STEPS:-20}
python=/usr/bin/python3

cmake -S "$root" -B "$build" -G Ninja -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_EXAMPLES=OFF -DMOE_BUILD_BENCH=ON \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --target bench_vit_train
mkdir -p "$out"

export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2
echo "== load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"

# Variant by variant, ours then PyTorch's two runs back to back, so that each comparison is taken
# under the same conditions (other work on the machine shows up in the timings).
for variant in self linear dense; do
  echo "== $variant: bench_vit_train (ours)"
  "$build/bench/bench_vit_train" --benchmark_filter="^Train/$variant/" \
    --benchmark_repetitions="$repetitions" \
    --benchmark_display_aggregates_only=true \
    --benchmark_out="$out/vit_train_$variant.json" --benchmark_out_format=json
  echo "== $variant: bench_vit_train (ours) with OMP_WAIT_POLICY=PASSIVE"
  OMP_WAIT_POLICY=PASSIVE "$build/bench/bench_vit_train" --benchmark_filter="^Train/$variant/" \
    --benchmark_repetitions="$repetitions" \
    --benchmark_display_aggregates_only=true \
    --benchmark_out="$out/vit_train_passive_$variant.json" --benchmark_out_format=json
  echo "== $variant: torch_vit_train.py (torch.set_num_threads(2), default environment)"
  "$python" "$root/bench/torch_vit_train.py" --threads 2 --steps "$torch_steps" --variant "$variant" \
    >"$out/torch_vit_train_$variant.json"
  echo "== $variant: torch_vit_train.py with OMP_WAIT_POLICY=PASSIVE"
  OMP_WAIT_POLICY=PASSIVE "$python" "$root/bench/torch_vit_train.py" --threads 2 --steps "$torch_steps" \
    --variant "$variant" >"$out/torch_vit_train_passive_$variant.json"
done
echo "== load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"

echo
echo "== summary (images/s, medians; ratio = ours / PyTorch; parameters: ours / PyTorch's)"
"$python" - "$out" <<'PY' | tee "$out/vit_table.txt"
import json, statistics, sys

out = sys.argv[1]
print("| variant | ours images/s | PyTorch (default) | ours / PyTorch | PyTorch (PASSIVE) | ours / PyTorch PASSIVE "
      "| ours best / worst rep | ours PASSIVE | ours PASSIVE / PyTorch PASSIVE | parameters ours / PyTorch |")
print("|---|---|---|---|---|---|---|---|---|---|")


def ours(file):
    reps = [b for b in json.load(open(file))["benchmarks"] if b.get("run_type") == "iteration"]
    return [b["images/s"] for b in reps], reps[0]["parameters"]


for variant in ("self", "linear", "dense"):
    runs, parameters = ours(f"{out}/vit_train_{variant}.json")
    median = statistics.median(runs)
    passive = statistics.median(ours(f"{out}/vit_train_passive_{variant}.json")[0])
    torch_default = json.load(open(f"{out}/torch_vit_train_{variant}.json"))["results"][0]
    t = torch_default["images_per_s"]
    p = json.load(open(f"{out}/torch_vit_train_passive_{variant}.json"))["results"][0]["images_per_s"]
    print(f"| {variant} | {median:,.0f} | {t:,.0f} | {median / t:.2f}x | {p:,.0f} | {median / p:.2f}x "
          f"| {max(runs):,.0f} / {min(runs):,.0f} | {passive:,.0f} | {passive / p:.2f}x "
          f"| {parameters:,.0f} / {torch_default['parameters']:,} |")
PY
