// moe/config.hpp: the layer's shape and options, and the error type every check throws.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace moe {

using Index = std::ptrdiff_t;

// Every invalid argument at a public entry point throws this, naming the argument and the shapes.
struct Error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Builds "moe: <parts...>" and throws moe::Error.
template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  message << "moe: ";
  (message << ... << parts);
  throw Error(message.str());
}

template <class... Parts>
void check(bool condition, const Parts&... parts) {
  if (!condition) fail(parts...);
}

// How routing weights are formed from the logits z of one token (see README, "Semantics").
enum class RoutingWeights {
  // Paper eq. 2: softmax over the k selected logits; weights sum to 1.
  // Identical to "softmax over all N, take top-k, renormalise".
  softmax_over_top_k,
  // Switch/DeepSeek style: softmax over all N logits, then the top-k probabilities,
  // not renormalised; weights sum to the selected probability mass (<= 1; = 1 when k = N).
  softmax_then_top_k,
};

// Auxiliary losses, off (0) by default as in the paper. Their gradients are added in backward.
struct AuxLossConfig {
  double load_balance = 0;  // weight alpha of paper eq. 4: alpha * N * sum_i f_i P_i
  double z_loss = 0;        // weight beta of ST-MoE's router z-loss: beta * mean_t logsumexp(z_t)^2
};

struct LayerConfig {
  Index hidden = 0;   // H: width of the layer input and output
  Index ffn = 0;      // F: hidden width of each expert
  Index experts = 0;  // N
  Index top_k = 0;    // k: experts per token
  RoutingWeights weights = RoutingWeights::softmax_over_top_k;
  // 0 = dropless (default). Otherwise each expert keeps at most
  // ceil(capacity_factor * T * k / N) token slots; the rest are dropped (zero contribution).
  double capacity_factor = 0;
  AuxLossConfig aux{};
};

inline void validate(const LayerConfig& config) {
  check(config.hidden > 0, "hidden size must be positive, got ", config.hidden);
  check(config.ffn > 0, "ffn size must be positive, got ", config.ffn);
  check(config.hidden <= (Index{1} << 30), "hidden size ", config.hidden, " is too large");
  check(config.ffn <= (Index{1} << 30), "ffn size ", config.ffn, " is too large");
  check(config.experts > 0, "number of experts must be positive, got ", config.experts);
  check(config.experts <= (Index{1} << 30), "number of experts ", config.experts, " is too large");
  // The largest weight, N stacked [2F, H] blocks (SwiGLU's gate and up), up to 2^58 elements: its
  // size, in bytes too, and the per-token counts below it stay far inside Index.
  check(2 * config.ffn <= (Index{1} << 58) / config.hidden / config.experts, "the experts' weights are too large: N = ",
        config.experts, " blocks of [2F, H] = [", 2 * config.ffn, ", ", config.hidden, "] pass 2^58 elements");
  check(config.top_k >= 1, "top_k must be at least 1, got ", config.top_k);
  check(config.top_k <= config.experts, "top_k = ", config.top_k, " exceeds the number of experts N = ",
        config.experts);
  check(config.capacity_factor >= 0 && std::isfinite(config.capacity_factor),
        "capacity_factor must be finite and >= 0 (0 = dropless), got ", config.capacity_factor);
  check(config.aux.load_balance >= 0 && config.aux.z_loss >= 0 && std::isfinite(config.aux.load_balance) &&
            std::isfinite(config.aux.z_loss),
        "auxiliary loss weights must be finite and >= 0, got load_balance = ", config.aux.load_balance,
        ", z_loss = ", config.aux.z_loss);
}

}  // namespace moe
