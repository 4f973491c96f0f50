// examples/vit_moe/router_bias.hpp: each MoE block's router logits for norm2's bias, the part of
// every token's logits that is the same for all tokens (examples/common/router_bias.hpp says why).
#pragma once

#include <vector>

#include "../common/router_bias.hpp"
#include "model.hpp"

namespace vit {

// [MoE blocks, in order][N] for a model on any backend; empty for the dense model and Random (its
// logits are drawn, not read).
template <class Model>
std::vector<std::vector<double>> router_bias_logits(Model& model) {
  if constexpr (!Model::is_moe) {
    return {};
  } else {
    if (!examples::gate_reads_its_input(Model::variant)) return {};
    const auto params = model.parameters();
    std::vector<std::vector<double>> logits;
    for (Index block : model.moe_blocks())
      logits.push_back(examples::gate_logits_for_bias(model, model.moe_ffn(block), params,
                                                      detail::block_prefix(block) + "norm2.bias",
                                                      detail::block_prefix(block) + "moe.router.weight", "vit"));
    return logits;
  }
}

}  // namespace vit
