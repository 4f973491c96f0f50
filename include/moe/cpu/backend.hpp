// moe/cpu/backend.hpp: the Eigen CPU backend, the readable reference implementation of every
// primitive MoELayer, its gates and its experts are written against (concept moe::Backend).
//
// Data layout: every matrix is row-major; tokens are rows. Expert weights are stacked:
// an expert bank with N experts mapping I -> O features is one [N*O, I] matrix whose rows
// [e*O, (e+1)*O) are expert e's nn.Linear weight, and biases are [N, O].
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <span>
#include <vector>

#include "moe/activations.hpp"
#include "moe/aux_loss.hpp"
#include "moe/backend_checks.hpp"
#include "moe/config.hpp"
#include "moe/cpu/gemm.hpp"
#include "moe/cpu/parallel.hpp"
#include "moe/random.hpp"
#include "moe/routing.hpp"
#include "moe/stats.hpp"
#include "moe/tensor.hpp"

namespace moe::cpu {

template <class S>
class BasicBackend {
 public:
  using Scalar = S;
  using Matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  template <class T>
  using Vector = std::vector<T>;
  using Plan = RoutingPlan;

  explicit BasicBackend(int threads = default_threads()) { set_threads(threads); }
  int threads() const { return threads_; }
  void set_threads(int threads) {
    check(threads >= 1, "thread count must be >= 1, got ", threads);
    threads_ = threads;
  }

  // ---- storage -------------------------------------------------------------------------
  static void resize(Matrix& m, Index rows, Index cols) {
    if (m.rows() != rows || m.cols() != cols) m.resize(rows, cols);
  }
  template <class T>
  static void resize(Vector<T>& v, Index size) { v.resize(std::size_t(size)); }

  void copy(ConstMatrixView<S> src, MatrixView<S> dst) const {
    check_same_shape("copy", "dst", dst, "src", src);
    for_rows(src.rows, src.cols, [&](Index r) { std::copy(src.row(r), src.row(r) + src.cols, dst.row(r)); });
  }
  // dst += src
  void add(ConstMatrixView<S> src, MatrixView<S> dst) const {
    check_same_shape("add", "dst", dst, "src", src);
    for_rows(src.rows, src.cols, [&](Index r) {
      const S* s = src.row(r);
      S* d = dst.row(r);
      for (Index c = 0; c < src.cols; ++c) d[c] += s[c];
    });
  }
  void fill(MatrixView<S> dst, S value) const {
    for_rows(dst.rows, dst.cols, [&](Index r) { std::fill(dst.row(r), dst.row(r) + dst.cols, value); });
  }
  // N(0, std^2) draws; element (r, c) is draw r*cols + c of (seed, stream).
  void fill_normal(MatrixView<S> dst, double std_dev, std::uint64_t seed, std::uint64_t stream) const {
    for_rows(dst.rows, dst.cols, [&](Index r) {
      for (Index c = 0; c < dst.cols; ++c)
        dst(r, c) = S(std_dev * random::normal(seed, stream, std::uint64_t(r * dst.cols + c)));
    });
  }

  // ---- dense linear: out = in W^T, the nn.Linear convention (W is [O, I]) ------------------
  // in: [T, I], weight: [O, I] -> out: [T, O]
  void linear_forward(ConstMatrixView<S> in, ConstMatrixView<S> weight, MatrixView<S> out) const {
    run_gemm(Gemm<S>{out, in, Op::none, weight, Op::transpose}, threads_);
  }
  // din += dout W (skipped if din is empty); dweight += dout^T in (skipped if empty)
  void linear_backward(ConstMatrixView<S> in, ConstMatrixView<S> dout, ConstMatrixView<S> weight,
                       MatrixView<S> din, MatrixView<S> dweight) const {
    std::vector<Gemm<S>> work;
    if (dweight.data) work.push_back({dweight, dout, Op::transpose, in, Op::none, true});
    if (din.data) work.push_back({din, dout, Op::none, weight, Op::none, true});
    run_gemms<S>(work, threads_);
  }

