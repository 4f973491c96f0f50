#!/usr/bin/env bash
# The issue's accuracy requirement: the default `vit_moe compare` budget on Fashion-MNIST takes
# self and linear well above chance (10%): test top-1 > 0.80, read from the report's routing.json.
# Usage: accuracy.sh path/to/vit_moe   (about 5 minutes on 2 cores)
set -uo pipefail
bin=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$bin" compare --variants self,linear --out "$work/report" >"$work/compare.log" 2>&1 || {
  echo "FAIL: compare: $(tail -5 "$work/compare.log")"
  exit 1
}
cat "$work/compare.log" | grep -E '^\||peak'
# routing.json: each variant's "variant": "<name>" line comes before its "metrics": {"test top-1": "<x>", ...} line.
accuracies=$(awk -F'"' '/"variant":/ { variant = $4 } /"test top-1":/ { for (i = 1; i < NF; i++) if ($i == "test top-1") print variant, $(i + 2) }' \
  "$work/report/routing.json")
failures=0
for variant in self linear; do
  accuracy=$(awk -v v="$variant" '$1 == v { print $2 }' <<<"$accuracies")
  if [[ -z $accuracy ]]; then
    echo "FAIL: no test top-1 for $variant in routing.json"
    failures=$((failures + 1))
  elif awk -v a="$accuracy" 'BEGIN { exit !(a > 0.80) }'; then
    echo "ok: $variant test top-1 $accuracy > 0.80"
  else
    echo "FAIL: $variant test top-1 $accuracy <= 0.80"
    failures=$((failures + 1))
  fi
done
exit $((failures > 0))
