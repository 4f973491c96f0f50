// examples/gpt2_moe/cuda_trainer.cu: the GPT-2 MoE trainers on the GPU (cuda_trainer.hpp), every
// variant in fp32, TF32 and bf16: model.hpp over moe::cuda::BasicBackend<S, CudaDevice>. Compiled
// by nvcc into gpt2_moe when CUDA is enabled; no Eigen here.
#include <cuda_runtime.h>

#include "cuda_trainer.hpp"
#include "moe/cuda.cuh"
#include "device_trainer.hpp"

namespace gpt2 {

bool cuda_available(std::string* why_not) {
  const std::string reason = moe::cuda::no_device_reason();
  if (reason.empty()) return true;
  if (why_not) *why_not = "no usable CUDA device (" + reason + ")";
  return false;
}

std::unique_ptr<Trainer> make_cuda_trainer(std::string_view variant, const Config& config,
                                           const moe::nn::AdamWConfig& adamw, Precision precision,
                                           examples::AttentionKernel attention) {
  std::string why;
  moe::check(cuda_available(&why), "--device cuda: ", why);
  const auto math = precision == Precision::tf32 ? moe::cuda::Fp32Math::tf32 : moe::cuda::Fp32Math::exact;
  return make_device_trainer(variant, config, adamw, precision, moe::cuda::CudaDevice(nullptr, math), attention);
}

}  // namespace gpt2