  // ---- grouped linear: each expert's contiguous block of rows through its own weights -------
  // in: [R, I] (rows of expert e at [offsets[e], offsets[e+1])), weight: [N*O, I], bias: [N, O]
  // or null -> out: [R, O]
  void grouped_linear_forward(ConstMatrixView<S> in, std::span<const Index> offsets, ConstMatrixView<S> weight,
                              const S* bias, MatrixView<S> out) const {
    run_gemms<S>(expert_products(in, offsets, nullptr, 1, weight, bias, out), threads_);
  }
  // pre = in W_e^T + b_e (bias [N, O], required), then act = gelu(pre): the expert MLP's first
  // layer with its activation (one fused GEMM on the GPU backend). pre empty (null data): not kept
  // (inference), act the same values.
  void grouped_linear_gelu_forward(ConstMatrixView<S> in, std::span<const Index> offsets, ConstMatrixView<S> weight,
                                   const S* bias, MatrixView<S> pre, MatrixView<S> act) const {
    check(bias, "grouped_linear_gelu_forward: the bias must not be null");
    if (!pre.data) {
      grouped_linear_forward(in, offsets, weight, bias, act);
      gelu_forward(act, act);
      return;
    }
    check_same_shape("grouped_linear_gelu_forward", "pre", pre, "act", act);
    grouped_linear_forward(in, offsets, weight, bias, pre);
    gelu_forward(pre, act);
  }
  // dweight += dout_e^T in_e and dbias += column sums of dout_e (if dbias), then
  // din = dout_e W_e (if din). din may alias in: the weight gradient is formed first.
  void grouped_linear_backward(ConstMatrixView<S> in, ConstMatrixView<S> dout, std::span<const Index> offsets,
                               ConstMatrixView<S> weight, MatrixView<S> din, MatrixView<S> dweight,
                               S* dbias) const {
    const Index O = dout.cols, experts = Index(offsets.size()) - 1;
    std::vector<Gemm<S>> work;
    for (Index e = 0; e < experts; ++e) {
      const Index begin = offsets[e], rows = offsets[e + 1] - begin;
      work.push_back({dweight.row_block(e * O, O), dout.row_block(begin, rows), Op::transpose,
                      in.row_block(begin, rows), Op::none, true});
    }
    run_gemms<S>(work, threads_);
    if (dbias)
      parallel_for(threads_, experts, [&](Index e) {
        S* db = dbias + e * O;
        for (Index r = offsets[e]; r < offsets[e + 1]; ++r)
          for (Index c = 0; c < O; ++c) db[c] += dout(r, c);
      });
    if (!din.data) return;
    work.clear();
    for (Index e = 0; e < experts; ++e) {
      const Index begin = offsets[e], rows = offsets[e + 1] - begin;
      work.push_back({din.row_block(begin, rows), dout.row_block(begin, rows), Op::none,
                      weight.row_block(e * O, O), Op::none, false});
    }
    run_gemms<S>(work, threads_);
  }

  // The same where `in` was gelu(pre): din = (dout_e W_e) * gelu'(pre_e) (fused into the GEMM on
  // the GPU backend). pre: [R, I]; din may alias in.
  void grouped_linear_backward_through_gelu(ConstMatrixView<S> in, ConstMatrixView<S> dout,
                                            std::span<const Index> offsets, ConstMatrixView<S> weight,
                                            ConstMatrixView<S> pre, MatrixView<S> din, MatrixView<S> dweight,
                                            S* dbias) const {
    check_same_shape("grouped_linear_backward_through_gelu", "pre", pre, "in", in);
    grouped_linear_backward(in, dout, offsets, weight, din, dweight, dbias);
    if (din.data) gelu_backward(pre, din, din);
  }

  // ---- routed products: the experts' products straight from the routing plan -------------
  // MoELayer's routed path (moe/layer.hpp, moe/experts.hpp), the contract of the CUDA backend's
  // routed_* products: out[r] = in_row(r) W_e^T (+ b_e) for the plan's R rows r (expert-sorted,
  // expert e's block), where in_row(r) is in's row r (gathered = false: in holds the
  // expert-sorted rows, [>= R, I]) or its token's row (gathered = true: in is the layer's input,
  // [T, I], read through slot_of_row / top_k, Gemm::a_rows). out has room for every slot, [T*k, O];
  // rows past R keep what they held. The gathered product reads x's rows through the plan (the
  // GEMM gathers a block in cache at a time): the same products as gather_rows then
  // grouped_linear_forward, so the same bits, without the expert-sorted copy of x.
  bool routed_product_fits(Index, Index) const { return true; }
  static bool routed_input_fits(ConstMatrixView<S>) { return true; }
  // The layer's combine folded into the last product: not on the CPU (a token's k rows come from
  // different experts' products), so routed_sum_fits is false and the layer runs combine().
  struct RoutedSum {
    const Vector<S>* weights = nullptr;
    MatrixView<S> y;
  };
  static bool routed_sum_fits(const Plan&, MatrixView<S>) { return false; }

