#!/usr/bin/env bash
# bench/gpu/run.sh: the CUDA backend on a GPU machine, in one command. Configures and builds
# (Release, sm_90, build-gpu/ under the repo root), runs the GPU tests (moe_cuda_tests), the
# same tests under compute-sanitizer memcheck and racecheck, bench_moe_cuda and the PyTorch
# peers (bench/gpu/torch_moe_cuda.py), then prints the comparison table (bench/gpu/report.py) last.
#
#   bench/gpu/run.sh                                         # everything: ~15-25 min on an H100
#   SANITIZER_FILTER='--test-case=*edge*,*NaN*' bench/gpu/run.sh  # shorter sanitizer runs: ~10 min
#   STEPS=build,test bench/gpu/run.sh                        # only some steps (a 10-minute slot each):
#   STEPS=memcheck,racecheck bench/gpu/run.sh                #   build ~2-4 min, test ~1 min,
#   STEPS=bench,torch,report bench/gpu/run.sh                #   sanitizers ~2-10 min each, bench ~3 min, torch ~2 min
#
# Environment (all optional):
#   OUT_DIR           results (default build-gpu/results): tests.log, memcheck.log, racecheck.log,
#                     moe_cuda.json, bench.log, torch_cuda.json, torch.log, table.md, env.txt
#   BUILD_DIR         the CMake build (default build-gpu)
#   STEPS             comma-separated subset of build,test,memcheck,racecheck,bench,torch,report
#                     (default: all; steps after build need the build to exist)
#   SANITIZER_FILTER  doctest arguments for the two sanitizer runs, e.g. '--test-case=*edge*,*NaN*'
#   REPETITIONS       bench_moe_cuda repetitions (default 3; the report uses their median)
#   MIN_TIME          seconds per benchmark repetition (default 0.5)
#   BENCH_FILTER      --benchmark_filter regex (default: every benchmark)
#   PYTHON            the python with torch 2.x and transformers (default python3)
#   COMPUTE_SANITIZER the compute-sanitizer binary (default: found on the PATH, under
#                     /usr/local/cuda*, or in pip's nvidia-cuda-sanitizer-api wheel)
#
# A failing step does not stop the later ones (a failed build does); the script exits 1 if any
# step failed. Benchmarks are timed with CUDA events; nothing else should use the GPU meanwhile.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${BUILD_DIR:-$root/build-gpu}
out=${OUT_DIR:-$build/results}
steps=${STEPS:-build,test,memcheck,racecheck,bench,torch,report}
repetitions=${REPETITIONS:-3}
min_time=${MIN_TIME:-0.5}
python=${PYTHON:-python3}
read -r -a sanitizer_filter <<<"${SANITIZER_FILTER:-}"

# nvcc and compute-sanitizer live here when the CUDA toolkit is not on the PATH.
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi

tests=$build/tests/moe_cuda_tests
bench=$build/bench/gpu/bench_moe_cuda
mkdir -p "$out"

want() { [[ ",$steps," == *",$1,"* ]]; }

failed=()
# run_step NAME LOG CMD...: runs CMD with its output shown and kept in LOG; a failure is recorded
# and the script goes on.
run_step() {
  local name=$1 log=$2 rc=0 start=$SECONDS
  shift 2
  echo "== $name: $*"
  "$@" 2>&1 | tee "$log" || rc=$?
  if ((rc == 0)); then
    echo "== $name: ok ($((SECONDS - start)) s)"
  else
    echo "== $name: FAILED with exit status $rc ($((SECONDS - start)) s), see $log"
    failed+=("$name")
  fi
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo '?')," \
    "$(git -C "$root" status --porcelain 2>/dev/null | wc -l) files changed or untracked"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvcc --version 2>&1 || echo "nvcc: not found"
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 || true
} >"$out/env.txt"

if want build; then
  generator=()
  # Ninja if available, unless the build directory was already configured (its generator stays).
  if [[ ! -f $build/CMakeCache.txt ]] && command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
  run_step configure "$out/configure.log" cmake -S "$root" -B "$build" "${generator[@]+"${generator[@]}"}" \
    -DMOE_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release -DMOE_BUILD_EXAMPLES=OFF \
    -DMOE_BUILD_TESTS=ON -DMOE_BUILD_BENCH=ON
  if ((${#failed[@]} == 0)); then
    run_step build "$out/build.log" cmake --build "$build" --parallel "$(nproc)" --target moe_cuda_tests bench_moe_cuda
  fi
  if ((${#failed[@]} > 0)); then
    echo "== the build failed: nothing to run"
    exit 1
  fi
fi

if want test; then
  run_step test "$out/tests.log" "$tests"
fi

# compute-sanitizer: $COMPUTE_SANITIZER, the PATH, a CUDA toolkit under /usr/local, or pip's
# nvidia-cuda-sanitizer-api wheel beside $PYTHON's torch. Prints nothing when there is none.
find_sanitizer() {
  local candidate
  for candidate in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer || true)" \
    /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
    if [[ -n $candidate && -x $candidate ]]; then
      echo "$candidate"
      return
    fi
  done
  "$python" -c 'import glob, os, site
dirs = site.getsitepackages() + [site.getusersitepackages()]
hits = [p for d in dirs for p in glob.glob(os.path.join(d, "nvidia", "*", "**", "compute-sanitizer"), recursive=True)
        if os.path.isfile(p) and os.access(p, os.X_OK)]
print(hits[0] if hits else "")' 2>/dev/null || true
}

if want memcheck || want racecheck; then
  sanitizer=$(find_sanitizer)
  for tool in memcheck racecheck; do
    want "$tool" || continue
    if [[ -z $sanitizer ]]; then
      echo "== $tool: FAILED: compute-sanitizer not found (set COMPUTE_SANITIZER=/path/to/compute-sanitizer)"
      failed+=("$tool")
      continue
    fi
    # --error-exitcode: a reported hazard fails the step even when every test passes.
    run_step "$tool" "$out/$tool.log" "$sanitizer" --tool "$tool" --error-exitcode 1 \
      "$tests" "${sanitizer_filter[@]+"${sanitizer_filter[@]}"}"
  done
fi

if want bench; then
  filter=()
  if [[ -n ${BENCH_FILTER:-} ]]; then filter=(--benchmark_filter="$BENCH_FILTER"); fi
  rm -f "$out/moe_cuda.json"  # no stale figures in the report if this run fails early
  run_step bench "$out/bench.log" "$bench" --benchmark_repetitions="$repetitions" \
    --benchmark_display_aggregates_only=true --benchmark_min_time="$min_time" \
    --benchmark_out="$out/moe_cuda.json" --benchmark_out_format=json "${filter[@]+"${filter[@]}"}"
fi

if want torch; then
  rm -f "$out/torch_cuda.json"
  run_step torch "$out/torch.log" "$python" "$root/bench/gpu/torch_moe_cuda.py" --out "$out/torch_cuda.json"
fi

echo
if ((${#failed[@]} > 0)); then
  echo "== FAILED steps: ${failed[*]} (logs in $out)"
else
  echo "== every step ran ($steps); results in $out"
fi

if want report; then
  if [[ -f $out/moe_cuda.json ]]; then
    echo
    # The torch file is optional for the report: its columns read "-" without it.
    "$python" "$root/bench/gpu/report.py" "$out/moe_cuda.json" "$out/torch_cuda.json" | tee "$out/table.md" ||
      failed+=(report)
  else
    echo "== report: no $out/moe_cuda.json (run the bench step first)"
    failed+=(report)
  fi
fi

((${#failed[@]} == 0))
