// examples/common/router_bias.hpp: a MoE block's router logits for its LayerNorm's bias.
//
// The example blocks' gates read LN(a) = g ∘ n + b (n: the normalised stream, g and b the
// LayerNorm's gain and bias: GPT-2's ln_2, ViT's norm2), and SelfRoute, Linear and FixedRandom are
// linear in what they read, so every token's logit of expert e is its logit for g ∘ n plus
// gate(b)_e, the same for all tokens. Set against the logits' means (moe::RoutingStats), gate(b)
// says how much of an expert's lead over the others the bias gives every token: the routing
// report's "the part the bias gives" table (report::LayerRouting::top_bias_offset). Each example
// names its blocks and biases (examples/gpt2_moe/router_bias.hpp, examples/vit_moe/router_bias.hpp).
#pragma once

#include <algorithm>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "moe/config.hpp"
#include "moe/tensor.hpp"

namespace examples {

// Whether a gate has logits with a constant part to measure: not Random's, which are drawn.
inline bool gate_reads_its_input(std::string_view variant) { return variant != "random"; }

// The logits of `ffn`'s gate (examples::MoEFFN over a CPU backend) for its input row `bias_name`, a
// parameter of `params` with H values.
template <class FFN, class S>
std::vector<double> gate_logits_for_bias(FFN& ffn, const std::vector<moe::ParamRef<S>>& params,
                                         const std::string& bias_name, moe::Index H, std::string_view who) {
  const auto bias = std::find_if(params.begin(), params.end(), [&](const auto& p) { return p.name == bias_name; });
  moe::check(bias != params.end() && moe::Index(bias->value.size()) == H, who, ": the model has no ", bias_name, " of ",
             H, " values");
  // A copy of the gate: the model's own keeps the logits of its last forward for that forward's backward.
  auto gate = ffn.layer().gate();
  typename std::remove_cvref_t<FFN>::Backend backend(1);
  const moe::ConstMatrixView<S> row(bias->value.data(), 1, H, H);
  const moe::ConstMatrixView<S> logits = gate.forward(backend, row);
  std::vector<double> out(std::size_t(logits.cols));
  for (moe::Index e = 0; e < logits.cols; ++e) out[std::size_t(e)] = double(logits(0, e));
  return out;
}

}  // namespace examples
