// examples/common/moe_ffn.hpp: the example transformers' MoE feed-forward network, a MoELayer of
// GELU MLP experts (experts.fc: H -> F, experts.proj: F -> H) behind Gate, with the FFN interface
// of gelu_mlp.hpp. Its parameters are the layer's names under the block's prefix
// ("h.{l}.moe.router.weight", "blocks.{l}.moe.experts.fc.weight", ...). The gate reads the FFN's
// own input (for SelfRoute: its last N coordinates), or a separate router input where the model
// routes from elsewhere (GPT-2's --route-from residual):
//   forward(x, router_input, y), backward(x, dy, dx, d_router_input)   d_router_input +=
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moe/experts.hpp"
#include "moe/gate.hpp"
#include "moe/layer.hpp"
#include "moe/random.hpp"
#include "moe/tensor.hpp"
#include "nn_ops.hpp"
#include "parameter.hpp"  // stream_of

namespace examples {

template <template <class> class Gate, class B>
class MoEFFN {
 public:
  using Backend = B;
  using Scalar = typename B::Scalar;
  using S = Scalar;
  using Layer = moe::MoELayer<Gate, moe::GeluMLP, B>;
  using ExpertOptions = typename Layer::ExpertsType::Options;
  using GateOptions = typename Layer::GateType::Options;
  using Ops = NnOps<B>;
  static constexpr bool is_moe = true;
  static constexpr std::string_view variant = Layer::GateType::name;

  // prefix: the block's, ending in "moe."; experts: their init (the router keeps the library's
  // N(0, 1/H): unit-variance logits for unit-variance inputs, the scale SelfRoute reads); gate: its
  // options ({}: the paper's, e.g. SelfRoute reading the last N coordinates). The layer's seed is a
  // stream of (seed, prefix), so each block draws its own.
  MoEFFN(std::string prefix, const moe::LayerConfig& layer, const ExpertOptions& experts, std::uint64_t seed,
         const Ops& ops, const GateOptions& gate = {})
      : prefix_(std::move(prefix)),
        layer_(layer, moe::random::mix64(seed ^ stream_of(prefix_)), gate, experts, ops.make_backend()) {}

  // x: [N, H] -> y: [N, H] (the layer keeps its routing and expert activations; x and a router
  // input stay the block's own until its backward, so the layer reads them there: input_kept, no copy)
  void forward(moe::ConstMatrixView<S> x, moe::MatrixView<S> y) { layer_.forward_into(x, y, {.input_kept = true}); }
  // dy: [N, H] -> dx: [N, H] (written; includes the router path, e.g. SelfRoute's logit gradient)
  void backward(moe::ConstMatrixView<S>, moe::ConstMatrixView<S> dy, moe::MatrixView<S> dx) {
    layer_.backward_into(dy, dx);
  }
  // The gate reads router_input: [N, H] instead of x; its gradient is added into d_router_input.
  void forward(moe::ConstMatrixView<S> x, moe::ConstMatrixView<S> router_input, moe::MatrixView<S> y) {
    layer_.forward_into(x, router_input, y, {.input_kept = true});
  }
  void backward(moe::ConstMatrixView<S>, moe::ConstMatrixView<S> dy, moe::MatrixView<S> dx,
                moe::MatrixView<S> d_router_input) {
    layer_.backward_into(dy, dx, d_router_input);
  }

  std::vector<moe::ParamRef<S>> parameters() {
    std::vector<moe::ParamRef<S>> params = layer_.parameters();
    for (moe::ParamRef<S>& p : params) p.name = prefix_ + p.name;
    return params;
  }
  void zero_grad() { layer_.zero_grad(); }
  void set_threads(int threads) {
    if constexpr (requires { layer_.backend().set_threads(threads); }) layer_.backend().set_threads(threads);
  }
  Layer& layer() { return layer_; }
  const Layer& layer() const { return layer_; }

 private:
  std::string prefix_;
  Layer layer_;
};

}  // namespace examples
