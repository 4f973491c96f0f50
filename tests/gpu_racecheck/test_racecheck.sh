#!/usr/bin/env bash
# bench/gpu/racecheck.sh against a mock compute-sanitizer (mock_sanitizer.sh) over the mock doctest
# binary of gpu_isolate (five cases; alone, "b, faulty" fails and "d, hangs" never ends): the canary
# runs first with the same kernel filter as the cases, a canary that racecheck does not report stops
# the step before any case, then the cases the doctest filter passes run in one process, and only
# when that is not clean each alone, where the step tells clean cases from a reported race, a
# failing case and the sanitizer's own breakdown.
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script=$here/../../bench/gpu/racecheck.sh
mock=$here/mock_sanitizer.sh
tests=$here/../gpu_isolate/mock_doctest.sh
calls=$(mktemp)
logs=$(mktemp -d)
trap 'rm -rf "$calls" "$calls.gemm" "$logs"' EXIT
fail() { echo "FAILED: $*"; echo "--- output:"; echo "$out"; echo "--- calls:"; cat "$calls"; exit 1; }
run() {  # run [ENV=VALUE...] -- [doctest arguments...]: the script over the mocks
  local env=()
  while [[ $1 != -- ]]; do env+=("$1"); shift; done
  shift
  : >"$calls"
  : >"$calls.gemm"
  rm -rf "${logs:?}"/*
  rc=0
  out=$(env MOCK_CALLS="$calls" RACECHECK_LOGS="$logs" RACECHECK_CASE_SECONDS=2 "${env[@]}" \
    "$script" "$mock" "$tests" "$@" 2>&1) || rc=$?
}

# The canary is reported, then the two cases '*e*' passes run in one process, with the filter: clean,
# and nothing more runs.
run MOCK_HELP=name -- '--test-case=*e*'
((rc == 0)) || fail "exit status $rc, expected 0 (every case clean)"
(($(wc -l <"$calls") == 2)) || fail "expected two sanitizer runs (the canary, then the cases in one process)"
[[ $(sed -n 1p "$calls") == "--tool racecheck --error-exitcode 86 --kernel-name kns=for_each_ $tests --test-case=*racecheck canary* --no-skip" ]] ||
  fail "canary call: '$(sed -n 1p "$calls")'"
[[ $(sed -n 2p "$calls") == "--tool racecheck --error-exitcode 1 --kernel-name kns=for_each_ $tests --test-case=*e*" ]] ||
  fail "the one process's call: '$(sed -n 2p "$calls")'"
grep -q 'racecheck: 2 cases in one process: clean' <<<"$out" || fail "no summary line"

# Every run, the canary's too, multiplies by the definition (MOE_CUDA_GEMM=reference: cuBLAS's bf16
# kernels break the sanitizer down), unless the caller chose an engine.
[[ $(sort -u "$calls.gemm") == reference ]] || fail "engines given: '$(sort -u "$calls.gemm" | tr '\n' ' ')'"
grep -q 'MOE_CUDA_GEMM=reference' <<<"$out" || fail "the engine is not named"
run MOE_CUDA_GEMM=cublas -- '--test-case=*e*'
((rc == 0)) && [[ $(sort -u "$calls.gemm") == cublas ]] || fail "MOE_CUDA_GEMM=cublas not kept"

# A race in the one process: each case again alone, with the filter, the comma in a name escaped; the
# racy one fails the step and is named.
run MOCK_RACE='e, last' -- '--test-case=*e*'
((rc == 1)) || fail "exit status $rc with a race, expected 1"
grep -q 'not clean in one process (a race reported' <<<"$out" || fail "no word of the one process's race"
(($(wc -l <"$calls") == 4)) || fail "expected four sanitizer runs (the canary, the one process, two cases)"
[[ $(sed -n 3p "$calls") == "--tool racecheck --error-exitcode 1 --kernel-name kns=for_each_ $tests --test-case=c: after the fault (x = 1\, y = 2)" ]] ||
  fail "first case's call: '$(sed -n 3p "$calls")'"
[[ $(sed -n 4p "$calls") == *" --test-case=e\, last" ]] || fail "second case's call: '$(sed -n 4p "$calls")'"
grep -q 'race reported (.*): e, last' <<<"$out" || fail "the racy case is not named"
grep -q '2 cases: 1 clean, 1 with a race reported, 0 failing, 0 unchecked' <<<"$out" || fail "wrong summary"

# The sanitizer's breakdown alone: exit status 3, the case named and listed, not counted clean.
run MOCK_BREAKDOWN='e, last' -- '--test-case=*e*'
((rc == 3)) || fail "exit status $rc with a breakdown only, expected 3"
grep -q 'not clean in one process (the sanitizer broke down' <<<"$out" || fail "no word of the breakdown"
grep -q 'unchecked, the sanitizer broke down (.*): e, last' <<<"$out" || fail "the unchecked case is not named"
[[ $(cat "$logs/unchecked.txt") == "e, last" ]] || fail "unchecked.txt is '$(cat "$logs/unchecked.txt")'"
grep -q '2 cases: 1 clean, 0 with a race reported, 0 failing, 1 unchecked' <<<"$out" || fail "wrong summary"

# Every case: the one process fails; then alone, a failing and a hanging case outrank a breakdown
# (exit status 1); the rest are clean.
run MOCK_BREAKDOWN='c: after the fault (x = 1, y = 2)' --
((rc == 1)) || fail "exit status $rc with failing cases, expected 1"
grep -q 'fails under racecheck (exit status 1, .*): b, faulty' <<<"$out" || fail "the failing case is not named"
grep -q 'fails under racecheck (timed out after 2 s, .*): d, hangs' <<<"$out" || fail "the hanging case is not named"
grep -q '5 cases: 2 clean, 0 with a race reported, 2 failing, 1 unchecked' <<<"$out" || fail "wrong summary"

# A failing case in the one process (the fault sticks to the cases after it): each alone names it.
run -- '--test-case=*f*'
((rc == 1)) || fail "exit status $rc with a failing case, expected 1"
grep -q 'not clean in one process (exit status 1' <<<"$out" || fail "no word of the failing process"
grep -q '3 cases: 2 clean, 0 with a race reported, 1 failing, 0 unchecked' <<<"$out" || fail "wrong summary"

# The one process past RACECHECK_WHOLE_SECONDS: stopped, then each case alone.
run RACECHECK_WHOLE_SECONDS=1 -- '--test-case=*d*'
((rc == 1)) || fail "exit status $rc with a hanging case, expected 1"
grep -q 'not clean in one process (timed out after 1 s' <<<"$out" || fail "no word of the one process's timeout"
grep -q 'fails under racecheck (timed out after 2 s, .*): d, hangs' <<<"$out" || fail "the hanging case is not named"

# A filter that passes no case: clean, nothing to check.
run -- '--test-case=*zzz*'
((rc == 0)) && grep -q 'racecheck: 0 cases in one process: clean' <<<"$out" || fail "an empty filter: '$out'"

# The canary unreported: exit 1, said so, and no case runs.
run MOCK_CANARY=silent -- '--test-case=*e*'
((rc == 1)) || fail "exit status $rc with an unreported canary, expected 1"
grep -q 'did not report the planted race' <<<"$out" || fail "no message for the unreported canary"
(($(wc -l <"$calls") == 1)) || fail "cases ran after an unreported canary"

# Older compute-sanitizers: --kernel-regex; none at all: every kernel, said so.
run MOCK_HELP=regex -- '--test-case=*e*'
((rc == 0)) && (($(grep -c -- '--kernel-regex kns=for_each_' "$calls") == 2)) ||
  fail "no --kernel-regex filter on every run where --help offers only that"
run MOCK_HELP=none -- '--test-case=*e*'
((rc == 0)) && ! grep -q -- '--kernel' "$calls" && grep -q 'checking every kernel' <<<"$out" ||
  fail "a filter where --help offers none, or no word of it"
run RACECHECK_KERNELS=all -- '--test-case=*e*'
((rc == 0)) && ! grep -q -- '--kernel' "$calls" || fail "RACECHECK_KERNELS=all still filters"
# A sanitizer that checks wgmma's asynchronous shared-memory reads: on, on every run, filter or not.
run MOCK_HELP=wgmma -- '--test-case=*e*'
((rc == 0)) && (($(grep -c -- '--kernel-name kns=for_each_ --check-warpgroup-mma yes' "$calls") == 2)) ||
  fail "no --check-warpgroup-mma yes where --help offers it"
run MOCK_HELP=wgmma RACECHECK_KERNELS=all -- '--test-case=*e*'
((rc == 0)) && (($(grep -c -- '--check-warpgroup-mma yes' "$calls") == 2)) && ! grep -q -- '--kernel' "$calls" ||
  fail "RACECHECK_KERNELS=all lost --check-warpgroup-mma"
run MOCK_HELP=name -- '--test-case=*e*'
! grep -q -- '--check-warpgroup-mma' "$calls" || fail "--check-warpgroup-mma passed where --help does not offer it"

# Usage, and a binary that cannot list its cases.
rc=0
out=$("$script" "$mock" 2>&1) || rc=$?
((rc == 2)) || fail "exit status $rc without a test binary, expected 2"
rc=0
out=$(MOCK_CALLS="$calls" "$script" "$mock" /bin/false 2>&1) || rc=$?
((rc == 2)) || fail "exit status $rc for a binary that cannot list, expected 2"
echo "racecheck.sh: every check passed"
