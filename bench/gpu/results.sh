# bench/gpu/results.sh, sourced by run.sh and profile.sh: where a GPU run's files go, and how they
# come back from the device machine. There $OUT is set, and at most 8 files come back from it, so
# the files are written outside it (OUT_DIR, default /tmp/gpu-results) and packed into one tarball,
# $OUT/<the folder's name>.tgz, after every step: a call cut off at its limit still brings back
# every step that ended. Elsewhere they stay in OUT_DIR (default <build>/results), unpacked.
#   results_dir BUILD   prints the folder
#   pack_results DIR    on the device machine: DIR -> $OUT/<basename DIR>.tgz, replaced whole

on_device_machine() { [[ -n ${OUT:-} && -d ${OUT:-} ]]; }

results_dir() {
  if on_device_machine; then echo "${OUT_DIR:-/tmp/gpu-results}"; else echo "${OUT_DIR:-$1/results}"; fi
}

pack_results() {
  on_device_machine || return 0
  local dir name rc=0
  dir=$(cd "$1" && pwd) || return 0
  name=$(printf '%s' "$(basename "$dir")" | tr -c 'A-Za-z0-9_.-' '_')
  # Written beside the old tarball, then renamed over it: a kill mid-way leaves the last whole one.
  tar czf "$OUT/$name.part" -C "$(dirname "$dir")" "$(basename "$dir")" 2>/dev/null || rc=$?
  if ((rc <= 1)); then mv -f "$OUT/$name.part" "$OUT/$name.tgz"; else rm -f "$OUT/$name.part"; fi
}
