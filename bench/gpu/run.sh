#!/usr/bin/env bash
# bench/gpu/run.sh: the CUDA backend and GPU training on a GPU machine, in one command. Runs the GPU
# tests (moe_cuda_tests: the backend, the transformer pieces and the whole GPT-2 MoE model against
# the CPU; after a failed run, each case again alone, bench/gpu/isolate_cases.sh), the same tests
# under compute-sanitizer memcheck and racecheck, bench_moe_cuda and its PyTorch peers
# (bench/gpu/torch_moe_cuda.py), bench_gpt2_cuda (GPT-2-small MoE training) and its PyTorch peer
# (bench/gpu/torch_gpt2_cuda.py), vit_moe --device cuda end to end on synthetic images, optionally
# the GPT-2-small comparison of the gates, and prints the tables (bench/gpu/report.py,
# bench/gpu/report_gpt2.py) last.
#
# The GPU machine has nvcc, CMake and PyTorch but not this project's Debian packages and no network:
# run bench/gpu/prepare.sh HERE first; it puts the binaries (built for sm_90a), the libraries they
# need and the data into .gpu-deps/, which the device call carries (carry [".gpu-deps"]). The
# binaries run from there; if they do not start, the build step builds them on the GPU machine from
# .gpu-deps/usr (Eigen, doctest, Google Benchmark, zlib), for sm_90a too: the wgmma grouped GEMM needs
# the arch-specific target (plain sm_90 code leaves it unavailable and its rows unrun).
#
#   bench/gpu/run.sh                                          # everything but compare (~25 min: more
#                                                             # than one device call; pick STEPS)
#   STEPS=test,bench_gpt2,torch_gpt2,report_gpt2 bench/gpu/run.sh   # GPU tests + GPT-2 training speed (~6 min)
#   STEPS=memcheck,racecheck SANITIZER_FILTER='--test-case=*edge*' bench/gpu/run.sh
#   STEPS=racecheck bench/gpu/run.sh                          # racecheck: the cases in one process, then
#                                                             # each alone if that is not clean (~3 min)
#   STEPS=bench,torch,report bench/gpu/run.sh                 # the MoE layer against PyTorch (~5 min)
#   STEPS=compare COMPARE_STEPS=300 bench/gpu/run.sh          # the gates at GPT-2-small scale
#   STEPS=vit bench/gpu/run.sh                                # vit_moe on the GPU: train, CPU resume, compare (~1 min)
#
# Environment (all optional):
#   OUT_DIR           results: tests.log (isolate.log and isolated/ after a failed run), memcheck.log,
#                     racecheck.log, moe_cuda.json, torch_cuda.json, gpt2_cuda.json, torch_gpt2_cuda.json,
#                     table.md, table_gpt2.md, compare/, vit/ (and vit_*.log), env.txt
#                     (default build-gpu/results; on the device machine, where $OUT is set,
#                     /tmp/gpu-results, packed after every step into $OUT/<its name>.tgz, e.g.
#                     OUT_DIR=/tmp/r -> $OUT/r.tgz: $OUT brings back 8 files at most, and a call cut
#                     off at its time limit still brings back every step that ended; bench/gpu/results.sh)
#   TEST_TIMEOUT      seconds the test step may take (default 180; the GPU tests take ~10 s), so a
#                     hung kernel leaves the BUDGET to the benchmarks
#   BUDGET            seconds this run may take in all (default: no limit): a step gets what is left
#                     (then it is stopped, TIMED OUT), and a step with nothing left does not start
#                     (NOT RUN); set it under the device call's limit so the tables are always printed
#   BUILD_DIR         the CMake build, if one is needed (default build-gpu)
#   DEPS_DIR          prepare.sh's folder (default .gpu-deps)
#   STEPS             comma-separated subset of build,test,memcheck,racecheck,bench,torch,report,
#                     bench_gpt2,torch_gpt2,report_gpt2,vit,compare (default: all but compare)
#   SANITIZER_FILTER  doctest arguments for the two sanitizer runs, e.g. '--test-case=*edge*,*NaN*'
#                     (split at spaces: a '?' stands for a space in a name, '*fused?attention*')
#   REPETITIONS       bench_moe_cuda repetitions (default 3; the report uses their median)
#   MIN_TIME          seconds per benchmark repetition (default 0.5)
#   BENCH_FILTER      --benchmark_filter regex for bench_moe_cuda (default: every benchmark)
#   GPT2_FILTER       --benchmark_filter regex for bench_gpt2_cuda (default: every benchmark; keep
#                     Peak/bf16_gemm in it, the MFU is against that peak)
#   GPT2_BATCHES      comma-separated batches (sequences of 1024 tokens) for bench_gpt2 and torch_gpt2
#                     (default 8), each B or BxA (A micro-batches of B per optimizer step, gradient
#                     accumulation): the first one's files are gpt2_cuda.json, torch_gpt2_cuda.json
#                     and table_gpt2.md, a further one's end in _b<B> or _b<B>x<A> (gpt2_cuda_b32.json,
#                     gpt2_cuda_b16x4.json, ...)
#   TORCH_GPT2_ARGS   extra arguments of torch_gpt2_cuda.py (e.g. '--mode eager')
#   COMPARE_VARIANTS  gates compared (default dense,linear,self,fixed-random,random)
#   COMPARE_STEPS     optimizer steps per variant (default 200), COMPARE_BATCH sequences of 1024
#                     tokens per step (default 8): 200 x 8 x 1024 = 1.6M tokens per variant
#   COMPARE_ARGS      extra arguments of gpt2_moe compare, split at spaces (e.g. '--route-from-residual')
#   ATTENTION         materialized (default) or fused: the GPT-2 attention of bench_gpt2 (read by the
#                     binary) and of compare (gpt2_moe --attention)
#   PYTHON            the python with torch 2.x and transformers (default python3)
#   COMPUTE_SANITIZER the compute-sanitizer binary (default: found on the PATH, under
#                     /usr/local/cuda*, or in pip's nvidia-cuda-sanitizer-api wheel)
#   RACECHECK_KERNELS all: racecheck checks CUB's kernels (and cuBLAS's, with MOE_CUDA_GEMM=cublas)
#                     too (default: ours only, after a planted race it must report; then the cases
#                     in one process, racecheck/all.log, and if that is not clean each in a process
#                     of its own, racecheck/<n>.log, where racecheck/unchecked.txt names the cases
#                     in which the sanitizer broke down; bench/gpu/racecheck.sh)
#
# A failing step does not stop the later ones (a failed build does); the script exits 1 if any
# step failed or was skipped (without a GPU every GPU step is skipped: a dry run of the script).
# Benchmarks are timed with CUDA events or a drained device; nothing else should use
# the GPU meanwhile.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${BUILD_DIR:-$root/build-gpu}
deps=${DEPS_DIR:-$root/.gpu-deps}
source "$root/bench/gpu/results.sh"
out=$(results_dir "$build")
budget=${BUDGET:-0}
steps=${STEPS:-build,test,memcheck,racecheck,bench,torch,report,bench_gpt2,torch_gpt2,report_gpt2,vit}
repetitions=${REPETITIONS:-3}
min_time=${MIN_TIME:-0.5}
python=${PYTHON:-python3}
read -r -a sanitizer_filter <<<"${SANITIZER_FILTER:-}"
# GPT-2 training speed at each batch of GPT2_BATCHES: the first one's files are gpt2_cuda.json,
# torch_gpt2_cuda.json and table_gpt2.md, each further batch B's carry the suffix _b<B>.
IFS=, read -r -a gpt2_batches <<<"${GPT2_BATCHES:-8}"
for b in "${gpt2_batches[@]}"; do
  [[ $b =~ ^[1-9][0-9]*(x[1-9][0-9]*)?$ ]] ||
    { echo "GPT2_BATCHES: '$b' is not a batch (B or BxA: positive counts of sequences and micro-batches)" >&2; exit 2; }
