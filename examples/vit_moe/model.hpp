// examples/vit_moe/model.hpp: ViT / DeiT (patch embedding, class token, learned positions,
// pre-LayerNorm blocks with bidirectional attention, a classification head on the class token)
// whose MLP in every moe_every-th block is a MoELayer with any of the library's gates, the
// paper's DeiT-S setting ("Every 2": blocks 1, 3, 5, ...). Forward then backward, side by side:
//
//   patches = the P x P patches of each image, flattened as (c, y, x)         [B*Np, C*P*P]
//   x_0     = [cls_token ; patches W_pe^T + b_pe] + pos_embed                  [B*T, H], T = 1 + Np
//   a_l     = x_l + proj(attention(qkv(norm1(x_l))))                           per block l
//   x_{l+1} = a_l + FFN_l(norm2(a_l))       FFN_l: MoE in MoE blocks, the dense MLP elsewhere
//   logits  = head(norm(x_L[class token]))                                     [B, classes]
//   loss    = mean cross-entropy(logits, labels)
//
// Parameter names and layouts are timm's VisionTransformer (patch_embed.proj.weight is its
// Conv2d weight [H, C, P, P]; every Linear is [out, in]); an MoE block's FFN is named
// "blocks.{l}.moe." + the MoELayer's names. Every backward adds its input gradient into the
// caller's buffer (+=), so the residual stream's gradient runs through the blocks in place; where
// a buffer holds nothing to keep the pieces write over it instead (moe::nn::GradInto::overwrite).
//
// The variant is a type: Model<DenseMLP<B>>, Model<MoEFFN<moe::SelfRoute, B>>, ...; the backend B
// picks the world through examples::NnOps<B> (examples/common/nn_ops.hpp), as GPT-2's model does:
// the CPU (moe::cpu::BasicBackend<S>, S = float to train, double for gradient checks; cpu_model.hpp
// has the aliases and with_variant) or a CUDA-backend device (moe::cuda::BasicBackend<S, D>,
// S = float or bf16: with_variant_on). This file includes neither, so nvcc compiles it for the GPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
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

namespace vit {

using moe::ConstMatrixView;
using moe::MatrixView;
using moe::ParamRef;

// What linear_backward and attention_backward take to write an input gradient instead of adding it.
inline constexpr moe::nn::GradInto kOverwrite = moe::nn::GradInto::overwrite;

namespace detail {

// timm initialises every Linear with std 0.02 (truncated at 2 std; a plain normal here).
inline constexpr double kLinearStd = 0.02;
inline std::string block_prefix(Index block) { return "blocks." + std::to_string(block) + "."; }

}  // namespace detail

// ---- the FFN choices -------------------------------------------------------------------------
// An FFN maps a block's norm2 output x: [B*T, H] to y: [B*T, H] (the interface of
// examples/common/gelu_mlp.hpp). Both are built from (config, block, seed, the model's NnOps).

// timm's Mlp: fc1 H -> F (bias), GELU, fc2 F -> H (bias). The GELU is the tanh approximation of
// the MoE experts (moe::GeluMLP), so dense and MoE blocks differ in routing alone; timm uses the
// exact erf form (the two differ by less than 5e-4 everywhere).
template <class B>
class DenseMLP : public examples::GeluMlp<B> {
 public:
  template <class NewBackend>
  using OnBackend = DenseMLP<NewBackend>;

  DenseMLP(const Config& config, Index block, std::uint64_t seed, const examples::NnOps<B>& ops)
      : examples::GeluMlp<B>({.fc = detail::block_prefix(block) + "mlp.fc1",
                              .proj = detail::block_prefix(block) + "mlp.fc2",
                              .hidden = config.hidden,
                              .ffn = config.ffn,
                              .fc_std = detail::kLinearStd,
                              .proj_std = detail::kLinearStd},
                             seed, ops) {}
};

// A MoELayer of GELU MLP experts behind Gate, named "blocks.{l}.moe." + the MoELayer's names;
// experts initialised as timm's Mlp. The gate reads the layer's own input, the norm2 output (for
// SelfRoute: its last N coordinates). Every token is routed, the class token included (as in V-MoE).
template <template <class> class Gate, class B>
class MoEFFN : public examples::MoEFFN<Gate, B> {
 public:
  template <class NewBackend>
  using OnBackend = MoEFFN<Gate, NewBackend>;

