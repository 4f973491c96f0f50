// The CUDA backend's test cases on the GPU (tests/cuda/backend_cases.hpp), plus what only a real
// device has: streams, TF32, bf16 GEMMs through cuBLAS. Each case skips itself, saying so, when
// the machine has no CUDA device, and main() then exits with 77, which ctest reports as
// "Skipped" (CI builds this binary but has no GPU).
#define DOCTEST_CONFIG_IMPLEMENT
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cstdio>

#include "moe/cuda.cuh"

namespace cuda_test {
using TestDevice = moe::cuda::CudaDevice;
inline constexpr bool kEmulatedDevice = false;
inline bool device_available() {
  static const bool available = moe::cuda::no_device_reason().empty();
  return available;
}
inline TestDevice make_device() { return TestDevice(nullptr); }
}  // namespace cuda_test

#define CUDA_TEST_NAME(text) "cuda backend, GPU: " text
#include "cuda/backend_cases.hpp"

namespace cuda_test {

TEST_CASE("cuda backend, GPU: a caller's stream is used and TF32 stays within its precision") {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  cudaStream_t stream;
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  {
    using B = moe::cuda::Backend;
    const moe::LayerConfig config{64, 128, 8, 2};
    moe::MoELayer<moe::SelfRoute, moe::GeluMLP, B> exact(config, 3, {}, {}, B(moe::cuda::CudaDevice(stream)));
    moe::MoELayer<moe::SelfRoute, moe::GeluMLP, B> tf32(config, 3, {}, {},
                                                       B(moe::cuda::CudaDevice(stream, moe::cuda::Fp32Math::tf32)));
    CHECK(exact.backend().device().stream() == stream);
    const auto x_host = normal_values(std::size_t(256 * 64), 5);
    const auto x = to_device<float>(exact.backend(), x_host, 256, 64);
    const auto y_exact = exact.forward(x), y_tf32 = tf32.forward(x);
    const auto a = to_host<float>(exact.backend(), y_exact.data(), y_exact.size());
    const auto b = to_host<float>(tf32.backend(), y_tf32.data(), y_tf32.size());
    CHECK(relative_error(b, a) < 5e-3);  // TF32 keeps 10 mantissa bits
  }
  cudaStreamDestroy(stream);
}

// A planted shared-memory race for bench/gpu/racecheck.sh, which runs this case alone under racecheck
// first and requires a reported hazard: otherwise a clean racecheck run over the binary proves
// nothing (a kernel filter that misses our kernels, a tool that did not attach). The first two warps
// of one block write the first warp's first staging word, and the first warp reads it back, with no
// barrier between them. Skipped unless asked for (doctest's --no-skip): a whole-binary racecheck run
// must not meet it, and without racecheck it only shows that the kernel ran.
TEST_CASE("cuda backend, GPU: racecheck canary, a planted shared-memory race (bench/gpu/racecheck.sh)" *
          doctest::skip()) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  const moe::cuda::CudaDevice device(nullptr);
  float* seen = nullptr;
  REQUIRE(cudaMalloc(&seen, sizeof(float)) == cudaSuccess);
  // 128 bytes of staging a warp: for_each_warp puts 4 warps in a block, w = 0 and 1 in slots 0 and 1,
  // so slot 1's staging starts 32 floats after slot 0's.
  constexpr std::size_t kStaging = 128;
  device.for_each_warp(2, kStaging, [=] __device__(moe::Index w, const moe::cuda::WarpTiles& warp) {
    if (warp.lane != 0) return;
    volatile float* own = reinterpret_cast<volatile float*>(warp.staging());
    if (w == 0) {
      own[0] = 1.0f;
      *seen = own[0];
    } else {
      own[-std::ptrdiff_t(kStaging / sizeof(float))] = 2.0f;  // the first warp's word
    }
  });
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  float value = 0;
  REQUIRE(cudaMemcpy(&value, seen, sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK((value == 1.0f || value == 2.0f));  // either write may land last: that is the race
  cudaFree(seen);
}

}  // namespace cuda_test

int main(int argc, char** argv) {
  doctest::Context context(argc, argv);
  // Queries (--list-test-cases, --help, ...) run no case, so they answer without a device too
  // (bench/gpu/isolate_cases.sh lists the cases it reruns one by one).
  if (const std::string why = moe::cuda::no_device_reason(); !why.empty() && !context.shouldExit()) {
    std::printf("moe_cuda_tests: no usable CUDA device (%s): the GPU tests were NOT run (skipped)\n", why.c_str());
    return 77;
  }
  return context.run();
}