done
batch_suffix() { [[ $1 == "${gpt2_batches[0]}" ]] || echo "_b$1"; }
batch_of() { echo "${1%%x*}"; }                                   # 16x4 -> 16
accumulation_of() { [[ $1 == *x* ]] && echo "${1#*x}" || echo 1; }  # 16x4 -> 4, 32 -> 1


# nvcc and compute-sanitizer live here when the CUDA toolkit is not on the PATH.
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi

# The libraries prepare.sh carried (Google Benchmark, OpenMP) and CUDA's own.
export LD_LIBRARY_PATH=$deps/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MOE_GPT2_BPE_DIR=${MOE_GPT2_BPE_DIR:-$deps/data/bpe}
# prepare.sh carries them gzipped (the device call's 64 MiB).
source "$root/bench/gpu/unpack_bins.sh"
unpack_gpu_bins "$deps"
# prepare.sh's binaries when they start here, else the build step's.
tests=$deps/bin/moe_cuda_tests
bench=$deps/bin/bench_moe_cuda
bench_gpt2=$deps/bin/bench_gpt2_cuda
gpt2=$deps/bin/gpt2_moe
vit=$deps/bin/vit_moe
# A binary starts if the loader finds its libraries: exit 0, or 77 (every GPU binary without a GPU: skipped).
starts() {
  local rc=0
  "$@" >/dev/null 2>&1 || rc=$?
  ((rc == 0 || rc == 77))
}
prebuilt_ok() {
  [[ -x $tests && -x $bench && -x $bench_gpt2 && -x $gpt2 && -x $vit ]] && starts "$tests" --list-test-cases &&
    starts "$bench_gpt2" --benchmark_list_tests && starts "$bench" --benchmark_list_tests && starts "$gpt2" --help &&
    starts "$vit" --help
}
mkdir -p "$out"
# On the device machine every step's files are packed into $OUT as it ends, and once more at the end.
trap 'pack_results "$out"' EXIT

