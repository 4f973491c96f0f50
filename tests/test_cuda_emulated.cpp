// The CUDA backend's test cases on the emulated device: moe::cuda::BasicBackend's every body,
// launch size, dispatch step and GEMM mapping, run on the host (every CI run, ASan included).
// tests/cuda/test_cuda_backend.cu runs the same cases on a GPU.
#include "moe/cuda/emulated_device.hpp"

namespace cuda_test {
using TestDevice = moe::cuda::EmulatedDevice;
inline TestDevice make_device() { return {}; }
inline bool device_available() { return true; }
}  // namespace cuda_test

#define CUDA_TEST_NAME(text) "cuda backend, emulated device: " text
#include "cuda/backend_cases.hpp"

TEST_CASE("bfloat16: rounding to nearest even, NaN and infinities kept, overflow to inf") {
  using moe::bfloat16;
  CHECK(bfloat16(1.0f).bits == 0x3f80);
  CHECK(float(bfloat16(1.0f + 0x1p-8f)) == 1.0f);              // halfway: ties to even (down)
  CHECK(float(bfloat16(1.0f + 3 * 0x1p-8f)) == 1.0f + 0x1p-6f); // halfway: ties to even (up)
  CHECK(float(bfloat16(1.0f + 0x1p-8f + 0x1p-20f)) == 1.0f + 0x1p-7f);
  CHECK(std::isnan(float(bfloat16(std::nanf("")))));
  CHECK(float(bfloat16(INFINITY)) == INFINITY);
  CHECK(float(bfloat16(-INFINITY)) == -INFINITY);
  CHECK(float(bfloat16(3.4e38f)) == INFINITY);
  CHECK(float(bfloat16(-2.5f)) == -2.5f);
  for (float v : {0.1f, -7.3f, 1e-30f, 6.5e4f}) CHECK(std::abs(float(bfloat16(v)) - v) <= std::abs(v) * 0x1p-8f);
}

TEST_CASE("cuda backend: routing workspace bytes per token follow the documented formula") {
  // k = 2, H = 768, bf16: 2 * (7 * 4 + 2 * 2 + 12 partials * 4) + 1 status byte
  CHECK(moe::cuda::BasicBackend<moe::bfloat16, moe::cuda::EmulatedDevice>::routing_bytes_per_token(2, 768) == 161);
  CHECK(moe::cuda::BasicBackend<float, moe::cuda::EmulatedDevice>::routing_bytes_per_token(1, 64) == 41);
}
