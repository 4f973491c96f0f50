// moe/nn/checks.hpp: what the CPU (moe/nn/) and CUDA (moe/cuda/nn/) transformer pieces share
// besides their arithmetic: argument checks with their messages, the ignore-target value, the
// optimizer's options, step constants, decay rule, which parameters it updates and its checks of
// the parameter list and of restored state. Plain C++ (no Eigen), so nvcc code includes it too.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <utility>
#include <vector>

#include "moe/config.hpp"
#include "moe/tensor.hpp"

namespace moe::nn {

// A cross-entropy target that leaves its row out of the loss.
inline constexpr std::int32_t kIgnoreTarget = -1;

// Where a backward puts an input's gradient: added into what the buffer holds (the default, llm.c's convention: a
// value used in several places sums its gradients), or written over it, so a caller whose buffer holds nothing to
// keep skips the zero fill first (a pass over the buffer, and the add's read of it). Both give the same values: the
// same bits wherever the product runs the same kernel either way (the CPU, the emulated device, the fused attention;
// cuBLAS may pick another kernel for beta = 0).
enum class GradInto { add, overwrite };

struct AdamWConfig {
  double lr = 6e-4;  // used by step(params); step(params, lr) takes a scheduled rate instead
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

// AdamW's options: finite; lr and weight_decay >= 0; eps > 0 (with 0, a weight whose gradient has
// always been 0, a dead expert's, would become 0 / 0); betas in [0, 1). The CPU and CUDA optimizers'
// constructors check them here; a step's own rate, check_adamw_rate.
inline void check_adamw_config(const AdamWConfig& c) {
  check(std::isfinite(c.lr) && c.lr >= 0, "AdamW: lr must be finite and >= 0, got ", c.lr);
  // (> 0 in float too: fp32 optimizers compute with float(eps).)
  check(std::isfinite(c.eps) && float(c.eps) > 0, "AdamW: eps must be finite and > 0 (in float), got ", c.eps);
  check(std::isfinite(c.weight_decay) && c.weight_decay >= 0, "AdamW: weight_decay must be finite and >= 0, got ",
        c.weight_decay);
  check(c.beta1 >= 0 && c.beta1 < 1 && c.beta2 >= 0 && c.beta2 < 1, "AdamW: betas must lie in [0, 1), got ", c.beta1,
        " and ", c.beta2);
}
inline void check_adamw_rate(double lr) {
  check(std::isfinite(lr) && lr >= 0, "AdamW: the step's learning rate must be finite and >= 0, got ", lr);
}

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

// A parameter the optimizer updates: trainable, with a gradient. The others keep empty moments.
template <class S>
bool optimizer_updates(const ParamRef<S>& param) {
  return param.trainable && !param.grad.empty();
}

namespace detail {

// The checks of a parameter list, one set for the CPU and CUDA optimizers, clipping and scaling
// (same messages). Each runs before the call allocates or changes anything, so a throw leaves it
// as it was.

// Every updated parameter has as many gradients as values.
template <class S>
void check_adamw_gradients(const std::vector<ParamRef<S>>& params) {
  for (std::size_t i = 0; i < params.size(); ++i)
    if (optimizer_updates(params[i]))
      check(params[i].grad.size() == params[i].value.size(), "AdamW: parameter ", i, " '", params[i].name, "' has ",
            params[i].value.size(), " values but ", params[i].grad.size(), " gradients");
}

// No two parameters that `keep` selects share memory in `field` (&ParamRef::value or
// &ParamRef::grad): a tied weight listed twice, which `consequence` says what would happen to.
// Sorted by address, so a list of a few hundred costs microseconds.
template <class S, class Keep>
void check_distinct(const char* where, const std::vector<ParamRef<S>>& params, std::span<S> ParamRef<S>::*field,
                    Keep keep, const char* what, const char* consequence) {
  std::vector<std::size_t> kept;
  for (std::size_t i = 0; i < params.size(); ++i)
    if (keep(params[i]) && !(params[i].*field).empty()) kept.push_back(i);
  const auto begin = [&](std::size_t i) { return (params[i].*field).data(); };
  std::sort(kept.begin(), kept.end(), [&](std::size_t a, std::size_t b) {  // by address, then list order
    return begin(a) == begin(b) ? a < b : std::less<>()(begin(a), begin(b));
  });
  for (std::size_t j = 1; j < kept.size(); ++j) {
    const ParamRef<S>& a = params[kept[j - 1]];
    check(!std::less<>()(begin(kept[j]), begin(kept[j - 1]) + (a.*field).size()), where, ": parameters ", kept[j - 1],
          " '", a.name, "' and ", kept[j], " '", params[kept[j]].name, "' share ", what,
          " (a tied weight listed twice?): ", consequence);
  }
}

// AdamW's: updated parameters' values (the CPU would update them twice a step, the GPU's
// multi-tensor launch with two writers racing). Checked on the first step.
template <class S>
void check_adamw_distinct(const std::vector<ParamRef<S>>& params) {
  check_distinct("AdamW", params, &ParamRef<S>::value, optimizer_updates<S>, "values",
                 "each would be updated twice a step");
}

// Clipping's: updated parameters' gradients (the norm would count them twice, the scaling apply
// twice). Checked on every call: clipping keeps no state to remember a list by.
template <class S>
void check_clip_distinct(const char* where, const std::vector<ParamRef<S>>& params) {
  check_distinct(where, params, &ParamRef<S>::grad, optimizer_updates<S>, "gradients",
                 "the norm would count them twice and clipping scale them twice");
}

// Scaling's: every gradient, frozen parameters' too (each would be scaled twice).
template <class S>
void check_scale_distinct(const char* where, const std::vector<ParamRef<S>>& params) {
  check_distinct(where, params, &ParamRef<S>::grad, [](const ParamRef<S>& p) { return !p.grad.empty(); }, "gradients",
                 "they would be scaled twice");
}

// The next step's number: refused at int's limit (its bias corrections count steps in an int).
inline int next_adamw_step(int steps) {
  check(steps < std::numeric_limits<int>::max(), "AdamW: the step count ", steps, " is at int's limit");
  return steps + 1;
}

// A state given to set_state: a step count >= 0 and two moments of the same size per parameter.
template <class C>
void check_adamw_set_state(int step_count, const std::vector<std::vector<C>>& m, const std::vector<std::vector<C>>& v) {
  check(step_count >= 0, "AdamW::set_state: step count must be >= 0, got ", step_count);
  check(m.size() == v.size(), "AdamW::set_state: ", m.size(), " first moments but ", v.size(), " second moments");
  for (std::size_t i = 0; i < m.size(); ++i)
    check(m[i].size() == v[i].size(), "AdamW::set_state: moments of parameter ", i, " have sizes ", m[i].size(),
          " and ", v[i].size());
}

// Per-parameter state (restored moments, master weights) against the list it will serve: none
// (a fresh optimizer), or one entry per parameter, each empty (not updated yet) or of its size.
// State is any vector-like of vector-likes (host vectors, device arrays).
template <class State, class S>
void check_adamw_state(const char* what, const State& state, const std::vector<ParamRef<S>>& params) {
  if (state.empty()) return;
  check(std::size_t(state.size()) == params.size(), "AdamW: the ", what, " hold ", state.size(),
        " parameters, the list has ", params.size());
  for (std::size_t i = 0; i < params.size(); ++i)
    check(state[i].empty() || std::size_t(state[i].size()) == params[i].value.size(), "AdamW: ", what,
          " of parameter ", i, " '", params[i].name, "' have ", state[i].size(), " entries, the parameter has ",
          params[i].value.size());
}

// After the first step the list keeps its length and every parameter its size (sizes: the first
// step's).
template <class S>
void check_adamw_list(const std::vector<ParamRef<S>>& params, const std::vector<std::size_t>& sizes) {
  check(params.size() == sizes.size(), "AdamW: the parameter list has ", params.size(), " entries, the first step had ",
        sizes.size());
  for (std::size_t i = 0; i < params.size(); ++i)
    check(params[i].value.size() == sizes[i], "AdamW: parameter ", i, " '", params[i].name, "' has ",
          params[i].value.size(), " values, it had ", sizes[i], " at the first step");
}

// Embedding shapes and token ids, checked on the host before any parallel or device work (an
// exception must not leave an OpenMP region; ids must never index the device out of range).
// B * T (a batch's rows) fits Index, for B, T >= 0: checked before it is computed.
inline void check_batch_rows(const char* where, Index B, Index T) {
  check(T == 0 || B <= std::numeric_limits<Index>::max() / T, where, ": B * T overflows (B = ", B, ", T = ", T, ")");
}

inline void check_embedding(const char* where, std::span<const std::int32_t> tokens, Index B, Index T, Index V,
                            Index max_T, Index C, Index rows, Index cols) {
  check(B >= 0 && T >= 0, where, ": B = ", B, " and T = ", T, " must be >= 0");
  check_batch_rows(where, B, T);
  check(Index(tokens.size()) == B * T, where, ": tokens has ", tokens.size(), " ids, expected B * T = ", B, " * ",
        T, " = ", B * T);
  check(T <= max_T, where, ": sequence length T = ", T, " exceeds the ", max_T, " positions of wpe");
  check(rows == B * T && cols == C, where, ": the [B*T, C] matrix is [", rows, ", ", cols, "], expected [", B * T,
        ", ", C, "]");
  for (Index i = 0; i < Index(tokens.size()); ++i)
    check(tokens[i] >= 0 && tokens[i] < V, where, ": token id ", tokens[i], " at position ", i, " (b = ", i / T,
          ", t = ", i % T, ") is outside the vocabulary [0, ", V, ")");
}

// The embedding's own checks before check_embedding's: wte [V, C] and wpe [maxT, C] share C;
// backward's gradients (each skipped if null) have dout's width.
template <class S>
void check_embedding_forward(std::span<const std::int32_t> tokens, Index B, Index T, ConstMatrixView<S> wte,
                             ConstMatrixView<S> wpe, MatrixView<S> out) {
  check_view("embedding_forward", "wte", wte);
  check_view("embedding_forward", "wpe", wpe);
  check_view("embedding_forward", "out", out);
  check(wpe.cols == wte.cols, "embedding_forward: wte is [", wte.rows, ", ", wte.cols, "], wpe is [", wpe.rows, ", ",
        wpe.cols, "] (the widths differ)");
  check_embedding("embedding_forward", tokens, B, T, wte.rows, wpe.rows, wte.cols, out.rows, out.cols);
}
template <class S>
void check_embedding_backward(ConstMatrixView<S> dout, std::span<const std::int32_t> tokens, Index B, Index T,
                              MatrixView<S> dwte, MatrixView<S> dwpe) {
  check_view("embedding_backward", "dout", dout);
  if (dwte.data) check_view("embedding_backward", "dwte", dwte);
  if (dwpe.data) check_view("embedding_backward", "dwpe", dwpe);
  const Index C = dout.cols;
  check(!dwte.data || dwte.cols == C, "embedding_backward: dwte is [", dwte.rows, ", ", dwte.cols, "], dout is [",
        dout.rows, ", ", C, "]");
  check(!dwpe.data || dwpe.cols == C, "embedding_backward: dwpe is [", dwpe.rows, ", ", dwpe.cols, "], dout is [",
        dout.rows, ", ", C, "]");
  // Without a dwte, ids are not looked up; with no dwpe, positions are unbounded.
  const Index V = dwte.data ? dwte.rows : Index(INT32_MAX) + 1;
  const Index max_T = dwpe.data ? dwpe.rows : T;
  check_embedding("embedding_backward", tokens, B, T, V, max_T, C, dout.rows, dout.cols);
}

// The checks that take views in turn: shapes, then `operands()`, then aliasing. The CUDA pieces
// check their operands as device memory in `operands()`, so a view past its buffer's end is named
// as that, not as an overlap with whatever buffer follows it.
struct NoOperandChecks {
  void operator()() const {}
};

// LayerNorm: x [T, C] with C > 0; out, dout and dx (skipped if null) of x's shape; no null
// parameter or cache. Stat is the cache's type (S on the CPU, Compute<S> on the device).
template <class S, class Stat>
void check_layernorm_forward(ConstMatrixView<S> x, const S* weight, const S* bias, MatrixView<S> out,
                             const Stat* mean, const Stat* rstd) {
  check_view("layernorm_forward", "x", x);
  check_view("layernorm_forward", "out", out);
  const Index T = x.rows, C = x.cols;
  check(C > 0, "layernorm_forward: x has no columns (x is [", T, ", ", C, "])");
  check(out.rows == T && out.cols == C, "layernorm_forward: out is [", out.rows, ", ", out.cols, "], x is [", T,
        ", ", C, "]");
  check(weight && bias, "layernorm_forward: weight and bias [", C, "] must not be null");
  check(mean && rstd, "layernorm_forward: mean and rstd [", T, "] (cached for backward) must not be null");
}
template <class S, class Stat, class Operands = NoOperandChecks>
void check_layernorm_backward(ConstMatrixView<S> dout, ConstMatrixView<S> x, const S* weight, const Stat* mean,
                              const Stat* rstd, MatrixView<S> dx, Operands operands = {}) {
  check_view("layernorm_backward", "dout", dout);
  check_view("layernorm_backward", "x", x);
  if (dx.data) check_view("layernorm_backward", "dx", dx);
  const Index T = x.rows, C = x.cols;
  check(C > 0, "layernorm_backward: x has no columns (x is [", T, ", ", C, "])");
  check(dout.rows == T && dout.cols == C, "layernorm_backward: dout is [", dout.rows, ", ", dout.cols, "], x is [",
        T, ", ", C, "]");
  check(!dx.data || (dx.rows == T && dx.cols == C), "layernorm_backward: dx is [", dx.rows, ", ", dx.cols,
        "], x is [", T, ", ", C, "]");
  check(weight && mean && rstd, "layernorm_backward: weight [", C, "], mean and rstd [", T, "] must not be null");
  operands();
  for (const auto& [operand, name] : {std::pair{dout, "dout"}, std::pair{x, "x"}})
    if (overlaps(dx, operand)) check(false, "layernorm_backward: dx overlaps ", name);
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
template <class S, class Operands = NoOperandChecks>
void check_linear_forward(ConstMatrixView<S> in, ConstMatrixView<S> weight, MatrixView<S> out, Operands operands = {}) {
  check_view("linear_forward", "in", in);
  check_view("linear_forward", "weight", weight);
  check_view("linear_forward", "out", out);
  check(in.cols == weight.cols, "linear_forward: in is [", in.rows, ", ", in.cols, "], weight is [", weight.rows,
        ", ", weight.cols, "] (expected [O, ", in.cols, "])");
  check(out.rows == in.rows && out.cols == weight.rows, "linear_forward: out is [", out.rows, ", ", out.cols,
        "], expected [T, O] = [", in.rows, ", ", weight.rows, "]");
  operands();
  for (const auto& [operand, name] : {std::pair{in, "in"}, std::pair{weight, "weight"}})
    if (overlaps(out, operand))
      check(false, "linear_forward: out overlaps ", name, " (the product reads it while it writes out)");
}
// Its backward: dout [T, O]; din [T, I] and dweight [O, I] unless null.
template <class S, class Operands = NoOperandChecks>
void check_linear_backward(ConstMatrixView<S> in, ConstMatrixView<S> dout, ConstMatrixView<S> weight,
                           MatrixView<S> din, MatrixView<S> dweight, Operands operands = {}) {
  check_view("linear_backward", "in", in);
  check_view("linear_backward", "dout", dout);
  check_view("linear_backward", "weight", weight);
  if (din.data) check_view("linear_backward", "din", din);
  if (dweight.data) check_view("linear_backward", "dweight", dweight);
  const Index T = in.rows, I = in.cols, O = weight.rows;
  check(weight.cols == I, "linear_backward: in is [", T, ", ", I, "], weight is [", O, ", ", weight.cols,
        "] (expected [O, ", I, "])");
  check(dout.rows == T && dout.cols == O, "linear_backward: dout is [", dout.rows, ", ", dout.cols,
        "], expected [T, O] = [", T, ", ", O, "]");
  check(!din.data || (din.rows == T && din.cols == I), "linear_backward: din is [", din.rows, ", ", din.cols,
        "], in is [", T, ", ", I, "]");
  check(!dweight.data || (dweight.rows == O && dweight.cols == I), "linear_backward: dweight is [", dweight.rows,
        ", ", dweight.cols, "], weight is [", O, ", ", I, "]");
  operands();
  // The two products run side by side: neither output may be what either reads, or the other output.
  for (const auto& [grad, grad_name] : {std::pair{din, "din"}, std::pair{dweight, "dweight"}})
    for (const auto& [operand, name] : {std::pair{in, "in"}, std::pair{dout, "dout"}, std::pair{weight, "weight"}})
      if (overlaps(grad, operand)) check(false, "linear_backward: ", grad_name, " overlaps ", name);
  check(!overlaps(din, dweight), "linear_backward: din overlaps dweight");
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
  check_batch_rows(where, B, T);
  check_view(where, "qkv", qkv);
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
