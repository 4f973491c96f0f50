#!/usr/bin/env bash
# bench/gpu/racecheck.sh against a mock compute-sanitizer (mock_sanitizer.sh): the canary runs first
# with the same kernel filter as the run, a canary that racecheck does not report stops the step
# before the run, the run's exit status is the script's, and the filter follows what --help offers.
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script=$here/../../bench/gpu/racecheck.sh
mock=$here/mock_sanitizer.sh
calls=$(mktemp)
trap 'rm -f "$calls"' EXIT
fail() { echo "FAILED: $*"; echo "--- output:"; echo "$out"; echo "--- calls:"; cat "$calls"; exit 1; }
run() {  # run [ENV=VALUE...]: the script over the mock, doctest arguments --test-case=*edge*
  : >"$calls"
  rc=0
  out=$(env MOCK_CALLS="$calls" "$@" "$script" "$mock" ./moe_cuda_tests '--test-case=*edge*' 2>&1) || rc=$?
}

# The canary is reported: two calls, both with the filter; the run gets the doctest arguments.
run MOCK_HELP=name MOCK_CANARY=report MOCK_RC=0
((rc == 0)) || fail "exit status $rc, expected the run's 0"
(($(wc -l <"$calls") == 2)) || fail "expected two sanitizer runs (canary, then the binary)"
canary=$(sed -n 1p "$calls") whole=$(sed -n 2p "$calls")
[[ $canary == "--tool racecheck --error-exitcode 86 --kernel-name kns=for_each_ ./moe_cuda_tests --test-case=*racecheck canary* --no-skip" ]] ||
  fail "canary call: '$canary'"
[[ $whole == "--tool racecheck --error-exitcode 1 --kernel-name kns=for_each_ ./moe_cuda_tests --test-case=*edge*" ]] ||
  fail "run call: '$whole'"

# A hazard (or a failing case) in the run is the script's failure.
run MOCK_HELP=name MOCK_CANARY=report MOCK_RC=1
((rc == 1)) || fail "exit status $rc, expected the run's 1"

# The canary unreported: exit 1, said so, and the run does not start.
run MOCK_HELP=name MOCK_CANARY=silent MOCK_RC=0
((rc == 1)) || fail "exit status $rc with an unreported canary, expected 1"
grep -q 'did not report the planted race' <<<"$out" || fail "no message for the unreported canary"
(($(wc -l <"$calls") == 1)) || fail "the run started after an unreported canary"

# Older compute-sanitizers: --kernel-regex; none at all: every kernel, said so.
run MOCK_HELP=regex MOCK_CANARY=report MOCK_RC=0
((rc == 0)) && grep -q -- '--kernel-regex kns=for_each_ ./moe_cuda_tests --test-case=\*edge\*' "$calls" ||
  fail "no --kernel-regex filter where --help offers only that"
run MOCK_HELP=none MOCK_CANARY=report MOCK_RC=0
((rc == 0)) && ! grep -q -- '--kernel' "$calls" && grep -q 'checking every kernel' <<<"$out" ||
  fail "a filter where --help offers none, or no word of it"
run RACECHECK_KERNELS=all MOCK_HELP=name MOCK_CANARY=report MOCK_RC=0
((rc == 0)) && ! grep -q -- '--kernel' "$calls" || fail "RACECHECK_KERNELS=all still filters"

# Usage.
rc=0
out=$("$script" "$mock" 2>&1) || rc=$?
((rc == 2)) || fail "exit status $rc without a test binary, expected 2"
echo "racecheck.sh: every check passed"
