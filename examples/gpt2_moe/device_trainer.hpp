// examples/gpt2_moe/device_trainer.hpp: a Trainer (trainer.hpp) for any variant on a CUDA-backend
// device D, in fp32 or bf16: moe::cuda::CudaDevice (cuda_trainer.cu, compiled by nvcc) or
// moe::cuda::EmulatedDevice (the same code on the host, for tests and --device emulated:
// emulated_trainer.cpp).
#pragma once

#include <memory>
#include <string_view>

#include "../common/nn_ops_cuda.hpp"
#include "config.hpp"
#include "model.hpp"
#include "moe/bfloat16.hpp"
#include "trainer.hpp"

namespace gpt2 {

// The model of `variant` over moe::cuda::BasicBackend<S, D> (S = float for fp32 and tf32, bf16),
// built on `device` with the CPU model's initial values (rounded to bf16 for bf16), and its AdamW.
// TF32 is the device's own setting (CudaDevice(stream, Fp32Math::tf32)); the caller makes it. `attention`: the
// materialised one everywhere (the default, faster on an H100), or the fused kernel where it fits
// (bf16, head sizes 32, 64 and 128; less memory).
template <class D>
std::unique_ptr<Trainer> make_device_trainer(std::string_view variant, const Config& config,
                                             const moe::nn::AdamWConfig& adamw, Precision precision, D device,
                                             examples::AttentionKernel attention = examples::kDefaultAttention) {
  const auto build = [&]<class S>(std::type_identity<S>) {
    using B = moe::cuda::BasicBackend<S, D>;
    return with_variant_on<B>(variant, [&](auto tag) -> std::unique_ptr<Trainer> {
      using M = typename decltype(tag)::type;
      return std::make_unique<OwningTrainer<M>>(config, adamw, examples::NnOps<B>(device, attention));
    });
  };
  if (precision == Precision::bf16) return build(std::type_identity<moe::bfloat16>{});
  return build(std::type_identity<float>{});
}

}  // namespace gpt2
