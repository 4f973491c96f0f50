// moe/routing.hpp: the routing contract, written once as plain reference code.
//
// Given logits z [T, N], each token picks its top-k experts and weights them. Every backend
// must produce exactly these selections and (up to rounding) these weights:
//
//  * Order. Larger logits rank first. NaN ranks below every number, -inf included. Equal
//    values (and NaN against NaN) rank by the lower expert index. So NaN is never selected
//    over a finite value and every selected index is in [0, N).
//  * Weights (RoutingWeights). softmax_over_top_k: softmax over the k selected logits (paper
//    eq. 2). softmax_then_top_k: softmax over all N, the selected probabilities kept as they
//    are. Both orders select the same experts (softmax is monotonic); softmax_over_top_k equals
//    "softmax over all N, take top-k, renormalise", softmax_then_top_k does not renormalise.
//  * Non-finite softmax (robust_softmax). NaN counts as -inf. If the largest value is +inf, the
//    +inf entries share the mass equally; if no value is above -inf, all entries share it
//    equally. Weights are therefore always finite, >= 0, and sum to 1 over the softmax's set.
//    Logit gradients of a row whose largest value is not finite are zero, and so is the
//    gradient of every non-finite logit.
//  * Dispatch. Slots (t, j) are grouped by expert with a stable counting sort in the order
//    "all first choices in token order, then all second choices, ...". With a capacity
//    (capacity_factor > 0), each expert keeps its first ceil(capacity_factor * T * k / N)
//    slots in that order; the others are dropped and contribute nothing to the output.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "moe/config.hpp"
#include "moe/host_device.hpp"
#include "moe/tensor.hpp"

