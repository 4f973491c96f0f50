// tests/cuda/cuda_nn_loss_instantiate.cu: compiles every function of moe/cuda/nn/cross_entropy.hpp
// and moe/cuda/nn/adamw.hpp for the GPU (CudaDevice), with S = float and S = moe::bfloat16.
// Nothing here runs: the functions are only instantiated (the emulated-device tests run them).
#include <cstdint>
#include <span>
#include <vector>

#include "moe/cuda.cuh"
#include "moe/cuda/nn/adamw.hpp"
#include "moe/cuda/nn/cross_entropy.hpp"

namespace cuda_nn_loss_instantiate {

template <class S>
void instantiate_all(const moe::cuda::CudaDevice& device) {
  moe::ConstMatrixView<S> logits;
  moe::MatrixView<S> dlogits;
  std::span<const std::int32_t> targets;
  S* losses = nullptr;
  (void)moe::cuda::nn::cross_entropy_forward<S>(device, logits, targets, losses);
  moe::cuda::nn::cross_entropy_backward<S>(device, logits, targets, 1.0, dlogits);

  std::vector<moe::ParamRef<S>> params;
  (void)moe::cuda::nn::clip_grad_norm<S>(device, params, 1.0);
  moe::cuda::nn::AdamW<S, moe::cuda::CudaDevice> adamw(device, moe::cuda::nn::AdamWConfig{});
  adamw.step(params);
  adamw.step(params, 1e-3);
  adamw.set_state(adamw.step_count(), adamw.m(), adamw.v());
  if constexpr (moe::cuda::nn::AdamW<S, moe::cuda::CudaDevice>::kMasterWeights)
    adamw.set_master_weights(adamw.master_weights());
}

// Never called.
void instantiate() {
  const moe::cuda::CudaDevice device;
  instantiate_all<float>(device);
  instantiate_all<moe::bfloat16>(device);
}

}  // namespace cuda_nn_loss_instantiate
