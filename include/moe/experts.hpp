// moe/experts.hpp: the Expert concept and the two expert banks. An expert bank holds the
// weights of all N experts and maps expert-sorted rows (expert e owns rows
// [offsets[e], offsets[e+1])) through their expert.
//
// Weights follow PyTorch's nn.Linear convention, stacked over experts (see README):
//   GeluMLP:  fc.weight [N, F, H], fc.bias [N, F], proj.weight [N, H, F], proj.bias [N, H]
//             (HF GPT-2's Conv1D stores these transposed: transpose when importing)
//   SwiGLU:   gate_up.weight [N, 2F, H] (rows 0..F-1 gate = Mixtral w1, F..2F-1 up = w3),
//             down.weight [N, H, F] (Mixtral w2); no biases.
#pragma once

#include <concepts>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "moe/backend.hpp"
#include "moe/config.hpp"
#include "moe/random.hpp"
#include "moe/tensor.hpp"

namespace moe {

template <class E, class B>
concept Expert = Backend<B> && requires(E& experts, const LayerConfig& config, B& be,
                                        ConstMatrixView<typename B::Scalar> rows, MatrixView<typename B::Scalar> out,
                                        std::span<const Index> offsets) {
  typename E::Options;                                            // init knobs; {} = defaults
  requires std::constructible_from<E, B&, const LayerConfig&, std::uint64_t, typename E::Options>;
  { E::name } -> std::convertible_to<std::string_view>;
  experts.forward(be, rows, offsets, out);                        // [R, H] -> [R, H]; caches for backward
  experts.backward(be, rows, rows, offsets, out);                 // (input rows, d out) -> d input; grads +=
  { experts.parameters() } -> std::same_as<std::vector<ParamRef<typename B::Scalar>>>;
  { E::cached_scalars_per_row(config) } -> std::convertible_to<Index>;  // kept from forward to backward
};
// Optional: experts.infer(be, rows, offsets, out), forward without keeping anything for backward
// (MoELayer's ForwardOptions::for_backward = false); the same output. Without it, forward serves.
// Optional, for backends whose products read the routing plan themselves (the CPU backend's
// routed products; the CUDA backend's with ExpertGemm::grouped): experts.can_infer_routed(be, x) and
// experts.infer_routed(be, x, plan, out, sum), infer's output from the layer's input x [T, H] and
// the plan, with no expert-sorted copy of x and no host copy of the offsets; out [T*k, H] holds the
// expert-sorted rows (rows past the plan's kept ones untouched). sum (a B::RoutedSum, or null): the
// layer's combine as well, handed to the last product. With them, experts.forward_routed(be, x, plan,
// out, sum): the same from a training forward, keeping what backward needs (rows of a slot each);
// backward then runs as after forward, on the layer's expert-sorted copy of x made there.

namespace detail {
template <class Matrix, class Scalar>
ParamRef<Scalar> param(std::string name, std::vector<Index> shape, Matrix& value, Matrix& grad) {
  const auto n = std::size_t(value.size());
  return {std::move(name), std::move(shape), {value.data(), n}, {grad.data(), n}, true};
}
}  // namespace detail

// GPT-2's MLP per expert: H -> F (bias) -> tanh-GELU -> H (bias).
template <class B>
struct GeluMLP {
  using Scalar = typename B::Scalar;
  struct Options {
    double init_std = 0.02;      // fc.weight ~ N(0, init_std^2), as GPT-2
    double out_init_std = 0.02;  // proj.weight; GPT-2 scales this by 1/sqrt(2 * layers)
  };
  static constexpr std::string_view name = "gelu-mlp";
  static Index cached_scalars_per_row(const LayerConfig& config) { return 2 * config.ffn; }  // pre | act

  GeluMLP(B& init, const LayerConfig& config, std::uint64_t seed, Options options)
      : experts_(config.experts), hidden_(config.hidden), ffn_(config.ffn) {
    const Index N = experts_, H = hidden_, F = ffn_;
    B::resize(fc_w_, N * F, H), B::resize(fc_b_, N, F), B::resize(proj_w_, N * H, F), B::resize(proj_b_, N, H);
    init.fill_normal(fc_w_, options.init_std, seed, random::kExpertWeightIn);
    init.fill_normal(proj_w_, options.out_init_std, seed, random::kExpertWeightOut);
    init.fill(fc_b_, Scalar(0)), init.fill(proj_b_, Scalar(0));
    B::resize(fc_w_grad_, N * F, H), B::resize(fc_b_grad_, N, F), B::resize(proj_w_grad_, N * H, F),
        B::resize(proj_b_grad_, N, H);
    for (auto* g : {&fc_w_grad_, &fc_b_grad_, &proj_w_grad_, &proj_b_grad_}) init.fill(*g, Scalar(0));
  }

