// examples/gpt2_moe/emulated_trainer.hpp: --device emulated's trainers (the GPU's code on the host,
// moe::cuda::EmulatedDevice: slow, for tests), built in emulated_trainer.cpp: a translation unit of
// their own, which the build compiles at -O1 (examples/CMakeLists.txt); main.cpp never instantiates them.
#pragma once

#include <memory>
#include <string_view>

#include "../common/attention_kernel.hpp"
#include "config.hpp"
#include "moe/nn/checks.hpp"
#include "trainer.hpp"

namespace gpt2 {

// A Trainer of `variant` on a fresh emulated device in `precision` (fp32 or bf16), with `attention`.
std::unique_ptr<Trainer> make_emulated_trainer(std::string_view variant, const Config& config,
                                               const moe::nn::AdamWConfig& adamw, Precision precision,
                                               examples::AttentionKernel attention = examples::kDefaultAttention);

}  // namespace gpt2
