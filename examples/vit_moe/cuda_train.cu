// examples/vit_moe/cuda_train.cu: vit_moe's --device cuda (device_train.hpp): the ViT model over
// moe::cuda::BasicBackend<S, CudaDevice> in fp32, TF32 or bf16, and its training loop. Compiled
// by nvcc into vit_moe when CUDA is enabled. Its checkpoints' host copy (the CPU model) is built
// by main.cpp's code and reached through HostCopy: no CPU model and no Eigen here.
#include <cuda_runtime.h>

#include "moe/cuda.cuh"
#include "device_train.hpp"

namespace vit {

bool cuda_available(std::string* why_not) {
  const std::string reason = moe::cuda::no_device_reason();
  if (reason.empty()) return true;
  if (why_not) *why_not = "no usable CUDA device (" + reason + ")";
  return false;
}

TrainResult train_on_cuda(const Run& run, const Data& data, HostCopy& host) {
  std::string why;
  moe::check(cuda_available(&why), "--device cuda: ", why);
  const auto math = run.precision == Precision::tf32 ? moe::cuda::Fp32Math::tf32 : moe::cuda::Fp32Math::exact;
  return train_on_device(run, data, moe::cuda::CudaDevice(nullptr, math), host);
}

}  // namespace vit
