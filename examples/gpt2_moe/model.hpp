// examples/gpt2_moe/model.hpp: GPT-2 (pre-LayerNorm, learned positions, causal attention, tied
// embeddings) whose feed-forward network (FFN) is a compile-time choice: a dense GELU MLP or a
// MoELayer with any of the library's gates. Forward then backward, side by side, llm.c style:
//
//   x_0     = wte[tokens] + wpe[positions]                          [B*T, H]
//   a_l     = x_l + c_proj(attention(c_attn(ln_1(x_l))))            per block l
//   x_{l+1} = a_l + FFN(ln_2(a_l))
//   logits  = ln_f(x_L) wte^T                                       [B*T, V]
//   loss    = mean cross-entropy(logits, targets)
//
// Every backward adds its input gradient into the caller's buffer (+=), so the residual stream's
// gradient runs through the blocks in place; where a buffer holds nothing to keep (dtmp, dqkv, an
// FFN's hidden gradient) the pieces write over it instead (kOverwrite), with no zero fill first.
//
// The variant is a type: Model<DenseFFN<B>>, Model<MoEFFN<moe::SelfRoute, B>>, ...; the backend B
// picks the world through examples::NnOps<B> (examples/common/nn_ops.hpp): the CPU
// (moe::cpu::BasicBackend<S>, S = float to train, double for gradient checks; cpu_model.hpp has
// the aliases and with_variant) or a CUDA-backend device (moe::cuda::BasicBackend<S, D>, S = float
// or bf16: cuda_model.hpp). This file includes neither, so nvcc compiles it for the GPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/nn_ops.hpp"
#include "../common/parameter.hpp"
#include "../common/variants.hpp"
#include "config.hpp"
#include "moe/experts.hpp"
#include "moe/gate.hpp"
#include "moe/layer.hpp"
#include "moe/nn/checks.hpp"
#include "moe/random.hpp"
#include "moe/tensor.hpp"

namespace gpt2 {

using moe::ConstMatrixView;
using moe::MatrixView;
using moe::ParamRef;

// What linear_backward and attention_backward take to write an input gradient instead of adding it.
inline constexpr moe::nn::GradInto kOverwrite = moe::nn::GradInto::overwrite;

namespace detail {

// GPT-2 scales the std of every projection that writes into the residual stream by 1/sqrt(2L)
// (two residual additions per block).
inline double residual_std(const Config& config) { return 0.02 / std::sqrt(2.0 * double(config.layers)); }

}  // namespace detail

// ---- the FFN choices -------------------------------------------------------------------------
// An FFN maps the block's ln_2 output x: [B*T, H] to y: [B*T, H]. Shared interface:
//   forward(x, y)           y written; caches what backward needs
//   backward(x, dy, dx)     dx WRITTEN (the block adds it through ln_2); parameter grads +=
//   parameters(), zero_grad(), set_threads(n)
// Both are built from (config, layer, seed, the model's NnOps).
// MoE FFNs also take a separate router input (Config::route_from_residual):
//   forward(x, router_input, y), backward(x, dy, dx, d_router_input)   d_router_input +=

// The dense GPT-2 MLP: H -> F (bias) -> tanh-GELU -> H (bias).
template <class B>
class DenseFFN {
 public:
  using Backend = B;
  using Scalar = typename B::Scalar;
  using S = Scalar;
  using Ops = examples::NnOps<B>;
  static constexpr bool is_moe = false;
  static constexpr std::string_view variant = "dense";

  // HF GPT-2 stores c_fc/c_proj as Conv1D, [in, out]; these are nn.Linear, [out, in]: transpose
  // when importing.
  DenseFFN(const Config& config, Index layer, std::uint64_t seed, const Ops& ops)
      : nn_(ops),
        fc_weight_(ops.param(prefix(layer) + "mlp.c_fc.weight", {config.ffn, config.hidden})),
        fc_bias_(ops.param(prefix(layer) + "mlp.c_fc.bias", {config.ffn})),
        proj_weight_(ops.param(prefix(layer) + "mlp.c_proj.weight", {config.hidden, config.ffn})),
        proj_bias_(ops.param(prefix(layer) + "mlp.c_proj.bias", {config.hidden})) {
    nn_.init_normal(fc_weight_, 0.02, seed);
    nn_.init_normal(proj_weight_, detail::residual_std(config), seed);
  }

