// moe/backend.hpp: the Backend concept, the primitives the generic MoELayer, its gates and its
// experts are written against. moe::cpu::BasicBackend (Eigen) is the reference implementation.
// The primitives check their operands' shapes (moe/backend_checks.hpp). Optional: a static
// B::check_layer_config(const LayerConfig&), which MoELayer's constructor calls to refuse a config
// past the backend's limits before any weight is allocated (the CUDA backend's N and k).
#pragma once

#include <concepts>
#include <cstdint>
#include <span>

#include "moe/aux_loss.hpp"
#include "moe/config.hpp"
#include "moe/stats.hpp"
#include "moe/tensor.hpp"

namespace moe {

template <class B>
concept Backend = requires(B& be, const B& cbe, typename B::Matrix& m, typename B::Plan& plan,
                           typename B::template Vector<typename B::Scalar>& vec,
                           ConstMatrixView<typename B::Scalar> in, MatrixView<typename B::Scalar> out,
                           std::span<const Index> offsets, const typename B::Scalar* bias,
                           typename B::Scalar* dbias, const LayerConfig& config,
                           std::span<const std::uint8_t> mask, RoutingStats& stats) {
  typename B::Scalar;                                  // element type of activations and weights
  typename B::Matrix;                                  // owning row-major matrix
  typename B::Plan;                                    // routing decisions of one forward
  B::resize(m, Index{}, Index{});                      // (re)shape an owning matrix
  { MatrixView<typename B::Scalar>(m) };               // ... viewable as a MatrixView
  cbe.copy(in, out);                                   // out = in
  cbe.add(in, out);                                    // out += in
  cbe.fill(out, typename B::Scalar{});                 // out = value
  cbe.fill_normal(out, double{}, std::uint64_t{}, std::uint64_t{});  // counter-based N(0, std^2)
  cbe.linear_forward(in, in, out);                     // out = in W^T
  cbe.linear_backward(in, in, in, out, out);           // din += dout W; dW += dout^T in
  cbe.grouped_linear_forward(in, offsets, in, bias, out);              // per-expert out = in W_e^T + b_e
  cbe.grouped_linear_gelu_forward(in, offsets, in, bias, out, out);    // per-expert pre = in W_e^T + b_e (pre empty: not kept), act = gelu(pre)
  cbe.grouped_linear_backward(in, in, offsets, in, out, out, dbias);   // per-expert gradients
  cbe.grouped_linear_backward_through_gelu(in, in, offsets, in, in, out, out, dbias);  // ... din * gelu'(pre)
  cbe.gelu_forward(in, out);
  cbe.gelu_backward(in, in, out);
  cbe.swiglu_forward(in, out);
  cbe.swiglu_backward(in, in, out);
  cbe.route(in, config, plan, vec);                    // top-k, weights, dispatch (moe/routing.hpp)
  cbe.gather_rows(in, plan, out);                      // expert-sorted copy of the tokens
  cbe.combine(in, plan, vec, out);                     // weighted sum of each token's expert rows
  cbe.combine_backward(in, in, plan, vec, out, vec);   // d(expert rows), d(weights)
  cbe.sum_rows_to_tokens(in, plan, out);               // d(expert input rows) -> d(tokens)
  cbe.route_backward(in, plan, config, vec, mask, out);  // d(weights) -> d(logits), aux included
  { cbe.aux_loss(in, plan, config, mask) } -> std::same_as<AuxLosses>;
  { B::expert_offsets(plan) } -> std::convertible_to<std::span<const Index>>;  // host copy
  B::accumulate_stats(plan, in, mask, stats);          // choices and each expert's logit moments
};

}  // namespace moe
