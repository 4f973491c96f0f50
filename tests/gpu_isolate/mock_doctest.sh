#!/usr/bin/env bash
# A stand-in for a doctest binary on a GPU whose case "b, faulty" leaves a sticky CUDA fault: run
# whole, it fails every case from "b, faulty" on; run alone, only "b, faulty" fails, and "d, hangs"
# never ends. Just enough of doctest's command line for bench/gpu/isolate_cases.sh and racecheck.sh
# (whose test lists with a --test-case=PATTERN after --list-test-cases: one glob, no commas). A
# --test-case=PATTERN with a '*' runs the cases it matches in one process, in order, the fault
# sticking as in a whole run.
names=("a, first" "b, faulty" "c: after the fault (x = 1, y = 2)" "d, hangs" "e, last")
summary() { echo "[doctest] test cases: $1 | $2 passed | $3 failed | 0 skipped"; }
case "${1:-}" in
  --list-test-cases)
    pattern='*'
    for a in "$@"; do [[ $a == --test-case=* ]] && pattern=${a#--test-case=}; done
    echo "[doctest] listing all test case names"
    echo "==============================================================================="
    for n in "${names[@]}"; do
      # shellcheck disable=SC2053  # the pattern is a glob, as doctest's
      [[ $n == $pattern ]] && echo "$n"
    done
    echo "==============================================================================="
    echo "[doctest] unskipped test cases passing the current filters: ${#names[@]}"
    exit 0 ;;
  --test-case=*)
    # doctest splits its filters at commas not escaped by a backslash, then unescapes "\,".
    filter=${1#--test-case=}
    filter=${filter//\\,/$'\x1f'}
    [[ $filter == *,* ]] && { summary 0 0 0; exit 0; }  # a name cut at a comma matches none of these
    name=${filter//$'\x1f'/,}
    if [[ $name == *'*'* ]]; then
      ran=0 passed=0 failed=0 faulted=0
      for n in "${names[@]}"; do
        # shellcheck disable=SC2053  # the pattern is a glob, as doctest's
        [[ $n == $name ]] || continue
        ran=$((ran + 1))
        if ((faulted)); then failed=$((failed + 1)); continue; fi
        case "$n" in
          "b, faulty") echo "ERROR: CUDA error: an illegal memory access was encountered"; faulted=1; failed=$((failed + 1)) ;;
          "d, hangs") sleep 30; passed=$((passed + 1)) ;;
          *) passed=$((passed + 1)) ;;
        esac
      done
      summary "$ran" "$passed" "$failed"
      ((failed == 0))
      exit
    fi
    case "$name" in
      "b, faulty") echo "ERROR: CUDA error: an illegal memory access was encountered"; summary 1 0 1; exit 1 ;;
      "d, hangs") sleep 30 ;;
    esac
    for n in "${names[@]}"; do
      if [[ $n == "$name" ]]; then summary 1 1 0; exit 0; fi
    done
    summary 0 0 0  # no case matched the filter: doctest exits 0 too
    exit 0 ;;
  *)
    echo "ERROR: CUDA error: an illegal memory access was encountered (4 cases)"
    summary 5 1 4
    exit 1 ;;
esac
