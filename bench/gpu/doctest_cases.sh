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
