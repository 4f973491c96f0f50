#!/usr/bin/env bash
# A stand-in for compute-sanitizer, just enough for bench/gpu/racecheck.sh. Each call but --help
# appends its arguments as one line to $MOCK_CALLS, and MOE_CUDA_GEMM's value (or "unset") to
# $MOCK_CALLS.gemm. Any run but the canary runs the test binary (the argument after the sanitizer's
# own options) with the arguments after it, and passes on its output and exit status, unless the
# environment says otherwise:
#   MOCK_HELP      name | regex | none | wgmma: which kernel filter option --help lists (wgmma:
#                  --kernel-name and --check-warpgroup-mma)
#   MOCK_CANARY    report | silent: whether the canary run (the one with --no-skip) reports its race
#   MOCK_RACE      a case name: a run that includes it reports a race (exit status: --error-exitcode's)
#   MOCK_BREAKDOWN a case name: in a run that includes it the sanitizer breaks down, and the run fails
if [[ ${1:-} == --help ]]; then
  echo "Usage: compute-sanitizer [options] [your-program] [your-program-options]"
  case ${MOCK_HELP:-name} in
    name) echo "  --kernel-name arg        Filter the kernels to check."
          echo "  --kernel-name-exclude arg  Filter the kernels not to check." ;;
    regex) echo "  --kernel-regex arg       Filter the kernels to check." ;;
    wgmma) echo "  --kernel-name arg        Filter the kernels to check."
           echo "  --check-warpgroup-mma arg  Check warpgroup MMA operations." ;;
  esac
  exit 0
fi
echo "$*" >>"$MOCK_CALLS"
echo "${MOE_CUDA_GEMM-unset}" >>"$MOCK_CALLS.gemm"  # the products' engine each run was given
error_rc=0
args=("$@")
for ((i = 0; i < ${#args[@]}; ++i)); do
  [[ ${args[i]} == --error-exitcode ]] && error_rc=${args[i + 1]}
done
if [[ " $* " == *" --no-skip "* ]]; then
  echo "[doctest] test cases: 1 | 1 passed | 0 failed | 0 skipped"
  if [[ ${MOCK_CANARY:-report} == report ]]; then
    echo "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)"
    exit "$error_rc"
  fi
  echo "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
  exit 0
fi
# The binary: the first argument after the options (each option racecheck.sh passes takes a value).
i=0
while [[ ${args[i]} == --* ]]; do i=$((i + 2)); done
binary=${args[i]}
case_args=("${args[@]:i+1}")
runs() {  # runs NAME: whether this run's doctest filter passes the case NAME
  [[ -n $1 ]] && "$binary" --list-test-cases "${case_args[@]}" | grep -qxF -- "$1"
}
if runs "${MOCK_RACE:-}"; then
  echo "========= Error: Race reported between Write access at for_each_warp_kernel+0x1f0"
  echo "[doctest] test cases: 1 | 1 passed | 0 failed | 66 skipped"
  echo "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"
  exit "$error_rc"
fi
if runs "${MOCK_BREAKDOWN:-}"; then
  echo "========= Internal Sanitizer Error: The Sanitizer failed to handle a hardware exception."
  echo "ERROR: test case THREW exception: moe: cuBLAS error in cublasLtMatmul: the function failed to launch"
  echo "[doctest] test cases: 1 | 0 passed | 1 failed | 66 skipped"
  echo "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"
  exit "$error_rc"
fi
rc=0
"$binary" "${case_args[@]}" || rc=$?
echo "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
exit "$rc"