  void routed_linear_forward(ConstMatrixView<S> in, const Plan& plan, bool gathered, ConstMatrixView<S> weight,
                             const S* bias, MatrixView<S> out, const RoutedSum* sum = nullptr) const {
    check(sum == nullptr, "routed products: the CPU backend keeps the combine apart (routed_sum_fits is false)");
    const Index N = plan.experts, O = out.cols, I = in.cols, R = plan.rows();
    check(Index(plan.expert_offsets.size()) == N + 1 && Index(plan.slot_of_row.size()) >= R,
          "routed products: the plan has not routed");
    check(weight.rows == N * O && weight.cols == I, "routed products: weight is [", weight.rows, ", ", weight.cols,
          "], expected [", N * O, ", ", I, "]");
    check(out.rows >= R, "routed products: out has ", out.rows, " rows, the plan's kept rows need ", R);
    check(gathered ? in.rows == plan.tokens : in.rows >= R, "routed products: in has ", in.rows, " rows, expected ",
          gathered ? plan.tokens : R, gathered ? " (the tokens)" : " (one per kept row)");
    if (R == 0) return;
    run_gemms<S>(expert_products(in, plan.expert_offsets, gathered ? plan.slot_of_row.data() : nullptr,
                                 plan.top_k, weight, bias, out),
                 threads_);
  }
  // act = gelu(in_row(r) W_e^T + b_e) as routed_linear_forward, pre (the pre-activation) kept
  // unless empty. bias required.
  void routed_linear_gelu_forward(ConstMatrixView<S> in, const Plan& plan, bool gathered, ConstMatrixView<S> weight,
                                  const S* bias, MatrixView<S> pre, MatrixView<S> act) const {
    check(bias, "routed_linear_gelu_forward: the bias must not be null");
    const Index R = plan.rows();
    if (!pre.data) {
      routed_linear_forward(in, plan, gathered, weight, bias, act);
      gelu_forward(act.row_block(0, R), act.row_block(0, R));
      return;
    }
    check_same_shape("routed_linear_gelu_forward", "pre", pre, "act", act);
    routed_linear_forward(in, plan, gathered, weight, bias, pre);
    gelu_forward(pre.row_block(0, R), act.row_block(0, R));
  }
  // act = silu(gate) * up of in_row(r) [W_gate; W_up]_e^T as routed_linear_forward (weight:
  // [N*2F, I], each expert's gate rows then its up rows; act: [T*k, F]), through a [R, 2F]
  // workspace: routed_linear_forward into it, then swiglu_forward.
  void routed_swiglu_forward(ConstMatrixView<S> in, const Plan& plan, bool gathered, ConstMatrixView<S> weight,
                             MatrixView<S> act) const {
    const Index R = plan.rows();
    resize(swiglu_workspace_, R, 2 * act.cols);
    routed_linear_forward(in, plan, gathered, weight, nullptr, swiglu_workspace_);
    swiglu_forward(swiglu_workspace_, act.row_block(0, R));
  }

