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
#include "moe/tensor.hpp"

namespace moe {

// True when logit a of expert ia ranks above logit b of expert ib (see "Order" above).
template <class S>
constexpr bool ranks_above(S a, Index ia, S b, Index ib) {
  const bool a_nan = std::isnan(a), b_nan = std::isnan(b);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a > b;
  return ia < ib;
}

// chosen[0..k) = the k best experts of one row of N logits, best first. O(N k), branch-light for
// the small N of MoE layers.
template <class S>
void select_top_k(const S* logits, Index N, Index k, std::int32_t* chosen) {
  Index count = 0;
  for (Index e = 0; e < N; ++e) {
    const S value = logits[e];
    if (count == k) {
      if (!ranks_above(value, e, logits[chosen[k - 1]], Index(chosen[k - 1]))) continue;
      count = k - 1;  // the current last one falls out
    }
    Index p = count;
    while (p > 0 && ranks_above(value, e, logits[chosen[p - 1]], Index(chosen[p - 1]))) {
      chosen[p] = chosen[p - 1];
      --p;
    }
    chosen[p] = std::int32_t(e);
    ++count;
  }
}

// p[i] = softmax(values)[i] with the documented answer for non-finite values; values[i] is read
// as values[i * step] so a row or a gathered selection can be passed. Returns false when the
// largest value is not finite (then the gradient through this softmax is defined as zero).
template <class S>
bool robust_softmax(const S* values, Index count, Index step, S* p) {
  constexpr S inf = std::numeric_limits<S>::infinity();
  S max_value = -inf;
  for (Index i = 0; i < count; ++i) {
    const S v = values[i * step];
    if (!std::isnan(v) && v > max_value) max_value = v;
  }
  if (std::isfinite(max_value)) {
    S sum = 0;
    for (Index i = 0; i < count; ++i) {
      const S v = values[i * step];
      p[i] = std::isnan(v) ? S(0) : std::exp(v - max_value);  // exp(-inf) = 0
      sum += p[i];
    }
    for (Index i = 0; i < count; ++i) p[i] /= sum;  // sum >= 1: the max contributes exp(0)
    return true;
  }
  // +inf present: the +inf entries share equally. Otherwise nothing is above -inf: all share.
  Index sharing = 0;
  for (Index i = 0; i < count; ++i) sharing += (max_value == inf) ? (values[i * step] == inf) : 1;
  for (Index i = 0; i < count; ++i) {
    const bool shares = (max_value == inf) ? (values[i * step] == inf) : true;
    p[i] = shares ? S(1) / S(sharing) : S(0);
  }
  return false;
}

// dz = J^T g for p = softmax(z): dz_i = p_i (g_i - sum_j p_j g_j); non-finite z_i get 0.
template <class S>
void softmax_backward(const S* p, const S* g, const S* values, Index count, Index step, S* dz) {
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

// Scratch values route_token / route_token_backward need per call (callers keep one per thread).
inline Index routing_scratch_size(Index experts) { return 3 * experts; }

// Token t: selects its experts into plan.expert and its weights into weight[t*k..), and records
// its row status. Independent across tokens (backends parallelise over t).
template <class S>
void route_token(ConstMatrixView<S> logits, Index t, Index k, RoutingWeights mode, RoutingPlan& plan,
                 S* weight, S* scratch) {
  const Index N = logits.cols;
  const S* z = logits.row(t);
  std::int32_t* chosen = plan.expert.data() + t * k;
  select_top_k(z, N, k, chosen);

  std::uint8_t status = kRowFinite;
  bool any_finite = false;
  for (Index e = 0; e < N; ++e) {
    if (std::isfinite(z[e])) any_finite = true;
    else status |= kRowHasNonFinite;
  }
  if (!any_finite) status |= kRowNoFiniteLogit;
  plan.row_status[t] = status;

  S* w = weight + t * k;
  if (mode == RoutingWeights::softmax_over_top_k) {
    S* selected = scratch;
    for (Index j = 0; j < k; ++j) selected[j] = z[chosen[j]];
    robust_softmax(selected, k, 1, w);
  } else {
    S* p = scratch;
    robust_softmax(z, N, 1, p);
    for (Index j = 0; j < k; ++j) w[j] = p[chosen[j]];
  }
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
  std::vector<S> scratch(routing_scratch_size(logits.cols));
  for (Index t = 0; t < logits.rows; ++t) route_token(logits, t, k, mode, plan, weight.data(), scratch.data());
  dispatch(plan, capacity_factor);
}

// Token t's logit gradient from the gradient of its k weights (dweight[t*k..)): the softmax
// backward over the selected logits, or over all N for softmax_then_top_k. Adds into dlogits.
template <class S>
void route_token_backward(ConstMatrixView<S> logits, Index t, Index k, RoutingWeights mode,
                          const RoutingPlan& plan, const S* dweight, MatrixView<S> dlogits, S* scratch) {
  const Index N = logits.cols;
  const S* z = logits.row(t);
  const std::int32_t* chosen = plan.expert.data() + t * k;
  S* dz = dlogits.row(t);
  S* p = scratch;
  S* g = p + N;
  S* dsel = g + N;
  if (mode == RoutingWeights::softmax_over_top_k) {
    for (Index j = 0; j < k; ++j) dsel[j] = z[chosen[j]];  // selected logits, contiguous
    if (!robust_softmax(dsel, k, 1, p)) return;
    softmax_backward(p, dweight + t * k, dsel, k, 1, g);  // g now holds d(selected logits)
    for (Index j = 0; j < k; ++j) dz[chosen[j]] += g[j];
  } else {
    if (!robust_softmax(z, N, 1, p)) return;
    std::fill(g, g + N, S(0));
    for (Index j = 0; j < k; ++j) g[chosen[j]] = dweight[t * k + j];
    softmax_backward(p, g, z, N, 1, dsel);
    for (Index e = 0; e < N; ++e) dz[e] += dsel[e];
  }
}

}  // namespace moe
