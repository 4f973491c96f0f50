// examples/gpt2_moe/sample.hpp: text generation from a trained model, one token at a time:
// forward the last `context` tokens, take the last position's logits, keep the top_k largest,
// softmax at `temperature`, draw. Deterministic in the seed. (No key/value cache: every step
// re-runs the window, which is simple and fast enough for the small configs.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include "cpu_model.hpp"

namespace gpt2 {

struct SampleOptions {
  std::int64_t tokens = 200;  // new tokens to generate
  double temperature = 0.8;   // 0: greedy (always the most likely token)
  std::int64_t top_k = 40;    // 0: the whole vocabulary
  std::uint64_t seed = 1337;

  void validate() const {
    moe::check(tokens >= 0, "sample: --tokens must be >= 0, got ", tokens);
    moe::check(temperature >= 0 && std::isfinite(temperature), "sample: --temperature must be finite and >= 0, got ",
               temperature);
    moe::check(top_k >= 0, "sample: --top-k must be >= 0, got ", top_k);
  }
};

// logits: [V] -> a token id. u: a uniform draw in [0, 1).
inline std::int32_t pick_token(std::span<const float> logits, double temperature, std::int64_t top_k, double u) {
  const std::int64_t V = std::int64_t(logits.size());
  std::vector<std::int32_t> order(static_cast<std::size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  // Largest first; ties to the lower id (the library's routing order).
  auto larger = [&](std::int32_t a, std::int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  const std::int64_t keep = top_k > 0 ? std::min(top_k, V) : V;
  std::partial_sort(order.begin(), order.begin() + keep, order.end(), larger);
  if (temperature == 0) return order[0];
  std::vector<double> weights(static_cast<std::size_t>(keep));
  const double top = logits[order[0]];
  double total = 0;
  for (std::int64_t i = 0; i < keep; ++i) total += weights[i] = std::exp((logits[order[i]] - top) / temperature);
  double target = u * total;
  for (std::int64_t i = 0; i < keep; ++i) {
    target -= weights[i];
    if (target < 0) return order[i];
  }
  return order[keep - 1];
}

// prompt: ids (at least one) -> prompt followed by options.tokens generated ids.
template <class Model>
std::vector<std::int32_t> generate(Model& model, std::vector<std::int32_t> ids, const SampleOptions& options) {
  options.validate();
  moe::check(!ids.empty(), "sample: the prompt must hold at least one token");
  const std::int64_t context = model.config().context, V = model.config().vocab;
  for (std::int64_t i = 0; i < options.tokens; ++i) {
    const std::int64_t T = std::min<std::int64_t>(std::int64_t(ids.size()), context);
    const std::span<const std::int32_t> window(ids.data() + ids.size() - std::size_t(T), std::size_t(T));
    model.set_routing_step(std::uint64_t(i));
    model.forward(window, {}, 1, T);
    const auto logits = model.logits();
    const std::span<const float> last(logits.row(T - 1), std::size_t(V));
    const double u = moe::random::uniform(options.seed, 0x5a3e, std::uint64_t(i));
    ids.push_back(pick_token(last, options.temperature, options.top_k, u));
  }
  return ids;
}

}  // namespace gpt2
