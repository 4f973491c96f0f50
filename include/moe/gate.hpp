// moe/gate.hpp: the Gate concept and the four gate policies. A gate turns the layer input
// x [T, H] into routing logits [T, N]; selection and weighting are shared (moe/routing.hpp).
#pragma once

#include <concepts>
#include <cstdint>
#include <string_view>
#include <vector>

#include "moe/backend.hpp"
#include "moe/config.hpp"
#include "moe/random.hpp"
#include "moe/tensor.hpp"

namespace moe {

template <class G, class B>
concept Gate = Backend<B> && requires(G& gate, const G& cgate, B& be, const LayerConfig& config,
                                      typename G::Options options, ConstMatrixView<typename B::Scalar> x,
                                      MatrixView<typename B::Scalar> dx) {
  typename G::Options;                                          // the gate's knobs; {} = paper defaults
  requires std::constructible_from<G, B&, const LayerConfig&, std::uint64_t, typename G::Options>;
  { G::name } -> std::convertible_to<std::string_view>;         // short name for reports
  { gate.forward(be, x) } -> std::same_as<ConstMatrixView<typename B::Scalar>>;  // logits, valid until next forward
  gate.backward(be, x, ConstMatrixView<typename B::Scalar>{}, dx);  // dx += through the gate; grads +=
  { cgate.wants_logit_gradient() } -> std::same_as<bool>;       // false: backward skips the router path
  { gate.parameters() } -> std::same_as<std::vector<ParamRef<typename B::Scalar>>>;
  { cgate.router_parameters() } -> std::convertible_to<Index>;  // learned parameters (paper Table 1)
};

// Whether a gate's logits are a view of its input, with no memory of their own (SelfRoute's): a
// gate says so with `static constexpr bool logits_are_input_view = true;`. Any other gate's logits
// are counted as its own [T, N] (MoELayer::saved_bytes_per_token).
template <class G>
inline constexpr bool gate_logits_are_input_view = requires { requires G::logits_are_input_view; };

// Self-Routing (paper eq. 5): the logits are N designated coordinates of x itself. Zero
// parameters. The logits are a strided view into x, no copy.
template <class B>
struct SelfRoute {
  using Scalar = typename B::Scalar;
  enum class Gradient { full, stop };
  struct Options {
    Index offset = -1;                  // first coordinate read; -1 = the last N (the paper's choice)
    Gradient gradient = Gradient::full; // full: logit gradients flow into x (paper); stop: ablation
  };
  static constexpr std::string_view name = "self";
  static constexpr bool logits_are_input_view = true;

  SelfRoute(B&, const LayerConfig& config, std::uint64_t /*seed*/, Options options)
      : experts_(config.experts), gradient_(options.gradient) {
    check(config.hidden >= config.experts, "SelfRoute reads N = ", config.experts,
          " coordinates as logits, but the hidden size H = ", config.hidden, " is smaller");
    check(options.offset >= -1, "SelfRoute offset must be >= 0, or -1 for the last N coordinates, got ",
          options.offset);
    offset_ = options.offset < 0 ? config.hidden - config.experts : options.offset;
    check(offset_ <= config.hidden - experts_, "SelfRoute offset ", offset_, " + N = ", experts_,  // no overflow
          " exceeds the hidden size H = ", config.hidden);
  }

  // x: [T, H] -> logits: [T, N] = x[:, offset : offset + N]
  ConstMatrixView<Scalar> forward(B&, ConstMatrixView<Scalar> x) { return x.col_block(offset_, experts_); }
  // dx[:, offset : offset + N] += dlogits
  void backward(B& be, ConstMatrixView<Scalar>, ConstMatrixView<Scalar> dlogits, MatrixView<Scalar> dx) {
    if (gradient_ == Gradient::full) be.add(dlogits, dx.col_block(offset_, experts_));
  }
  bool wants_logit_gradient() const { return gradient_ == Gradient::full; }
  std::vector<ParamRef<Scalar>> parameters() { return {}; }
  Index router_parameters() const { return 0; }
  Index offset() const { return offset_; }

