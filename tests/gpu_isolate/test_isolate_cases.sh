#!/usr/bin/env bash
# bench/gpu/isolate_cases.sh against a mock doctest binary (mock_doctest.sh): run whole, four of its
# five cases fail; alone, the faulty case fails and the hanging one times out, and the three others
# pass. The script must name exactly those two, escape the commas in names, and exit 1.
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script=$here/../../bench/gpu/isolate_cases.sh
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
fail() { echo "FAILED: $*"; echo "--- output:"; echo "$out"; exit 1; }

rc=0
out=$("$script" "$here/mock_doctest.sh" "$logs" 2 2>&1) || rc=$?
((rc == 1)) || fail "exit status $rc, expected 1 (some cases fail alone)"
expected=$'b, faulty\nd, hangs'
[[ $(cat "$logs/failed.txt") == "$expected" ]] || fail "failed.txt is '$(cat "$logs/failed.txt")', expected '$expected'"
[[ ! -e $logs/failed.txt.partial ]] || fail "failed.txt.partial is left behind"
grep -q 'isolated: 5 cases, 3 pass alone, 2 fail alone' <<<"$out" || fail "no summary line"
grep -q 'fails alone (timed out after 2 s, .*): d, hangs' <<<"$out" || fail "the hanging case is not named as timed out"
grep -q 'fails alone (exit status 1, .*): b, faulty' <<<"$out" || fail "the faulty case is not named with its exit status"
grep -q 'illegal memory access' "$logs/1.log" || fail "the faulty case's log lacks its output"

# A run cut short (the caller's budget, run.sh's timeout, while "d, hangs" runs) leaves no failed.txt:
# an incomplete list is not a verdict. And the case it was running ends with it: a GPU case left
# running would be timed beside the next step. (A copy of the mock, so that no other test's matches.)
cp "$here/mock_doctest.sh" "$logs/cut_mock.sh"
rc=0
timeout 2 "$script" "$logs/cut_mock.sh" "$logs/cut" 10 >/dev/null 2>&1 || rc=$?
((rc == 124)) || fail "the cut-short run exited $rc, expected 124 (timed out)"
[[ ! -e $logs/cut/failed.txt && -e $logs/cut/failed.txt.partial ]] || fail "a run cut short left a failed.txt"
sleep 0.5
! pgrep -f "$logs/cut_mock.sh" >/dev/null || fail "the case the cut-short run was running is still running"

# A binary that cannot list its cases: exit status 2, said so.
rc=0
out=$("$script" /bin/false "$logs/none" 2>&1) || rc=$?
((rc == 2)) || fail "exit status $rc for a binary that cannot list, expected 2"
echo "isolate_cases.sh: every check passed"
