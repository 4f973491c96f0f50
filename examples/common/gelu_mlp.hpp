// examples/common/gelu_mlp.hpp: the dense feed-forward network of the example transformers,
// fc: H -> F (bias), tanh-GELU, proj: F -> H (bias), over examples::NnOps<B>: GPT-2's mlp.c_fc /
// mlp.c_proj and timm's mlp.fc1 / mlp.fc2 (the models name the tensors and pick the init).
// The tanh GELU is the MoE experts' (moe::GeluMLP), so dense and MoE variants differ in routing
// alone. The FFN interface the example blocks call (MoEFFN, moe_ffn.hpp, has the same):
//   forward(x, y)           x: [N, H] -> y: [N, H] written; caches what backward needs
//   backward(x, dy, dx)     dx WRITTEN (the block adds it through its LayerNorm); parameter grads +=
//   parameters(), zero_grad(), set_threads(n)
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "moe/nn/checks.hpp"
#include "moe/tensor.hpp"
#include "nn_ops.hpp"

namespace examples {

// Tensor names without ".weight" / ".bias", and the init std of each weight (biases start at 0).
struct GeluMlpShape {
  std::string fc, proj;
  moe::Index hidden = 0, ffn = 0;
  double fc_std = 0.02, proj_std = 0.02;
};

template <class B>
class GeluMlp {
 public:
  using Backend = B;
  using Scalar = typename B::Scalar;
  using S = Scalar;
  using Ops = NnOps<B>;
  static constexpr bool is_moe = false;
  static constexpr std::string_view variant = "dense";

  GeluMlp(const GeluMlpShape& shape, std::uint64_t seed, const Ops& ops)
      : nn_(ops),
        fc_weight_(ops.param(shape.fc + ".weight", {shape.ffn, shape.hidden})),
        fc_bias_(ops.param(shape.fc + ".bias", {shape.ffn})),
        proj_weight_(ops.param(shape.proj + ".weight", {shape.hidden, shape.ffn})),
        proj_bias_(ops.param(shape.proj + ".bias", {shape.hidden})) {
    nn_.init_normal(fc_weight_, shape.fc_std, seed);
    nn_.init_normal(proj_weight_, shape.proj_std, seed);
  }

  // x: [N, H] -> pre = x fc^T + b: [N, F] (kept), act = gelu(pre): [N, F] (kept), y = act proj^T + b: [N, H]
  void forward(moe::ConstMatrixView<S> x, moe::MatrixView<S> y) {
    B::resize(pre_, x.rows, fc_weight_.rows());
    B::resize(act_, x.rows, fc_weight_.rows());
    nn_.linear_forward(x, fc_weight_.matrix(), fc_bias_.value.data(), pre_);
    nn_.gelu_forward(pre_, act_);
    nn_.linear_forward(act_, proj_weight_.matrix(), proj_bias_.value.data(), y);
  }
  // dy: [N, H] -> dact = dy proj: [N, F] -> dpre = dact * gelu'(pre) -> dx = dpre fc: [N, H] (written)
  void backward(moe::ConstMatrixView<S> x, moe::ConstMatrixView<S> dy, moe::MatrixView<S> dx) {
    constexpr moe::nn::GradInto overwrite = moe::nn::GradInto::overwrite;
    B::resize(dact_, pre_.rows(), pre_.cols());
    nn_.linear_backward(act_, dy, proj_weight_.matrix(), dact_, proj_weight_.grad_matrix(), proj_bias_.grad.data(),
                        overwrite);
    nn_.gelu_backward(pre_, dact_, dact_);
    nn_.linear_backward(x, dact_, fc_weight_.matrix(), dx, fc_weight_.grad_matrix(), fc_bias_.grad.data(), overwrite);
  }

  std::vector<moe::ParamRef<S>> parameters() {
    return {fc_weight_.ref(), fc_bias_.ref(), proj_weight_.ref(), proj_bias_.ref()};
  }
  void zero_grad() {
    for (moe::ParamRef<S>& p : parameters()) nn_.zero_grad(p);
  }
  void set_threads(int threads) { nn_.set_threads(threads); }

 private:
  Ops nn_;
  typename Ops::Param fc_weight_, fc_bias_, proj_weight_, proj_bias_;
  typename B::Matrix pre_, act_, dact_;
};

}  // namespace examples
