// examples/common/pre_ln_attention.hpp: everything of a pre-LayerNorm transformer block but its
// FFN, shared by the GPT-2 and ViT blocks (which differ in names, init, the mask, and the FFN):
//
//   forward(x)            ln1 = LN_1(x); qkv = ln1 Wqkv^T + b: [N, 3H]; atty = attention(qkv): [N, H]
//                         residual_attn = x + atty Wproj^T + b; ffn_in = LN_2(residual_attn)
//   (the block)           out = residual_attn + FFN(ffn_in)               add_residual(out)
//   backward_ln2(d ffn_in, dresidual)     dresidual += LN_2'(d ffn_in)
//   backward(x, dresidual, ...)           dresidual: d residual_attn on entry, d x on exit (+= LN_1'(...))
//
// qkv's weight is [3H, H] with rows q | k | v (nn.Linear's layout; timm's Attention.qkv, GPT-2's
// c_attn transposed from HF's Conv1D). Parameters in order: ln1, qkv, proj, ln2 (weight, bias each).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/nn/checks.hpp"
#include "moe/tensor.hpp"
#include "nn_ops.hpp"

namespace examples {

// Tensor names without ".weight" / ".bias", the attention's shape and mask, and the init std of the
// two projections (LayerNorms start at weight 1, bias 0; biases at 0).
struct PreLnAttentionShape {
  std::string ln1, qkv, proj, ln2;
  moe::Index hidden = 0, heads = 0;
  bool causal = false;
  double qkv_std = 0.02, proj_std = 0.02;
};

template <class B>
struct PreLnAttention {
  using S = typename B::Scalar;
  using Ops = NnOps<B>;
  using Matrix = typename B::Matrix;
  using Param = typename Ops::Param;
  template <class T>
  using Array = typename Ops::template Array<T>;

  Ops nn;
  moe::Index heads = 0;
  bool causal = false;
  Param ln1_weight, ln1_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, ln2_weight, ln2_bias;
  // Activations kept for backward ([N, ...] rows, N = batch * T; att is the attention's cache:
  // nn.attention_cache_size). ffn_in is the FFN's input.
  moe::Index batch = 0, T = 0;
  Matrix ln1, qkv, atty, residual_attn, ffn_in;
  Array<typename Ops::Stat> ln1_mean, ln1_rstd, ln2_mean, ln2_rstd;
  Array<S> att;

  PreLnAttention(const PreLnAttentionShape& shape, std::uint64_t seed, const Ops& ops)
      : nn(ops),
        heads(shape.heads),
        causal(shape.causal),
        ln1_weight(ops.param(shape.ln1 + ".weight", {shape.hidden})),
        ln1_bias(ops.param(shape.ln1 + ".bias", {shape.hidden})),
        qkv_weight(ops.param(shape.qkv + ".weight", {3 * shape.hidden, shape.hidden})),
        qkv_bias(ops.param(shape.qkv + ".bias", {3 * shape.hidden})),
        proj_weight(ops.param(shape.proj + ".weight", {shape.hidden, shape.hidden})),
        proj_bias(ops.param(shape.proj + ".bias", {shape.hidden})),
        ln2_weight(ops.param(shape.ln2 + ".weight", {shape.hidden})),
        ln2_bias(ops.param(shape.ln2 + ".bias", {shape.hidden})) {
    nn.fill(ln1_weight, S(1));
    nn.fill(ln2_weight, S(1));
    nn.init_normal(qkv_weight, shape.qkv_std, seed);
    nn.init_normal(proj_weight, shape.proj_std, seed);
  }

  // Activations for batch sequences of T tokens.
  void allocate(moe::Index batch_, moe::Index T_) {
    batch = batch_, T = T_;
    const moe::Index N = batch * T, H = ln1_weight.rows();
    for (Matrix* m : {&ln1, &atty, &residual_attn, &ffn_in}) B::resize(*m, N, H);
    B::resize(qkv, N, 3 * H);
    for (auto* v : {&ln1_mean, &ln1_rstd, &ln2_mean, &ln2_rstd}) v->resize(std::size_t(N));
    att.resize(std::size_t(nn.attention_cache_size(batch, T, heads, H)));
  }

  // x: [N, H] -> residual_attn and ffn_in (the FFN's input).
  void forward(moe::ConstMatrixView<S> x) {
    nn.layernorm_forward(x, ln1_weight.value.data(), ln1_bias.value.data(), ln1, ln1_mean.data(), ln1_rstd.data());
    nn.linear_forward(ln1, qkv_weight.matrix(), qkv_bias.value.data(), qkv);
    nn.attention_forward(qkv, batch, T, heads, causal, atty, att.data());
    nn.linear_forward(atty, proj_weight.matrix(), proj_bias.value.data(), residual_attn);
    nn.add(x, residual_attn);
    nn.layernorm_forward(residual_attn, ln2_weight.value.data(), ln2_bias.value.data(), ffn_in, ln2_mean.data(),
                         ln2_rstd.data());
  }
  // out (the FFN's output) += residual_attn: the block's output.
  void add_residual(moe::MatrixView<S> out) { nn.add(residual_attn, out); }

  // d ffn_in -> dresidual += its path through LN_2 (and LN_2's parameter gradients).
  void backward_ln2(moe::ConstMatrixView<S> dffn_in, moe::MatrixView<S> dresidual) {
    nn.layernorm_backward(dffn_in, residual_attn, ln2_weight.value.data(), ln2_mean.data(), ln2_rstd.data(), dresidual,
                          ln2_weight.grad.data(), ln2_bias.grad.data());
  }
  // dresidual: d residual_attn on entry, d x on exit:
  //   d x = d residual_attn + LN_1'(qkv'(attention'(proj'(d residual_attn))))
  // dtmp [N, H] and dqkv [N, 3H] hold nothing to keep: gradients are written over them, no zero fill first.
  void backward(moe::ConstMatrixView<S> x, moe::MatrixView<S> dresidual, moe::MatrixView<S> dtmp,
                moe::MatrixView<S> dqkv) {
    constexpr moe::nn::GradInto overwrite = moe::nn::GradInto::overwrite;
    nn.linear_backward(atty, dresidual, proj_weight.matrix(), dtmp, proj_weight.grad_matrix(), proj_bias.grad.data(),
                       overwrite);  // dtmp = d atty
    nn.attention_backward(dtmp, qkv, atty, att.data(), batch, T, heads, causal, dqkv, overwrite);
    nn.linear_backward(ln1, dqkv, qkv_weight.matrix(), dtmp, qkv_weight.grad_matrix(), qkv_bias.grad.data(),
                       overwrite);  // dtmp = d ln1
    nn.layernorm_backward(dtmp, x, ln1_weight.value.data(), ln1_mean.data(), ln1_rstd.data(), dresidual,
                          ln1_weight.grad.data(), ln1_bias.grad.data());
  }

  std::vector<moe::ParamRef<S>> parameters() {
    std::vector<moe::ParamRef<S>> all;
    for (Param* t : {&ln1_weight, &ln1_bias, &qkv_weight, &qkv_bias, &proj_weight, &proj_bias, &ln2_weight, &ln2_bias})
      all.push_back(t->ref());
    return all;
  }
};

}  // namespace examples
