#!/usr/bin/env bash
# bench/gpu/unpack_bins.sh DEPS_DIR: unpacks prepare.sh's gzipped binaries (DEPS_DIR/bin/*.gz) beside themselves,
# where the plain file is missing or older. Sourced by run.sh and profile.sh on the GPU machine; a no-op without them.
unpack_gpu_bins() {
  local packed
  for packed in "$1"/bin/*.gz; do
    [[ -e $packed ]] || continue
    if [[ ! -x ${packed%.gz} || $packed -nt ${packed%.gz} ]]; then
      gzip -dc "$packed" >"${packed%.gz}" && chmod +x "${packed%.gz}"
    fi
  done
}