  MoEFFN(const Config& config, Index block, std::uint64_t seed, const examples::NnOps<B>& ops)
      : examples::MoEFFN<Gate, B>(detail::block_prefix(block) + "moe.", config.layer(),
                                  {.init_std = detail::kLinearStd, .out_init_std = detail::kLinearStd}, seed, ops) {}
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
  using MLP = DenseMLP<B>;
  // Host pixels and logits: float for float and bf16 models, double for a double model.
  using Pixel = moe::Compute<S>;
  static constexpr bool is_moe = FFN::is_moe;
  static constexpr std::string_view variant = FFN::variant;
  // The same variant over another backend (a device model's host copy for checkpoints).
  template <class NewBackend>
  using OnBackend = Model<typename FFN::template OnBackend<NewBackend>>;

  // ops: where the model lives and computes (the CPU's thread count, or a device).
  explicit Model(const Config& config, Ops ops = Ops{})
      : config_(validated(config)),
        nn_(std::move(ops)),
        cls_token_(nn_.param("cls_token", {1, 1, config.hidden})),
        pos_embed_(nn_.param("pos_embed", {1, config.tokens(), config.hidden})),
        patch_weight_(nn_.param("patch_embed.proj.weight", {config.hidden, config.channels, config.patch, config.patch})),
        patch_bias_(nn_.param("patch_embed.proj.bias", {config.hidden})),
        norm_weight_(nn_.param("norm.weight", {config.hidden})),
        norm_bias_(nn_.param("norm.bias", {config.hidden})),
        head_weight_(nn_.param("head.weight", {config.classes, config.hidden})),
        head_bias_(nn_.param("head.bias", {config.classes})) {
    nn_.init_normal(cls_token_, 0.02, config_.seed);
    nn_.init_normal(pos_embed_, 0.02, config_.seed);
    // timm keeps PyTorch's default for the patch Conv2d: U(+-1/sqrt(fan_in)), std 1/sqrt(3 fan_in).
    nn_.init_normal(patch_weight_, 1.0 / std::sqrt(3.0 * double(config_.patch_size())), config_.seed);
    nn_.init_normal(head_weight_, detail::kLinearStd, config_.seed);
    nn_.fill(norm_weight_, S(1));
    blocks_.reserve(std::size_t(config_.layers));
    for (Index l = 0; l < config_.layers; ++l)
      blocks_.emplace_back(config_, l, is_moe && config_.is_moe_block(l), nn_);
  }

  const Config& config() const { return config_; }
  const Ops& ops() const { return nn_; }

  // images: [B, C*S*S] host pixels (each image channels, then rows, then columns; already
  // normalised), labels: [B] (classes in [0, classes); empty: logits only) -> mean loss over the
  // batch (0 without labels). Keeps every activation for backward; logits() stays valid until the
  // next forward.
  double forward(std::span<const Pixel> images, std::span<const std::int32_t> labels, Index batch) {
    check_inputs(images, labels, batch);
    allocate(batch);
    labels_.assign(labels.begin(), labels.end());

    extract_patches(images);
    nn_.linear_forward(patches_, patch_weight_.matrix(), patch_bias_.value.data(), patch_rows(token_table_));
    embed_tokens();
    for (Index l = 0; l < config_.layers; ++l) blocks_[l].forward(residual_[l], residual_[l + 1]);
    nn_.layernorm_forward(class_rows(residual_.back()), norm_weight_.value.data(), norm_bias_.value.data(), normed_,
                          norm_mean_.data(), norm_rstd_.data());
    nn_.linear_forward(normed_, head_weight_.matrix(), head_bias_.value.data(), logits_);
    loss_ = labels.empty() ? 0.0 : nn_.cross_entropy_forward(logits_, labels, losses_.data(), loss_stats_.data());
    forwarded_ = !labels.empty();
    return loss_;
  }

