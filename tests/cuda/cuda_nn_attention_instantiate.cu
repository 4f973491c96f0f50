// Instantiates moe::cuda::nn::attention_forward / attention_backward for the GPU (CudaDevice, fp32 and bf16) so that
// nvcc compiles every body; never run (no main).
#include "moe/cuda.cuh"
#include "moe/cuda/nn/attention.hpp"

namespace cuda_nn_attention_instantiate {

template <class S>
void instantiate(const moe::cuda::CudaDevice& device, moe::MatrixView<S> qkv, moe::MatrixView<S> out, S* att,
                 moe::MatrixView<S> dqkv) {
  moe::cuda::nn::attention_forward<S>(device, qkv, 2, 3, 4, true, out, att);
  moe::cuda::nn::attention_backward<S>(device, out, qkv, att, 2, 3, 4, false, dqkv);
}

void instantiate_all(const moe::cuda::CudaDevice& device) {
  instantiate<float>(device, {}, {}, nullptr, {});
  instantiate<moe::bfloat16>(device, {}, {}, nullptr, {});
}

}  // namespace cuda_nn_attention_instantiate
