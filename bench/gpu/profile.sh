#!/usr/bin/env bash
# bench/gpu/profile.sh: where the GPU time of one timed call goes, kernel by kernel, on a GPU machine.
# Runs a benchmark binary under Nsight Compute (ncu) with MOE_PROFILE_ONE=1, so that only one call
# after the warm-up is recorded (bench/gpu/guarded.hpp's profiled_once), one metric per kernel
# (gpu__time_duration: a single pass, no replay), and sums the kernels by name
# (bench/gpu/kernel_summary.py). The kernels run serialized under ncu: the table is where the time
# goes, not the call's wall time.
#
#   bench/gpu/profile.sh gpt2 'Train/self/bf16' 'Train/linear/bf16'
#   bench/gpu/profile.sh moe 'moe_fwd/gpt2_T16384/bf16/'
#
# Uses prepare.sh's binaries (.gpu-deps/bin), else the build's (build-gpu). Writes
# profile_<filter>.csv and .md into OUT_DIR (default: /tmp/gpu-results on the device machine, packed
# into $OUT/gpu-results.tgz after each filter, bench/gpu/results.sh; else build-gpu/results).
# PROFILE_TIMEOUT: seconds per filter (default 60; a profile took ~18 s on the H100).
#
# --benchmark_min_time is 1e-6 s: Google Benchmark runs a benchmark's function again while its
# iterations took less than the minimum, so one run is asked for (profiled_once, guarded.hpp, also
# profiles one call a process, whatever the runs).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
deps=${DEPS_DIR:-$root/.gpu-deps}
build=${BUILD_DIR:-$root/build-gpu}
source "$root/bench/gpu/results.sh"
out=$(results_dir "$build")
mkdir -p "$out"
trap 'pack_results "$out"' EXIT
export LD_LIBRARY_PATH=$deps/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

if (($# < 2)); then
  echo "usage: bench/gpu/profile.sh gpt2|moe FILTER..." >&2
  exit 2
fi
case $1 in
  gpt2) name=bench_gpt2_cuda; built=$build/bench/gpu/bench_gpt2_cuda ;;
  moe) name=bench_moe_cuda; built=$build/bench/gpu/bench_moe_cuda ;;
  *) echo "profile.sh: '$1' is neither gpt2 nor moe" >&2; exit 2 ;;
esac
shift
# prepare.sh carries them gzipped (the device call's 64 MiB).
source "$root/bench/gpu/unpack_bins.sh"
unpack_gpu_bins "$deps"
binary=$deps/bin/$name
[[ -x $binary ]] || binary=$built
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)
if [[ -z $ncu ]]; then
  echo "profile.sh: no ncu (Nsight Compute) on this machine" >&2
  exit 1
fi

status=0
for filter in "$@"; do
  tag=$(printf '%s' "$filter" | tr -c 'A-Za-z0-9_.-' '_')
  echo "== profile $name '$filter' (ncu: $ncu)"
  # --clock-control none: measure the card as it is (its clocks are not ours to set).
  if ! MOE_PROFILE_ONE=1 timeout "${PROFILE_TIMEOUT:-60}" "$ncu" --profile-from-start off --clock-control none \
    --metrics gpu__time_duration.sum --csv --print-units base --print-kernel-base demangled \
    "$binary" --benchmark_filter="$filter" --benchmark_min_time=0.000001 >"$out/profile_$tag.csv" 2>"$out/profile_$tag.err"; then
    echo "== profile '$filter': FAILED, see $out/profile_$tag.err"
    tail -5 "$out/profile_$tag.err"
    status=1
  fi
  python3 "$root/bench/gpu/kernel_summary.py" "$out/profile_$tag.csv" --top "${PROFILE_TOP:-30}" |
    tee "$out/profile_$tag.md" || status=1
  pack_results "$out"
done
exit $status