want() { [[ ",$steps," == *",$1,"* ]]; }

failed=()
# run_step NAME LOG CMD...: runs CMD with its output shown and kept in LOG, within what is left of
# BUDGET; a failure is recorded and the script goes on.
# `step_cap=SECONDS run_step ...` caps that one step (the tests: a hung kernel must not take the
# whole BUDGET from the benchmarks behind them); the assignment lasts for that call only.
run_step() {
  local name=$1 log=$2 rc=0 start=$SECONDS limit=() cap=${step_cap:-0}
  shift 2
  last_rc=125  # not run
  local left=$cap
  if ((budget > 0)); then
    left=$((budget - SECONDS))
    if ((left < 5)); then
      echo "== $name: NOT RUN: the run's BUDGET of $budget s is spent"
      failed+=("$name")
      return
    fi
    ((cap > 0 && cap < left)) && left=$cap
  fi
  ((left > 0)) && limit=(timeout -k 5 "$left")
  echo "== $name: $*"
  "${limit[@]+"${limit[@]}"}" "$@" 2>&1 | tee "$log" || rc=$?
  last_rc=$rc
  if ((rc == 124 && ${#limit[@]} > 0)); then
    echo "== $name: TIMED OUT after $((SECONDS - start)) s (the step's cap of $cap s or the run's BUDGET of $budget s), see $log"
    failed+=("$name")
  elif ((rc == 0)); then
    echo "== $name: ok ($((SECONDS - start)) s)"
  elif ((rc == 77)) || grep -q -- "--device cuda: no usable CUDA device" "$log"; then
    # The GPU binaries' "no CUDA device here" (77), or the examples' `--device cuda` saying so (their
    # error's status, 1): nothing ran, which is not a pass.
    echo "== $name: SKIPPED: no CUDA device on this machine (exit status $rc), see $log"
    failed+=("$name")
  else
    echo "== $name: FAILED with exit status $rc ($((SECONDS - start)) s), see $log"
    failed+=("$name")
  fi
  pack_results "$out"
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
  if prebuilt_ok; then
    echo "== build: using the binaries of $deps/bin (bench/gpu/prepare.sh)"
  else
    echo "== build: $deps/bin is missing or does not start here: building"
    generator=()
    # Ninja if available, unless the build directory was already configured (its generator stays).
    if [[ ! -f $build/CMakeCache.txt ]] && command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
    prefix=()
    if [[ -d $deps/usr ]]; then prefix=(-DCMAKE_PREFIX_PATH="$deps/usr" -DZLIB_ROOT="$deps/usr"); fi
    run_step configure "$out/configure.log" cmake -S "$root" -B "$build" "${generator[@]+"${generator[@]}"}" \
      "${prefix[@]+"${prefix[@]}"}" -DMOE_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a -DCMAKE_BUILD_TYPE=Release \
      -DMOE_BUILD_EXAMPLES=ON -DMOE_BUILD_TESTS=ON -DMOE_BUILD_BENCH=ON -DMOE_NATIVE=OFF
    if ((${#failed[@]} == 0)); then
      run_step build "$out/build.log" cmake --build "$build" --parallel "$(nproc)" \
        --target moe_cuda_tests bench_moe_cuda bench_gpt2_cuda gpt2_moe vit_moe
    fi
    if ((${#failed[@]} > 0)); then
      echo "== the build failed: nothing to run"
      exit 1
    fi
  fi
fi
if ! prebuilt_ok; then
  tests=$build/tests/moe_cuda_tests
  bench=$build/bench/gpu/bench_moe_cuda
  bench_gpt2=$build/bench/gpu/bench_gpt2_cuda
  gpt2=$build/examples/gpt2_moe
  vit=$build/examples/vit_moe
fi

if want test; then
  rm -rf "$out/isolated"  # a failed.txt of an earlier run in this OUT_DIR says nothing of this one
  step_cap=${TEST_TIMEOUT:-180} run_step test "$out/tests.log" "$tests"
  # A failed run (not a skip or the budget): a CUDA fault is sticky, so every case after the faulty
  # one fails too. Each case again in a process of its own tells the faulty ones from their victims.
  if ((last_rc != 0 && last_rc != 77 && last_rc != 124 && last_rc != 125)); then
    run_step isolate "$out/isolate.log" "$root/bench/gpu/isolate_cases.sh" "$tests" "$out/isolated"
  fi
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
    # --error-exitcode: a reported hazard fails the step even when every test passes. Racecheck
    # goes through racecheck.sh: a planted race first, then our kernels only (its header says why).
    if [[ $tool == racecheck ]]; then
      RACECHECK_LOGS=$out/racecheck run_step racecheck "$out/racecheck.log" "$root/bench/gpu/racecheck.sh" \
        "$sanitizer" "$tests" "${sanitizer_filter[@]+"${sanitizer_filter[@]}"}"
    else
      run_step "$tool" "$out/$tool.log" "$sanitizer" --tool "$tool" --error-exitcode 1 \
        "$tests" "${sanitizer_filter[@]+"${sanitizer_filter[@]}"}"
    fi
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

if want bench_gpt2; then
  filter=()
  if [[ -n ${GPT2_FILTER:-} ]]; then filter=(--benchmark_filter="$GPT2_FILTER"); fi
  for b in "${gpt2_batches[@]}"; do
    suffix=$(batch_suffix "$b")
    rm -f "$out/gpt2_cuda$suffix.json"
    run_step "bench_gpt2$suffix" "$out/bench_gpt2$suffix.log" \
      env BATCH="$(batch_of "$b")" ACCUMULATION="$(accumulation_of "$b")" "$bench_gpt2" \
      --benchmark_out="$out/gpt2_cuda$suffix.json" --benchmark_out_format=json "${filter[@]+"${filter[@]}"}"
  done
fi

if want torch_gpt2; then
  read -r -a torch_gpt2_args <<<"${TORCH_GPT2_ARGS:-}"
  for b in "${gpt2_batches[@]}"; do
    suffix=$(batch_suffix "$b")
    rm -f "$out/torch_gpt2_cuda$suffix.json"
    run_step "torch_gpt2$suffix" "$out/torch_gpt2$suffix.log" env PYTHONUNBUFFERED=1 "$python" \
      "$root/bench/gpu/torch_gpt2_cuda.py" --out "$out/torch_gpt2_cuda$suffix.json" --batch "$(batch_of "$b")" \
      --accumulation "$(accumulation_of "$b")" \
      "${torch_gpt2_args[@]+"${torch_gpt2_args[@]}"}"
  done
fi

if want vit; then
  # vit_moe --device cuda end to end (cuda_train.cu, its checkpoints through the host copy) on
  # synthetic 8 x 8 images in 4 classes (tests/vit_cli/synthetic_idx.sh; no Fashion-MNIST here):
  # bf16 training with a checkpoint, that checkpoint resumed on the CPU, and an fp32 compare of three
  # variants on the GPU, whose test top-1 must pass 0.7 (chance 0.25; the CPU's CLI test asks the same).
  # The checkpoints (~3 MB each) stay in the build folder, outside what comes back; the reports come back.
  source "$root/tests/vit_cli/synthetic_idx.sh"
  vit_data=$build/vit-data vit_runs=$build/vit-runs
  rm -rf "$out/vit" "$vit_runs"  # a failed step must not leave an earlier run's report to be read
  mkdir -p "$vit_data" "$out/vit"
  write_split "$vit_data/train" 1024 1
  write_split "$vit_data/t10k" 256 2
  vit_model=(--layers 4 --hidden 64 --heads 2 --ffn 128 --patch 4 --experts 4 --batch 64 --warmup 5 --lr 3e-3
    --data "$vit_data")
  run_step vit_train "$out/vit_train.log" "$vit" train --variant self --device cuda --precision bf16 --steps 40 \
    "${vit_model[@]}" --out "$vit_runs/train"
  run_step vit_resume_cpu "$out/vit_resume_cpu.log" "$vit" train --resume "$vit_runs/train/self.safetensors" \
    --steps 50 --data "$vit_data" --threads "$(nproc)" --out "$vit_runs/resume"
  run_step vit_compare "$out/vit_compare.log" "$vit" compare --variants dense,linear,self --device cuda \
    --precision fp32 --steps 60 "${vit_model[@]}" --no-checkpoint --out "$out/vit/compare"
  if [[ -f $out/vit/compare/report.md ]]; then
    low=$({ grep -E '^\| (dense|linear|self) ' "$out/vit/compare/report.md" || true; } |
      awk -F'|' '{ gsub(/ /, ""); if ($5 + 0 <= 0.7) print $2, $5 }')
    if [[ -n $low ]]; then
      echo "== vit_compare: test top-1 at or below 0.7 on the synthetic task: $low"
      failed+=(vit_accuracy)
    fi
  fi
fi

if want compare; then
  # The gates at GPT-2-small scale on the dictionaries prepare.sh carried, tokenized here. No
  # checkpoints: gigabytes each, they could not come back from the device machine.
  # The shards (57 MB) stay in the build folder, outside what the device tool brings back.
  shards=$build/gpt2-shards
  mkdir -p "$build/dicts"
  for f in "$deps"/data/dicts/*.dict.dz; do ln -sf "$f" "$build/dicts/"; done
  run_step tokenize "$out/tokenize.log" "$gpt2" tokenize --config gpt2-small --data "$build/dicts" \
    --tokenizer gpt2-bpe --out "$shards"
  compare_steps=${COMPARE_STEPS:-200}
  run_step compare "$out/compare.log" "$gpt2" compare --config gpt2-small --device cuda --precision bf16 \
    --variants "${COMPARE_VARIANTS:-dense,linear,self,fixed-random,random}" --data "$shards" \
    --steps "$compare_steps" --batch "${COMPARE_BATCH:-8}" --seq 1024 --lr 6e-4 \
    --warmup $((compare_steps < 20 ? compare_steps : 20)) \
    --eval-every 0 --eval-tokens 262144 --stats-tokens 262144 --no-checkpoint --out "$out/compare" \
    ${ATTENTION:+--attention "$ATTENTION"} ${COMPARE_ARGS:-}
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

if want report_gpt2; then
  for b in "${gpt2_batches[@]}"; do
    suffix=$(batch_suffix "$b")
    if [[ -f $out/gpt2_cuda$suffix.json ]]; then
      echo
      "$python" "$root/bench/gpu/report_gpt2.py" "$out/gpt2_cuda$suffix.json" "$out/torch_gpt2_cuda$suffix.json" |
        tee "$out/table_gpt2$suffix.md" || failed+=("report_gpt2$suffix")
    else
      echo "== report_gpt2$suffix: no $out/gpt2_cuda$suffix.json (run the bench_gpt2 step first)"
      failed+=("report_gpt2$suffix")
    fi
  done
fi

if want vit && [[ -f $out/vit/compare/report.md ]]; then
  echo
  sed -n '/^| variant/,/^$/p' "$out/vit/compare/report.md"
fi

if want compare && [[ -f $out/compare/report.md ]]; then
  echo
  sed -n '/^| variant/,/^$/p' "$out/compare/report.md"
fi

((${#failed[@]} == 0))