  // rows: [R, H] -> out: [R, H];  pre = rows fc_e^T + b, act = gelu(pre) (both kept, from one
  // fused GEMM on the GPU), out = act proj_e^T + b
  void forward(B& be, ConstMatrixView<Scalar> rows, std::span<const Index> offsets, MatrixView<Scalar> out) {
    B::resize(pre_, rows.rows, ffn_), B::resize(act_, rows.rows, ffn_);
    be.grouped_linear_gelu_forward(rows, offsets, fc_w_, fc_b_.data(), pre_, act_);
    be.grouped_linear_forward(act_, offsets, proj_w_, proj_b_.data(), out);
  }
  // forward's output, keeping nothing for backward: no pre-activation is written (GELU_BIAS on
  // the GPU), act_ is workspace.
  void infer(B& be, ConstMatrixView<Scalar> rows, std::span<const Index> offsets, MatrixView<Scalar> out) {
    B::resize(act_, rows.rows, ffn_);
    be.grouped_linear_gelu_forward(rows, offsets, fc_w_, fc_b_.data(), MatrixView<Scalar>{}, act_);
    be.grouped_linear_forward(act_, offsets, proj_w_, proj_b_.data(), out);
  }
  // infer from the routing plan (the concept's note above): the first product gathers x's rows.
  bool can_infer_routed(const B& be, ConstMatrixView<Scalar> x) const
    requires requires { be.routed_product_fits(Index{}, Index{}); }
  {
    return be.routed_input_fits(x) && be.routed_product_fits(ffn_, hidden_) && be.routed_product_fits(hidden_, ffn_);
  }
  template <class Plan, class Sum>
  void infer_routed(B& be, ConstMatrixView<Scalar> x, const Plan& plan, MatrixView<Scalar> out, const Sum* sum)
    requires requires { be.routed_linear_forward(x, plan, true, x, static_cast<const Scalar*>(nullptr), out, sum); }
  {
    B::resize(act_, out.rows, ffn_);
    be.routed_linear_gelu_forward(x, plan, true, fc_w_, fc_b_.data(), MatrixView<Scalar>{}, act_);
    be.routed_linear_forward(act_, plan, false, proj_w_, proj_b_.data(), out, sum);
  }
  // forward from the routing plan: pre and act kept as forward keeps them, a row per slot.
  template <class Plan, class Sum>
  void forward_routed(B& be, ConstMatrixView<Scalar> x, const Plan& plan, MatrixView<Scalar> out, const Sum* sum)
    requires requires { be.routed_linear_forward(x, plan, true, x, static_cast<const Scalar*>(nullptr), out, sum); }
  {
    B::resize(pre_, out.rows, ffn_), B::resize(act_, out.rows, ffn_);
    be.routed_linear_gelu_forward(x, plan, true, fc_w_, fc_b_.data(), pre_, act_);
    be.routed_linear_forward(act_, plan, false, proj_w_, proj_b_.data(), out, sum);
  }
  // (rows, dout) -> drows; gradients accumulate. Once per forward: act_ becomes the gradient.
  void backward(B& be, ConstMatrixView<Scalar> rows, ConstMatrixView<Scalar> dout, std::span<const Index> offsets,
                MatrixView<Scalar> drows) {
    be.grouped_linear_backward_through_gelu(act_, dout, offsets, proj_w_, pre_, act_, proj_w_grad_,
                                            proj_b_grad_.data());  // act_ := dpre = (dout proj_e) * gelu'(pre)
    be.grouped_linear_backward(rows, act_, offsets, fc_w_, drows, fc_w_grad_, fc_b_grad_.data());
  }

  std::vector<ParamRef<Scalar>> parameters() {
    const Index N = experts_, H = hidden_, F = ffn_;
    return {detail::param<typename B::Matrix, Scalar>("experts.fc.weight", {N, F, H}, fc_w_, fc_w_grad_),
            detail::param<typename B::Matrix, Scalar>("experts.fc.bias", {N, F}, fc_b_, fc_b_grad_),
            detail::param<typename B::Matrix, Scalar>("experts.proj.weight", {N, H, F}, proj_w_, proj_w_grad_),
            detail::param<typename B::Matrix, Scalar>("experts.proj.bias", {N, H}, proj_b_, proj_b_grad_)};
  }

 private:
  Index experts_, hidden_, ffn_;
  typename B::Matrix fc_w_, fc_b_, proj_w_, proj_b_;
  typename B::Matrix fc_w_grad_, fc_b_grad_, proj_w_grad_, proj_b_grad_;
  typename B::Matrix pre_, act_;  // kept for backward, where act_ turns into the gradient
};

// Llama/Mixtral's gated MLP per expert: H -> (gate, up) F each -> silu(gate) * up -> H, no biases.
template <class B>
struct SwiGLU {
  using Scalar = typename B::Scalar;
  struct Options {
    double init_std = 0.02;
    double out_init_std = 0.02;
  };
  static constexpr std::string_view name = "swiglu";
  static Index cached_scalars_per_row(const LayerConfig& config) { return 2 * config.ffn; }  // gate | up