namespace moe {

// Routing arithmetic runs in Compute<S>: S itself, float for bfloat16 logits.
template <class S>
using Compute = typename ComputeTypeOf<S>::type;

// True when logit a of expert ia ranks above logit b of expert ib (see "Order" above).
template <class S>
MOE_HOST_DEVICE constexpr bool ranks_above(S a, Index ia, S b, Index ib) {
  const bool a_nan = std::isnan(a), b_nan = std::isnan(b);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a > b;
  return ia < ib;
}

// chosen[0..k) = the k best experts of one row of N logits, best first. O(N k), branch-light for
// the small N of MoE layers, and no scratch: the GPU runs it per token in registers.
template <class S>
MOE_HOST_DEVICE void select_top_k(const S* logits, Index N, Index k, std::int32_t* chosen) {
  using C = Compute<S>;
  Index count = 0;
  for (Index e = 0; e < N; ++e) {
    const C value = C(logits[e]);
    if (count == k) {
      if (!ranks_above(value, e, C(logits[chosen[k - 1]]), Index(chosen[k - 1]))) continue;
      count = k - 1;  // the current last one falls out
    }
    Index p = count;
    while (p > 0 && ranks_above(value, e, C(logits[chosen[p - 1]]), Index(chosen[p - 1]))) {
      chosen[p] = chosen[p - 1];
      --p;
    }
    chosen[p] = std::int32_t(e);
    ++count;
  }
}

// select_top_k with k fixed at compile time (kK >= 1, kK <= N): the selection is kK (value, expert)
// pairs kept sorted, so with its loops unrolled it lives in registers (the GPU's routing thread
// reads each logit once and nothing else; on the CPU it took a third off routing). The result is
// select_top_k's: ranks_above is a strict total order, so the k best and their order are unique.
template <Index kK, class S>
MOE_HOST_DEVICE void select_top_k_fixed(const S* logits, Index N, std::int32_t* chosen) {
  static_assert(kK >= 1, "moe::select_top_k_fixed: k must be at least 1");
  using C = Compute<S>;
  C value[kK];
  std::int32_t expert[kK];  // -1: an empty place, below every logit
  MOE_UNROLL
  for (Index j = 0; j < kK; ++j) value[j] = C(0), expert[j] = -1;
  for (Index e = 0; e < N; ++e) {
    const C v = C(logits[e]);
    // Whether v ranks above place p: ranks_above(v, e, value[p], expert[p]) where every expert
    // held is below e (the scan ascends), so a tie never does.
    bool above[kK];
    MOE_UNROLL
    for (Index p = 0; p < kK; ++p)
      above[p] = expert[p] < 0 || v > value[p] || (!std::isnan(v) && std::isnan(value[p]));
    // Places below v's shift down one; v takes the first place it ranks above ("above" is
    // monotone: the places are sorted).
    MOE_UNROLL
    for (Index p = kK - 1; p > 0; --p) {
      value[p] = above[p - 1] ? value[p - 1] : above[p] ? v : value[p];
      expert[p] = above[p - 1] ? expert[p - 1] : above[p] ? std::int32_t(e) : expert[p];
    }
    value[0] = above[0] ? v : value[0];
    expert[0] = above[0] ? std::int32_t(e) : expert[0];
  }
  MOE_UNROLL
  for (Index j = 0; j < kK; ++j) chosen[j] = expert[j];
}

// What a softmax over count values needs besides the values: their largest (NaN skipped) and
// the sum of exp(v - max), or, when the largest is not finite, how many entries share the mass.
template <class C>
struct SoftmaxScale {
  C max_value;
  C sum;          // finite case
  Index sharing;  // non-finite case: +inf entries, or all entries when nothing is above -inf
  MOE_HOST_DEVICE bool finite() const { return std::isfinite(max_value); }
  // softmax(values)[i] for the entry holding v, with the documented answer for non-finite values.
  MOE_HOST_DEVICE C at(C v) const {
    constexpr C inf = C(INFINITY);
    if (finite()) return std::isnan(v) ? C(0) : C(std::exp(v - max_value)) / sum;  // exp(-inf) = 0
    const bool shares = max_value == inf ? v == inf : true;
    return shares ? C(1) / C(sharing) : C(0);
  }
};

// The scale of softmax over value(0), ..., value(count - 1), summed in index order.
template <class C, class Value>
MOE_HOST_DEVICE SoftmaxScale<C> softmax_scale(Value value, Index count) {
  constexpr C inf = C(INFINITY);
  SoftmaxScale<C> scale{-inf, C(0), 0};
  for (Index i = 0; i < count; ++i) {
    const C v = value(i);
    if (!std::isnan(v) && v > scale.max_value) scale.max_value = v;
  }
  if (scale.finite()) {
    for (Index i = 0; i < count; ++i) {
      const C v = value(i);
      if (!std::isnan(v)) scale.sum += C(std::exp(v - scale.max_value));  // >= 1: the max adds exp(0)
    }
  } else {
    for (Index i = 0; i < count; ++i) scale.sharing += scale.max_value == inf ? value(i) == inf : 1;
  }
  return scale;
}

// p[i] = softmax(values)[i] with the documented answer for non-finite values; values[i] is read
// as values[i * step] so a row or a gathered selection can be passed. Returns false when the
// largest value is not finite (then the gradient through this softmax is defined as zero).
template <class S>
MOE_HOST_DEVICE bool robust_softmax(const S* values, Index count, Index step, S* p) {
  const auto scale = softmax_scale<S>([&](Index i) { return values[i * step]; }, count);
  for (Index i = 0; i < count; ++i) p[i] = scale.at(values[i * step]);
  return scale.finite();
}

// dz = J^T g for p = softmax(z): dz_i = p_i (g_i - sum_j p_j g_j); non-finite z_i get 0.
template <class S>
MOE_HOST_DEVICE void softmax_backward(const S* p, const S* g, const S* values, Index count, Index step, S* dz) {
  S dot = 0;
  for (Index i = 0; i < count; ++i) dot += p[i] * g[i];
  for (Index i = 0; i < count; ++i)
    dz[i * step] = std::isfinite(values[i * step]) ? p[i] * (g[i] - dot) : S(0);
}

// Everything a forward pass decided about routing, and what backward needs to undo it.
// Slot s = t * k + j is token t's j-th choice (j = 0 best).
struct RoutingPlan {
  Index tokens = 0, experts = 0, top_k = 0;
  std::vector<std::int32_t> expert;        // [T*k] chosen expert of each slot
  std::vector<std::int32_t> row;           // [T*k] row in the expert-sorted buffer, -1 if dropped
  std::vector<std::int32_t> slot_of_row;   // [R]   inverse of row: which slot fills each row
  std::vector<Index> expert_offsets;       // [N+1] expert e owns rows [offsets[e], offsets[e+1])
  std::vector<std::int64_t> chosen_count;  // [N]   slots that chose e, dropped ones included
  std::vector<std::uint8_t> row_status;    // [T]   RowStatus bits of each token's logits
  Index capacity = 0;                      // rows per expert kept; = T*k when dropless
  Index dropped_slots = 0;