  // ---- activations (row by row, so the vector/scalar split never depends on threads) -------
  // in: [R, F] -> out: [R, F]; out may alias in
  void gelu_forward(ConstMatrixView<S> in, MatrixView<S> out) const {
    check_same_shape("gelu_forward", "out", out, "in", in);
    for_rows(in.rows, in.cols, [&](Index r) {
      const auto x = array_map(in.row(r), in.cols);
      const auto inner = S(activation::kGeluScale) * (x + S(activation::kGeluCubic) * x.cube());
      array_map(out.row(r), in.cols) = S(0.5) * x * (S(1) + inner.tanh());
    });
  }
  // din = dout * gelu'(in); din may alias dout
  void gelu_backward(ConstMatrixView<S> in, ConstMatrixView<S> dout, MatrixView<S> din) const {
    check_same_shape("gelu_backward", "dout", dout, "in", in);
    check_same_shape("gelu_backward", "din", din, "in", in);
    for_row_segments(in.rows, in.cols, [&](Index r, Index c, Index n) {
      const auto x = array_map(in.row(r) + c, n);
      const auto x2 = x.square();
      const Segment t = (S(activation::kGeluScale) * (x + S(activation::kGeluCubic) * x2 * x)).tanh();
      const auto grad = S(0.5) * (S(1) + t) +
                        S(0.5) * x * (S(1) - t.square()) * S(activation::kGeluScale) *
                            (S(1) + S(3 * activation::kGeluCubic) * x2);
      array_map(din.row(r) + c, n) = array_map(dout.row(r) + c, n) * grad;
    });
  }
  // gate_up: [R, 2F] (gate | up) -> out: [R, F] = silu(gate) * up
  void swiglu_forward(ConstMatrixView<S> gate_up, MatrixView<S> out) const {
    const Index F = out.cols;
    backend_checks::shape_is("swiglu_forward", "gate_up", gate_up, out.rows, 2 * F, "gate | up for out's rows");
    for_rows(gate_up.rows, gate_up.cols, [&](Index r) {
      const auto g = array_map(gate_up.row(r), F);
      const auto u = array_map(gate_up.row(r) + F, F);
      array_map(out.row(r), F) = g / (S(1) + (-g).exp()) * u;
    });
  }
  // dgate_up = (dout * up * silu'(gate) | dout * silu(gate)); dgate_up may alias gate_up
  void swiglu_backward(ConstMatrixView<S> gate_up, ConstMatrixView<S> dout, MatrixView<S> dgate_up) const {
    const Index F = dout.cols;
    backend_checks::shape_is("swiglu_backward", "gate_up", gate_up, dout.rows, 2 * F, "gate | up for dout's rows");
    check_same_shape("swiglu_backward", "dgate_up", dgate_up, "gate_up", gate_up);
    for_row_segments(gate_up.rows, F, [&](Index r, Index c, Index n) {
      const Segment g = array_map(gate_up.row(r) + c, n);  // copies: dgate_up may alias gate_up
      const Segment u = array_map(gate_up.row(r) + F + c, n);
      const auto d = array_map(dout.row(r) + c, n);
      const Segment sig = S(1) / (S(1) + (-g).exp());
      array_map(dgate_up.row(r) + c, n) = d * u * sig * (S(1) + g * (S(1) - sig));
      array_map(dgate_up.row(r) + F + c, n) = d * g * sig;
    });
  }

