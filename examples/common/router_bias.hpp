// examples/common/router_bias.hpp: a MoE block's router logits for its LayerNorm's bias.
//
// The example blocks' gates read LN(a) = g ∘ n + b (n: the normalised stream, g and b the
// LayerNorm's gain and bias: GPT-2's ln_2, ViT's norm2), and SelfRoute, Linear and FixedRandom are
// linear in what they read, so every token's logit of expert e is its logit for g ∘ n plus
// gate(b)_e, the same for all tokens. Set against the logits' means (moe::RoutingStats), gate(b)
// says how much of an expert's lead over the others the bias gives every token: the routing
// report's split of the logit offset (report::LayerRouting::top_bias_offset). Each example names
// its blocks and tensors (examples/gpt2_moe/router_bias.hpp, examples/vit_moe/router_bias.hpp).
//
// Computed on the host from the parameters, on any backend: b and the router's weight come down
// from a device (H + N·H values a block; a bf16 model's as the forward reads them), so no host
// copy of the model is built. The gates' formulas are written again here (SelfRoute reads
// x[offset, offset + N); Linear and FixedRandom compute x Wᵀ); tests/test_gpt2_model.cpp holds them
// to each gate's own forward.
#pragma once

#include <algorithm>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moe/config.hpp"
#include "moe/tensor.hpp"

namespace examples {

// Whether a gate has logits with a constant part to measure: not Random's, which are drawn.
inline bool gate_reads_its_input(std::string_view variant) { return variant != "random"; }

namespace router_bias_detail {

// A parameter's values on the host as doubles: a CPU model's as they are (double ones exactly), a
// device's through its download (waits for its stream).
template <class Ops, class S>
std::vector<double> host_values(const Ops& ops, std::span<const S> values) {
  if constexpr (requires(std::span<S> host) { ops.download(values, host); }) {
    std::vector<S> host(values.size());
    ops.download(values, std::span<S>(host));
    return {host.begin(), host.end()};
  } else {  // a bf16 device model: its values come down as floats
    std::vector<float> host(values.size());
    ops.download(values, std::span<float>(host));
    return {host.begin(), host.end()};
  }
}

template <class S>
const moe::ParamRef<S>& find(const std::vector<moe::ParamRef<S>>& params, const std::string& name, std::size_t size,
                             std::string_view who) {
  const auto p = std::find_if(params.begin(), params.end(), [&](const auto& q) { return q.name == name; });
  moe::check(p != params.end() && p->value.size() == size, who, ": the model has no ", name, " of ", size, " values");
  return *p;
}

}  // namespace router_bias_detail

// The logits of `ffn`'s gate (an examples::MoEFFN) for the row `bias_name` (a parameter of `params`,
// `model.parameters()`); a projection gate's weight is `router_weight_name`.
template <class Model, class FFN, class S>
std::vector<double> gate_logits_for_bias(const Model& model, FFN& ffn, const std::vector<moe::ParamRef<S>>& params,
                                         const std::string& bias_name, const std::string& router_weight_name,
                                         std::string_view who) {
  using namespace router_bias_detail;
  const moe::LayerConfig& layer = ffn.layer().config();
  const std::size_t H = std::size_t(layer.hidden), N = std::size_t(layer.experts);
  const std::vector<double> b = host_values(model.ops(), std::span<const S>(find(params, bias_name, H, who).value));
  std::vector<double> logits(N);
  const auto& gate = ffn.layer().gate();
  if constexpr (requires { gate.offset(); }) {  // SelfRoute: the N coordinates from its offset
    const std::size_t offset = std::size_t(gate.offset());
    moe::check(offset + N <= H, who, ": the gate reads coordinates ", offset, " to ", offset + N, " of ", H);
    std::copy_n(b.begin() + std::ptrdiff_t(offset), N, logits.begin());
  } else {  // Linear, FixedRandom: b Wᵀ, W [N, H]
    const std::vector<double> w =
        host_values(model.ops(), std::span<const S>(find(params, router_weight_name, N * H, who).value));
    for (std::size_t e = 0; e < N; ++e)
      for (std::size_t h = 0; h < H; ++h) logits[e] += w[e * H + h] * b[h];
  }
  return logits;
}

}  // namespace examples
