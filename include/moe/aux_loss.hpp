// moe/aux_loss.hpp: the optional auxiliary losses on the router logits, forward and backward.
// Both are off by default (weights 0), as in the paper. Only tokens whose mask entry is non-zero
// count (an empty mask means every token); T_m below is the number of counted tokens.
//
//   load balance (paper eq. 4):  L_b = alpha * N * sum_i f_i P_i
//       f_i = share of the T_m * k router choices that picked expert i (capacity drops included:
//             it measures the router, not the capacity), not differentiated;
//       P_i = mean over counted tokens of softmax(z_t)_i over all N (robust_softmax).
//       dL_b/dz_t = alpha * N / T_m * J_softmax(z_t)^T f
//   router z-loss (ST-MoE):       L_z = beta / T_m * sum_t logsumexp(z_t)^2
//       dL_z/dz_t = beta / T_m * 2 logsumexp(z_t) softmax(z_t)
//       rows whose logsumexp is not finite (+inf or NaN present, or all -inf) are skipped.
//
// Sums run in a fixed order in double, so the result does not depend on threads.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moe/config.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"

namespace moe {

struct AuxLosses {
  double load_balance = 0;  // weighted (alpha applied)
  double z_loss = 0;        // weighted (beta applied)
  double total() const { return load_balance + z_loss; }
};

namespace detail {
inline bool is_counted(std::span<const std::uint8_t> mask, Index t) { return mask.empty() || mask[t] != 0; }

inline Index counted_tokens(std::span<const std::uint8_t> mask, Index tokens) {
  if (mask.empty()) return tokens;
  Index count = 0;
  for (Index t = 0; t < tokens; ++t) count += mask[t] != 0;
  return count;
}

// f_i over the counted tokens' choices.
inline std::vector<double> choice_fractions(const RoutingPlan& plan, std::span<const std::uint8_t> mask,
                                            Index counted) {
  std::vector<double> f(plan.experts, 0.0);
  if (counted == 0) return f;
  for (Index t = 0; t < plan.tokens; ++t)
    if (is_counted(mask, t))
      for (Index j = 0; j < plan.top_k; ++j) f[plan.expert[t * plan.top_k + j]] += 1.0;
  for (double& fi : f) fi /= double(counted * plan.top_k);
  return f;
}

template <class S>
double logsumexp(const S* z, Index N) {
  double max_value = -double(INFINITY);
  for (Index e = 0; e < N; ++e)
    if (!std::isnan(z[e]) && double(z[e]) > max_value) max_value = double(z[e]);
  if (!std::isfinite(max_value)) return max_value;
  double sum = 0;
  for (Index e = 0; e < N; ++e)
    if (!std::isnan(z[e])) sum += std::exp(double(z[e]) - max_value);
  return max_value + std::log(sum);
}
}  // namespace detail

inline void check_mask(std::span<const std::uint8_t> mask, Index tokens) {
  check(mask.empty() || Index(mask.size()) == tokens, "token mask has ", mask.size(),
        " entries, the input has ", tokens, " tokens");
}

// The weighted auxiliary losses of one forward pass.
template <class S>
AuxLosses aux_loss_forward(ConstMatrixView<S> logits, const RoutingPlan& plan, const AuxLossConfig& config,
                           std::span<const std::uint8_t> mask) {
  AuxLosses out;
  const Index T = logits.rows, N = logits.cols;
  const Index counted = detail::counted_tokens(mask, T);
  if (counted == 0) return out;
  std::vector<S> p(N);
  if (config.load_balance > 0) {
    const std::vector<double> f = detail::choice_fractions(plan, mask, counted);
    std::vector<double> P(N, 0.0);
    for (Index t = 0; t < T; ++t) {
      if (!detail::is_counted(mask, t)) continue;
      robust_softmax(logits.row(t), N, 1, p.data());
      for (Index e = 0; e < N; ++e) P[e] += double(p[e]);
    }
    double sum = 0;
    for (Index e = 0; e < N; ++e) sum += f[e] * P[e] / double(counted);
    out.load_balance = config.load_balance * double(N) * sum;
  }
  if (config.z_loss > 0) {
    double sum = 0;
    for (Index t = 0; t < T; ++t) {
      if (!detail::is_counted(mask, t)) continue;
      const double lse = detail::logsumexp(logits.row(t), N);
      if (std::isfinite(lse)) sum += lse * lse;
    }
    out.z_loss = config.z_loss * sum / double(counted);
  }
  return out;
}

// Adds the auxiliary losses' gradient into dlogits [T, N].
template <class S>
void aux_loss_backward(ConstMatrixView<S> logits, const RoutingPlan& plan, const AuxLossConfig& config,
                       std::span<const std::uint8_t> mask, MatrixView<S> dlogits) {
  const Index T = logits.rows, N = logits.cols;
  const Index counted = detail::counted_tokens(mask, T);
  if (counted == 0 || (config.load_balance <= 0 && config.z_loss <= 0)) return;
  std::vector<S> p(N), g(N), dz(N);
  std::vector<double> f;
  if (config.load_balance > 0) f = detail::choice_fractions(plan, mask, counted);
  for (Index t = 0; t < T; ++t) {
    if (!detail::is_counted(mask, t)) continue;
    const S* z = logits.row(t);
    if (!robust_softmax(z, N, 1, p.data())) continue;  // no gradient through a non-finite row
    if (config.load_balance > 0) {
      const double scale = config.load_balance * double(N) / double(counted);
      for (Index e = 0; e < N; ++e) g[e] = S(scale * f[e]);
      softmax_backward(p.data(), g.data(), z, N, 1, dz.data());
      for (Index e = 0; e < N; ++e) dlogits(t, e) += dz[e];
    }
    if (config.z_loss > 0) {
      const double lse = detail::logsumexp(z, N);
      if (!std::isfinite(lse)) continue;
      const double scale = config.z_loss * 2.0 * lse / double(counted);
      for (Index e = 0; e < N; ++e)
        if (std::isfinite(z[e])) dlogits(t, e) += S(scale * double(p[e]));
    }
  }
}

}  // namespace moe
