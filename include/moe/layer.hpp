// moe/layer.hpp: the generic MoELayer. The gate, the expert bank and the backend are
// compile-time policies; this file is the whole algorithm, written once for every backend:
//
//   forward:  logits = gate(x) -> route (top-k, weights, dispatch) -> gather rows by expert
//             -> experts -> combine rows back into tokens with the weights (paper eq. 2)
//   backward: the same steps in reverse, each step's backward beside its forward in the backend.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "moe/aux_loss.hpp"
#include "moe/backend.hpp"
#include "moe/config.hpp"
#include "moe/experts.hpp"
#include "moe/gate.hpp"
#include "moe/stats.hpp"
#include "moe/tensor.hpp"

namespace moe {

struct ForwardOptions {
  // One entry per token; tokens with 0 are left out of the auxiliary losses and the statistics
  // (they are still routed and computed). Empty: every token counts.
  std::span<const std::uint8_t> token_mask = {};
  // false: inference (torch.no_grad()): nothing is kept for backward. The input is not copied, the
  // experts keep no activations (GeluMLP writes no pre-activation), and backward throws until the
  // next forward with true. The same output.
  bool for_backward = true;
  // true: the caller keeps x (and a separate router input) unchanged until the backward, so the
  // layer reads them there instead of keeping copies: a model that keeps each block's activations
  // anyway saves a copy of [T, H] and its memory per layer. The same results.
  bool input_kept = false;
};

template <template <class> class GatePolicy, template <class> class ExpertPolicy, class B>
class MoELayer {
  static_assert(Backend<B>, "MoELayer: the backend does not satisfy moe::Backend (moe/backend.hpp)");
  static_assert(Gate<GatePolicy<B>, B>, "MoELayer: the gate policy does not satisfy moe::Gate (moe/gate.hpp)");
  static_assert(Expert<ExpertPolicy<B>, B>,
                "MoELayer: the expert policy does not satisfy moe::Expert (moe/experts.hpp)");

 public:
  using Scalar = typename B::Scalar;
  using Matrix = typename B::Matrix;
  using GateType = GatePolicy<B>;
  using ExpertsType = ExpertPolicy<B>;

  MoELayer(const LayerConfig& config, std::uint64_t seed, typename GateType::Options gate_options = {},
           typename ExpertsType::Options expert_options = {}, B backend = B{})
      : config_(validated(config)),
        backend_(std::move(backend)),
        gate_(backend_, config_, seed, gate_options),
        experts_(backend_, config_, seed, expert_options),
        stats_(config_.experts, gate_.router_parameters()) {}

  // x: [T, H] -> y: [T, H]. T = 0 gives an empty [0, H] result.
  Matrix forward(ConstMatrixView<Scalar> x, const ForwardOptions& options = {}) {
    check_view("MoELayer forward", "input", x);  // before its rows size y
    Matrix y;
    B::resize(y, x.rows, config_.hidden);
    forward_into(x, y, options);
    return y;
  }

  void forward_into(ConstMatrixView<Scalar> x, MatrixView<Scalar> y, const ForwardOptions& options = {}) {
    forward_impl(x, nullptr, y, options);
  }

  // The same layer, but the gate reads router_input: [T, H] instead of x (e.g. the residual stream
  // before the LayerNorm that produced x; for SelfRoute its last N coordinates become the logits).
  // The experts still read x. backward_into then needs a d_router_input buffer.
  void forward_into(ConstMatrixView<Scalar> x, ConstMatrixView<Scalar> router_input, MatrixView<Scalar> y,
                    const ForwardOptions& options = {}) {
    check(router_input.rows == x.rows && router_input.cols == x.cols, "router input is [", router_input.rows, ", ",
          router_input.cols, "], the layer input is [", x.rows, ", ", x.cols, "]");
    forward_impl(x, &router_input, y, options);
  }

  // dy: [T, H] of the last forward -> dx: [T, H]. Parameter gradients accumulate (+=) until
  // zero_grad(). The auxiliary losses' gradients are included. Once per forward.
  Matrix backward(ConstMatrixView<Scalar> dy) {
    check_view("MoELayer backward", "output gradient", dy);  // before its rows size dx
    Matrix dx;
    B::resize(dx, dy.rows, config_.hidden);
    backward_into(dy, dx);
    return dx;
  }

