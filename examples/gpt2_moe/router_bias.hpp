// examples/gpt2_moe/router_bias.hpp: each MoE layer's router logits for ln_2's bias, the part of
// every token's logits that is the same for all tokens (examples/common/router_bias.hpp says why).
#pragma once

#include <vector>

#include "../common/router_bias.hpp"
#include "model.hpp"

namespace gpt2 {

// [layers][N] for a model on any backend; empty where the logits have no such constant part: the
// dense model, Random (its logits are drawn, not read), and gates reading the residual stream
// (--route-from residual: no LayerNorm before them).
template <class Model>
std::vector<std::vector<double>> router_bias_logits(Model& model) {
  if constexpr (!Model::is_moe) {
    return {};
  } else {
    if (!examples::gate_reads_its_input(Model::variant) || model.config().route_from_residual) return {};
    const auto params = model.parameters();
    std::vector<std::vector<double>> logits;
    for (Index l = 0; l < model.config().layers; ++l)
      logits.push_back(examples::gate_logits_for_bias(model, model.ffn(l), params, detail::prefix(l) + "ln_2.bias",
                                                      detail::prefix(l) + "moe.router.weight", "gpt2"));
    return logits;
  }
}

}  // namespace gpt2
