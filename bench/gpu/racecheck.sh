#!/usr/bin/env bash
# bench/gpu/racecheck.sh SANITIZER TESTS [doctest arguments...]: compute-sanitizer's racecheck over
# moe_cuda_tests (run.sh's racecheck step), on our own kernels, once it has reported a planted race.
#
# Racecheck looks at shared memory only. Of our kernels (the moe::cuda::for_each* templates) only
# for_each_warp uses it, for its warps' staging (the fused attention). cuBLAS's and CUB's kernels
# use their own, which no argument of ours can make racy, and under racecheck they run for minutes:
# the first H200 run could not finish the fp32 attention case in 155 s. So racecheck checks the
# kernels whose names hold "for_each_" and the others run unchecked. RACECHECK_KERNELS=all checks
# every kernel: the way to check the Hopper grouped GEMM (grouped_gemm_kernel, whose cases run no
# cuBLAS): RACECHECK_KERNELS=all with SANITIZER_FILTER='--test-case=*hopper?grouped*'. Where the
# sanitizer offers --check-warpgroup-mma, it is turned on: the grouped GEMM's wgmma products read
# shared memory asynchronously, after cp.async wrote it.
#
# First the canary: moe_cuda_tests' "racecheck canary" case, skipped in every other run, plants a
# race between two warps of a block. Racecheck must report it under the same filter, or a clean run
# would prove nothing (a filter that misses our kernels, a tool that did not attach); then the step
# fails without the clean run.
#
# Then every case the doctest arguments pass in one process (one start and one CUDA context for them
# all): a clean run ends the step. Anything else (a reported race, a failing case, the sanitizer's
# breakdown, RACECHECK_WHOLE_SECONDS passed, default 600) and each case runs again in a process of
# its own, which names the cases. Both with MOE_CUDA_GEMM=reference unless it is set: the products
# run as the definition, a thread per element (moe/cuda/reference_gemm.hpp, the emulated device's
# bits), not in cuBLAS. On an H100 (2026-12-05)
# the sanitizer itself broke down in every case that ran cuBLAS's bf16 products ("Internal Sanitizer
# Error: The Sanitizer failed to handle a hardware exception", with the kernel filter too; natively
# and under memcheck those cases pass), and in one process every later case then failed on the
# poisoned context; those cases went unchecked. MOE_CUDA_GEMM=cublas keeps cuBLAS; one process a
# case still keeps a breakdown to the cases it hits, and the step names them.
# The one process's log goes to RACECHECK_LOGS/all.log, each case's to RACECHECK_LOGS/<n>.log
# (default: a temporary folder); a case alone gets RACECHECK_CASE_SECONDS (default 120).
#
# Exit status: 0 when every case is clean; 1 for a reported race, a failing case or a canary that
# was not reported; 3 when no race was reported and every case passed but the sanitizer broke down
# in some (those are unchecked, not clean); 2 for a usage error or a binary that cannot list.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/doctest_cases.sh"