  void backward_into(ConstMatrixView<Scalar> dy, MatrixView<Scalar> dx) {
    check(!routed_separately_, "the last forward had a separate router input: call backward_into(dy, dx, d_router_input)");
    backward_impl(dy, dx, dx);
  }

  // After forward_into(x, router_input, y): dx WRITTEN (the experts' path), d_router_input ADDED to
  // (+=, the gate's path: SelfRoute's logit gradient, the Linear router's input gradient).
  void backward_into(ConstMatrixView<Scalar> dy, MatrixView<Scalar> dx, MatrixView<Scalar> d_router_input) {
    check(routed_separately_, "the last forward had no separate router input: call backward_into(dy, dx)");
    check(d_router_input.rows == dx.rows && d_router_input.cols == dx.cols, "router input gradient is [",
          d_router_input.rows, ", ", d_router_input.cols, "], expected [", dx.rows, ", ", dx.cols, "]");
    backward_impl(dy, dx, d_router_input);
  }

  // Every parameter (gate first, then experts), with its gradient; frozen ones marked.
  std::vector<ParamRef<Scalar>> parameters() {
    std::vector<ParamRef<Scalar>> all = gate_.parameters();
    for (auto& p : experts_.parameters()) all.push_back(std::move(p));
    return all;
  }
  void zero_grad() {
    for (auto& p : parameters())
      if (!p.grad.empty()) backend_.fill(MatrixView<Scalar>(p.grad.data(), 1, Index(p.grad.size())), Scalar(0));
  }
  // Learned (trainable) parameters, the router's included; frozen buffers excluded.
  Index trainable_parameter_count() {
    Index n = 0;
    for (auto& p : parameters()) n += p.trainable ? Index(p.value.size()) : 0;
    return n;
  }
  Index router_parameter_count() const { return gate_.router_parameters(); }

  // Statistics since the last reset_stats(); collect_stats(false) pauses them (e.g. to gather
  // them on held-out tokens only).
  const RoutingStats& stats() const { return stats_; }
  void reset_stats() { stats_.reset(); }
  void collect_stats(bool on) { collect_stats_ = on; }

  // Weighted auxiliary losses of the last forward (0 when disabled); add to the task loss.
  const AuxLosses& aux_losses() const { return aux_; }
  double aux_loss() const { return aux_.total(); }

  // Activation memory kept from forward to backward, per token (bytes), for this configuration.
  static Index saved_bytes_per_token(const LayerConfig& c) {
    const Index scalars = c.hidden                                           // the input (the caller's with input_kept)
                          + 2 * c.top_k * c.hidden                           // expert input and output rows
                          + c.top_k * ExpertsType::cached_scalars_per_row(c) // expert activations
                          + (gate_logits_are_input_view<GateType> ? 0 : c.experts)  // logits (none: a view)
                          + c.top_k;                                         // routing weights
    const Index routing = c.top_k * 3 * Index(sizeof(std::int32_t)) + 1;     // expert, row, slot_of_row; status
    return scalars * Index(sizeof(Scalar)) + routing;
  }

  const LayerConfig& config() const { return config_; }
  GateType& gate() { return gate_; }
  ExpertsType& experts() { return experts_; }
  B& backend() { return backend_; }
  // The last forward's routing: the plan, the weights [T*k], the logits [T, N].
  const typename B::Plan& last_plan() const { return plan_; }
  const typename B::template Vector<Scalar>& last_weights() const { return weights_; }
  // The last forward's logits (SelfRoute's are a view of the gate's input: after an inference
  // forward or one with input_kept, of the caller's matrix, which an in-place forward has since
  // overwritten with its output). Empty in a copy of a layer (it keeps no forward).
  ConstMatrixView<Scalar> last_logits() const { return last_.logits; }