  SwiGLU(B& init, const LayerConfig& config, std::uint64_t seed, Options options)
      : experts_(config.experts), hidden_(config.hidden), ffn_(config.ffn) {
    const Index N = experts_, H = hidden_, F = ffn_;
    B::resize(gate_up_w_, N * 2 * F, H), B::resize(down_w_, N * H, F);
    init.fill_normal(gate_up_w_, options.init_std, seed, random::kExpertWeightIn);
    init.fill_normal(down_w_, options.out_init_std, seed, random::kExpertWeightOut);
    B::resize(gate_up_w_grad_, N * 2 * F, H), B::resize(down_w_grad_, N * H, F);
    init.fill(gate_up_w_grad_, Scalar(0)), init.fill(down_w_grad_, Scalar(0));
  }

  // rows: [R, H] -> out: [R, H];  gate_up = rows W_gu^T (kept), act = silu(gate) * up, out = act W_down^T
  void forward(B& be, ConstMatrixView<Scalar> rows, std::span<const Index> offsets, MatrixView<Scalar> out) {
    B::resize(gate_up_, rows.rows, 2 * ffn_), B::resize(act_, rows.rows, ffn_);
    be.grouped_linear_forward(rows, offsets, gate_up_w_, nullptr, gate_up_);
    be.swiglu_forward(gate_up_, act_);
    be.grouped_linear_forward(act_, offsets, down_w_, nullptr, out);
  }
  // forward from the routing plan (the concept's note above), keeping nothing for backward: the
  // first product gathers x's rows and makes silu(gate) * up in its epilogue (its tiles hold F's
  // gate and up columns in halves: 2F fits as F's tiles do); act_ is workspace of a row per slot.
  bool can_infer_routed(const B& be, ConstMatrixView<Scalar> x) const
    requires requires { be.routed_product_fits(Index{}, Index{}); }
  {
    return be.routed_input_fits(x) && be.routed_product_fits(2 * ffn_, hidden_) &&
           be.routed_product_fits(hidden_, ffn_);
  }
  template <class Plan, class Sum>
  void infer_routed(B& be, ConstMatrixView<Scalar> x, const Plan& plan, MatrixView<Scalar> out, const Sum* sum)
    requires requires {
      be.routed_swiglu_forward(x, plan, true, x, out);
      be.routed_linear_forward(x, plan, true, x, static_cast<const Scalar*>(nullptr), out, sum);
    }
  {
    B::resize(act_, out.rows, ffn_);
    be.routed_swiglu_forward(x, plan, true, gate_up_w_, act_);  // silu(gate) * up in the product's epilogue
    be.routed_linear_forward(act_, plan, false, down_w_, nullptr, out, sum);
  }
  // forward from the routing plan: gate_up kept as forward keeps it (so no SwiGLU in the epilogue),
  // a row per slot.
  template <class Plan, class Sum>
  void forward_routed(B& be, ConstMatrixView<Scalar> x, const Plan& plan, MatrixView<Scalar> out, const Sum* sum)
    requires requires { be.routed_linear_forward(x, plan, true, x, static_cast<const Scalar*>(nullptr), out, sum); }
  {
    B::resize(gate_up_, out.rows, 2 * ffn_), B::resize(act_, out.rows, ffn_);
    be.routed_linear_forward(x, plan, true, gate_up_w_, nullptr, gate_up_, nullptr);
    be.swiglu_forward(gate_up_, act_);
    be.routed_linear_forward(act_, plan, false, down_w_, nullptr, out, sum);
  }
  void backward(B& be, ConstMatrixView<Scalar> rows, ConstMatrixView<Scalar> dout, std::span<const Index> offsets,
                MatrixView<Scalar> drows) {
    be.swiglu_forward(gate_up_, act_);
    be.grouped_linear_backward(act_, dout, offsets, down_w_, act_, down_w_grad_, nullptr);  // act_ := dact
    be.swiglu_backward(gate_up_, act_, gate_up_);                                           // gate_up_ := d(gate|up)
    be.grouped_linear_backward(rows, gate_up_, offsets, gate_up_w_, drows, gate_up_w_grad_, nullptr);
  }

  std::vector<ParamRef<Scalar>> parameters() {
    const Index N = experts_, H = hidden_, F = ffn_;
    return {detail::param<typename B::Matrix, Scalar>("experts.gate_up.weight", {N, 2 * F, H}, gate_up_w_, gate_up_w_grad_),
            detail::param<typename B::Matrix, Scalar>("experts.down.weight", {N, H, F}, down_w_, down_w_grad_)};
  }

 private:
  Index experts_, hidden_, ffn_;
  typename B::Matrix gate_up_w_, down_w_, gate_up_w_grad_, down_w_grad_;
  typename B::Matrix gate_up_, act_;  // gate_up_ is kept for backward; act_ is workspace
};

}  // namespace moe
