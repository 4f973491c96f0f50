#!/usr/bin/env bash
# Installs everything the project needs from Debian's archive (idempotent).
# Usage: scripts/setup.sh            -> build + test dependencies
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config
  libeigen3-dev doctest-dev libbenchmark-dev
  python3 python3-numpy python3-torch libopenblas0-pthread
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "setup: dependencies present"
