// examples/common/schedule.hpp: the learning rate at each optimizer step: linear warmup from 0,
// then a cosine decay from the peak to min_ratio * peak at the last step (llm.c, nanoGPT).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>

#include "moe/config.hpp"

namespace train {

struct Schedule {
  double peak_lr = 1e-3;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 1;
  double min_ratio = 0.1;

  void validate() const {
    moe::check(peak_lr >= 0 && std::isfinite(peak_lr), "schedule: learning rate must be finite and >= 0, got ",
               peak_lr);
    moe::check(total_steps >= 1, "schedule: the number of steps must be >= 1, got ", total_steps);
    moe::check(warmup_steps >= 0 && warmup_steps <= total_steps, "schedule: warmup = ", warmup_steps,
               " must lie in [0, steps = ", total_steps, "]");
    moe::check(min_ratio >= 0 && min_ratio <= 1, "schedule: min_ratio must lie in [0, 1], got ", min_ratio);
  }

  // step: 0-based index of the optimizer step about to run.
  double lr(std::int64_t step) const {
    if (step < warmup_steps) return peak_lr * double(step + 1) / double(warmup_steps);
    const std::int64_t decay_steps = std::max<std::int64_t>(1, total_steps - warmup_steps);
    const double progress = std::clamp(double(step - warmup_steps) / double(decay_steps), 0.0, 1.0);
    const double cosine = 0.5 * (1 + std::cos(std::numbers::pi * progress));  // 1 -> 0
    return peak_lr * (min_ratio + (1 - min_ratio) * cosine);
  }
};

}  // namespace train
