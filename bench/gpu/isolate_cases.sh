#!/usr/bin/env bash
# Reruns every test case of a doctest binary alone, each in a process of its own, and says which
# cases fail alone. For the GPU test binary after a failed run: a CUDA fault (an illegal address, a
# misaligned load) is sticky, so every case after the faulty one fails on the poisoned context too,
# and a single run cannot tell the faulty case from its victims (the first GPU run, 2026-12-04: 18 of
# 51 cases passed before one fault failed the other 33).
#
#   bench/gpu/isolate_cases.sh BINARY LOG_DIR [SECONDS_PER_CASE]
#
# Writes LOG_DIR/<n>.log per case, LOG_DIR/failed.txt (the names of the cases that fail alone, one a
# line; it appears once every case has run, so a run cut short leaves none, only failed.txt.partial,
# and an empty list means every case passed) and prints a line per failing case, then a summary.
# Exit status: 0 when every case passes alone, 1 when some fail alone, 2 when the binary cannot list
# its cases. A case that runs past SECONDS_PER_CASE (default 120) counts as failed ("timed out").
set -u
binary=${1:?usage: isolate_cases.sh BINARY LOG_DIR [SECONDS_PER_CASE]}
logs=${2:?usage: isolate_cases.sh BINARY LOG_DIR [SECONDS_PER_CASE]}
per_case=${3:-120}
source "$(dirname "${BASH_SOURCE[0]}")/doctest_cases.sh"
mkdir -p "$logs"
rm -f "$logs/failed.txt"
: >"$logs/failed.txt.partial"

list=$(doctest_case_names "$binary") || {
  echo "isolate_cases: $binary --list-test-cases failed (its output above)" >&2
  exit 2
}
names=()
[[ -n $list ]] && mapfile -t names <<<"$list"
if ((${#names[@]} == 0)); then
  echo "isolate_cases: $binary listed no test cases" >&2
  exit 2
fi

passed=0
failed=()
for i in "${!names[@]}"; do
  name=${names[$i]}
  log="$logs/$i.log"
  rc=0
  timed_case "$per_case" "$log" "$binary" "$(doctest_case_filter "$name")" || rc=$?
  if ((rc == 0)) && doctest_ran_once "$log"; then
    passed=$((passed + 1))
    continue
  fi
  why="exit status $rc"
  ((rc == 124 || rc == 137)) && why="timed out after $per_case s"
  ((rc == 0)) && why="did not run exactly once"
  echo "fails alone ($why, $log): $name"
  echo "$name" >>"$logs/failed.txt.partial"
  failed+=("$name")
done
mv "$logs/failed.txt.partial" "$logs/failed.txt"
echo "isolated: ${#names[@]} cases, $passed pass alone, ${#failed[@]} fail alone"
((${#failed[@]} == 0))