 private:
  // router_input: null when the gate reads x itself.
  void forward_impl(ConstMatrixView<Scalar> x, const ConstMatrixView<Scalar>* router_input, MatrixView<Scalar> y,
                    const ForwardOptions& options) {
    const Index T = x.rows, H = config_.hidden;
    check_operand("MoELayer forward", "input", x);
    check_operand("MoELayer forward", "output", y);
    if (router_input) check_operand("MoELayer forward", "router input", *router_input);
    check(x.cols == H, "input has ", x.cols, " columns, the layer's hidden size is ", H);
    check(y.rows == T && y.cols == H, "output is [", y.rows, ", ", y.cols, "], expected [", T, ", ", H, "]");
    // With input_kept the backward reads the caller's input, which an output over it would have replaced.
    if (options.for_backward && options.input_kept) {
      check(!overlaps(x, y), "MoELayer forward: input_kept, but the output overlaps the input the backward will read");
      check(!router_input || !overlaps(*router_input, y),
            "MoELayer forward: input_kept, but the output overlaps the router input the backward will read");
    }
    check_mask(options.token_mask, T);
    mask_.assign(options.token_mask.begin(), options.token_mask.end());

    // Kept for backward (copies, unless the caller keeps them: it may change x before): the gate's
    // backward reads its input. An inference forward reads the caller's matrices in place.
    const bool keep = options.for_backward;
    last_.forwarded = false;  // until this forward has finished
    routed_separately_ = router_input != nullptr;
    ConstMatrixView<Scalar> input = x, gate_in = routed_separately_ ? *router_input : x;
    if (keep) {
      input_kept_ = options.input_kept;
      last_.callers_input = x;
      last_.callers_router_input = routed_separately_ ? *router_input : ConstMatrixView<Scalar>{};
      if (!input_kept_) {
        B::resize(input_, T, H);
        backend_.copy(x, input_);
        if (routed_separately_) {
          B::resize(router_input_, T, H);
          backend_.copy(*router_input, router_input_);
        }
      }
      input = layer_input(), gate_in = gate_input();
    }
    last_.logits = gate_.forward(backend_, gate_in);  // SelfRoute's: a view of gate_in
    // An in-place inference forward (y over x) overwrites SelfRoute's logits with the output, so the
    // losses and statistics read them first; otherwise after the experts' work is queued (a GPU
    // backend's losses and statistics wait for their sums on the host).
    const bool read_logits_first = overlaps(last_.logits, y);
    const bool aux_first = has_aux_loss() && read_logits_first;
    const bool stats_first = collect_stats_ && read_logits_first;
    const bool routed = can_run_routed(input, keep);
    // A training forward's backward reads the offsets on the host: their copy starts here and has
    // long arrived by then.
    route(routed && !keep);
    if (aux_first) aux_ = backend_.aux_loss(last_.logits, plan_, config_, mask_);
    if (stats_first) B::accumulate_stats(plan_, last_.logits, mask_, stats_);
    routed_forward_ = routed && keep;
    bool combined = false;  // by the routed products themselves
    if (routed) {
      combined = run_routed(input, y, keep);
    } else {
      // Gathered before the host reads the expert offsets: a GPU backend's route() leaves their
      // copy in flight, and the gather runs while the host waits for it. So room for every slot
      // (T*k rows); the R kept ones are filled.
      B::resize(expert_in_, T * config_.top_k, H);
      backend_.gather_rows(input, plan_, expert_in_);
      const std::span<const Index> offsets = B::expert_offsets(plan_);
      B::resize(expert_out_, offsets.back(), H);
      if (keep)
        experts_.forward(backend_, expert_input(offsets.back()), offsets, expert_out_);
      else
        infer_experts(offsets);
    }
    if (!combined) backend_.combine(expert_out_, plan_, weights_, y);

    if (!aux_first) aux_ = has_aux_loss() ? backend_.aux_loss(last_.logits, plan_, config_, mask_) : AuxLosses{};
    if (collect_stats_ && !stats_first) B::accumulate_stats(plan_, last_.logits, mask_, stats_);
    last_.forwarded = keep;
  }