  Index rows() const { return expert_offsets.empty() ? 0 : expert_offsets.back(); }
  Index slots() const { return tokens * top_k; }
};

// Per-token flags on its logits (bit set).
enum RowStatus : std::uint8_t {
  kRowFinite = 0,
  kRowHasNonFinite = 1,     // some logit is NaN or +-inf
  kRowNoFiniteLogit = 2,    // no logit is finite
};

inline void check_top_k(Index k, Index experts) {
  check(k >= 1 && k <= experts, "top_k = ", k, " must be in [1, N] with N = ", experts, " logit columns");
}

// Rows each expert may keep: T*k when dropless, else ceil(factor * T * k / N).
inline Index expert_capacity(Index tokens, Index top_k, Index experts, double capacity_factor) {
  const Index slots = tokens * top_k;
  if (capacity_factor <= 0) return slots;
  const double c = std::ceil(capacity_factor * double(slots) / double(experts));
  return c < double(slots) ? Index(c) : slots;  // compare in double: a huge factor must not overflow
}

// One token: logits z [N] -> its k experts (chosen, best first) and their weights w [k]; returns
// the token's RowStatus. No scratch and no allocation: the CPU runs it per token on threads, the
// GPU per token in one thread's registers. kFixedK > 0: k is that compile-time constant (k must
// equal it) and the selection is select_top_k_fixed's unrolled one; the same result.
template <Index kFixedK = 0, class S>
MOE_HOST_DEVICE std::uint8_t route_one_token(const S* z, Index N, Index k, RoutingWeights mode,
                                             std::int32_t* chosen, S* w) {
  using C = Compute<S>;
  if constexpr (kFixedK > 0) {
    k = kFixedK;
    select_top_k_fixed<kFixedK>(z, N, chosen);
  } else {
    select_top_k(z, N, k, chosen);
  }
  std::uint8_t status = kRowFinite;
  bool any_finite = false;
  for (Index e = 0; e < N; ++e) {
    if (std::isfinite(C(z[e]))) any_finite = true;
    else status |= kRowHasNonFinite;
  }
  if (!any_finite) status |= kRowNoFiniteLogit;

  const bool over_selection = mode == RoutingWeights::softmax_over_top_k;
  const auto scale = over_selection ? softmax_scale<C>([&](Index j) { return C(z[chosen[j]]); }, k)
                                    : softmax_scale<C>([&](Index e) { return C(z[e]); }, N);
  for (Index j = 0; j < k; ++j) w[j] = S(scale.at(C(z[chosen[j]])));
  return status;
}

// One token's logit gradient from the gradient dw [k] of its k weights, ADDED into dz [N]: the
// softmax backward over the selected logits, or over all N for softmax_then_top_k. Zero for a row
// whose largest logit is not finite, and for every non-finite logit.
template <class S>
MOE_HOST_DEVICE void route_one_token_backward(const S* z, Index N, Index k, RoutingWeights mode,
                                              const std::int32_t* chosen, const S* dw, S* dz) {
  using C = Compute<S>;
  if (mode == RoutingWeights::softmax_over_top_k) {
    const auto scale = softmax_scale<C>([&](Index j) { return C(z[chosen[j]]); }, k);
    if (!scale.finite()) return;
    C dot = 0;
    for (Index j = 0; j < k; ++j) dot += scale.at(C(z[chosen[j]])) * C(dw[j]);
    for (Index j = 0; j < k; ++j) {
      const C v = C(z[chosen[j]]);
      if (std::isfinite(v)) dz[chosen[j]] = S(C(dz[chosen[j]]) + scale.at(v) * (C(dw[j]) - dot));
    }
    return;
  }
  const auto scale = softmax_scale<C>([&](Index e) { return C(z[e]); }, N);
  if (!scale.finite()) return;
  // g_e = dw_j where chosen[j] = e, else 0; sums run over e ascending.
  const auto g = [&](Index e) {
    for (Index j = 0; j < k; ++j)
      if (chosen[j] == e) return C(dw[j]);
    return C(0);
  };
  C dot = 0;
  for (Index e = 0; e < N; ++e) dot += scale.at(C(z[e])) * g(e);
  for (Index e = 0; e < N; ++e) {
    const C v = C(z[e]);
    if (std::isfinite(v)) dz[e] = S(C(dz[e]) + scale.at(v) * (g(e) - dot));
  }
}

// route_one_token with the selection unrolled (select_top_k_fixed) for k up to kUnrolledTopK, the
// generic loop above that: the same result. On the CPU the generic insertion's branches on random
// logits cost more than the rest of routing (bench/RESULTS.md, 2026-12-06).
inline constexpr Index kUnrolledTopK = 8;
template <Index kK = 1, class S>
std::uint8_t route_one_token_unrolled(const S* z, Index N, Index k, RoutingWeights mode, std::int32_t* chosen, S* w) {
  if constexpr (kK <= kUnrolledTopK) {
    if (k == kK) return route_one_token<kK>(z, N, k, mode, chosen, w);
    return route_one_token_unrolled<kK + 1>(z, N, k, mode, chosen, w);
  } else {
    return route_one_token(z, N, k, mode, chosen, w);
  }
}

// Token t of the plan: selects its experts into plan.expert and its weights into weight[t*k..),
// and records its row status. Independent across tokens (backends parallelise over t).
template <class S>
void route_token(ConstMatrixView<S> logits, Index t, Index k, RoutingWeights mode, RoutingPlan& plan, S* weight) {
  plan.row_status[t] =
      route_one_token_unrolled(logits.row(t), logits.cols, k, mode, plan.expert.data() + t * k, weight + t * k);
}

// Groups the slots of plan.expert by expert (stable, choice-major) and applies the capacity.
// Sequential and O(T k + N): a small fraction of a layer's time.
inline void dispatch(RoutingPlan& plan, double capacity_factor) {
  const Index T = plan.tokens, k = plan.top_k, N = plan.experts;
  plan.capacity = expert_capacity(T, k, N, capacity_factor);
  plan.chosen_count.assign(N, 0);
  for (Index s = 0; s < T * k; ++s) ++plan.chosen_count[plan.expert[s]];

  plan.expert_offsets.assign(N + 1, 0);
  for (Index e = 0; e < N; ++e)
    plan.expert_offsets[e + 1] = plan.expert_offsets[e] + std::min<Index>(plan.chosen_count[e], plan.capacity);
  plan.slot_of_row.resize(plan.rows());
  plan.row.resize(T * k);

  std::vector<Index> next(plan.expert_offsets.begin(), plan.expert_offsets.end() - 1);
  plan.dropped_slots = 0;
  for (Index j = 0; j < k; ++j) {
    for (Index t = 0; t < T; ++t) {
      const Index s = t * k + j;
      const Index e = plan.expert[s];
      if (next[e] < plan.expert_offsets[e + 1]) {
        plan.row[s] = std::int32_t(next[e]);
        plan.slot_of_row[next[e]] = std::int32_t(s);
        ++next[e];
      } else {
        plan.row[s] = -1;
        ++plan.dropped_slots;
      }
    }
  }
}

// The whole reference routing: selection, weights, dispatch. weight must hold T*k values.
template <class S>
void route(ConstMatrixView<S> logits, Index k, RoutingWeights mode, double capacity_factor, RoutingPlan& plan,
           std::span<S> weight) {
  check_top_k(k, logits.cols);
  check(Index(weight.size()) >= logits.rows * k, "route: weight buffer holds ", weight.size(), " values, needs ",
        logits.rows * k);
  plan.tokens = logits.rows;
  plan.experts = logits.cols;
  plan.top_k = k;
  plan.expert.resize(logits.rows * k);
  plan.row_status.resize(logits.rows);
  for (Index t = 0; t < logits.rows; ++t) route_token(logits, t, k, mode, plan, weight.data());
  dispatch(plan, capacity_factor);
}

// Token t's logit gradient from the gradient of its k weights (dweight[t*k..)), added into dlogits.
template <class S>
void route_token_backward(ConstMatrixView<S> logits, Index t, Index k, RoutingWeights mode,
                          const RoutingPlan& plan, const S* dweight, MatrixView<S> dlogits) {
  route_one_token_backward(logits.row(t), logits.cols, k, mode, plan.expert.data() + t * k, dweight + t * k,
                           dlogits.row(t));
}

}  // namespace moe