 private:
  Index experts_, offset_ = 0;
  Gradient gradient_;
};

// A router projection W [N, H] (nn.Linear(H, N, bias=False).weight): logits = x W^T (paper
// eq. 3), in the backend's scalar type (fp32 by default). Trainable = the learned router;
// frozen = the fixed random projection, whose gradient is never produced.
// Initialised N(0, 1/H): unit-variance inputs give unit-variance logits, the scale SelfRoute reads.
template <class B, bool Trainable>
struct ProjectionGate {
  using Scalar = typename B::Scalar;
  struct Options {};
  static constexpr std::string_view name = Trainable ? "linear" : "fixed-random";

  ProjectionGate(B& be, const LayerConfig& config, std::uint64_t seed, Options) {
    B::resize(weight_, config.experts, config.hidden);
    be.fill_normal(weight_, 1.0 / std::sqrt(double(config.hidden)), seed, random::kRouterWeight);
    if constexpr (Trainable) {
      B::resize(grad_, config.experts, config.hidden);
      be.fill(grad_, Scalar(0));
    }
  }

  // x: [T, H] -> logits: [T, N] = x W^T
  ConstMatrixView<Scalar> forward(B& be, ConstMatrixView<Scalar> x) {
    B::resize(logits_, x.rows, weight_.rows());
    be.linear_forward(x, weight_, logits_);
    return MatrixView<Scalar>(logits_);
  }
  // dx += dlogits W; (trainable) dW += dlogits^T x
  void backward(B& be, ConstMatrixView<Scalar> x, ConstMatrixView<Scalar> dlogits, MatrixView<Scalar> dx) {
    be.linear_backward(x, dlogits, weight_, dx, Trainable ? MatrixView<Scalar>(grad_) : MatrixView<Scalar>{});
  }
  bool wants_logit_gradient() const { return true; }
  std::vector<ParamRef<Scalar>> parameters() {
    const Index n = weight_.rows() * weight_.cols();
    return {{"router.weight", {Index(weight_.rows()), Index(weight_.cols())}, {weight_.data(), std::size_t(n)},
             Trainable ? std::span<Scalar>(grad_.data(), std::size_t(n)) : std::span<Scalar>{}, Trainable}};
  }
  Index router_parameters() const { return Trainable ? Index(weight_.size()) : 0; }

 private:
  typename B::Matrix weight_, grad_, logits_;
};

template <class B>
using Linear = ProjectionGate<B, true>;
template <class B>
using FixedRandom = ProjectionGate<B, false>;

// Random routing: fresh N(0, 1) logits every forward, a pure function of (seed, step, t, e), so
// runs are reproducible. The step advances by one per forward; set_step() rewinds it. No gradient.
template <class B>
struct Random {
  using Scalar = typename B::Scalar;
  struct Options {};
  static constexpr std::string_view name = "random";

  Random(B&, const LayerConfig& config, std::uint64_t seed, Options) : experts_(config.experts), seed_(seed) {}

  // x: [T, H] -> logits: [T, N], element (t, e) = normal(seed, stream(step), t * N + e)
  ConstMatrixView<Scalar> forward(B& be, ConstMatrixView<Scalar> x) {
    B::resize(logits_, x.rows, experts_);
    be.fill_normal(logits_, 1.0, seed_, random::mix64(random::kRandomGateLogits) + step_);
    ++step_;
    return MatrixView<Scalar>(logits_);
  }
  void backward(B&, ConstMatrixView<Scalar>, ConstMatrixView<Scalar>, MatrixView<Scalar>) {}
  bool wants_logit_gradient() const { return false; }
  std::vector<ParamRef<Scalar>> parameters() { return {}; }
  Index router_parameters() const { return 0; }
  std::uint64_t step() const { return step_; }
  void set_step(std::uint64_t step) { step_ = step; }

 private:
  Index experts_;
  std::uint64_t seed_, step_ = 0;
  typename B::Matrix logits_;
};

}  // namespace moe