  // x: [N, H] -> pre = x fc^T + b: [N, F] (kept), act = gelu(pre): [N, F] (kept), y = act proj^T + b: [N, H]
  void forward(ConstMatrixView<S> x, MatrixView<S> y) {
    B::resize(pre_, x.rows, fc_weight_.rows());
    B::resize(act_, x.rows, fc_weight_.rows());
    nn_.linear_forward(x, fc_weight_.matrix(), fc_bias_.value.data(), pre_);
    nn_.gelu_forward(pre_, act_);
    nn_.linear_forward(act_, proj_weight_.matrix(), proj_bias_.value.data(), y);
  }
  // dy: [N, H] -> dact = dy proj: [N, F] -> dpre = dact * gelu'(pre) -> dx = dpre fc: [N, H] (written)
  void backward(ConstMatrixView<S> x, ConstMatrixView<S> dy, MatrixView<S> dx) {
    B::resize(dact_, pre_.rows(), pre_.cols());
    nn_.linear_backward(act_, dy, proj_weight_.matrix(), dact_, proj_weight_.grad_matrix(), proj_bias_.grad.data(),
                        kOverwrite);
    nn_.gelu_backward(pre_, dact_, dact_);
    nn_.linear_backward(x, dact_, fc_weight_.matrix(), dx, fc_weight_.grad_matrix(), fc_bias_.grad.data(),
                        kOverwrite);
  }

  std::vector<ParamRef<S>> parameters() {
    return {fc_weight_.ref(), fc_bias_.ref(), proj_weight_.ref(), proj_bias_.ref()};
  }
  void zero_grad() {
    for (ParamRef<S>& p : parameters()) nn_.zero_grad(p);
  }
  void set_threads(int threads) { nn_.set_threads(threads); }

 private:
  static std::string prefix(Index layer) { return "h." + std::to_string(layer) + "."; }

  Ops nn_;
  typename Ops::Param fc_weight_, fc_bias_, proj_weight_, proj_bias_;
  typename B::Matrix pre_, act_, dact_;
};

// A MoELayer of GPT-2 MLP experts (experts.fc: H -> F, experts.proj: F -> H) behind Gate. The
// gate reads the layer's own input, the ln_2 output (for SelfRoute: its last N coordinates).
// Parameter names: "h.{l}.moe." + the MoELayer's names (router.weight, experts.fc.weight, ...).
template <template <class> class Gate, class B>
class MoEFFN {
 public:
  using Backend = B;
  using Scalar = typename B::Scalar;
  using S = Scalar;
  using Layer = moe::MoELayer<Gate, moe::GeluMLP, B>;
  using Ops = examples::NnOps<B>;
  static constexpr bool is_moe = true;
  static constexpr std::string_view variant = Layer::GateType::name;

  // Experts initialised as GPT-2's MLP (proj scaled by 1/sqrt(2L)); the router keeps the library's
  // N(0, 1/H) (unit-variance logits for unit-variance inputs, the scale SelfRoute reads).
  MoEFFN(const Config& config, Index layer, std::uint64_t seed, const Ops& ops)
      : prefix_("h." + std::to_string(layer) + ".moe."),
        layer_(config.layer(), moe::random::mix64(seed ^ examples::stream_of(prefix_)), {},
               {.init_std = 0.02, .out_init_std = detail::residual_std(config)}, ops.make_backend()) {}

