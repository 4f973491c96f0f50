// Instantiates moe/cuda/nn/layernorm.hpp, embedding.hpp and linear.hpp for CudaDevice with
// float and bfloat16, so nvcc checks every device body. Nothing here runs (no main()).
#include <cstdint>
#include <span>

#include "moe/cuda.cuh"
#include "moe/cuda/nn/embedding.hpp"
#include "moe/cuda/nn/layernorm.hpp"
#include "moe/cuda/nn/linear.hpp"

namespace cuda_nn_norm_instantiate {

template <class S>
void instantiate(const moe::cuda::CudaDevice& device) {
  using moe::ConstMatrixView;
  using moe::MatrixView;
  using Cm = moe::Compute<S>;
  S* p = nullptr;
  Cm* stats = nullptr;
  const MatrixView<S> m(p, 0, 1);
  const ConstMatrixView<S> cm(p, 0, 1);
  moe::cuda::nn::layernorm_forward<S>(device, cm, p, p, m, stats, stats);
  moe::cuda::nn::layernorm_backward<S>(device, cm, cm, p, stats, stats, m, p, p);
  const std::span<const std::int32_t> tokens;
  moe::cuda::nn::embedding_forward<S>(device, tokens, 0, 0, cm, cm, m);
  moe::cuda::nn::embedding_backward<S>(device, cm, tokens, 0, 0, m, m);
  moe::cuda::nn::linear_forward<S>(device, cm, cm, p, m);
  moe::cuda::nn::linear_backward<S>(device, cm, cm, cm, m, m, p);
}

void instantiate_all(const moe::cuda::CudaDevice& device) {
  instantiate<float>(device);
  instantiate<moe::bfloat16>(device);
}

}  // namespace cuda_nn_norm_instantiate
