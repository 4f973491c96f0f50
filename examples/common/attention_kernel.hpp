// examples/common/attention_kernel.hpp: which attention a device model runs (NnOps<cuda>,
// nn_ops_cuda.hpp), named apart so that plain C++ (a command line, cuda_trainer.hpp) can choose it
// without the device headers.
#pragma once

#include <string_view>

#include "moe/config.hpp"

namespace examples {

// fused keeps the probabilities on chip (moe/cuda/nn/fused_attention.hpp: bf16, head sizes 32, 64
// and 128; its cache is a float log-sum-exp per query row); materialized stores them
// (moe/cuda/nn/attention.hpp: every precision and shape; its cache is the [B, heads, T, T]
// probabilities). fused falls back to materialized where it does not fit.
enum class AttentionKernel { fused, materialized };

// The default is materialized: on an H100 (2026-12-05, bench_gpt2_cuda's Attention rows) one GPT-2-small
// layer's bf16 forward + backward took 0.96 ms materialized against 1.77 ms fused, and a self-routing
// training step 43.5 ms against 52.3 ms. fused keeps 192 MiB less a layer at that shape (8 x 1024
// tokens): the choice where memory, not time, is short.
inline constexpr AttentionKernel kDefaultAttention = AttentionKernel::materialized;

inline std::string_view attention_name(AttentionKernel kernel) {
  return kernel == AttentionKernel::fused ? "fused" : "materialized";
}
inline AttentionKernel parse_attention(std::string_view name) {
  if (name == "fused") return AttentionKernel::fused;
  if (name == "materialized") return AttentionKernel::materialized;
  moe::fail("--attention must be fused or materialized, got '", name, "'");
}

}  // namespace examples