  // d(mean loss) -> every parameter's gradient, added (+=) until zero_grad(). Once per forward.
  void backward() {
    moe::check(forwarded_, "vit: backward needs a forward with labels first (and runs once per forward)");
    forwarded_ = false;

    nn_.cross_entropy_backward(logits_, labels_, 1.0, dlogits_, loss_stats_.data());
    nn_.linear_backward(normed_, dlogits_, head_weight_.matrix(), dnormed_, head_weight_.grad_matrix(),
                        head_bias_.grad.data(), kOverwrite);
    // Only the class token's rows reach the head: the other rows' gradient starts at 0.
    nn_.zero(dresidual_);
    nn_.layernorm_backward(dnormed_, class_rows(residual_.back()), norm_weight_.value.data(), norm_mean_.data(),
                           norm_rstd_.data(), class_rows(dresidual_), norm_weight_.grad.data(), norm_bias_.grad.data());
    for (Index l = config_.layers - 1; l >= 0; --l) blocks_[l].backward(*this, residual_[l]);
    embed_tokens_backward();
    nn_.linear_backward(patches_, patch_rows(dtoken_table_), patch_weight_.matrix(), MatrixView<S>{},
                        patch_weight_.grad_matrix(), patch_bias_.grad.data());
  }

  // timm's names and order: cls_token, pos_embed, patch_embed.proj.*, blocks.{l}.*, norm.*, head.*.
  std::vector<ParamRef<S>> parameters() {
    std::vector<ParamRef<S>> all{cls_token_.ref(), pos_embed_.ref(), patch_weight_.ref(), patch_bias_.ref()};
    for (Block& block : blocks_)
      for (ParamRef<S>& p : block.parameters()) all.push_back(std::move(p));
    for (Param* t : {&norm_weight_, &norm_bias_, &head_weight_, &head_bias_}) all.push_back(t->ref());
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
  // Learned routing parameters over all MoE blocks (the paper's Table 1): 0 for self,
  // fixed-random, random and dense.
  Index router_parameter_count() const {
    Index n = 0;
    if constexpr (is_moe)
      for (const Block& block : blocks_)
        if (block.moe) n += block.moe->layer().router_parameter_count();
    return n;
  }

  // CPU threads for every operation (results are bit-identical on any count); no-op on a device.
  void set_threads(int threads) {
    moe::check(threads >= 1, "vit: thread count must be >= 1, got ", threads);
    nn_.set_threads(threads);
    for (Block& block : blocks_) {
      block.attn.nn = nn_;
      if (block.mlp) block.mlp->set_threads(threads);
      if (block.moe) block.moe->set_threads(threads);
    }
  }

  // The last forward's logits [B, classes] and per-image losses [B], in the model's memory (the
  // device's for a device model: host_logits() copies them out).
  ConstMatrixView<S> logits() const { return logits_; }
  std::span<const S> losses() const { return {losses_.data(), std::size_t(batch_)}; }
  // The last forward's logits as host values, [B * classes] row-major.
  std::vector<Pixel> host_logits() const {
    std::vector<Pixel> host(std::size_t(logits_.rows() * logits_.cols()));
    nn_.download(std::span<const S>(logits_.data(), host.size()), std::span<Pixel>(host));
    return host;
  }
  // The last forward's predicted class per image (largest logit; ties go to the lower class).
  std::vector<std::int32_t> predictions() const {
    const std::vector<Pixel> logits = host_logits();
    const Index classes = config_.classes;
    std::vector<std::int32_t> predicted(static_cast<std::size_t>(batch_));
    for (Index b = 0; b < batch_; ++b) {
      const Pixel* row = logits.data() + b * classes;
      predicted[std::size_t(b)] = std::int32_t(std::max_element(row, row + classes) - row);
    }
    return predicted;
  }

  // ---- routing (MoE variants) ----
  // The blocks whose FFN is a MoELayer, in order (1, 3, 5 for small()); none for dense.
  std::vector<Index> moe_blocks() const {
    std::vector<Index> found;
    for (Index l = 0; l < config_.layers; ++l)
      if (blocks_[std::size_t(l)].moe) found.push_back(l);
    return found;
  }
  FFN& moe_ffn(Index block)
    requires is_moe
  {
    return *blocks_[std::size_t(checked_moe_block(block))].moe;
  }
  const moe::RoutingStats& routing_stats(Index block) const
    requires is_moe
  {
    return blocks_[std::size_t(checked_moe_block(block))].moe->layer().stats();
  }
  void reset_routing_stats()
    requires is_moe
  {
    for (Block& block : blocks_)
      if (block.moe) block.moe->layer().reset_stats();
  }
  void collect_routing_stats(bool on)
    requires is_moe
  {
    for (Block& block : blocks_)
      if (block.moe) block.moe->layer().collect_stats(on);
  }
  // The Random gate's draw counter (advances by one per forward in every MoE block); rewinding it
  // replays the same routing (gradient checks, exact resume). No-op for the other gates.
  void set_routing_step(std::uint64_t step) {
    if constexpr (is_moe)
      for (Block& block : blocks_)
        if constexpr (requires { block.moe->layer().gate().set_step(step); })
          if (block.moe) block.moe->layer().gate().set_step(step);
  }
  // The first MoE block's Random-gate counter (every block's moves together); 0 for the other gates.
  std::uint64_t routing_step() const {
    if constexpr (is_moe)
      for (const Block& block : blocks_)
        if constexpr (requires { block.moe->layer().gate().step(); })
          if (block.moe) return block.moe->layer().gate().step();
    return 0;
  }

 private:
  // One pre-LayerNorm transformer block: attention (examples/common/pre_ln_attention.hpp: norm1,
  // attn.qkv, attn.proj, norm2; every token sees every token), then the dense MLP or the MoE FFN.
  struct Block {
    examples::PreLnAttention<B> attn;
    std::optional<MLP> mlp;  // the dense blocks
    std::optional<FFN> moe;  // the MoE blocks (MoE variants only)

    Block(const Config& c, Index l, bool moe_block, const Ops& ops)
        : attn({.ln1 = detail::block_prefix(l) + "norm1",
                .qkv = detail::block_prefix(l) + "attn.qkv",
                .proj = detail::block_prefix(l) + "attn.proj",
                .ln2 = detail::block_prefix(l) + "norm2",
                .hidden = c.hidden,
                .heads = c.heads,
                .causal = false,
                .qkv_std = detail::kLinearStd,
                .proj_std = detail::kLinearStd},
               c.seed, ops) {
      if (moe_block)
        moe.emplace(c, l, c.seed, ops);
      else
        mlp.emplace(c, l, c.seed, ops);
    }

    // x: [B*T, H] -> out = a + FFN(norm2(a)), a = x + attention half (attn.residual_attn)
    void forward(ConstMatrixView<S> x, MatrixView<S> out) {
      attn.forward(x);
      if (moe)
        moe->forward(attn.ffn_in, out);
      else
        mlp->forward(attn.ffn_in, out);
      attn.add_residual(out);
    }

    // m.dresidual_: d out on entry, d x on exit (in place; every backward below adds into it).
    //   d a = d out + LN_2'(FFN'(d out)), d x = attn.backward(d a)
    void backward(Model& m, ConstMatrixView<S> x) {
      if (moe)  // dtmp = d norm2 (written)
        moe->backward(attn.ffn_in, m.dresidual_, m.dtmp_);
      else
        mlp->backward(attn.ffn_in, m.dresidual_, m.dtmp_);
      attn.backward_ln2(m.dtmp_, m.dresidual_);
      attn.backward(x, m.dresidual_, m.dtmp_, m.dqkv_);
    }

    std::vector<ParamRef<S>> parameters() {
      std::vector<ParamRef<S>> all = attn.parameters();
      for (ParamRef<S>& p : moe ? moe->parameters() : mlp->parameters()) all.push_back(std::move(p));
      return all;
    }
  };

  static Config validated(const Config& config) {
    config.validate();
    return config;
  }

  // Shapes, labels and pixels, checked once at the entry point.
  void check_inputs(std::span<const Pixel> images, std::span<const std::int32_t> labels, Index batch) const {
    const Index pixels = config_.pixels();
    moe::check(batch >= 1, "vit: batch B = ", batch, " must be positive");
    moe::check(Index(images.size()) == batch * pixels, "vit: images has ", images.size(),
               " values, expected B * C*S*S = ", batch, " * ", config_.channels, "*", config_.image_size, "*",
               config_.image_size, " = ", batch * pixels);
    moe::check(labels.empty() || Index(labels.size()) == batch, "vit: labels has ", labels.size(),
               " entries, expected B = ", batch, " (or none)");
    for (std::size_t i = 0; i < labels.size(); ++i)
      moe::check(labels[i] >= 0 && labels[i] < config_.classes, "vit: label ", labels[i], " of image ", i,
                 " is outside [0, ", config_.classes, ")");
    for (std::size_t i = 0; i < images.size(); ++i)
      moe::check(std::isfinite(images[i]), "vit: image ", Index(i) / pixels, " has a non-finite pixel (",
                 images[i], ") at index ", Index(i) % pixels);
  }

  // Activations for a batch of B images: allocated on the first forward of that size, then reused.
  void allocate(Index batch) {
    if (batch == batch_) return;
    batch_ = batch;
    const Index T = config_.tokens(), BT = batch * T, H = config_.hidden, Np = config_.patches(), BNp = batch * Np;
    host_patches_.resize(std::size_t(BNp * config_.patch_size()));
    B::resize(patches_, BNp, config_.patch_size());
    for (Matrix* m : {&token_table_, &dtoken_table_}) B::resize(*m, 1 + BNp, H);
    // Row b*T + t of the stream takes token_table_ row 0 (the class token) at t = 0, row
    // 1 + b*Np + t - 1 (its patch) after: the embedding's ids.
    token_ids_.resize(std::size_t(BT));
    for (Index r = 0; r < BT; ++r) {
      const Index b = r / T, t = r % T;
      token_ids_[std::size_t(r)] = std::int32_t(t == 0 ? 0 : 1 + b * Np + t - 1);
    }
    residual_.resize(std::size_t(config_.layers + 1));
    for (Matrix& r : residual_) B::resize(r, BT, H);
    for (Block& block : blocks_) block.attn.allocate(batch, T);
    for (Matrix* m : {&dresidual_, &dtmp_}) B::resize(*m, BT, H);
    B::resize(dqkv_, BT, 3 * H);
    for (Matrix* m : {&normed_, &dnormed_}) B::resize(*m, batch, H);
    for (Matrix* m : {&logits_, &dlogits_}) B::resize(*m, batch, config_.classes);
    norm_mean_.resize(std::size_t(batch)), norm_rstd_.resize(std::size_t(batch)), losses_.resize(std::size_t(batch));
    loss_stats_.resize(std::size_t(2 * batch));
  }

  // images: [B, C*S*S] -> patches_: [B*Np, C*P*P], row b*Np + (py*G + px) holds patch (py, px) of
  // image b with columns (c, y, x): the order of timm's Conv2d weight [H, C, P, P] flattened.
  // Cut on the host (a copy of the pixels), then moved into the model's memory.
  void extract_patches(std::span<const Pixel> images) {
    const Index C = config_.channels, P = config_.patch, side = config_.image_size, G = config_.patches_per_side();
    const Index Np = config_.patches(), pixels = config_.pixels();
    for (Index r = 0; r < batch_ * Np; ++r) {
      const Index b = r / Np, py = r % Np / G, px = r % Np % G;
      Pixel* out = host_patches_.data() + r * C * P * P;
      for (Index c = 0; c < C; ++c)
        for (Index y = 0; y < P; ++y) {
          const Pixel* in = images.data() + b * pixels + (c * side + py * P + y) * side + px * P;
          std::copy(in, in + P, out + (c * P + y) * P);
        }
    }
    nn_.upload(std::span<const Pixel>(host_patches_), std::span<S>(patches_.data(), host_patches_.size()));
  }

  // The token embedding as GPT-2's: a table whose row 0 is the class token and rows 1.. the
  // patches' embeddings (patch_rows), looked up by token_ids_, plus pos_embed [T, H]:
  //   residual_[0] row b*T + t = cls_token + pos_embed[0] (t = 0), patch b*Np + t - 1 + pos_embed[t] (t >= 1).
  // Its backward sums each id's rows in order: the class token's B rows, each patch's one row.
  void embed_tokens() {
    MatrixView<S> cls_row = MatrixView<S>(token_table_).row_block(0, 1);
    nn_.zero(cls_row);
    nn_.add(cls_token_.matrix(), cls_row);
    nn_.embedding_forward(token_ids_, batch_, config_.tokens(), token_table_, positions(pos_embed_.value.data()),
                          residual_[0]);
  }
  // dresidual_ -> cls_token.grad += sum_b d row b*T, pos_embed.grad[t] += sum_b d row b*T + t,
  // dtoken_table_'s patch rows = d row b*T + t (written: the table's gradient starts at zero).
  void embed_tokens_backward() {
    nn_.zero(dtoken_table_);
    nn_.embedding_backward(dresidual_, token_ids_, batch_, config_.tokens(), dtoken_table_,
                           positions(pos_embed_.grad.data()));
    nn_.add(MatrixView<S>(dtoken_table_).row_block(0, 1), cls_token_.grad_matrix());
  }
  // pos_embed's values or gradient as [T, H].
  MatrixView<S> positions(S* data) const { return {data, config_.tokens(), config_.hidden}; }
  // The patches' rows of the token table: [B*Np, H] below the class token's row.
  MatrixView<S> patch_rows(Matrix& table) const { return MatrixView<S>(table).row_block(1, table.rows() - 1); }

  // The class token's rows (b*T) of a [B*T, H] stream: a strided [B, H] view, no copy.
  MatrixView<S> class_rows(Matrix& stream) const {
    return {stream.data(), batch_, config_.hidden, config_.tokens() * config_.hidden};
  }

  Index checked_moe_block(Index block) const {
    moe::check(block >= 0 && block < config_.layers && blocks_[std::size_t(block)].moe, "vit: block ", block,
               " has no MoE layer (MoE blocks: every ", config_.moe_every, "-th of ", config_.layers, ", from ",
               config_.moe_every - 1, "; none in the dense variant)");
    return block;
  }

  Config config_;
  Ops nn_;
  Param cls_token_, pos_embed_;      // [1, 1, H], [1, T, H]
  Param patch_weight_, patch_bias_;  // [H, C, P, P], [H]
  std::vector<Block> blocks_;
  Param norm_weight_, norm_bias_;    // [H]
  Param head_weight_, head_bias_;    // [classes, H], [classes]

  // Activations of the last forward.
  Index batch_ = 0;
  std::vector<std::int32_t> labels_, token_ids_;  // token_ids_: [B*T], the token table's row of each position
  std::vector<Pixel> host_patches_;               // [B*Np * C*P*P], cut on the host
  Matrix patches_;                                // [B*Np, C*P*P]
  Matrix token_table_;                            // [1 + B*Np, H]: the class token, then the embedded patches
  std::vector<Matrix> residual_;                  // [L + 1] x [B*T, H]: the input of block l, then the final stream
  Matrix normed_, logits_;                        // [B, H], [B, classes]
  Array<typename Ops::Stat> norm_mean_, norm_rstd_;
  Array<S> losses_;
  Array<typename Ops::Stat> loss_stats_;  // [2B] the loss's softmax statistics, from forward to backward
  double loss_ = 0;
  bool forwarded_ = false;
  // Backward workspace, shared by every block.
  Matrix dresidual_, dtmp_, dqkv_, dnormed_, dlogits_, dtoken_table_;
};

// ---- run-time choice of the variant ----------------------------------------------------------

using examples::kVariants;

// The model types over backend B, by variant (examples::with_variant_of).
template <class B>
struct ModelsOn {
  using Dense = Model<DenseMLP<B>>;
  template <template <class> class Gate>
  using MoE = Model<MoEFFN<Gate, B>>;
};

// Calls fn(std::type_identity<ModelType>{}) with the model type over backend B that the name
// selects and returns its result, e.g.
//   with_variant_on<moe::cpu::Backend>(name, [&](auto tag) { typename decltype(tag)::type model(config); ... });
// Unknown names throw moe::Error naming the name and the valid list.
template <class B, class Fn>
decltype(auto) with_variant_on(std::string_view name, Fn&& fn) {
  return examples::with_variant_of<ModelsOn<B>>(name, "vit", std::forward<Fn>(fn));
}

}  // namespace vit
