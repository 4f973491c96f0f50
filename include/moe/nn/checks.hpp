// moe/nn/checks.hpp: what the CPU (moe/nn/) and CUDA (moe/cuda/nn/) transformer pieces share
// besides their arithmetic: argument checks with their messages, the ignore-target value, the
// optimizer's options, step constants and decay rule. Plain C++ (no Eigen), so nvcc code includes
// it too.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>

#include "moe/config.hpp"
#include "moe/tensor.hpp"

namespace moe::nn {

// A cross-entropy target that leaves its row out of the loss.
inline constexpr std::int32_t kIgnoreTarget = -1;

struct AdamWConfig {
  double lr = 6e-4;  // used by step(params); step(params, lr) takes a scheduled rate instead
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

// One AdamW step's constants in C, computed in double from the options, the step's rate and its
// number t (1 on the first step): the CPU and CUDA optimizers take them from here.
template <class C>
struct AdamWStep {
  C b1, b2, one_minus_b1, one_minus_b2;
  C step_size;             // lr / (1 - b1^t)
  C inv_sqrt_correction2;  // 1 / sqrt(1 - b2^t)
  C eps;
  C decay;                 // 1 - lr * weight_decay, the factor of a parameter that decays
};

template <class C>
AdamWStep<C> adamw_step(const AdamWConfig& config, double lr, int t) {
  const double b1 = config.beta1, b2 = config.beta2;
  const double correction1 = 1 - std::pow(b1, t), correction2 = 1 - std::pow(b2, t);
  return {C(b1), C(b2), C(1 - b1), C(1 - b2), C(lr / correction1), C(1 / std::sqrt(correction2)), C(config.eps),
          C(1 - lr * config.weight_decay)};
}

// Weight decay applies only to parameters of 2 or more dimensions (matrices, embeddings); biases
// and norm weights (1-D) are not decayed: the GPT-2 / llm.c convention.
template <class S>
bool decays(const ParamRef<S>& param) {
  return param.shape.size() >= 2;
}

namespace detail {

// Embedding shapes and token ids, checked on the host before any parallel or device work (an
// exception must not leave an OpenMP region; ids must never index the device out of range).
inline void check_embedding(const char* where, std::span<const std::int32_t> tokens, Index B, Index T, Index V,
                            Index max_T, Index C, Index rows, Index cols) {
  check(B >= 0 && T >= 0, where, ": B = ", B, " and T = ", T, " must be >= 0");
  check(Index(tokens.size()) == B * T, where, ": tokens has ", tokens.size(), " ids, expected B * T = ", B, " * ",
        T, " = ", B * T);
  check(T <= max_T, where, ": sequence length T = ", T, " exceeds the ", max_T, " positions of wpe");
  check(rows == B * T && cols == C, where, ": the [B*T, C] matrix is [", rows, ", ", cols, "], expected [", B * T,
        ", ", C, "]");
  for (Index i = 0; i < Index(tokens.size()); ++i)
    check(tokens[i] >= 0 && tokens[i] < V, where, ": token id ", tokens[i], " at position ", i, " (b = ", i / T,
          ", t = ", i % T, ") is outside the vocabulary [0, ", V, ")");
}

// Cross-entropy shapes and targets; returns the number of rows counted.
inline Index check_cross_entropy(const char* where, Index N, Index V, std::span<const std::int32_t> targets) {
  check(Index(targets.size()) == N, where, ": targets has ", targets.size(), " entries, logits has ", N, " rows");
  check(V > 0 || N == 0, where, ": logits has no columns (logits is [", N, ", ", V, "])");
  Index valid = 0;
  for (Index r = 0; r < N; ++r) {
    check(targets[r] >= kIgnoreTarget && targets[r] < V, where, ": target ", targets[r], " of row ", r,
          " is outside [0, ", V, ") (or -1 to ignore the row)");
    valid += targets[r] != kIgnoreTarget;
  }
  return valid;
}

// nn.Linear: in [T, I], weight [O, I], out [T, O].
template <class S>
void check_linear_forward(ConstMatrixView<S> in, ConstMatrixView<S> weight, MatrixView<S> out) {
  check(in.cols == weight.cols, "linear_forward: in is [", in.rows, ", ", in.cols, "], weight is [", weight.rows,
        ", ", weight.cols, "] (expected [O, ", in.cols, "])");
  check(out.rows == in.rows && out.cols == weight.rows, "linear_forward: out is [", out.rows, ", ", out.cols,
        "], expected [T, O] = [", in.rows, ", ", weight.rows, "]");
}
// Its backward: dout [T, O]; din [T, I] and dweight [O, I] unless null.
template <class S>
void check_linear_backward(ConstMatrixView<S> in, ConstMatrixView<S> dout, ConstMatrixView<S> weight,
                           MatrixView<S> din, MatrixView<S> dweight) {
  const Index T = in.rows, I = in.cols, O = weight.rows;
  check(weight.cols == I, "linear_backward: in is [", T, ", ", I, "], weight is [", O, ", ", weight.cols,
        "] (expected [O, ", I, "])");
  check(dout.rows == T && dout.cols == O, "linear_backward: dout is [", dout.rows, ", ", dout.cols,
        "], expected [T, O] = [", T, ", ", O, "]");
  check(!din.data || (din.rows == T && din.cols == I), "linear_backward: din is [", din.rows, ", ", din.cols,
        "], in is [", T, ", ", I, "]");
  check(!dweight.data || (dweight.rows == O && dweight.cols == I), "linear_backward: dweight is [", dweight.rows,
        ", ", dweight.cols, "], weight is [", O, ", ", I, "]");
}

// Attention: qkv [B*T, 3C], the output (or its gradient) [B*T, C], the att cache; returns C and
// the head size.
struct AttentionShape {
  Index C, hs;
};
template <class S>
AttentionShape check_attention(const char* where, ConstMatrixView<S> qkv, Index B, Index T, Index heads,
                               Index out_rows, Index out_cols, const char* out_name, const S* att) {
  check(B >= 1 && T >= 1, where, ": batch B = ", B, " and sequence length T = ", T, " must be positive");
  check(heads >= 1, where, ": heads must be positive, got ", heads);
  check(qkv.rows == B * T, where, ": qkv has ", qkv.rows, " rows, expected B*T = ", B, "*", T, " = ", B * T);
  check(qkv.cols % 3 == 0 && qkv.cols > 0, where, ": qkv has ", qkv.cols,
        " columns, expected 3*C (q | k | v) for some C > 0");
  const Index C = qkv.cols / 3;
  check(C % heads == 0, where, ": C = ", C, " is not divisible by heads = ", heads);
  check(out_rows == B * T && out_cols == C, where, ": ", out_name, " is [", out_rows, ", ", out_cols,
        "], expected [B*T, C] = [", B * T, ", ", C, "]");
  check(att != nullptr, where, ": att (the [B, heads, T, T] probabilities) is null");
  return {C, C / heads};
}

}  // namespace detail
}  // namespace moe::nn
