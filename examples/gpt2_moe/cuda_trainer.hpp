// examples/gpt2_moe/cuda_trainer.hpp: the GPU's trainers, built in cuda_trainer.cu (nvcc) when
// gpt2_moe is compiled with CUDA (MOE_GPT2_CUDA); plain C++, so the rest of the program never
// sees a CUDA header.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "../common/attention_kernel.hpp"
#include "config.hpp"
#include "moe/nn/checks.hpp"
#include "trainer.hpp"

namespace gpt2 {

// Whether this build has the CUDA trainers and the machine a CUDA device; when not, why not.
bool cuda_available(std::string* why_not);

// A Trainer of `variant` on the current CUDA device (the legacy default stream), in `precision`,
// with `attention` (examples/common/attention_kernel.hpp).
std::unique_ptr<Trainer> make_cuda_trainer(std::string_view variant, const Config& config,
                                           const moe::nn::AdamWConfig& adamw, Precision precision,
                                           examples::AttentionKernel attention = examples::kDefaultAttention);

}  // namespace gpt2
