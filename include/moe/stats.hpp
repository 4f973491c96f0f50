// moe/stats.hpp: routing statistics accumulated over many batches (the paper's section 4.2), and
// the moments of each expert's logit, which tell a token-independent offset (one expert's mean far
// above the others': that expert in nearly every token's top-k) from logits that spread.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moe/aux_loss.hpp"
#include "moe/config.hpp"
#include "moe/routing.hpp"

namespace moe {

// Fractions f_i = count_i / sum(count). Empty counts give all zeros.
inline std::vector<double> fractions(std::span<const std::int64_t> counts) {
  std::int64_t total = 0;
  for (auto c : counts) total += c;
  std::vector<double> f(counts.size(), 0.0);
  if (total > 0)
    for (std::size_t i = 0; i < counts.size(); ++i) f[i] = double(counts[i]) / double(total);
  return f;
}

// Paper eq. 6 divided by log N: 1 = perfectly uniform. Defined as 1 for N = 1, 0 with no counts.
inline double normalized_entropy(std::span<const std::int64_t> counts) {
  if (counts.size() <= 1) return counts.empty() ? 0.0 : 1.0;
  const std::vector<double> f = fractions(counts);
  double h = 0;
  bool any = false;
  for (double fi : f)
    if (fi > 0) h -= fi * std::log(fi), any = true;
  return any ? h / std::log(double(counts.size())) : 0.0;
}

inline double max_fraction(std::span<const std::int64_t> counts) {
  const std::vector<double> f = fractions(counts);
  return f.empty() ? 0.0 : *std::max_element(f.begin(), f.end());
}

// Tokens per partial of the logit moments. Every backend sums them the same way, so they have the
// same bits everywhere: over a chunk's tokens in token order, then over the chunks in order (the
// CUDA backend's threads take a chunk each).
inline constexpr Index kLogitMomentChunk = 256;

// One expert's logit over some tokens: finite values only (NaN and +-inf left out), their count
// as a double (exact below 2^53, and so one type for the device's partials).
struct LogitMoment {
  double sum = 0;
  double sum_squares = 0;
  double count = 0;

  MOE_HOST_DEVICE void add(const LogitMoment& other) {
    sum += other.sum, sum_squares += other.sum_squares, count += other.count;
  }
};

// Expert e's logit over the tokens [begin, end) that the mask counts (null: every token), in
// token order. A logit is read in its compute type (float for bfloat16); its square is exact in
// double, so a fused multiply-add gives the same bits.
template <class S>
MOE_HOST_DEVICE LogitMoment logit_moment(ConstMatrixView<S> logits, const std::uint8_t* mask, Index e, Index begin,
                                         Index end) {
  LogitMoment m;
  for (Index t = begin; t < end; ++t) {
    if (mask && mask[t] == 0) continue;
    const double v = double(Compute<S>(logits(t, e)));
    if (!std::isfinite(v)) continue;
    m.sum += v, m.sum_squares += v * v, m.count += 1;
  }
  return m;
}

// Counts since the last reset. Fractions are over router choices (T*k per batch, slots that a
// capacity later dropped included), as the paper's f_i.
struct RoutingStats {
  std::vector<std::int64_t> assignments;    // [N] router choices per expert
  std::int64_t tokens = 0;                  // tokens counted
  std::int64_t slots = 0;                   // tokens * k
  std::int64_t dropped_slots = 0;           // choices a capacity dropped
  std::int64_t rows_with_nonfinite = 0;     // tokens with any NaN/inf logit
  std::int64_t rows_without_finite = 0;     // tokens with no finite logit at all
  Index router_parameters = 0;              // learned routing parameters (0 for SelfRoute)
  std::vector<LogitMoment> logits;          // [N] each expert's logit over the counted tokens

  explicit RoutingStats(Index experts = 0, Index router_params = 0)
      : assignments(experts, 0), router_parameters(router_params), logits(experts) {}

  void reset() {
    std::fill(assignments.begin(), assignments.end(), 0);
    std::fill(logits.begin(), logits.end(), LogitMoment{});
    tokens = slots = dropped_slots = rows_with_nonfinite = rows_without_finite = 0;
  }

  // Adds one forward pass; tokens whose mask entry is 0 are not counted (empty mask: all).
  void accumulate(const RoutingPlan& plan, std::span<const std::uint8_t> mask = {}) {
    for (Index t = 0; t < plan.tokens; ++t) {
      if (!mask.empty() && mask[t] == 0) continue;
      ++tokens;
      for (Index j = 0; j < plan.top_k; ++j) {
        const Index s = t * plan.top_k + j;
        ++assignments[plan.expert[s]];
        ++slots;
        dropped_slots += plan.row[s] < 0;
      }
      rows_with_nonfinite += (plan.row_status[t] & kRowHasNonFinite) != 0;
      rows_without_finite += (plan.row_status[t] & kRowNoFiniteLogit) != 0;
    }
  }

  // Adds one forward pass's logits [T, N] in host memory (the tokens of accumulate's mask).
  template <class S>
  void accumulate_logits(ConstMatrixView<S> z, std::span<const std::uint8_t> mask = {}) {
    check(Index(logits.size()) == z.cols, "routing statistics hold ", logits.size(), " experts, the logits have ",
          z.cols, " columns");
    check_mask(mask, z.rows);
    std::vector<LogitMoment> pass(logits.size());
    for (Index e = 0; e < z.cols; ++e)
      for (Index begin = 0; begin < z.rows; begin += kLogitMomentChunk)
        pass[e].add(logit_moment(z, mask.empty() ? nullptr : mask.data(), e, begin,
                                 std::min(begin + kLogitMomentChunk, z.rows)));
    add_logit_moments(pass);
  }
  // Adds one forward pass's moments, each already summed over its chunks in order.
  void add_logit_moments(std::span<const LogitMoment> pass) {
    check(pass.size() == logits.size(), "routing statistics hold ", logits.size(), " experts, got logit moments of ",
          pass.size());
    for (std::size_t e = 0; e < pass.size(); ++e) logits[e].add(pass[e]);
  }

  // Each expert's mean and (population) standard deviation of its finite logits; NaN for an
  // expert with none.
  std::vector<double> logit_means() const {
    std::vector<double> mean(logits.size());
    for (std::size_t e = 0; e < logits.size(); ++e)
      mean[e] = logits[e].count > 0 ? logits[e].sum / logits[e].count : std::nan("");
    return mean;
  }
  std::vector<double> logit_stds() const {
    std::vector<double> sd(logits.size());
    for (std::size_t e = 0; e < logits.size(); ++e) {
      const LogitMoment& m = logits[e];
      const double mean = m.count > 0 ? m.sum / m.count : 0.0;
      sd[e] = m.count > 0 ? std::sqrt(std::max(0.0, m.sum_squares / m.count - mean * mean)) : std::nan("");
    }
    return sd;
  }

  std::vector<double> expert_fractions() const { return fractions(assignments); }
  double normalized_entropy() const { return moe::normalized_entropy(assignments); }
  double max_fraction() const { return moe::max_fraction(assignments); }
  Index dead_experts() const { return Index(std::count(assignments.begin(), assignments.end(), 0)); }
  double dropped_fraction() const { return slots ? double(dropped_slots) / double(slots) : 0.0; }
};

}  // namespace moe
