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
// FFN's hidden gradient) the pieces write over it instead (moe::nn::GradInto::overwrite), with no
// zero fill first.
//
// The variant is a type: Model<DenseFFN<B>>, Model<MoEFFN<moe::SelfRoute, B>>, ...; the backend B
// picks the world through examples::NnOps<B> (examples/common/nn_ops.hpp): the CPU
// (moe::cpu::BasicBackend<S>, S = float to train, double for gradient checks; cpu_model.hpp has
// the aliases and with_variant) or a CUDA-backend device (moe::cuda::BasicBackend<S, D>, S = float
// or bf16: cuda_model.hpp). This file includes neither, so nvcc compiles it for the GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/gelu_mlp.hpp"
#include "../common/moe_ffn.hpp"
#include "../common/nn_ops.hpp"
#include "../common/parameter.hpp"
#include "../common/pre_ln_attention.hpp"
#include "../common/variants.hpp"
#include "config.hpp"
#include "moe/nn/checks.hpp"
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
inline std::string prefix(Index layer) { return "h." + std::to_string(layer) + "."; }

}  // namespace detail

// ---- the FFN choices -------------------------------------------------------------------------
// An FFN maps the block's ln_2 output x: [B*T, H] to y: [B*T, H] (the interface of
// examples/common/gelu_mlp.hpp). Both are built from (config, layer, seed, the model's NnOps).
// MoE FFNs also take a separate router input (Config::route_from_residual; moe_ffn.hpp).

// The dense GPT-2 MLP: H -> F (bias) -> tanh-GELU -> H (bias). HF GPT-2 stores c_fc/c_proj as
// Conv1D, [in, out]; these are nn.Linear, [out, in]: transpose when importing.
template <class B>
class DenseFFN : public examples::GeluMlp<B> {
 public:
  DenseFFN(const Config& config, Index layer, std::uint64_t seed, const examples::NnOps<B>& ops)
      : examples::GeluMlp<B>({.fc = detail::prefix(layer) + "mlp.c_fc",
                              .proj = detail::prefix(layer) + "mlp.c_proj",
                              .hidden = config.hidden,
                              .ffn = config.ffn,
                              .fc_std = 0.02,
                              .proj_std = detail::residual_std(config)},
                             seed, ops) {}
};

// A MoELayer of GPT-2 MLP experts behind Gate, named "h.{l}.moe." + the MoELayer's names; experts
// initialised as GPT-2's MLP (proj scaled by 1/sqrt(2L)). The gate reads the layer's own input,
// the ln_2 output (for SelfRoute: the N coordinates Config::self_slice gives this layer), or the
// residual stream.
template <template <class> class Gate, class B>
class MoEFFN : public examples::MoEFFN<Gate, B> {
  using Base = examples::MoEFFN<Gate, B>;

 public:
  MoEFFN(const Config& config, Index layer, std::uint64_t seed, const examples::NnOps<B>& ops)
      : Base(detail::prefix(layer) + "moe.", config.layer(),
             {.init_std = 0.02, .out_init_std = detail::residual_std(config)}, seed, ops, gate_options(config, layer)) {}

 private:
  static typename Base::GateOptions gate_options(const Config& config, Index layer) {
    if constexpr (std::is_same_v<typename Base::Layer::GateType, moe::SelfRoute<B>>)
      return {.offset = config.self_offset(layer)};
    else
      return {};
  }
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
      block.attn.nn = nn_;
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
  // One pre-LayerNorm transformer block: attention (examples/common/pre_ln_attention.hpp: ln_1,
  // attn.c_attn, attn.c_proj, ln_2; causal), then its FFN.
  struct Block {
    examples::PreLnAttention<B> attn;
    FFN ffn;

    // attn.c_attn.weight is [3H, H] with rows q | k | v, nn.Linear layout (HF's Conv1D stores [H, 3H]).
    Block(const Config& c, Index l, const Ops& ops)
        : attn({.ln1 = detail::prefix(l) + "ln_1",
                .qkv = detail::prefix(l) + "attn.c_attn",
                .proj = detail::prefix(l) + "attn.c_proj",
                .ln2 = detail::prefix(l) + "ln_2",
                .hidden = c.hidden,
                .heads = c.heads,
                .causal = true,
                .qkv_std = 0.02,
                .proj_std = detail::residual_std(c)},
               c.seed, ops),
          ffn(c, l, c.seed, ops) {}

    // x: [B*T, H] -> out = a + FFN(ln_2(a)), a = x + attention half (attn.residual_attn)
    void forward(Model& m, ConstMatrixView<S> x, MatrixView<S> out) {
      attn.forward(x);
      if constexpr (is_moe) {
        if (m.routes_from_residual())
          ffn.forward(attn.ffn_in, attn.residual_attn, out);  // the gate reads the stream before ln_2
        else
          ffn.forward(attn.ffn_in, out);
      } else {
        ffn.forward(attn.ffn_in, out);
      }
      attn.add_residual(out);
    }

    // m.dresidual_: d out on entry, d x on exit (in place; every backward below adds into it).
    //   d a = d out + LN_2'(FFN'(d out)) (+ the router's path), d x = attn.backward(d a)
    void backward(Model& m, ConstMatrixView<S> x) {
      MatrixView<S> dresidual = m.dresidual_, dtmp = m.dtmp_;
      const bool routed = m.routes_from_residual();
      if constexpr (is_moe) {
        if (routed) {
          attn.nn.zero(m.drouter_);
          ffn.backward(attn.ffn_in, dresidual, dtmp, m.drouter_);  // dtmp = d ln_2 (written), drouter_ = the gate's path
        }
      }
      if (!routed) ffn.backward(attn.ffn_in, dresidual, dtmp);  // dtmp = d ln_2 (written)
      attn.backward_ln2(dtmp, dresidual);
      if (routed) attn.nn.add(m.drouter_, dresidual);
      attn.backward(x, dresidual, dtmp, m.dqkv_);
    }

    std::vector<ParamRef<S>> parameters() {
      std::vector<ParamRef<S>> all = attn.parameters();
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
    for (Block& block : blocks_) block.attn.allocate(B_, T);
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
