// moe/stats.hpp: routing statistics accumulated over many batches (the paper's section 4.2).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

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

  explicit RoutingStats(Index experts = 0, Index router_params = 0)
      : assignments(experts, 0), router_parameters(router_params) {}

  void reset() {
    std::fill(assignments.begin(), assignments.end(), 0);
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

  std::vector<double> expert_fractions() const { return fractions(assignments); }
  double normalized_entropy() const { return moe::normalized_entropy(assignments); }
  double max_fraction() const { return moe::max_fraction(assignments); }
  Index dead_experts() const { return Index(std::count(assignments.begin(), assignments.end(), 0)); }
  double dropped_fraction() const { return slots ? double(dropped_slots) / double(slots) : 0.0; }
};

}  // namespace moe
