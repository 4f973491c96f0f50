// examples/gpt2_moe/router_bias.hpp: each MoE layer's router logits for ln_2's bias.
//
// The gate reads ln_2(a) = g ∘ n + b (n: the normalised stream, g and b the LayerNorm's gain and
// bias), and SelfRoute, Linear and FixedRandom are linear in what they read, so every token's logit
// of expert e is its logit for g ∘ n plus gate(b)_e, the same for all tokens. Set against the logits'
// means (moe::RoutingStats), gate(b) says how much of an expert's lead over the others the bias
// gives every token: the routing report's "of that lead, the bias's part" table
// (report::LayerRouting::top_bias_offset).
#pragma once

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "model.hpp"
#include "moe/config.hpp"
#include "moe/cpu/backend.hpp"
#include "moe/tensor.hpp"

namespace gpt2 {

// [layers][N] for a CPU model (a device trainer's state is downloaded into one first: session.hpp);
// empty where the logits have no such constant part: the dense model, Random (its logits are drawn,
// not read), and gates reading the residual stream (--route-from residual: no LayerNorm before them).
template <class Model>
std::vector<std::vector<double>> router_bias_logits(Model& model) {
  if constexpr (!Model::is_moe) {
    return {};
  } else {
    if (Model::variant == "random" || model.config().route_from_residual) return {};
    using S = typename Model::Scalar;
    const std::vector<moe::ParamRef<S>> params = model.parameters();
    const Index H = model.config().hidden;
    std::vector<std::vector<double>> logits;
    for (Index l = 0; l < model.config().layers; ++l) {
      const std::string name = detail::prefix(l) + "ln_2.bias";
      const auto bias = std::find_if(params.begin(), params.end(), [&](const auto& p) { return p.name == name; });
      moe::check(bias != params.end() && Index(bias->value.size()) == H, "gpt2: the model has no ", name, " of ", H,
                 " values");
      // A copy of the gate: the model's own keeps the logits of its last forward for that forward's backward.
      auto gate = model.ffn(l).layer().gate();
      typename std::remove_cvref_t<decltype(model.ffn(l))>::Backend backend(1);
      const moe::ConstMatrixView<S> row(bias->value.data(), 1, H, H);
      const moe::ConstMatrixView<S> out = gate.forward(backend, row);
      std::vector<double>& layer = logits.emplace_back(std::size_t(out.cols));
      for (Index e = 0; e < out.cols; ++e) layer[std::size_t(e)] = double(out(0, e));
    }
    return logits;
  }
}

}  // namespace gpt2