  // dx written through the experts; d_gate_input (dx itself, or the router input's gradient) +=
  // through the gate.
  void backward_impl(ConstMatrixView<Scalar> dy, MatrixView<Scalar> dx, MatrixView<Scalar> d_gate_input) {
    check(last_.forwarded, "backward needs a forward first (one with ForwardOptions::for_backward, the default; and "
                           "runs once per forward; a copy of a layer keeps no forward)");
    check_operand("MoELayer backward", "output gradient", dy);
    check_operand("MoELayer backward", "input gradient", dx);
    if (routed_separately_) check_operand("MoELayer backward", "router input gradient", d_gate_input);
    // With input_kept the gate's backward reads the caller's (router) input after dx is written.
    if (input_kept_) {
      check(!overlaps(dx, gate_input()), "MoELayer backward: input_kept, but the input gradient overlaps the ",
            routed_separately_ ? "router input" : "input", " the gate's backward reads");
      check(!routed_separately_ || !overlaps(d_gate_input, gate_input()),
            "MoELayer backward: input_kept, but the router input gradient overlaps the router input");
    }
    const Index T = layer_input().rows, H = config_.hidden;
    check(dy.rows == T && dy.cols == H, "output gradient is [", dy.rows, ", ", dy.cols,
          "], the last forward's output is [", T, ", ", H, "]");
    check(dx.rows == T && dx.cols == H, "input gradient is [", dx.rows, ", ", dx.cols, "], expected [", T, ", ",
          H, "]");
    last_.forwarded = false;

    const std::span<const Index> offsets = B::expert_offsets(plan_);
    if (routed_forward_) {  // the forward's products read x's rows in place; the weight gradients read them sorted
      B::resize(expert_in_, T * config_.top_k, H);
      backend_.gather_rows(layer_input(), plan_, expert_in_);
    }
    const Index R = offsets.back();
    const MatrixView<Scalar> expert_out = MatrixView<Scalar>(expert_out_).row_block(0, R);
    B::resize(expert_grad_, R, H);
    backend_.combine_backward(dy, expert_out, plan_, weights_, expert_grad_, dweights_);
    // expert_out_ is spent: it receives d(expert input rows).
    experts_.backward(backend_, expert_input(R), expert_grad_, offsets, expert_out);
    backend_.sum_rows_to_tokens(expert_out, plan_, dx);
    if (gate_.wants_logit_gradient()) {
      B::resize(dlogits_, T, config_.experts);
      backend_.route_backward(last_.logits, plan_, config_, dweights_, mask_, dlogits_);
      gate_.backward(backend_, gate_input(), dlogits_, d_gate_input);
    }
  }

  // The last forward's input and the gate's: the layer's copies, or the caller's matrices (input_kept).
  ConstMatrixView<Scalar> layer_input() const {
    return input_kept_ ? last_.callers_input : ConstMatrixView<Scalar>(input_);
  }
  ConstMatrixView<Scalar> gate_input() const {
    if (!routed_separately_) return layer_input();
    return input_kept_ ? last_.callers_router_input : ConstMatrixView<Scalar>(router_input_);
  }
  // The R gathered rows.
  ConstMatrixView<Scalar> expert_input(Index R) const { return ConstMatrixView<Scalar>(expert_in_).row_block(0, R); }

  // expert_in_ -> expert_out_ through the experts' inference forward where they have one
  // (moe/experts.hpp), else through their forward.
  void infer_experts(std::span<const Index> offsets) {
    if constexpr (requires { experts_.infer(backend_, expert_in_, offsets, expert_out_); })
      experts_.infer(backend_, expert_input(offsets.back()), offsets, expert_out_);
    else
      experts_.forward(backend_, expert_input(offsets.back()), offsets, expert_out_);
  }

  // Whether the expert bank and the backend offer an inference forward straight from the routing
  // plan (moe/experts.hpp's infer_routed; the CPU and CUDA backends' routed products).
  static constexpr bool has_routed_inference() {
    if constexpr (requires { typename B::RoutedSum; }) {  // the backend's half first: its types below
      return requires(ExpertsType& e, B& be, ConstMatrixView<Scalar> x, MatrixView<Scalar> out,
                      const typename B::Plan& plan, const typename B::RoutedSum* sum) {
        { e.can_infer_routed(be, x) } -> std::convertible_to<bool>;
        { B::routed_sum_fits(plan, out) } -> std::convertible_to<bool>;
        e.infer_routed(be, x, plan, out, sum);
      };
    } else {
      return false;
    }
  }
  // The same for a training forward: the expert bank's forward_routed as well.
  static constexpr bool has_routed_training() {
    if constexpr (has_routed_inference()) {
      return requires(ExpertsType& e, B& be, ConstMatrixView<Scalar> x, MatrixView<Scalar> out,
                      const typename B::Plan& plan, const typename B::RoutedSum* sum) {
        e.forward_routed(be, x, plan, out, sum);
      };
    } else {
      return false;
    }
  }
  // Whether this forward's experts run from the routing plan (for backward: keep).
  bool can_run_routed(ConstMatrixView<Scalar> input, bool keep) const {
    if constexpr (has_routed_inference()) {
      if (keep && !has_routed_training()) return false;
      if constexpr (requires { B::routed_rows_fit(Index{}, Index{}); })
        if (!B::routed_rows_fit(input.rows * config_.top_k, config_.experts)) return false;
      return experts_.can_infer_routed(backend_, input);
    }
    return false;
  }
  // route(); the routed products never read the offsets on the host, so a backend that copies them
  // there (the CUDA backend: route() starts the copy the per-expert path waits for) need not.
  void route(bool offsets_stay_on_device) {
    if constexpr (requires { backend_.route(last_.logits, config_, plan_, weights_, true); })
      backend_.route(last_.logits, config_, plan_, weights_, !offsets_stay_on_device);
    else
      backend_.route(last_.logits, config_, plan_, weights_);
  }
  // A forward's experts straight from the routing plan (can_run_routed): no expert-sorted copy of
  // the input, and for inference no host copy of the offsets (training's backward reads them, and
  // makes the copy of the input its weight gradients need). expert_out_ then has a row per slot.
  // Where the backend can (routed_sum_fits: no slot dropped), the last product also makes y;
  // returns whether it did.
  bool run_routed(ConstMatrixView<Scalar> input, MatrixView<Scalar> y, bool keep) {
    if constexpr (has_routed_inference()) {
      B::resize(expert_out_, input.rows * config_.top_k, config_.hidden);
      const typename B::RoutedSum sum{&weights_, y};
      const bool combined = B::routed_sum_fits(plan_, y);
      if constexpr (has_routed_training()) {
        if (keep) {
          experts_.forward_routed(backend_, input, plan_, expert_out_, combined ? &sum : nullptr);
          return combined;
        }
      }
      experts_.infer_routed(backend_, input, plan_, expert_out_, combined ? &sum : nullptr);
      return combined;
    }
    return false;
  }

