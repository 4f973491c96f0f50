# bench/gpu/doctest_cases.sh: sourced by isolate_cases.sh and racecheck.sh, which run a doctest
# binary's cases one process each (a sticky CUDA fault, or a sanitizer's own failure, then stays
# with the case that caused it).

# doctest_case_names BINARY [doctest filters...]: the names of the cases the filters pass, one a
# line: doctest's listing, the names between the two rules of '=' after "listing all test case
# names". Returns 1, with the binary's output on stderr, when the binary cannot list.
doctest_case_names() {
  local binary=$1 list
  shift
  list=$("$binary" --list-test-cases --no-intro=true "$@" 2>&1) || {
    echo "$list" >&2
    return 1
  }
  awk '/^====/ { rules++; next } rules == 1 && NF' <<<"$list"
}

# doctest_case_filter NAME: the --test-case argument that picks the case NAME. doctest splits its
# filters at commas not escaped by a backslash; '*' and '?' in a name still match themselves.
doctest_case_filter() { printf '%s' "--test-case=${1//,/\\,}"; }

# doctest_ran_once LOG: whether exactly one case ran and passed (a filter that matched nothing also
# exits 0).
doctest_ran_once() { grep -Eq 'test cases: +1 \| +1 passed' "$1"; }

# timed_case SECONDS LOG COMMAND...: `timeout -k 5 SECONDS COMMAND...`, its output in LOG, returning
# its status. timeout runs in a process group of its own, which a signal to the caller's group does
# not reach: when run.sh's BUDGET ended isolate_cases.sh or racecheck.sh (its own timeout signals the
# step's group), the case it was running kept the GPU into the next step, timed beside it. So a TERM
# or INT to the caller goes on to the case's group, and the caller exits.
timed_case_pid=
timed_case() {
  local seconds=$1 log=$2 rc=0
  shift 2
  trap 'timed_case_stop' TERM INT
  timeout -k 5 "$seconds" "$@" >"$log" 2>&1 &
  timed_case_pid=$!
  wait "$timed_case_pid" || rc=$?
  timed_case_pid=
  return "$rc"
}
timed_case_stop() {
  if [[ -n $timed_case_pid ]]; then
    kill -TERM -- "-$timed_case_pid" 2>/dev/null || kill -TERM "$timed_case_pid" 2>/dev/null
  fi
  exit 143
}