  // x: [N, H] -> y: [N, H] (the MoELayer keeps its routing and expert activations; x, the block's
  // ln_2 output, and a router input, its residual stream, are the block's own until its backward,
  // so the layer reads them there: input_kept, no copy)
  void forward(ConstMatrixView<S> x, MatrixView<S> y) { layer_.forward_into(x, y, {.input_kept = true}); }
  // dy: [N, H] -> dx: [N, H] (written; includes the router path, e.g. SelfRoute's logit gradient)
  void backward(ConstMatrixView<S>, ConstMatrixView<S> dy, MatrixView<S> dx) { layer_.backward_into(dy, dx); }
  // The gate reads router_input: [N, H] instead of x; its gradient is added into d_router_input.
  void forward(ConstMatrixView<S> x, ConstMatrixView<S> router_input, MatrixView<S> y) {
    layer_.forward_into(x, router_input, y, {.input_kept = true});
  }
  void backward(ConstMatrixView<S>, ConstMatrixView<S> dy, MatrixView<S> dx, MatrixView<S> d_router_input) {
    layer_.backward_into(dy, dx, d_router_input);
  }

  std::vector<ParamRef<S>> parameters() {
    std::vector<ParamRef<S>> params = layer_.parameters();
    for (ParamRef<S>& p : params) p.name = prefix_ + p.name;
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

// ---- the model -------------------------------------------------------------------------------

template <class FFN>
class Model {
 public:
  using Scalar = typename FFN::Scalar;
  using S = Scalar;
  using B = typename FFN::Backend;
  using Ops = examples::NnOps<B>;
  using Optimizer = typename Ops::Optimizer;
  using Matrix = typename B::Matrix;
  using Param = typename Ops::Param;
  template <class T>
  using Array = typename Ops::template Array<T>;
  static constexpr bool is_moe = FFN::is_moe;
  static constexpr std::string_view variant = FFN::variant;

  // ops: where the model lives and computes (the CPU's thread count, or a device).
  explicit Model(const Config& config, Ops ops = Ops{})
      : config_(validated(config)),
        nn_(std::move(ops)),
        wte_(nn_.param("wte.weight", {config.vocab, config.hidden}, padded_vocab())),
        wpe_(nn_.param("wpe.weight", {config.context, config.hidden})),
        ln_f_weight_(nn_.param("ln_f.weight", {config.hidden})),
        ln_f_bias_(nn_.param("ln_f.bias", {config.hidden})) {
    nn_.init_normal(wte_, 0.02, config_.seed);
    nn_.init_normal(wpe_, 0.02, config_.seed);
    blocks_.reserve(std::size_t(config_.layers));
    for (Index l = 0; l < config_.layers; ++l) blocks_.emplace_back(config_, l, nn_);
    nn_.fill(ln_f_weight_, S(1));
  }

  const Config& config() const { return config_; }
  const Ops& ops() const { return nn_; }

  // tokens: [B*T], targets: [B*T] (host ids in [0, V), -1 to ignore a position; empty: logits
  // only) -> mean loss over the counted targets (0 without targets). Keeps every activation for
  // backward; logits() is valid until backward (which overwrites it with its gradient).
  double forward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets, Index B_, Index T) {
    check_inputs(tokens, targets, B_, T);
    allocate(B_, T);
    tokens_.assign(tokens.begin(), tokens.end());
    targets_.assign(targets.begin(), targets.end());

    nn_.embedding_forward(tokens, B_, T, wte_.matrix(), wpe_.matrix(), residual_[0]);
    for (Index l = 0; l < config_.layers; ++l) blocks_[l].forward(*this, residual_[l], residual_[l + 1]);
    nn_.layernorm_forward(residual_.back(), ln_f_weight_.value.data(), ln_f_bias_.value.data(), ln_f_,
                          ln_f_mean_.data(), ln_f_rstd_.data());
    nn_.linear_forward(ln_f_, wte_.padded_matrix(), nullptr, classifier_view());  // tied: logits = ln_f wte^T
    loss_ = targets.empty() ? 0.0
                            : nn_.cross_entropy_forward(logits_view(), targets, losses_.data(), loss_stats_.data());
    forwarded_ = !targets.empty();
    return loss_;
  }

  // d(mean loss) -> every parameter's gradient, added (+=) until zero_grad(). Once per forward.
  void backward() {
    moe::check(forwarded_, "gpt2: backward needs a forward with targets first (and runs once per forward)");
    forwarded_ = false;
    const Index B_ = batch_, T = seq_;

    const MatrixView<S> dlogits = logits_view();  // written over the logits (llm.c): they are not needed again
    nn_.cross_entropy_backward(dlogits, targets_, 1.0, dlogits, loss_stats_.data());  // the forward's row statistics
    // wte's padding rows (device only) gave zero logits; their gradient must be zero too, also
    // where a non-finite input made 0 * inf there.
    const Index classes = wte_.padded_matrix().rows;
    if (classes > config_.vocab) nn_.zero(MatrixView<S>(logits_).col_block(config_.vocab, classes - config_.vocab));
    nn_.linear_backward(ln_f_, classifier_view(), wte_.padded_matrix(), dtmp_, wte_.padded_grad_matrix(), nullptr,
                        kOverwrite);  // dtmp_ = d ln_f
    nn_.zero(dresidual_);
    nn_.layernorm_backward(dtmp_, residual_.back(), ln_f_weight_.value.data(), ln_f_mean_.data(), ln_f_rstd_.data(),
                           dresidual_, ln_f_weight_.grad.data(), ln_f_bias_.grad.data());
    for (Index l = config_.layers - 1; l >= 0; --l) blocks_[l].backward(*this, residual_[l]);
    nn_.embedding_backward(dresidual_, tokens_, B_, T, wte_.grad_matrix(), wpe_.grad_matrix());
  }

  // Hugging Face GPT-2 names and order: wte, wpe, h.{l}.*, ln_f.*.
  std::vector<ParamRef<S>> parameters() {
    std::vector<ParamRef<S>> all{wte_.ref(), wpe_.ref()};
    for (Block& block : blocks_)
      for (ParamRef<S>& p : block.parameters()) all.push_back(std::move(p));
    all.push_back(ln_f_weight_.ref());
    all.push_back(ln_f_bias_.ref());
    return all;
  }
  void zero_grad() {
    std::vector<ParamRef<S>> all = parameters();
    nn_.zero_grads(all);  // one pass over every gradient (a few launches on a device)
  }
  Index parameter_count() {
    Index n = 0;
    for (const ParamRef<S>& p : parameters()) n += Index(p.value.size());
    return n;
  }
  // Learned routing parameters over all layers (the paper's Table 1): 0 for self, fixed-random, random, dense.
  Index router_parameter_count() const {
    Index n = 0;
    if constexpr (is_moe)
      for (const Block& block : blocks_) n += block.ffn.layer().router_parameter_count();
    return n;
  }

  // CPU threads for every operation (results are bit-identical on any count); no-op on a device.
  void set_threads(int threads) {
    moe::check(threads >= 1, "gpt2: thread count must be >= 1, got ", threads);
    nn_.set_threads(threads);
    for (Block& block : blocks_) {
      block.nn = nn_;
      block.ffn.set_threads(threads);
    }
  }

  // The last forward's logits [B*T, V] (until backward) and per-position losses [B*T], in the
  // model's memory (the device's for a device model).
  ConstMatrixView<S> logits() const { return ConstMatrixView<S>(logits_).col_block(0, config_.vocab); }
  std::span<const S> losses() const { return {losses_.data(), std::size_t(losses_.size())}; }

  // ---- routing (MoE variants) ----
  FFN& ffn(Index layer) { return blocks_.at(std::size_t(layer)).ffn; }
  const moe::RoutingStats& routing_stats(Index layer) const
    requires is_moe
  {
    return blocks_.at(std::size_t(layer)).ffn.layer().stats();
  }
  void reset_routing_stats()
    requires is_moe
  {
    for (Block& block : blocks_) block.ffn.layer().reset_stats();
  }
  void collect_routing_stats(bool on)
    requires is_moe
  {
    for (Block& block : blocks_) block.ffn.layer().collect_stats(on);
  }
  // The Random gate's draw counter (advances by one per forward in every layer); rewinding it
  // replays the same routing (gradient checks, exact resume). No-op for the other gates.
  void set_routing_step(std::uint64_t step) {
    if constexpr (is_moe)
      for (Block& block : blocks_)
        if constexpr (requires { block.ffn.layer().gate().set_step(step); }) block.ffn.layer().gate().set_step(step);
  }
  // Layer 0's Random-gate counter (every layer's moves together); 0 for the other gates.
  std::uint64_t routing_step() {
    if constexpr (is_moe)
      if constexpr (requires { ffn(0).layer().gate().step(); }) return ffn(0).layer().gate().step();
    return 0;
  }

 private:
  // One pre-LayerNorm transformer block: its parameters, its FFN and its activations.
  struct Block {
    Ops nn;
    Param ln_1_weight, ln_1_bias, c_attn_weight, c_attn_bias, c_proj_weight, c_proj_bias, ln_2_weight, ln_2_bias;
    FFN ffn;
    // Activations kept for backward ([B*T, ...] rows; att is the attention's cache: nn.attention_cache_size).
    Matrix ln_1, qkv, atty, residual_attn, ln_2;
    Array<typename Ops::Stat> ln_1_mean, ln_1_rstd, ln_2_mean, ln_2_rstd;
    Array<S> att;

    // c_attn is [3H, H] with rows q | k | v, nn.Linear layout (HF's Conv1D stores [H, 3H]).
    Block(const Config& c, Index l, const Ops& ops)
        : nn(ops),
          ln_1_weight(ops.param(name(l, "ln_1.weight"), {c.hidden})),
          ln_1_bias(ops.param(name(l, "ln_1.bias"), {c.hidden})),
          c_attn_weight(ops.param(name(l, "attn.c_attn.weight"), {3 * c.hidden, c.hidden})),
          c_attn_bias(ops.param(name(l, "attn.c_attn.bias"), {3 * c.hidden})),
          c_proj_weight(ops.param(name(l, "attn.c_proj.weight"), {c.hidden, c.hidden})),
          c_proj_bias(ops.param(name(l, "attn.c_proj.bias"), {c.hidden})),
          ln_2_weight(ops.param(name(l, "ln_2.weight"), {c.hidden})),
          ln_2_bias(ops.param(name(l, "ln_2.bias"), {c.hidden})),
          ffn(c, l, c.seed, ops) {
      nn.fill(ln_1_weight, S(1));
      nn.fill(ln_2_weight, S(1));
      nn.init_normal(c_attn_weight, 0.02, c.seed);
      nn.init_normal(c_proj_weight, detail::residual_std(c), c.seed);
    }
    static std::string name(Index l, std::string_view what) { return "h." + std::to_string(l) + "." + std::string(what); }

    void allocate(Index BT, Index H, Index attention_size) {
      for (Matrix* m : {&ln_1, &atty, &residual_attn, &ln_2}) B::resize(*m, BT, H);
      B::resize(qkv, BT, 3 * H);
      for (auto* v : {&ln_1_mean, &ln_1_rstd, &ln_2_mean, &ln_2_rstd}) v->resize(std::size_t(BT));
      att.resize(std::size_t(attention_size));
    }

    // x: [B*T, H] -> out: [B*T, H]
    //   ln_1 = LN(x); qkv = ln_1 c_attn^T + b: [B*T, 3H]; atty = attention(qkv): [B*T, H]
    //   residual_attn = x + atty c_proj^T + b; ln_2 = LN(residual_attn); out = residual_attn + FFN(ln_2)
    void forward(Model& m, ConstMatrixView<S> x, MatrixView<S> out) {
      nn.layernorm_forward(x, ln_1_weight.value.data(), ln_1_bias.value.data(), ln_1, ln_1_mean.data(),
                           ln_1_rstd.data());
      nn.linear_forward(ln_1, c_attn_weight.matrix(), c_attn_bias.value.data(), qkv);
      nn.attention_forward(qkv, m.batch_, m.seq_, m.config_.heads, /*causal=*/true, atty, att.data());
      nn.linear_forward(atty, c_proj_weight.matrix(), c_proj_bias.value.data(), residual_attn);
      nn.add(x, residual_attn);
      nn.layernorm_forward(residual_attn, ln_2_weight.value.data(), ln_2_bias.value.data(), ln_2, ln_2_mean.data(),
                           ln_2_rstd.data());
      if constexpr (is_moe) {
        if (m.routes_from_residual())
          ffn.forward(ln_2, residual_attn, out);  // the gate reads the stream before ln_2
        else
          ffn.forward(ln_2, out);
      } else {
        ffn.forward(ln_2, out);
      }
      nn.add(residual_attn, out);
    }

    // m.dresidual_: d out on entry, d x on exit (in place; every backward below adds into it).
    //   d residual_attn = d out + LN_2'(FFN'(d out))
    //   d x             = d residual_attn + LN_1'(c_attn'(attention'(c_proj'(d residual_attn))))
    void backward(Model& m, ConstMatrixView<S> x) {
      MatrixView<S> dresidual = m.dresidual_, dtmp = m.dtmp_, dqkv = m.dqkv_;
      const bool routed = m.routes_from_residual();
      if constexpr (is_moe) {
        if (routed) {
          nn.zero(m.drouter_);
          ffn.backward(ln_2, dresidual, dtmp, m.drouter_);  // dtmp = d ln_2 (written), drouter_ = the gate's path
        }
      }
      if (!routed) ffn.backward(ln_2, dresidual, dtmp);  // dtmp = d ln_2 (written)
      nn.layernorm_backward(dtmp, residual_attn, ln_2_weight.value.data(), ln_2_mean.data(), ln_2_rstd.data(),
                            dresidual, ln_2_weight.grad.data(), ln_2_bias.grad.data());
      if (routed) nn.add(m.drouter_, dresidual);
      // dtmp and dqkv hold nothing to keep: their gradients are written over them, with no zero fill first.
      nn.linear_backward(atty, dresidual, c_proj_weight.matrix(), dtmp, c_proj_weight.grad_matrix(),
                         c_proj_bias.grad.data(), kOverwrite);  // dtmp = d atty
      nn.attention_backward(dtmp, qkv, atty, att.data(), m.batch_, m.seq_, m.config_.heads, /*causal=*/true, dqkv,
                            kOverwrite);
      nn.linear_backward(ln_1, dqkv, c_attn_weight.matrix(), dtmp, c_attn_weight.grad_matrix(),
                         c_attn_bias.grad.data(), kOverwrite);  // dtmp = d ln_1
      nn.layernorm_backward(dtmp, x, ln_1_weight.value.data(), ln_1_mean.data(), ln_1_rstd.data(), dresidual,
                            ln_1_weight.grad.data(), ln_1_bias.grad.data());
    }

    std::vector<ParamRef<S>> parameters() {
      std::vector<ParamRef<S>> all;
      for (Param* t : {&ln_1_weight, &ln_1_bias, &c_attn_weight, &c_attn_bias, &c_proj_weight, &c_proj_bias,
                       &ln_2_weight, &ln_2_bias})
        all.push_back(t->ref());
      for (ParamRef<S>& p : ffn.parameters()) all.push_back(std::move(p));
      return all;
    }
  };

  static Config validated(const Config& config) {
    config.validate();
    return config;
  }
  bool routes_from_residual() const { return is_moe && config_.route_from_residual; }

  // Shapes and ids, checked once at the entry point.
  void check_inputs(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets, Index B_,
                    Index T) const {
    moe::check(B_ >= 1 && T >= 1, "gpt2: batch B = ", B_, " and sequence length T = ", T, " must be positive");
    moe::check(T <= config_.context, "gpt2: sequence length T = ", T, " exceeds the context ", config_.context);
    moe::check(Index(tokens.size()) == B_ * T, "gpt2: tokens has ", tokens.size(), " ids, expected B * T = ", B_,
               " * ", T, " = ", B_ * T);
    moe::check(targets.empty() || Index(targets.size()) == B_ * T, "gpt2: targets has ", targets.size(),
               " ids, expected B * T = ", B_ * T, " (or none)");
    for (std::size_t i = 0; i < tokens.size(); ++i)
      moe::check(tokens[i] >= 0 && tokens[i] < config_.vocab, "gpt2: token id ", tokens[i], " at position ", i,
                 " is outside the vocabulary [0, ", config_.vocab, ")");
    for (std::size_t i = 0; i < targets.size(); ++i)
      moe::check(targets[i] >= moe::nn::kIgnoreTarget && targets[i] < config_.vocab, "gpt2: target id ", targets[i],
                 " at position ", i, " is outside [0, ", config_.vocab, ") (or -1 to ignore)");
  }

  // The logits' row stride: V rounded up to 64 elements, so that every row starts 128-byte aligned
  // (GPT-2's V = 50257 is odd; cuBLAS's fast bf16 kernels want ld a multiple of 8 elements).
  Index padded_vocab() const { return (config_.vocab + 63) / 64 * 64; }
  MatrixView<S> logits_view() { return MatrixView<S>(logits_).col_block(0, config_.vocab); }
  // The classifier's output: the logits and, on the device, the columns of wte's padding rows
  // (the product runs over wte's padded_matrix(): 50304 rows, not GPT-2's odd 50257).
  MatrixView<S> classifier_view() { return MatrixView<S>(logits_).col_block(0, wte_.padded_matrix().rows); }

  // Activations for (B, T): allocated on the first forward of that shape, then reused.
  void allocate(Index B_, Index T) {
    if (B_ == batch_ && T == seq_) return;
    batch_ = B_, seq_ = T;
    const Index BT = B_ * T, H = config_.hidden;
    residual_.resize(std::size_t(config_.layers + 1));
    for (Matrix& r : residual_) B::resize(r, BT, H);
    for (Block& block : blocks_) block.allocate(BT, H, nn_.attention_cache_size(B_, T, config_.heads, H));
    for (Matrix* m : {&ln_f_, &dresidual_, &dtmp_}) B::resize(*m, BT, H);
    if (routes_from_residual()) B::resize(drouter_, BT, H);
    B::resize(dqkv_, BT, 3 * H);
    B::resize(logits_, BT, padded_vocab());
    ln_f_mean_.resize(std::size_t(BT)), ln_f_rstd_.resize(std::size_t(BT)), losses_.resize(std::size_t(BT));
    loss_stats_.resize(std::size_t(2 * BT));
  }

  Config config_;
  Ops nn_;
  Param wte_, wpe_;  // [V, H] (also the output projection), [maxT, H]
  std::vector<Block> blocks_;
  Param ln_f_weight_, ln_f_bias_;

  // Activations of the last forward.
  Index batch_ = 0, seq_ = 0;
  std::vector<std::int32_t> tokens_, targets_;
  std::vector<Matrix> residual_;  // [L + 1] x [B*T, H]: the input of block l, then the final stream
  Matrix ln_f_, logits_;  // logits_: rows of padded_vocab(), the first V used
  Array<typename Ops::Stat> ln_f_mean_, ln_f_rstd_;
  Array<S> losses_;
  Array<typename Ops::Stat> loss_stats_;  // [2 B*T] the loss's softmax statistics, from forward to backward
  double loss_ = 0;
  bool forwarded_ = false;
  // Backward workspace, shared by every block.
  Matrix dresidual_, dtmp_, dqkv_, drouter_;
};

// ---- run-time choice of the variant ----------------------------------------------------------

using examples::kVariants;

// The model types over backend B, by variant (examples::with_variant_of).
template <class B>
struct ModelsOn {
  using Dense = Model<DenseFFN<B>>;
  template <template <class> class Gate>
  using MoE = Model<MoEFFN<Gate, B>>;
};

// Calls fn(std::type_identity<ModelType>{}) with the model type over backend B that the name
// selects and returns its result, e.g.
//   with_variant_on<moe::cpu::Backend>(name, [&](auto tag) { typename decltype(tag)::type model(config); ... });
// Unknown names throw moe::Error naming the name and the valid list.
template <class B, class Fn>
decltype(auto) with_variant_on(std::string_view name, Fn&& fn) {
  return examples::with_variant_of<ModelsOn<B>>(name, "gpt2", std::forward<Fn>(fn));
}

}  // namespace gpt2
