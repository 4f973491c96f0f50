// What a project compiling moe's CUDA headers with nvcc sees from them under a user's strict host
// warnings (-Xcompiler, as errors; tests/CMakeLists.txt: moe_strict_warnings_cuda; built, never
// run): layers of each gate and expert kind trained a step on CudaDevice, fp32 and bf16, and every
// transformer piece of moe::cuda::nn. Fewer flags than the host build's (strict_warnings.cpp):
// nvcc's own output trips the others (cudafe writes a functional cast `T(x)` as `(T)(x)`, which
// -Wold-style-cast flags; its lambda wrappers and CUDA's headers trip -Wpedantic, -Wextra-semi,
// -Wzero-as-null-pointer-constant, and CUDA's pipeline header -Wundef).
#include "moe/cuda.cuh"
#include "moe/cuda/hopper_grouped_gemm.cuh"
#include "strict_warnings_device.hpp"

// Referenced, so that nvcc instantiates every piece (never called).
void moe_strict_warnings_cuda_pieces(std::span<const std::int32_t> ids, moe::MatrixView<float> m, float* p,
                                     moe::MatrixView<moe::bfloat16> h, moe::bfloat16* q, float* lse) {
  strict::every_device_piece(moe::cuda::CudaDevice(), ids, m, p, h, q, lse);
}

bool moe_strict_warnings_cuda_instantiations() {
  using moe::cuda::Backend, moe::cuda::BackendBF16;
  return strict::trains_a_step_on_device<moe::SelfRoute, moe::GeluMLP>(Backend()) &&
         strict::trains_a_step_on_device<moe::Linear, moe::SwiGLU>(BackendBF16()) &&
         strict::trains_a_step_on_device<moe::FixedRandom, moe::GeluMLP>(Backend()) &&
         strict::trains_a_step_on_device<moe::Random, moe::SwiGLU>(BackendBF16());
}
