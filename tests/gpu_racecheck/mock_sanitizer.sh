#!/usr/bin/env bash
# A stand-in for compute-sanitizer, just enough for bench/gpu/racecheck.sh. Each call but --help
# appends its arguments as one line to $MOCK_CALLS. The environment sets what it does:
#   MOCK_HELP    name | regex | none: which kernel filter option --help lists
#   MOCK_CANARY  report | silent: whether the canary run (the one with --no-skip) reports its race
#   MOCK_RC      the exit status of any other run
if [[ ${1:-} == --help ]]; then
  echo "Usage: compute-sanitizer [options] [your-program] [your-program-options]"
  case ${MOCK_HELP:-name} in
    name) echo "  --kernel-name arg        Filter the kernels to check."
          echo "  --kernel-name-exclude arg  Filter the kernels not to check." ;;
    regex) echo "  --kernel-regex arg       Filter the kernels to check." ;;
  esac
  exit 0
fi
echo "$*" >>"$MOCK_CALLS"
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
echo "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
exit "${MOCK_RC:-0}"
