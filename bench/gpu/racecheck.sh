#!/usr/bin/env bash
# bench/gpu/racecheck.sh SANITIZER TESTS [doctest arguments...]: compute-sanitizer's racecheck over
# moe_cuda_tests (run.sh's racecheck step), on our own kernels, once it has reported a planted race.
#
# Racecheck looks at shared memory only. Of our kernels (the moe::cuda::for_each* templates) only
# for_each_warp uses it, for its warps' staging (the fused attention). cuBLAS's and CUB's kernels
# use their own, which no argument of ours can make racy, and under racecheck they run for minutes:
# the first H200 run could not finish the fp32 attention case in 155 s. So racecheck checks the
# kernels whose names hold "for_each_" and the others run unchecked. RACECHECK_KERNELS=all checks
# every kernel.
#
# First the canary: moe_cuda_tests' "racecheck canary" case, skipped in every other run, plants a
# race between two warps of a block. Racecheck must report it under the same filter, or a clean run
# would prove nothing (a filter that misses our kernels, a tool that did not attach); then the step
# fails without the clean run.
#
# Exit status: the racecheck run's (1 for a hazard or a failing case), 1 if the canary was not
# reported, 2 for a usage error.
set -uo pipefail

if (($# < 2)); then
  echo "usage: $0 SANITIZER TESTS [doctest arguments...]" >&2
  exit 2
fi
sanitizer=$1 tests=$2
shift 2

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

# The canary: its own exit status marks a reported error apart from a failing case (doctest's 1).
readonly kReported=86
canary_out=$(mktemp)
trap 'rm -f "$canary_out"' EXIT
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
echo "== racecheck canary: reported (exit status $canary_rc); now the binary, filter: ${filter[*]:-none}"

"$sanitizer" --tool racecheck --error-exitcode 1 "${filter[@]+"${filter[@]}"}" "$tests" "$@"