if (($# < 2)); then
  echo "usage: $0 SANITIZER TESTS [doctest arguments...]" >&2
  exit 2
fi
sanitizer=$1 tests=$2
shift 2
per_case=${RACECHECK_CASE_SECONDS:-120} whole=${RACECHECK_WHOLE_SECONDS:-600}
export MOE_CUDA_GEMM=${MOE_CUDA_GEMM:-reference}

# The option that picks the kernels to check: --kernel-name in current compute-sanitizers,
# --kernel-regex in older ones (the same key=value filters: kns is a substring of the name).
filter=()
if [[ ${RACECHECK_KERNELS:-ours} != all ]]; then
  help=$("$sanitizer" --help 2>&1 || true)
  if grep -qE -- '--kernel-name([^-]|$)' <<<"$help"; then
    filter=(--kernel-name kns=for_each_)
  elif grep -qE -- '--kernel-regex([^-]|$)' <<<"$help"; then
    filter=(--kernel-regex kns=for_each_)
  else
    echo "racecheck.sh: $sanitizer --help names no kernel filter (--kernel-name, --kernel-regex): checking every kernel"
  fi
fi

# The tensor cores' asynchronous reads of shared memory (wgmma), where this sanitizer can check them.
help=${help:-$("$sanitizer" --help 2>&1 || true)}
if grep -q -- '--check-warpgroup-mma' <<<"$help"; then
  filter+=(--check-warpgroup-mma yes)
fi

# The canary: its own exit status marks a reported error apart from a failing case (doctest's 1).
readonly kReported=86
canary_out=$(mktemp)
logs=${RACECHECK_LOGS:-}
if [[ -z $logs ]]; then
  logs=$(mktemp -d)
  trap 'rm -rf "$canary_out" "$logs"' EXIT
else
  trap 'rm -f "$canary_out"' EXIT
fi
mkdir -p "$logs"
echo "== racecheck canary: a planted race that racecheck must report"
"$sanitizer" --tool racecheck --error-exitcode "$kReported" "${filter[@]+"${filter[@]}"}" "$tests" \
  --test-case='*racecheck canary*' --no-skip 2>&1 | tee "$canary_out"
canary_rc=${PIPESTATUS[0]}
if ((canary_rc != kReported)) && ! grep -qE 'RACECHECK SUMMARY: *[1-9][0-9]* hazard' "$canary_out"; then
  echo "racecheck.sh: racecheck did not report the planted race (exit status $canary_rc, no hazard in its" \
    "summary), so a clean run would prove nothing; not running it. Filter: ${filter[*]:-none}" \
    "(RACECHECK_KERNELS=all checks every kernel)"
  exit 1
fi
echo "== racecheck canary: reported (exit status $canary_rc); now the cases, filter: ${filter[*]:-none}," \
  "MOE_CUDA_GEMM=$MOE_CUDA_GEMM"

list=$(doctest_case_names "$tests" "$@") || {
  echo "racecheck.sh: $tests --list-test-cases failed (its output above)" >&2
  exit 2
}
names=()
[[ -n $list ]] && mapfile -t names <<<"$list"

# Every case in one process: clean only when no race is reported, the sanitizer held, and every listed
# case ran and passed.
rc=0
timed_case "$whole" "$logs/all.log" "$sanitizer" --tool racecheck --error-exitcode 1 "${filter[@]+"${filter[@]}"}" \
  "$tests" "$@" || rc=$?
count=${#names[@]}
if ((rc == 0)) && ! grep -qE 'Race reported|Internal Sanitizer Error' "$logs/all.log" &&
  grep -Eq "test cases: +$count \| +$count passed \| +0 failed" "$logs/all.log"; then
  echo "racecheck: $count cases in one process: clean ($logs/all.log)"
  exit 0
fi
if grep -q 'Race reported' "$logs/all.log"; then
  why="a race reported"
elif grep -q 'Internal Sanitizer Error' "$logs/all.log"; then
  why="the sanitizer broke down"
elif ((rc == 124 || rc == 137)); then
  why="timed out after $whole s"
elif ((rc != 0)); then
  why="exit status $rc"
else
  why="not every listed case ran and passed"
fi
echo "== racecheck: not clean in one process ($why, $logs/all.log): each case alone"

clean=0 raced=() failing=() unchecked=()
for i in "${!names[@]}"; do
  name=${names[$i]} log=$logs/$i.log rc=0
  [[ $name == *"racecheck canary"* ]] && continue  # listed only under --no-skip; it ran above
  timed_case "$per_case" "$log" "$sanitizer" --tool racecheck --error-exitcode 1 "${filter[@]+"${filter[@]}"}" \
    "$tests" "$(doctest_case_filter "$name")" || rc=$?
  # A race outranks the breakdown it may come with; a breakdown outranks the case's failure, which it
  # causes (the context is poisoned after it).
  if grep -q 'Race reported' "$log"; then
    raced+=("$name")
    echo "race reported ($log): $name"
  elif grep -q 'Internal Sanitizer Error' "$log"; then
    unchecked+=("$name")
    echo "unchecked, the sanitizer broke down ($log): $name"
  elif ((rc == 0)) && doctest_ran_once "$log"; then
    clean=$((clean + 1))
  else
    failing+=("$name")
    why="exit status $rc"
    ((rc == 124 || rc == 137)) && why="timed out after $per_case s"
    ((rc == 0)) && why="did not run exactly once"
    echo "fails under racecheck ($why, $log): $name"
  fi
done
printf '%s\n' "${unchecked[@]+"${unchecked[@]}"}" >"$logs/unchecked.txt"
echo "racecheck: ${#names[@]} cases: $clean clean, ${#raced[@]} with a race reported, ${#failing[@]} failing," \
  "${#unchecked[@]} unchecked (the sanitizer broke down; $logs/unchecked.txt)"
((${#raced[@]} + ${#failing[@]} > 0)) && exit 1
((${#unchecked[@]} > 0)) && exit 3
exit 0