  // A caller's matrix: a view of memory (check_view), and where the backend can tell (the CUDA
  // backend), memory its kernels read.
  template <class T>
  void check_operand(const char* where, const char* name, MatrixView<T> v) const {
    check_view(where, name, v);
    if constexpr (requires { backend_.check_operand(where, name, v); }) backend_.check_operand(where, name, v);
  }

  // The config's own rules, then the backend's limits where it has some (the CUDA backend's N and
  // k): at construction, before any weight is allocated, not at the first forward.
  static LayerConfig validated(const LayerConfig& config) {
    validate(config);
    if constexpr (requires { B::check_layer_config(config); }) B::check_layer_config(config);
    return config;
  }
  bool has_aux_loss() const { return config_.aux.load_balance > 0 || config_.aux.z_loss > 0; }

  // What a forward leaves its backward that points at memory by address: the caller's matrices, and
  // the logits (SelfRoute's: a view of the input or of its copy here). A copy of the layer must not
  // keep these (they would point into the original), so a copy of this starts empty: the copied
  // layer's backward throws until its own forward. A move takes them (the buffers keep their
  // addresses) and leaves the source empty. The first member: a copy assignment resets it before
  // the buffers are replaced, so one that throws partway leaves no forward behind.
  struct LastForward {
    bool forwarded = false;  // a training forward has run, its backward not yet
    ConstMatrixView<Scalar> logits;
    ConstMatrixView<Scalar> callers_input, callers_router_input;  // read by backward when input_kept_
    LastForward() = default;
    LastForward(const LastForward&) {}
    LastForward& operator=(const LastForward& other) {
      if (this != &other) *this = LastForward{};
      return *this;
    }
    LastForward(LastForward&& other) noexcept { take(other); }
    LastForward& operator=(LastForward&& other) noexcept {
      if (this != &other) take(other);
      return *this;
    }

   private:
    void take(LastForward& other) {
      forwarded = std::exchange(other.forwarded, false);
      logits = std::exchange(other.logits, {});
      callers_input = std::exchange(other.callers_input, {});
      callers_router_input = std::exchange(other.callers_router_input, {});
    }
  };
  LastForward last_;
  LayerConfig config_;
  B backend_;
  GateType gate_;
  ExpertsType experts_;
  RoutingStats stats_;
  bool collect_stats_ = true;
  bool routed_separately_ = false;
  bool routed_forward_ = false;  // the last training forward's experts ran from the routing plan

  // Kept from forward for backward.
  Matrix input_, router_input_, expert_in_, expert_out_;
  bool input_kept_ = false;  // ForwardOptions::input_kept of the last forward
  typename B::Plan plan_;
  typename B::template Vector<Scalar> weights_;
  std::vector<std::uint8_t> mask_;
  AuxLosses aux_;
  // Backward workspace.
  Matrix expert_grad_, dlogits_;
  typename B::template Vector<Scalar> dweights_;
};

}  // namespace moe