  // ---- routing ---------------------------------------------------------------------------
  // logits: [T, N] -> plan, weights [T*k] (the contract in moe/routing.hpp)
  void route(ConstMatrixView<S> logits, const LayerConfig& config, Plan& plan, Vector<S>& weights) const {
    const Index T = logits.rows, k = config.top_k;
    check_top_k(k, logits.cols);
    plan.tokens = T;
    plan.experts = logits.cols;
    plan.top_k = k;
    plan.expert.resize(T * k);
    plan.row_status.resize(T);
    weights.resize(T * k);
    parallel_chunks(threads_, T, kTokenChunk, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) route_token(logits, t, k, config.weights, plan, weights.data());
    });
    dispatch(plan, config.capacity_factor);
  }

  // rows[r] = x[token of row r] for the R kept rows: the expert-sorted copy of the input.
  // x: [T, H] -> rows: [>= R, H], rows past R untouched.
  void gather_rows(ConstMatrixView<S> x, const Plan& plan, MatrixView<S> rows) const {
    const Index R = plan.rows();
    backend_checks::shape_is("gather_rows", "x", x, plan.tokens, x.cols, "the plan's tokens");
    backend_checks::holds_rows("gather_rows", "rows", rows, R, x.cols);
    for_rows(R, rows.cols, [&](Index r) {
      const Index t = plan.slot_of_row[r] / plan.top_k;
      std::copy(x.row(t), x.row(t) + x.cols, rows.row(r));
    });
  }

  // y[t] = sum_j weight[t,j] * expert_rows[row(t,j)], j ascending, dropped slots skipped.
  // expert_rows: [R, H] -> y: [T, H]
  void combine(ConstMatrixView<S> expert_rows, const Plan& plan, const Vector<S>& weights, MatrixView<S> y) const {
    backend_checks::one_per_slot("combine", "weights", Index(weights.size()), plan.slots());
    check_gather_sum("combine", "expert_rows", expert_rows, plan, "y", y);
    gather_sum(expert_rows, plan, weights.data(), y);
  }
  // d_rows[row(t,j)] = weight[t,j] * dy[t];  dweights[t,j] = dy[t] . expert_rows[row(t,j)] (0 if dropped)
  void combine_backward(ConstMatrixView<S> dy, ConstMatrixView<S> expert_rows, const Plan& plan,
                        const Vector<S>& weights, MatrixView<S> d_rows, Vector<S>& dweights) const {
    const Index k = plan.top_k, H = dy.cols;
    backend_checks::shape_is("combine_backward", "dy", dy, plan.tokens, H, "the plan's tokens");
    backend_checks::holds_rows("combine_backward", "expert_rows", expert_rows, plan.rows(), H);
    backend_checks::holds_rows("combine_backward", "d_rows", d_rows, plan.rows(), H);
    backend_checks::one_per_slot("combine_backward", "weights", Index(weights.size()), plan.slots());
    dweights.resize(plan.slots());
    for_rows(dy.rows, H, [&](Index t) {
      for (Index j = 0; j < k; ++j) {
        const Index s = t * k + j, r = plan.row[s];
        if (r < 0) {
          dweights[s] = S(0);
          continue;
        }
        const S w = weights[s];
        const S* g = dy.row(t);
        S* out = d_rows.row(r);
        for (Index c = 0; c < H; ++c) out[c] = w * g[c];
        dweights[s] = dot(g, expert_rows.row(r), H);
      }
    });
  }
  // dx[t] = sum_j d_rows[row(t,j)] (j ascending; 0 if every slot was dropped)
  void sum_rows_to_tokens(ConstMatrixView<S> d_rows, const Plan& plan, MatrixView<S> dx) const {
    check_gather_sum("sum_rows_to_tokens", "d_rows", d_rows, plan, "dx", dx);
    gather_sum(d_rows, plan, nullptr, dx);
  }

  // dlogits = d(routing weights)/d(logits)^T dweights + gradient of the auxiliary losses.
  void route_backward(ConstMatrixView<S> logits, const Plan& plan, const LayerConfig& config,
                      const Vector<S>& dweights, std::span<const std::uint8_t> mask, MatrixView<S> dlogits) const {
    backend_checks::plan_matches("route_backward", plan.experts, plan.top_k, config);
    backend_checks::shape_is("route_backward", "logits", logits, plan.tokens, plan.experts, "the plan's [T, N]");
    check_same_shape("route_backward", "dlogits", dlogits, "logits", logits);
    backend_checks::one_per_slot("route_backward", "dweights", Index(dweights.size()), plan.slots());
    fill(dlogits, S(0));
    parallel_chunks(threads_, logits.rows, kTokenChunk, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t)
        route_token_backward(logits, t, config.top_k, config.weights, plan, dweights.data(), dlogits);
    });
    aux_loss_backward(logits, plan, config.aux, mask, dlogits);
  }
  AuxLosses aux_loss(ConstMatrixView<S> logits, const Plan& plan, const LayerConfig& config,
                     std::span<const std::uint8_t> mask) const {
    return aux_loss_forward(logits, plan, config.aux, mask);
  }

  static std::span<const Index> expert_offsets(const Plan& plan) { return plan.expert_offsets; }
  static void accumulate_stats(const Plan& plan, ConstMatrixView<S> logits, std::span<const std::uint8_t> mask,
                               RoutingStats& stats) {
    stats.accumulate(plan, mask);
    stats.accumulate_logits(logits, mask);
  }

 private:
  static constexpr Index kTokenChunk = 256;

  // One product per expert e: out's rows [offsets[e], offsets[e+1]) = in's rows W_e^T (+ b_e),
  // in's rows being that block of in, or (gather) in.row(gather[r] / divisor) for each r of it.
  static std::vector<Gemm<S>> expert_products(ConstMatrixView<S> in, std::span<const Index> offsets,
                                              const std::int32_t* gather, Index divisor, ConstMatrixView<S> weight,
                                              const S* bias, MatrixView<S> out) {
    const Index O = out.cols;
    std::vector<Gemm<S>> work;
    for (Index e = 0; e + 1 < Index(offsets.size()); ++e) {
      const Index begin = offsets[e], rows = offsets[e + 1] - begin;
      Gemm<S> g{out.row_block(begin, rows), gather ? in : in.row_block(begin, rows), Op::none,
                weight.row_block(e * O, O), Op::transpose, false, bias ? bias + e * O : nullptr};
      if (gather) g.a_rows = gather + begin, g.a_rows_divisor = std::int32_t(divisor);
      work.push_back(g);
    }
    return work;
  }

  // Activations work on row segments of at most kSegment columns, so temporaries live on the stack.
  static constexpr Index kSegment = 256;
  using Segment = Eigen::Array<S, Eigen::Dynamic, 1, 0, kSegment, 1>;

  static auto array_map(S* p, Index n) { return Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>(p, n); }
  static auto array_map(const S* p, Index n) { return Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>(p, n); }

  // body(r) for every row, in tasks of rows_per_task(cols) rows.
  template <class Body>
  void for_rows(Index rows, Index cols, Body&& body) const {
    parallel_chunks(threads_, rows, rows_per_task(cols), [&](Index begin, Index end) {
      for (Index r = begin; r < end; ++r) body(r);
    });
  }

  // body(r, c, n) for columns [c, c + n) of every row, segments of kSegment.
  template <class Body>
  void for_row_segments(Index rows, Index cols, Body&& body) const {
    for_rows(rows, cols, [&](Index r) {
      for (Index c = 0; c < cols; c += kSegment) body(r, c, std::min(kSegment, cols - c));
    });
  }

  // gather_sum's operands: out [T, H] from rows [>= R, H].
  static void check_gather_sum(const char* primitive, const char* rows_name, ConstMatrixView<S> rows, const Plan& plan,
                               const char* out_name, MatrixView<S> out) {
    backend_checks::shape_is(primitive, out_name, out, plan.tokens, rows.cols, "the plan's tokens");
    backend_checks::holds_rows(primitive, rows_name, rows, plan.rows(), rows.cols);
  }
  // out[t] = sum_j w[t,j] * rows[row(t,j)] in ascending j (w = 1 when weights is null): each
  // token gathers its own rows, so there is no racy scatter and the sum order is fixed.
  void gather_sum(ConstMatrixView<S> rows, const Plan& plan, const S* weights, MatrixView<S> out) const {
    const Index k = plan.top_k, H = out.cols;
    for_rows(out.rows, H, [&](Index t) {
      S* o = out.row(t);
      std::fill(o, o + H, S(0));
      for (Index j = 0; j < k; ++j) {
        const Index r = plan.row[t * k + j];
        if (r < 0) continue;
        const S* in = rows.row(r);
        if (weights) {
          const S w = weights[t * k + j];
          for (Index c = 0; c < H; ++c) o[c] += w * in[c];
        } else {
          for (Index c = 0; c < H; ++c) o[c] += in[c];
        }
      }
    });
  }

  // A dot product in a fixed order (8 interleaved partial sums), vectorisable and deterministic.
  static S dot(const S* a, const S* b, Index n) {
    S partial[8] = {};
    Index i = 0;
    for (; i + 8 <= n; i += 8)
      for (Index l = 0; l < 8; ++l) partial[l] += a[i + l] * b[i + l];
    for (; i < n; ++i) partial[0] += a[i] * b[i];
    return ((partial[0] + partial[1]) + (partial[2] + partial[3])) + ((partial[4] + partial[5]) + (partial[6] + partial[7]));
  }

  int threads_ = 1;
  mutable Matrix swiglu_workspace_;  // routed_swiglu_forward's [R, 2F]
};

// fp32, the default. BasicBackend<double> serves gradient checks.
using Backend = BasicBackend<float>;
using Backend64 = BasicBackend<double>;

}  // namespace moe::cpu
