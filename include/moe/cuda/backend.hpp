// moe/cuda/backend.hpp: the CUDA backend, moe::cuda::BasicBackend<Scalar, Device>, every primitive
// of the moe::Backend concept written once against a Device (moe/cuda/device.hpp):
//   * CudaDevice (moe/cuda/cuda_device.cuh, nvcc): the GPU. Aliases in moe/cuda.cuh.
//   * EmulatedDevice (moe/cuda/emulated_device.hpp, any compiler): the same code on the host, so
//     the tests run every body of this file without a GPU.
// Its pieces with a header of their own: routing and dispatch (moe/cuda/dispatch.hpp), the
// products on row-major views (moe/cuda/products.hpp), the bias gradients' column sums
// (moe/cuda/column_sums.hpp); the transformer pieces (moe/cuda/nn/) use the last two as well.
//
// Data layout and semantics are the CPU backend's (moe/cpu/backend.hpp, moe/routing.hpp):
// row-major matrices, stacked expert weights, the same routing contract, run by the same
// MOE_HOST_DEVICE functions per token. Scalar is float or moe::bfloat16 (storage; arithmetic in
// float, GEMMs accumulate in fp32); double is accepted for checks.
//
// Determinism: nothing adds floating-point values with atomics. Each output element is one
// thread's fixed-order sum (combine gathers each token's k rows in slot order; reductions go
// through per-chunk partials summed in chunk order), and the statistics' counts use integer
// atomics, whose result does not depend on order (dispatch needs none). Same inputs, same bits,
// run to run.
//
// Host synchronisation: the per-expert GEMMs need their row counts on the host. route() starts the
// copy of the N+1 expert offsets, and the first read of them (B::expert_offsets, after the layer has
// queued the gather) waits for it: the one sync of a forward's computation. Statistics and
// the auxiliary losses are computed on the device and only their results come back:
//   * accumulate_stats (when collected) downloads N+4 counters and each expert's logit moments
//     (4N+4 doubles): one sync per forward;
//   * aux_loss (when a loss weight is > 0) downloads the two weighted losses: one sync per forward.
// route_backward's auxiliary gradient needs no sync. The token mask travels host -> device (an
// upload, ordered on the stream) wherever it is used. Neither logits nor plans are copied to the
// host (detail::to_host does that for the tests).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "moe/activations.hpp"
#include "moe/aux_loss.hpp"
#include "moe/backend_checks.hpp"
#include "moe/bfloat16.hpp"
#include "moe/config.hpp"
#include "moe/cuda/buffer.hpp"
#include "moe/cuda/column_sums.hpp"
#include "moe/cuda/device.hpp"
#include "moe/cuda/device_operands.hpp"
#include "moe/cuda/dispatch.hpp"
#include "moe/cuda/grouped_gemm.hpp"
#include "moe/cuda/multi_tensor.hpp"
#include "moe/cuda/pack.hpp"
#include "moe/cuda/products.hpp"
#include "moe/cuda/row_packs.hpp"
#include "moe/random.hpp"
#include "moe/routing.hpp"
#include "moe/stats.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda {

// The routing decisions of one forward, in device memory (moe::RoutingPlan's fields, same
// meaning), plus the host copy of the expert offsets and the dispatch workspace.
template <class D>
struct DevicePlan {
  Index tokens = 0, experts = 0, top_k = 0;
  Index capacity = 0;
  DeviceArray<std::int32_t, D> expert;       // [T*k] chosen expert of each slot
  DeviceArray<std::int32_t, D> row;          // [T*k] row in the expert-sorted buffer, -1 if dropped
  DeviceArray<std::int32_t, D> slot_of_row;  // [R]   which slot fills each row
  DeviceArray<std::uint8_t, D> row_status;   // [T]   RowStatus bits
  DeviceArray<std::int64_t, D> chosen_count; // [N]   slots that chose e, dropped ones included
  DeviceArray<Index, D> offsets;             // [N+1] on the device (the host's: host_offsets())
  // Dispatch workspace (detail::dispatch_by_counts): each slot's expert as one byte in
  // choice-major order, and per tile of that order the slots choosing each expert.
  DeviceArray<std::uint8_t, D> choice;       // [tiles * tile size] expert of slot t*k + j at j*T + t
  DeviceArray<std::int32_t, D> tile_count;   // [N * tiles] expert-major, zero between routes (below)
  // Statistics and auxiliary-loss workspace, written through the const plan of a finished
  // forward (hence mutable): the uploaded token mask and integer counters (per-expert choices of
  // counted tokens, then the statistics' tokens, dropped slots, rows with non-finite and without
  // finite logits).
  mutable DeviceArray<std::uint8_t, D> mask;     // [T]   the token mask on the device
  mutable DeviceArray<std::int64_t, D> tally;    // [N+4]
  mutable DeviceArray<LogitMoment, D> moments;   // [chunks * N] each expert's logit moments per chunk of tokens
  mutable DeviceArray<double, D> stats_totals;   // [3N + N + 4] the moments' sums, then the tally: one download
  // The device that routed (statistics run on it): a copy of its handle, not its address, so a plan
  // moved with its layer (a vector of layers growing between forward and backward) still reaches it.
  std::optional<D> device;

  Index slots_count() const { return tokens * top_k; }

  // The host copy of the offsets. route() starts it and returns; the first of these reads waits
  // for it (the forward's one sync point), so what was queued after route() (the gather) keeps
  // the GPU busy while the host waits, and the experts' products queue behind it. A route() told
  // not to copy them (the routed products read them on the device) leaves the copy to this read.
  std::span<const Index> host_offsets() const {
    if (offsets_copy_ == OffsetsCopy::not_started) start_offsets_download();
    finish_offsets();
    return host_offsets_;
  }
  Index rows() const { return host_offsets().empty() ? 0 : host_offsets_.back(); }  // R: the kept slots
  Index dropped_slots() const { return slots_count() - rows(); }
  bool offsets_on_host() const { return offsets_copy_ == OffsetsCopy::on_host; }
  bool offsets_copy_in_flight() const { return offsets_copy_ == OffsetsCopy::in_flight; }

  // route()'s part, on the device that routed: the copy of `offsets` ([experts + 1]) starts.
  void start_offsets_download() const {
    host_offsets_.resize(std::size_t(experts + 1));
    device->start_download(offsets_download_, offsets.data(), host_offsets_.size() * sizeof(Index));
    offsets_copy_ = OffsetsCopy::in_flight;
  }
  // route()'s part when it does not copy them: the host's copy is out of date until a read.
  void mark_offsets_stale() { offsets_copy_ = OffsetsCopy::not_started; }

 private:
  void finish_offsets() const {
    if (offsets_copy_ != OffsetsCopy::in_flight) return;
    device->finish_download(offsets_download_, host_offsets_.data());
    offsets_copy_ = OffsetsCopy::on_host;
  }
  mutable std::vector<Index> host_offsets_;  // [N+1]
  mutable typename D::PendingDownload offsets_download_;
  // The host copy of this routing's offsets: made (on_host), started by route() (in_flight), or
  // left to the first host read (not_started: route() was told the products read them on the device).
  enum class OffsetsCopy { on_host, in_flight, not_started };
  mutable OffsetsCopy offsets_copy_ = OffsetsCopy::on_host;
};

namespace detail {

// The host RoutingPlan of a device plan (statistics and auxiliary losses read it).
template <class D>
RoutingPlan to_host(const DevicePlan<D>& plan) {
  check(plan.device.has_value(), "routing plan: no forward has routed yet");
  RoutingPlan h;
  h.tokens = plan.tokens, h.experts = plan.experts, h.top_k = plan.top_k;
  h.capacity = plan.capacity, h.dropped_slots = plan.dropped_slots();
  const Index slots = plan.slots_count();
  h.expert.resize(slots), h.row.resize(slots), h.row_status.resize(plan.tokens);
  h.slot_of_row.resize(plan.rows()), h.chosen_count.resize(plan.experts);
  const D& d = *plan.device;
  d.download(h.expert.data(), plan.expert.data(), slots * sizeof(std::int32_t));
  d.download(h.row.data(), plan.row.data(), slots * sizeof(std::int32_t));
  d.download(h.row_status.data(), plan.row_status.data(), plan.tokens * sizeof(std::uint8_t));
  d.download(h.slot_of_row.data(), plan.slot_of_row.data(), plan.rows() * sizeof(std::int32_t));
  d.download(h.chosen_count.data(), plan.chosen_count.data(), plan.experts * sizeof(std::int64_t));
  h.expert_offsets.assign(plan.host_offsets().begin(), plan.host_offsets().end());
  return h;
}

// Token t counts toward the statistics and auxiliary losses (mask null: every token counts).
MOE_HOST_DEVICE inline bool is_counted(const std::uint8_t* mask, Index t) { return !mask || mask[t] != 0; }

// The host mask in the plan's device buffer; null for an empty mask (every token counts).
template <class D>
const std::uint8_t* upload_mask(const D& device, const DevicePlan<D>& plan, std::span<const std::uint8_t> mask,
                                Index tokens) {
  check_mask(mask, tokens);
  if (mask.empty()) return nullptr;
  plan.mask.resize(tokens);
  device.upload(plan.mask.data(), mask.data(), mask.size() * sizeof(std::uint8_t));
  return plan.mask.data();
}

// plan.tally[0..N) = router choices of counted tokens per expert (dropped slots included),
// plan.tally[N..N+4) = counted tokens, their dropped slots, their rows with a non-finite logit
// and their rows without a finite one. Integer atomics: the counts do not depend on order.
template <class D>
std::int64_t* tally_choices(const D& device, const DevicePlan<D>& plan, const std::uint8_t* mask) {
  const Index T = plan.tokens, N = plan.experts, k = plan.top_k;
  plan.tally.resize(N + 4);
  std::int64_t* tally = plan.tally.data();
  device.for_each(N + 4, [=] MOE_HOST_DEVICE(Index i) { tally[i] = 0; });
  const std::int32_t* expert = plan.expert.data();
  const std::int32_t* row = plan.row.data();
  const std::uint8_t* status = plan.row_status.data();
  if (T > 0)
    device.for_each(T, [=] MOE_HOST_DEVICE(Index t) {
      if (!is_counted(mask, t)) return;
      std::int64_t dropped = 0;
      for (Index j = 0; j < k; ++j) {
        atomic_add(tally + expert[t * k + j], std::int64_t{1});
        dropped += row[t * k + j] < 0;
      }
      atomic_add(tally + N, std::int64_t{1});
      if (dropped) atomic_add(tally + N + 1, dropped);
      if (status[t] & kRowHasNonFinite) atomic_add(tally + N + 2, std::int64_t{1});
      if (status[t] & kRowNoFiniteLogit) atomic_add(tally + N + 3, std::int64_t{1});
    });
  return tally;
}

// What the statistics bring back from one forward, in one download: each expert's logit moments
// over the counted tokens (mask null: every token), summed as RoutingStats::accumulate_logits sums
// them (a thread per chunk of tokens and expert in token order, then a thread per expert over its
// chunks in order), then the tally of tally_choices as doubles (exact: counts below 2^53).
// Layout [N] x (sum, sum of squares, count), then [N + 4] counts.
template <class D, class S>
const double* stats_totals(const D& device, const DevicePlan<D>& plan, ConstMatrixView<S> logits,
                           const std::uint8_t* mask) {
  const Index T = logits.rows, N = logits.cols, chunks = (T + kLogitMomentChunk - 1) / kLogitMomentChunk;
  const std::int64_t* tally = tally_choices(device, plan, mask);
  plan.moments.resize(chunks * N);
  plan.stats_totals.resize(3 * N + N + 4);
  LogitMoment* partial = plan.moments.data();
  double* totals = plan.stats_totals.data();
  if (chunks > 0)
    for_each_2d(device, chunks, N, [=] MOE_HOST_DEVICE(Index q, Index e) {
      const Index end = (q + 1) * kLogitMomentChunk < T ? (q + 1) * kLogitMomentChunk : T;
      partial[q * N + e] = logit_moment(logits, mask, e, q * kLogitMomentChunk, end);
    });
  device.for_each(N + 4, [=] MOE_HOST_DEVICE(Index i) {
    totals[3 * N + i] = double(tally[i]);
    if (i >= N) return;
    LogitMoment sum;
    fetch_in_batches<8>(0, chunks, [&](Index q) { return partial[q * N + i]; }, [&](const LogitMoment& m) { sum.add(m); });
    totals[3 * i] = sum.sum, totals[3 * i + 1] = sum.sum_squares, totals[3 * i + 2] = sum.count;
  });
  return totals;
}

// logsumexp of one row in double, NaN skipped: moe::detail::logsumexp (moe/aux_loss.hpp) on the
// row's compute-type values, runnable on the device.
template <class S>
MOE_HOST_DEVICE double row_logsumexp(const S* z, Index N) {
  using C = Compute<S>;
  double max_value = -double(INFINITY);
  for (Index e = 0; e < N; ++e) {
    const C v = C(z[e]);
    if (!std::isnan(v) && double(v) > max_value) max_value = double(v);
  }
  if (!std::isfinite(max_value)) return max_value;
  double sum = 0;
  for (Index e = 0; e < N; ++e) {
    const C v = C(z[e]);
    if (!std::isnan(v)) sum += std::exp(double(v) - max_value);
  }
  return max_value + std::log(sum);
}

// The softmax scale of one row over all N logits (what robust_softmax computes), device-callable.
template <class S>
MOE_HOST_DEVICE SoftmaxScale<Compute<S>> row_softmax_scale(const S* z, Index N) {
  using C = Compute<S>;
  return softmax_scale<C>([&](Index e) { return C(z[e]); }, N);
}

// One counted token's auxiliary-loss gradient ADDED into dz [N]: aux_loss_backward's formulas
// (moe/aux_loss.hpp) with f_e = count[e] / choices.
//   load balance (lb_scale = alpha N / T_m > 0): J_softmax(z)^T g with g_e = lb_scale * f_e;
//   z-loss (z_weight = beta > 0): beta * 2 logsumexp(z) / T_m * softmax(z) on the finite logits.
// Nothing for a row whose largest logit is not finite, nor for a non-finite logit.
template <class S>
MOE_HOST_DEVICE void add_aux_gradient_row(const S* z, Index N, const std::int64_t* count, double choices,
                                          double lb_scale, double z_weight, double counted, S* dz) {
  using C = Compute<S>;
  const SoftmaxScale<C> scale = row_softmax_scale(z, N);
  if (!scale.finite()) return;
  if (lb_scale > 0) {
    C dot = 0;
    for (Index e = 0; e < N; ++e) dot += scale.at(C(z[e])) * C(lb_scale * (double(count[e]) / choices));
    for (Index e = 0; e < N; ++e) {
      const C v = C(z[e]);
      if (!std::isfinite(v)) continue;
      const C g = C(lb_scale * (double(count[e]) / choices));
      dz[e] = S(C(dz[e]) + scale.at(v) * (g - dot));
    }
  }
  if (z_weight > 0) {
    const double lse = row_logsumexp(z, N);
    if (!std::isfinite(lse)) return;
    const double factor = z_weight * 2.0 * lse / counted;
    for (Index e = 0; e < N; ++e) {
      const C v = C(z[e]);
      if (std::isfinite(v)) dz[e] = S(C(dz[e]) + C(factor * double(scale.at(v))));
    }
  }
}

}  // namespace detail

template <class S, class D>
class BasicBackend {
  using C = Compute<S>;  // arithmetic type: float for bfloat16
  static constexpr Index kPack = kPackSize<S>;  // elements per 16-byte pack (moe/cuda/pack.hpp)

  // to[c] = f(from[c]) over a row of `packs` 16-byte packs, by a row of work (a warp on the GPU):
  // each lane loads its kUnroll packs before it stores any (a store could alias a later load for
  // all the compiler knows), so a lane keeps kUnroll loads in flight. Row copies of dispatch.
  template <class Row, class F>
  MOE_HOST_DEVICE static void map_row_packs(const Row& work, Index packs, const S* from, S* to, F f) {
    constexpr Index kUnroll = 4;
    const Index groups = (packs + kRowLanes * kUnroll - 1) / (kRowLanes * kUnroll);
    work.for_each(groups * kRowLanes, [&](Index c) {  // c: lane + kRowLanes * group
      const Index first = (c / kRowLanes) * kRowLanes * kUnroll + c % kRowLanes;
      Pack<S> v[kUnroll] = {};
      for (Index u = 0; u < kUnroll; ++u)
        if (first + u * kRowLanes < packs) v[u] = load_pack(from + (first + u * kRowLanes) * kPack);
      for (Index u = 0; u < kUnroll; ++u) {
        if (first + u * kRowLanes >= packs) continue;
        for (Index i = 0; i < kPack; ++i) v[u].v[i] = f(v[u].v[i]);
        store_pack(to + (first + u * kRowLanes) * kPack, v[u]);
      }
    });
  }

 public:
  using Scalar = S;
  using Device = D;
  using Matrix = DeviceMatrix<S, D>;
  template <class T>
  using Vector = DeviceArray<T, D>;
  using Plan = DevicePlan<D>;

  explicit BasicBackend(D device = D{}) : device_(std::move(device)) {}
  BasicBackend(BasicBackend&&) noexcept = default;
  BasicBackend& operator=(BasicBackend&&) noexcept = default;
  const D& device() const { return device_; }
  D& device() { return device_; }

  // The layer's construction asks (MoELayer): this backend's limits on N and k, before any weight
  // is allocated; route() checks them again for its own callers.
  static void check_layer_config(const LayerConfig& config) { check_routing_limits(config.experts, config.top_k); }

  // The layer's operands (MoELayer asks where a backend has this): memory the kernels can read, a
  // host pointer named rather than faulted on (D::check_device_memory; no sync).
  template <class T>
  void check_operand(const char* where, const char* name, MatrixView<T> v) const {
    check_on_device(device_, where, name, v);
  }

  // ---- storage -------------------------------------------------------------------------
  static void resize(Matrix& m, Index rows, Index cols) { m.resize(rows, cols); }
  template <class T>
  static void resize(Vector<T>& v, Index size) { v.resize(size); }

  // copy, add and fill move 16-byte packs where the rows allow (moe/cuda/pack.hpp), single elements otherwise.
  void copy(ConstMatrixView<S> src, MatrixView<S> dst) const {
    check_same_shape("copy", "dst", dst, "src", src);
    if (packable<S>(src.cols, src, dst)) {
      detail::for_each_2d(device_, src.rows, src.cols / kPack, [=] MOE_HOST_DEVICE(Index r, Index q) {
        store_pack(&dst(r, q * kPack), load_pack(&src(r, q * kPack)));
      });
      return;
    }
    detail::for_each_2d(device_, src.rows, src.cols, [=] MOE_HOST_DEVICE(Index r, Index c) { dst(r, c) = src(r, c); });
  }
  // dst += src
  void add(ConstMatrixView<S> src, MatrixView<S> dst) const {
    check_same_shape("add", "dst", dst, "src", src);
    if (packable<S>(src.cols, src, dst)) {
      detail::for_each_2d(device_, src.rows, src.cols / kPack, [=] MOE_HOST_DEVICE(Index r, Index q) {
        const Pack<S> a = load_pack(&src(r, q * kPack));
        Pack<S> sum = load_pack(&dst(r, q * kPack));
        for (Index i = 0; i < kPack; ++i) sum.v[i] = S(C(sum.v[i]) + C(a.v[i]));
        store_pack(&dst(r, q * kPack), sum);
      });
      return;
    }
    detail::for_each_2d(device_, src.rows, src.cols,
                        [=] MOE_HOST_DEVICE(Index r, Index c) { dst(r, c) = S(C(dst(r, c)) + C(src(r, c))); });
  }
  void fill(MatrixView<S> dst, S value) const {
    if (packable<S>(dst.cols, dst)) {
      Pack<S> values;
      for (Index i = 0; i < kPack; ++i) values.v[i] = value;
      detail::for_each_2d(device_, dst.rows, dst.cols / kPack,
                          [=] MOE_HOST_DEVICE(Index r, Index q) { store_pack(&dst(r, q * kPack), values); });
      return;
    }
    detail::for_each_2d(device_, dst.rows, dst.cols, [=] MOE_HOST_DEVICE(Index r, Index c) { dst(r, c) = value; });
  }
  // N(0, std^2) draws; element (r, c) is draw r*cols + c of (seed, stream): the CPU backend's numbers.
  void fill_normal(MatrixView<S> dst, double std_dev, std::uint64_t seed, std::uint64_t stream) const {
    const Index cols = dst.cols;
    detail::for_each_2d(device_, dst.rows, cols, [=] MOE_HOST_DEVICE(Index r, Index c) {
      dst(r, c) = S(std_dev * random::normal(seed, stream, std::uint64_t(r * cols + c)));
    });
  }

  // Copies between host memory and a device matrix (for loading weights and reading results).
  void upload(std::span<const S> host, MatrixView<S> dst) const {
    check(Index(host.size()) == dst.size(), "upload: ", host.size(), " values for a [", dst.rows, ", ", dst.cols,
          "] matrix");
    check(dst.contiguous(), "upload: the destination must be contiguous");
    device_.upload(dst.data, host.data(), host.size() * sizeof(S));
  }
  void download(ConstMatrixView<S> src, std::span<S> host) const {
    check(Index(host.size()) == src.size(), "download: ", host.size(), " values for a [", src.rows, ", ", src.cols,
          "] matrix");
    check(src.contiguous(), "download: the source must be contiguous");
    device_.download(host.data(), src.data, host.size() * sizeof(S));
  }

  // ---- dense linear: out = in W^T (W is [O, I]) ------------------------------------------
  void linear_forward(ConstMatrixView<S> in, ConstMatrixView<S> weight, MatrixView<S> out) const {
    detail::gemm(device_, out, in, BlasOp::none, weight, BlasOp::transpose, false);
  }
  // din += dout W (skipped if din is empty); dweight += dout^T in (skipped if empty)
  void linear_backward(ConstMatrixView<S> in, ConstMatrixView<S> dout, ConstMatrixView<S> weight,
                       MatrixView<S> din, MatrixView<S> dweight) const {
    if (dweight.data) detail::gemm(device_, dweight, dout, BlasOp::transpose, in, BlasOp::none, true);
    if (din.data) detail::gemm(device_, din, dout, BlasOp::none, weight, BlasOp::none, true);
  }

  // ---- grouped linear: each expert's contiguous block of rows through its own weights -------
  // in: [R, I], weight: [N*O, I], bias: [N, O] or null -> out: [R, O]. One GEMM per non-empty
  // expert (the row counts are the host offsets route() fetched), the bias in its epilogue.
  void grouped_linear_forward(ConstMatrixView<S> in, std::span<const Index> offsets, ConstMatrixView<S> weight,
                              const S* bias, MatrixView<S> out) const {
    const Index O = out.cols;
    detail::GemmGroup<D, S> experts(device_);
    for (Index e = 0; e + 1 < Index(offsets.size()); ++e) {
      const Index begin = offsets[e], rows = offsets[e + 1] - begin;
      if (rows == 0) continue;
      const MatrixView<S> block = out.row_block(begin, rows);
      if (bias)
        experts.gemm_epilogue(block, in.row_block(begin, rows), weight.row_block(e * O, O), BlasOp::transpose,
                              Epilogue::bias, bias + e * O);
      else
        experts.gemm(block, in.row_block(begin, rows), BlasOp::none, weight.row_block(e * O, O), BlasOp::transpose,
                     false);
    }
    experts.run();
  }
  // pre = in W_e^T + b_e and act = gelu(pre), per expert in one GEMM (Epilogue::bias_gelu:
  // cuBLASLt's GELU_AUX_BIAS on the GPU). bias: [N, O], required; pre and act: [R, O]. pre empty
  // (null data): not kept (inference; GELU_BIAS, R x O fewer values written), act the same.
  void grouped_linear_gelu_forward(ConstMatrixView<S> in, std::span<const Index> offsets, ConstMatrixView<S> weight,
                                   const S* bias, MatrixView<S> pre, MatrixView<S> act) const {
    const Index O = act.cols;
    check(bias, "grouped_linear_gelu_forward: the bias must not be null");
    const bool keep = pre.data != nullptr;
    if (keep) check_same_shape("grouped_linear_gelu_forward", "pre", pre, "act", act);
    detail::GemmGroup<D, S> experts(device_);
    for (Index e = 0; e + 1 < Index(offsets.size()); ++e) {
      const Index begin = offsets[e], rows = offsets[e + 1] - begin;
      if (rows == 0) continue;
      experts.gemm_epilogue(act.row_block(begin, rows), in.row_block(begin, rows), weight.row_block(e * O, O),
                            BlasOp::transpose, Epilogue::bias_gelu, bias + e * O,
                            keep ? pre.row_block(begin, rows) : MatrixView<S>{});
    }
    experts.run();
  }
  // ---- routed products: the experts' products straight from the routing plan ------------------
  // (ExpertGemm::grouped, moe/cuda/device.hpp.) Whether a product of `outputs` features from
  // `inputs` takes them: the device's setting, its grouped GEMM for S, and tiles that fit.
  bool routed_product_fits(Index outputs, Index inputs) const {
    return device_.expert_gemm() == ExpertGemm::grouped && D::template grouped_gemm_supports<S>() &&
           outputs % kGroupedGemmColumns == 0 && inputs % grouped_gemm_detail::kStageK == 0;
  }
  // Whether the grouped GEMM can gather its rows from x: 16-byte rows (its copies' unit).
  static bool routed_input_fits(ConstMatrixView<S> x) { return rows_copyable(x.data, x.stride); }
  // Whether one launch holds a forward's T*k slots over N experts (its grid's row tiles); past
  // that (about 8.35M slots) the layer takes the per-expert path.
  static bool routed_rows_fit(Index slots, Index experts) { return grouped_gemm_detail::rows_fit(slots, experts); }
  // The layer's combine (combine(rows, plan, weights, y)) folded into the last routed product:
  // GroupedGemm's combine, the same bits with no pass of its own over the T*k rows.
  struct RoutedSum {
    const Vector<S>* weights = nullptr;  // route()'s [T*k]
    MatrixView<S> y;                     // [T, O]
  };
  // Whether it can: every slot kept (no expert can pass its capacity, so every token has its k
  // rows), and y's pairs of columns 4-byte aligned.
  static bool routed_sum_fits(const Plan& plan, MatrixView<S> y) {
    return plan.capacity >= plan.tokens && pairs_storable(y.data, y.stride);
  }
  // out[r] = in_row(r) W_e^T (+ b_e) for the plan's R rows r (expert-sorted, expert e's block),
  // one grouped GEMM (device.grouped_gemm): in_row(r) is in's row r (gathered = false: in is
  // the expert-sorted rows, [>= R, I]) or its token's row (gathered = true: in is the layer's
  // input, [T, I], read through slot_of_row). out has room for every slot, [T*k, O]; rows past
  // R keep what they held. Nothing waits for the host. weight: [N*O, I], bias: [N, O] or null.
  // With sum (routed_sum_fits), also sum->y = the combine of out's rows by sum->weights.
  void routed_linear_forward(ConstMatrixView<S> in, const Plan& plan, bool gathered, ConstMatrixView<S> weight,
                             const S* bias, MatrixView<S> out, const RoutedSum* sum = nullptr) const
    requires std::is_same_v<S, bfloat16>  // the grouped GEMM's operands
  {
    GroupedGemm<S> g = routed_gemm(in, plan, gathered, weight, bias, out, bias ? Epilogue::bias : Epilogue::none);
    if (sum) {
      const Index T = plan.tokens, k = plan.top_k;
      check(sum->weights && sum->weights->size() == T * k, "routed products: the combine needs route()'s ", T * k,
            " weights");
      check(sum->y.rows == T && sum->y.cols == out.cols, "routed products: the combine's y is [", sum->y.rows, ", ",
            sum->y.cols, "], expected [", T, ", ", out.cols, "]");
      check(routed_sum_fits(plan, sum->y), "routed products: the combine needs every slot kept (no capacity) and y's "
                                            "rows 4-byte aligned with an even stride");
      // Arrival counts, zero between launches (the kernel leaves them so): zeroed when they grow.
      const Index counts = T * (out.cols / kGroupedGemmColumns);
      if (arrivals_.size() < counts) {
        arrivals_.resize(counts);
        std::uint32_t* a = arrivals_.data();
        device_.for_each(counts, [=] MOE_HOST_DEVICE(Index i) { a[i] = 0; });
      }
      g.combine = {sum->y.data,           sum->y.stride,     T, k, plan.slot_of_row.data(), plan.row.data(),
                   sum->weights->data(), arrivals_.data()};
    }
    device_.grouped_gemm(g);
  }
  // act = gelu(in_row(r) W_e^T + b_e) as routed_linear_forward, pre (the pre-activation) kept
  // unless empty. bias required.
  void routed_linear_gelu_forward(ConstMatrixView<S> in, const Plan& plan, bool gathered, ConstMatrixView<S> weight,
                                  const S* bias, MatrixView<S> pre, MatrixView<S> act) const
    requires std::is_same_v<S, bfloat16>
  {
    check(bias, "routed_linear_gelu_forward: the bias must not be null");
    GroupedGemm<S> g = routed_gemm(in, plan, gathered, weight, bias, act, Epilogue::bias_gelu);
    if (pre.data) {
      check_same_shape("routed_linear_gelu_forward", "pre", pre, "act", act);
      g.aux = pre.data, g.ldaux = pre.stride;
    }
    device_.grouped_gemm(g);
  }

  // act = silu(gate) * up of in_row(r) [W_gate; W_up]_e^T as routed_linear_forward, one grouped
  // GEMM whose tiles hold each output's gate and up columns (GroupedGemm::swiglu): the same bits as
  // routed_linear_forward into gate_up, then swiglu_forward, without the [*, 2F] matrix or its pass.
  // weight: [N*2F, I] (each expert's gate rows, then its up rows), act: [T*k, F].
  void routed_swiglu_forward(ConstMatrixView<S> in, const Plan& plan, bool gathered, ConstMatrixView<S> weight,
                             MatrixView<S> act) const
    requires std::is_same_v<S, bfloat16>
  {
    device_.grouped_gemm(routed_gemm(in, plan, gathered, weight, nullptr, act, Epilogue::none, true));
  }

  // dweight_e += dout_e^T in_e; dbias_e += column sums of dout_e (if dbias);
  // din = dout_e W_e (if din). din may alias in: the weight gradient is formed first.
  void grouped_linear_backward(ConstMatrixView<S> in, ConstMatrixView<S> dout, std::span<const Index> offsets,
                               ConstMatrixView<S> weight, MatrixView<S> din, MatrixView<S> dweight,
                               S* dbias) const {
    grouped_linear_backward_impl(in, dout, offsets, weight, din, dweight, dbias, nullptr);
  }
  // The same where `in` was gelu(pre): din continues through the GELU, din = (dout_e W_e) *
  // gelu'(pre_e), in the GEMM's epilogue (cuBLASLt's DGELU on the GPU). pre: [R, I]; din may alias in.
  void grouped_linear_backward_through_gelu(ConstMatrixView<S> in, ConstMatrixView<S> dout,
                                            std::span<const Index> offsets, ConstMatrixView<S> weight,
                                            ConstMatrixView<S> pre, MatrixView<S> din, MatrixView<S> dweight,
                                            S* dbias) const {
    check_same_shape("grouped_linear_backward_through_gelu", "pre", pre, "in", in);
    grouped_linear_backward_impl(in, dout, offsets, weight, din, dweight, dbias, &pre);
  }

  // out = every expert's block of weight transposed: weight [E*O, I] -> out [E*I, O],
  // out(e*I + i, o) = weight(e*O + o, i). Where the shapes allow, one index per 16-byte pack of out's
  // rows: its 8 values come from 8 rows of weight at one column, so a warp (32 columns) reads 8 runs
  // of 64 contiguous bytes, and a block's 8 warps (8 packs along o) fill 128 bytes of each out row.
  void transpose_expert_blocks(ConstMatrixView<S> weight, Index experts, MatrixView<S> out) const {
    check(experts >= 1, "transpose_expert_blocks: experts must be >= 1, got ", experts);
    const Index O = weight.rows / experts, I = weight.cols;
    check(weight.rows == experts * O && out.rows == experts * I && out.cols == O,
          "transpose_expert_blocks: weight [", weight.rows, ", ", I, "] of ", experts, " experts into out [", out.rows,
          ", ", out.cols, "]");
    if (O % kPack == 0 && packable<S>(O, out)) {
      const Index packs = O / kPack;
      detail::for_each_2d(device_, experts * packs, I, [=] MOE_HOST_DEVICE(Index r, Index i) {
        const Index e = r / packs, o = (r - e * packs) * kPack;
        Pack<S> x;
        for (Index j = 0; j < kPack; ++j) x.v[j] = weight(e * O + o + j, i);
        store_pack(&out(e * I + i, o), x);
      });
      return;
    }
    detail::for_each_2d(device_, experts * O, I, [=] MOE_HOST_DEVICE(Index r, Index i) {
      const Index e = r / O;
      out(e * I + i, r - e * O) = weight(r, i);
    });
  }

  // ---- activations, element by element ------------------------------------------------------
  // Each takes 16-byte packs of columns where the rows allow (moe/cuda/pack.hpp), single elements
  // otherwise: the same arithmetic per element.
  // in: [R, F] -> out: [R, F]; out may alias in
  void gelu_forward(ConstMatrixView<S> in, MatrixView<S> out) const {
    check_same_shape("gelu_forward", "out", out, "in", in);
    if (packable<S>(in.cols, in, out)) {
      detail::for_each_2d(device_, in.rows, in.cols / kPack, [=] MOE_HOST_DEVICE(Index r, Index q) {
        Pack<S> v = load_pack(&in(r, q * kPack));
        for (Index i = 0; i < kPack; ++i) v.v[i] = S(activation::gelu(C(v.v[i])));
        store_pack(&out(r, q * kPack), v);
      });
      return;
    }
    detail::for_each_2d(device_, in.rows, in.cols,
                        [=] MOE_HOST_DEVICE(Index r, Index c) { out(r, c) = S(activation::gelu(C(in(r, c)))); });
  }
  // din = dout * gelu'(in); din may alias dout
  void gelu_backward(ConstMatrixView<S> in, ConstMatrixView<S> dout, MatrixView<S> din) const {
    check_same_shape("gelu_backward", "dout", dout, "in", in);
    check_same_shape("gelu_backward", "din", din, "in", in);
    if (packable<S>(in.cols, in, dout, din)) {
      detail::for_each_2d(device_, in.rows, in.cols / kPack, [=] MOE_HOST_DEVICE(Index r, Index q) {
        const Pack<S> x = load_pack(&in(r, q * kPack));
        Pack<S> d = load_pack(&dout(r, q * kPack));
        for (Index i = 0; i < kPack; ++i) d.v[i] = S(C(d.v[i]) * activation::gelu_grad(C(x.v[i])));
        store_pack(&din(r, q * kPack), d);
      });
      return;
    }
    detail::for_each_2d(device_, in.rows, in.cols, [=] MOE_HOST_DEVICE(Index r, Index c) {
      din(r, c) = S(C(dout(r, c)) * activation::gelu_grad(C(in(r, c))));
    });
  }
  // gate_up: [R, 2F] (gate | up) -> out: [R, F] = silu(gate) * up
  void swiglu_forward(ConstMatrixView<S> gate_up, MatrixView<S> out) const {
    const Index F = out.cols;
    backend_checks::shape_is("swiglu_forward", "gate_up", gate_up, out.rows, 2 * F, "gate | up for out's rows");
    if (packable<S>(F, gate_up, out)) {
      detail::for_each_2d(device_, out.rows, F / kPack, [=] MOE_HOST_DEVICE(Index r, Index q) {
        const Pack<S> g = load_pack(&gate_up(r, q * kPack)), u = load_pack(&gate_up(r, F + q * kPack));
        Pack<S> y;
        for (Index i = 0; i < kPack; ++i) y.v[i] = S(activation::silu(C(g.v[i])) * C(u.v[i]));
        store_pack(&out(r, q * kPack), y);
      });
      return;
    }
    detail::for_each_2d(device_, out.rows, F, [=] MOE_HOST_DEVICE(Index r, Index c) {
      out(r, c) = S(activation::silu(C(gate_up(r, c))) * C(gate_up(r, F + c)));
    });
  }
  // dgate_up = (dout * up * silu'(gate) | dout * silu(gate)); one thread reads and writes both
  // halves of its columns, so dgate_up may alias gate_up.
  void swiglu_backward(ConstMatrixView<S> gate_up, ConstMatrixView<S> dout, MatrixView<S> dgate_up) const {
    const Index F = dout.cols;
    backend_checks::shape_is("swiglu_backward", "gate_up", gate_up, dout.rows, 2 * F, "gate | up for dout's rows");
    check_same_shape("swiglu_backward", "dgate_up", dgate_up, "gate_up", gate_up);
    if (packable<S>(F, gate_up, dout, dgate_up)) {
      detail::for_each_2d(device_, dout.rows, F / kPack, [=] MOE_HOST_DEVICE(Index r, Index q) {
        const Index c = q * kPack;
        const Pack<S> g = load_pack(&gate_up(r, c)), u = load_pack(&gate_up(r, F + c)), d = load_pack(&dout(r, c));
        Pack<S> dg, du;
        for (Index i = 0; i < kPack; ++i) {
          dg.v[i] = S(C(d.v[i]) * C(u.v[i]) * activation::silu_grad(C(g.v[i])));
          du.v[i] = S(C(d.v[i]) * activation::silu(C(g.v[i])));
        }
        store_pack(&dgate_up(r, c), dg);
        store_pack(&dgate_up(r, F + c), du);
      });
      return;
    }
    detail::for_each_2d(device_, dout.rows, F, [=] MOE_HOST_DEVICE(Index r, Index c) {
      const C g = C(gate_up(r, c)), u = C(gate_up(r, F + c)), d = C(dout(r, c));
      dgate_up(r, c) = S(d * u * activation::silu_grad(g));
      dgate_up(r, F + c) = S(d * activation::silu(g));
    });
  }

  // ---- routing ---------------------------------------------------------------------------
  // logits: [T, N] (a strided view is read in place: SelfRoute's slice of x is never copied)
  // -> plan, weights [T*k]. Selection and weights: moe::route_one_token, one thread per token.
  // Dispatch: detail::dispatch_by_counts, a counting sort whose counts route_tokens makes; two
  // launches more. Ends by starting the
  // offsets' copy to the host, unless copy_offsets is false (the routed products read them on the
  // device; a later host read copies them then).
  void route(ConstMatrixView<S> logits, const LayerConfig& config, Plan& plan, Vector<S>& weights,
             bool copy_offsets = true) const {
    const Index T = logits.rows, N = logits.cols, k = config.top_k;
    check_top_k(k, N);
    check_routing_limits(N, k);
    check(T * k < (Index{1} << 31), "T * k = ", T * k, " slots overflow the 32-bit row indices");
    plan.tokens = T, plan.experts = N, plan.top_k = k, plan.device = device_;
    plan.capacity = expert_capacity(T, k, N, config.capacity_factor);
    const Index slots = T * k;
    const detail::DispatchTiles tiles = detail::dispatch_tiles(slots);
    plan.expert.resize(slots), plan.row.resize(slots), plan.slot_of_row.resize(slots);
    plan.row_status.resize(T), plan.chosen_count.resize(N), plan.offsets.resize(N + 1);
    plan.choice.resize(tiles.count * tiles.size);
    // The counts are zero between routes (the scatter leaves them so); a new allocation is zeroed here.
    const bool counts_allocated = plan.tile_count.capacity() < N * tiles.count;
    plan.tile_count.resize(N * tiles.count);
    if (counts_allocated) {
      std::int32_t* counts = plan.tile_count.data();
      device_.for_each(plan.tile_count.capacity(), [=] MOE_HOST_DEVICE(Index i) { counts[i] = 0; });
    }
    weights.resize(slots);

    if (T > 0)
      detail::route_tokens(device_, logits, k, config.weights, plan.expert.data(), plan.row_status.data(),
                           weights.data(), plan.choice.data(), tiles, plan.tile_count.data());
    detail::dispatch_by_counts(device_, plan.choice.data(), T, k, N, plan.capacity, tiles, plan.tile_count.data(),
                               plan.chosen_count.data(), plan.offsets.data(), plan.row.data(),
                               plan.slot_of_row.data());
    if (copy_offsets)
      plan.start_offsets_download();  // read by B::expert_offsets(plan): the forward's sync point
    else
      plan.mark_offsets_stale();
  }

  // rows[r] = x[token of row r] for the R kept rows: the expert-sorted copy of the input.
  // x: [T, H] -> rows: [>= R, H], rows past R untouched. R is read on the device, so the gather
  // queues before the host has the offsets; rows then needs every slot's row (T*k).
  void gather_rows(ConstMatrixView<S> x, const Plan& plan, MatrixView<S> rows) const {
    backend_checks::shape_is("gather_rows", "x", x, plan.tokens, x.cols, "the plan's tokens");
    check_plan_rows("gather_rows", "rows", rows, plan, x.cols);
    const std::int32_t* slot_of_row = plan.slot_of_row.data();
    const Index* kept = plan.offsets.data() + plan.experts;  // R
    const Index k = plan.top_k;
    if (packable<S>(rows.cols, x, rows)) {
      const Index packs = rows.cols / kPack;
      device_.for_each_row(rows.rows, [=] MOE_HOST_DEVICE(Index r, const typename D::Row& row) {
        if (r < *kept) map_row_packs(row, packs, x.row(slot_of_row[r] / k), rows.row(r), [](S v) { return v; });
      });
      return;
    }
    detail::for_each_2d(device_, rows.rows, rows.cols, [=] MOE_HOST_DEVICE(Index r, Index c) {
      if (r < *kept) rows(r, c) = x(slot_of_row[r] / k, c);
    });
  }

  // y[t] = sum_j weight[t,j] * expert_rows[row(t,j)], j ascending, dropped slots skipped.
  void combine(ConstMatrixView<S> expert_rows, const Plan& plan, const Vector<S>& weights, MatrixView<S> y) const {
    backend_checks::one_per_slot("combine", "weights", weights.size(), plan.slots_count());
    check_gather_sum("combine", "expert_rows", expert_rows, plan, "y", y);
    gather_sum(expert_rows, plan, weights.data(), y);
  }
  // d_rows[row(t,j)] = weight[t,j] * dy[t];  dweights[t,j] = dy[t] . expert_rows[row(t,j)] (0 if dropped)
  void combine_backward(ConstMatrixView<S> dy, ConstMatrixView<S> expert_rows, const Plan& plan,
                        const Vector<S>& weights, MatrixView<S> d_rows, Vector<S>& dweights) const {
    const Index k = plan.top_k, H = dy.cols, slots = plan.slots_count(), R = plan.rows();
    backend_checks::shape_is("combine_backward", "dy", dy, plan.tokens, H, "the plan's tokens");
    backend_checks::holds_rows("combine_backward", "expert_rows", expert_rows, R, H);
    backend_checks::holds_rows("combine_backward", "d_rows", d_rows, R, H);
    backend_checks::one_per_slot("combine_backward", "weights", weights.size(), slots);
    const std::int32_t* row = plan.row.data();
    const std::int32_t* slot_of_row = plan.slot_of_row.data();
    const S* w = weights.data();
    // In row order, each row fetching its slot's dy: the stores run along d_rows (by slot, they
    // landed on rows in a random order: 3x gather_rows' time on an H200).
    if (packable<S>(H, dy, d_rows)) {
      device_.for_each_row(R, [=] MOE_HOST_DEVICE(Index r, const typename D::Row& work) {
        const Index s = slot_of_row[r];
        const C weight = C(w[s]);
        map_row_packs(work, H / kPack, dy.row(s / k), d_rows.row(r), [=](S g) { return S(weight * C(g)); });
      });
    } else {
      detail::for_each_2d(device_, R, H, [=] MOE_HOST_DEVICE(Index r, Index c) {
        const Index s = slot_of_row[r];
        d_rows(r, c) = S(C(w[s]) * C(dy(s / k, c)));
      });
    }
    // dweights: per-slot dot products over H, one row of work each (a warp on the GPU: its lanes
    // read neighbouring 16-byte packs, moe/cuda/row_packs.hpp). One thread per 64-column chunk
    // read its own stretch, so a warp's loads touched 32 lines at once: on an H200 that took
    // ~250 us of a 2.4 ms forward + backward at T = 16384.
    dweights.resize(slots);
    if (slots > 0) {
      if (row_packs_fit(dy.data, dy.stride) && row_packs_fit(expert_rows.data, expert_rows.stride))
        slot_dots<true>(dy, expert_rows, row, k, dweights.data(), slots);
      else
        slot_dots<false>(dy, expert_rows, row, k, dweights.data(), slots);
    }
  }
  // dx[t] = sum_j d_rows[row(t,j)] (j ascending; 0 if every slot was dropped)
  void sum_rows_to_tokens(ConstMatrixView<S> d_rows, const Plan& plan, MatrixView<S> dx) const {
    check_gather_sum("sum_rows_to_tokens", "d_rows", d_rows, plan, "dx", dx);
    gather_sum(d_rows, plan, nullptr, dx);
  }

  // dlogits = d(routing weights)/d(logits)^T dweights (+ the auxiliary losses' gradient).
  void route_backward(ConstMatrixView<S> logits, const Plan& plan, const LayerConfig& config,
                      const Vector<S>& dweights, std::span<const std::uint8_t> mask, MatrixView<S> dlogits) const {
    const Index N = logits.cols, k = config.top_k;
    backend_checks::plan_matches("route_backward", plan.experts, plan.top_k, config);
    backend_checks::shape_is("route_backward", "logits", logits, plan.tokens, plan.experts, "the plan's [T, N]");
    check_same_shape("route_backward", "dlogits", dlogits, "logits", logits);
    backend_checks::one_per_slot("route_backward", "dweights", dweights.size(), plan.slots_count());
    const RoutingWeights mode = config.weights;
    const std::int32_t* expert = plan.expert.data();
    const S* dw = dweights.data();
    if (logits.rows > 0)
      device_.for_each(logits.rows, [=] MOE_HOST_DEVICE(Index t) {
        S* dz = dlogits.row(t);
        for (Index e = 0; e < N; ++e) dz[e] = S(0);  // the row's zeros, then its gradient added (no fill launch)
        route_one_token_backward(logits.row(t), N, k, mode, expert + t * k, dw + t * k, dz);
      });
    if (config.aux.load_balance > 0 || config.aux.z_loss > 0) add_aux_gradient(logits, plan, config, mask, dlogits);
  }
  // The auxiliary losses (off by default, as in the paper), aux_loss_forward's values
  // (moe/aux_loss.hpp) computed on the device; only the two results come back (a sync).
  AuxLosses aux_loss(ConstMatrixView<S> logits, const Plan& plan, const LayerConfig& config,
                     std::span<const std::uint8_t> mask) const {
    const Index T = logits.rows, N = logits.cols, k = plan.top_k;
    check_mask(mask, T);
    const double alpha = config.aux.load_balance, beta = config.aux.z_loss;
    const Index counted = moe::detail::counted_tokens(mask, T);
    if (counted == 0 || (alpha <= 0 && beta <= 0)) return {};
    const std::uint8_t* m = detail::upload_mask(device_, plan, mask, T);
    const std::int64_t* count = detail::tally_choices(device_, plan, m);

    // Per token: its softmax scale (for P) and logsumexp^2 (0 when skipped or not finite).
    aux_scale_.resize(T);
    aux_lse2_.resize(T);
    SoftmaxScale<C>* scale = aux_scale_.data();
    double* lse2 = aux_lse2_.data();
    device_.for_each(T, [=] MOE_HOST_DEVICE(Index t) {
      scale[t] = detail::row_softmax_scale(logits.row(t), N);
      double value = 0;
      if (beta > 0 && detail::is_counted(m, t)) {
        const double lse = detail::row_logsumexp(logits.row(t), N);
        if (std::isfinite(lse)) value = lse * lse;
      }
      lse2[t] = value;
    });

    // Column sums over counted tokens in double, in token chunks whose partials add in chunk
    // order: columns 0..N-1 sum softmax(z_t)_e (T_m P_e), column N sums logsumexp^2.
    const Index cols = N + 1, chunks = (T + kChunk - 1) / kChunk;
    aux_sums_.resize(chunks * cols + cols + 2);
    double* partial = aux_sums_.data();
    double* column = partial + chunks * cols;
    double* result = column + cols;
    detail::for_each_2d(device_, chunks, cols, [=] MOE_HOST_DEVICE(Index q, Index c) {
      const Index end = (q + 1) * kChunk < T ? (q + 1) * kChunk : T;
      double sum = 0;
      for (Index t = q * kChunk; t < end; ++t)
        if (detail::is_counted(m, t)) sum += c < N ? double(scale[t].at(C(logits(t, c)))) : lse2[t];
      partial[q * cols + c] = sum;
    });
    device_.for_each(cols, [=] MOE_HOST_DEVICE(Index c) {
      column[c] = sum_in_order<double>(chunks, [&](Index q) { return partial[q * cols + c]; });
    });
    const double tm = double(counted), choices = double(counted * k);
    device_.for_each(1, [=] MOE_HOST_DEVICE(Index) {
      double sum = 0;
      for (Index e = 0; e < N; ++e) sum += double(count[e]) / choices * column[e] / tm;
      result[0] = alpha > 0 ? alpha * double(N) * sum : 0.0;
      result[1] = beta > 0 ? beta * column[N] / tm : 0.0;
    });
    double host[2];
    device_.download(host, result, sizeof(host));
    AuxLosses out;
    out.load_balance = host[0], out.z_loss = host[1];
    return out;
  }

  static std::span<const Index> expert_offsets(const Plan& plan) { return plan.host_offsets(); }
  // Counts and logit moments on the device; downloads them together (4N+4 doubles, a sync); pause
  // with MoELayer::collect_stats(false). Adds exactly what RoutingStats::accumulate and
  // accumulate_logits add, to the bit (the moments in their chunk order, moe/stats.hpp).
  static void accumulate_stats(const Plan& plan, ConstMatrixView<S> logits, std::span<const std::uint8_t> mask,
                               RoutingStats& stats) {
    check(plan.device.has_value(), "routing plan: no forward has routed yet");
    const Index T = plan.tokens, N = plan.experts;
    check(Index(stats.assignments.size()) == N && Index(stats.logits.size()) == N, "routing statistics hold ",
          stats.assignments.size(), " experts, the plan routes to ", N);
    backend_checks::shape_is("accumulate_stats", "logits", logits, T, N, "the plan's [T, N]");
    const D& device = *plan.device;
    const double* totals = detail::stats_totals(device, plan, logits, detail::upload_mask(device, plan, mask, T));
    std::vector<double> host(std::size_t(3 * N + N + 4));
    device.download(host.data(), totals, host.size() * sizeof(double));
    std::vector<LogitMoment> moments(static_cast<std::size_t>(N));
    for (Index e = 0; e < N; ++e) moments[std::size_t(e)] = {host[3 * e], host[3 * e + 1], host[3 * e + 2]};
    const auto count = [&](Index i) { return std::int64_t(host[std::size_t(3 * N + i)]); };
    for (Index e = 0; e < N; ++e) stats.assignments[e] += count(e);
    stats.tokens += count(N);
    stats.slots += count(N) * plan.top_k;
    stats.dropped_slots += count(N + 1);
    stats.rows_with_nonfinite += count(N + 2);
    stats.rows_without_finite += count(N + 3);
    stats.add_logit_moments(moments);
  }

  // Device bytes of routing state and workspace per token: per slot 3 int32 (expert, row,
  // slot_of_row), its choice byte, the weight and its gradient; the status byte; and dispatch's
  // N counts per tile of at least 128 slots, at most k * N / 32 bytes a token (rounded up).
  static Index routing_bytes_per_token(Index top_k, Index experts) {
    return top_k * (3 * Index(sizeof(std::int32_t)) + 1 + 2 * Index(sizeof(S))) + 1 +
           (top_k * experts * Index(sizeof(std::int32_t)) + 127) / 128;
  }

  // ---- implementation pieces: public only because nvcc's device lambdas may not be defined in
  // private member functions ------------------------------------------------------------------

  // dw[s] = dy[token of s] . expert_rows[row(s)] over H (0 for a dropped slot), in Compute<S>.
  // Lane l of the row work takes the 16-byte packs l, l + 32, ... and adds each pack's products
  // in order; Packed only decides whether a pack comes in one load or element by element, so both
  // give the same bits (tests/cuda/backend_cases.hpp's check_packs_change_no_bits).
  template <bool Packed>
  void slot_dots(ConstMatrixView<S> dy, ConstMatrixView<S> expert_rows, const std::int32_t* row, Index k, S* dw,
                 Index slots) const {
    const Index H = dy.cols;
    device_.for_each_row(slots, [=] MOE_HOST_DEVICE(Index s, const typename D::Row& lanes) {
      const Index r = row[s];
      if (r < 0) {
        if (lanes.first()) dw[s] = S(0);
        return;
      }
      const S* a = dy.row(s / k);
      const S* b = expert_rows.row(r);
      const C sum = lanes.sum((H + kPack - 1) / kPack, [&](Index q) {
        Pack<S> x, y;
        if (Packed && (q + 1) * kPack <= H) {
          x = load_pack(a + q * kPack), y = load_pack(b + q * kPack);
        } else {  // zeros past H add nothing
          for (Index i = 0, c = q * kPack; i < kPack; ++i, ++c) x.v[i] = c < H ? a[c] : S(0), y.v[i] = c < H ? b[c] : S(0);
        }
        // Explicit fused multiply-adds: left to the compiler, the two instantiations contract
        // differently (seen: one float ulp apart).
        C acc = 0;
        for (Index i = 0; i < kPack; ++i) acc = std::fma(C(x.v[i]), C(y.v[i]), acc);
        return acc;
      });
      if (lanes.first()) dw[s] = S(sum);
    });
  }

  // out[t] = sum_j w[t,j] * rows[row(t,j)] in ascending j (w = 1 when weights is null): each
  // output element is one thread's fixed-order sum, so there is no racy scatter.
  void gather_sum(ConstMatrixView<S> rows, const Plan& plan, const S* weights, MatrixView<S> out) const {
    const Index k = plan.top_k;
    const std::int32_t* row = plan.row.data();
    if (packable<S>(out.cols, rows, out)) {  // the same sums, a pack of columns per thread
      detail::for_each_2d(device_, out.rows, out.cols / kPack, [=] MOE_HOST_DEVICE(Index t, Index q) {
        C sum[kPack] = {};
        for (Index j = 0; j < k; ++j) {
          const Index r = row[t * k + j];
          if (r < 0) continue;
          const Pack<S> v = load_pack(&rows(r, q * kPack));
          for (Index i = 0; i < kPack; ++i)
            sum[i] += weights ? C(weights[t * k + j]) * C(v.v[i]) : C(v.v[i]);
        }
        Pack<S> result;
        for (Index i = 0; i < kPack; ++i) result.v[i] = S(sum[i]);
        store_pack(&out(t, q * kPack), result);
      });
      return;
    }
    detail::for_each_2d(device_, out.rows, out.cols, [=] MOE_HOST_DEVICE(Index t, Index c) {
      C sum = 0;
      for (Index j = 0; j < k; ++j) {
        const Index r = row[t * k + j];
        if (r < 0) continue;
        sum += weights ? C(weights[t * k + j]) * C(rows(r, c)) : C(rows(r, c));
      }
      out(t, c) = S(sum);
    });
  }

  // db_e[c] += sum over the rows of expert e's block of m(r, c), for every expert with rows
  // (detail::add_column_sums: two launches for all of them, partials in partial_).
  void add_grouped_column_sums(ConstMatrixView<S> m, std::span<const Index> offsets, S* db) const {
    std::vector<detail::ColumnSum<S, C>> sums;
    Index partials = 0;
    for (Index e = 0; e + 1 < Index(offsets.size()); ++e) {
      const Index begin = offsets[e], rows = offsets[e + 1] - begin;
      if (rows == 0) continue;
      sums.push_back({m.row_block(begin, rows), db + e * m.cols});
      partials += detail::column_sum_partials(rows, m.cols);
    }
    partial_.resize(partials);
    detail::add_column_sums(device_, std::span(sums), partial_.data());
  }

  // dlogits += the auxiliary losses' gradient (aux_loss_backward, moe/aux_loss.hpp): f from the
  // plan's choices and the mask by integer atomics, then one thread per counted token.
  void add_aux_gradient(ConstMatrixView<S> logits, const Plan& plan, const LayerConfig& config,
                        std::span<const std::uint8_t> mask, MatrixView<S> dlogits) const {
    const Index T = logits.rows, N = logits.cols, k = plan.top_k;
    check_mask(mask, T);
    const Index counted = moe::detail::counted_tokens(mask, T);
    const double alpha = config.aux.load_balance, beta = config.aux.z_loss;
    if (counted == 0 || (alpha <= 0 && beta <= 0)) return;
    const std::uint8_t* m = detail::upload_mask(device_, plan, mask, T);
    const std::int64_t* count = detail::tally_choices(device_, plan, m);
    const double tm = double(counted), choices = double(counted * k);
    const double lb_scale = alpha > 0 ? alpha * double(N) / tm : 0.0, z_weight = beta > 0 ? beta : 0.0;
    device_.for_each(T, [=] MOE_HOST_DEVICE(Index t) {
      if (detail::is_counted(m, t))
        detail::add_aux_gradient_row(logits.row(t), N, count, choices, lb_scale, z_weight, tm, dlogits.row(t));
    });
  }

 private:
  static void check_routing_limits(Index N, Index k) {
    check(N <= kMaxExperts, "the CUDA backend routes at most ", kMaxExperts, " experts, got N = ", N);
    check(k <= kMaxTopK, "the CUDA backend selects at most ", kMaxTopK, " experts per token, got top_k = ", k);
  }
  // gather_sum's operands: out [T, H] from rows [>= R, H] (check_plan_rows).
  static void check_gather_sum(const char* primitive, const char* rows_name, ConstMatrixView<S> rows, const Plan& plan,
                               const char* out_name, MatrixView<S> out) {
    backend_checks::shape_is(primitive, out_name, out, plan.tokens, rows.cols, "the plan's tokens");
    check_plan_rows(primitive, rows_name, rows, plan, rows.cols);
  }
  // v holds the plan's R expert rows, `cols` wide; until the host has the offsets (reading R would
  // wait for their copy), every slot's row (T*k): gather_rows and gather_sum's operands.
  template <class T>
  static void check_plan_rows(const char* primitive, const char* name, MatrixView<T> v, const Plan& plan, Index cols) {
    const bool known = plan.offsets_on_host();
    backend_checks::holds_rows(primitive, name, v, known ? plan.rows() : plan.slots_count(), cols,
                               known ? "" : " (T*k rows until the host has the offsets)");
  }
  // The grouped product of routed_*: the plan's device offsets and, for gathered input, its
  // slot_of_row over top_k (a row's slot -> its token). swiglu: each expert has 2 O weight rows.
  GroupedGemm<S> routed_gemm(ConstMatrixView<S> in, const Plan& plan, bool gathered, ConstMatrixView<S> weight,
                             const S* bias, MatrixView<S> out, Epilogue epilogue, bool swiglu = false) const {
    const Index N = plan.experts, O = out.cols, I = in.cols, slots = plan.slots_count();
    const Index rows_per_expert = swiglu ? 2 * O : O;
    check(weight.rows == N * rows_per_expert && weight.cols == I, "routed products: weight is [", weight.rows, ", ",
          weight.cols, "], expected [", N * rows_per_expert, ", ", I, "]");
    check(out.rows >= slots, "routed products: out has ", out.rows, " rows, the plan's slots need ", slots);
    check(gathered ? in.rows == plan.tokens : in.rows >= slots, "routed products: in has ", in.rows, " rows, expected ",
          gathered ? plan.tokens : slots, gathered ? " (the tokens)" : " (one per slot)");
    check(weight.stride == I, "routed products: the weights must be contiguous rows");
    GroupedGemm<S> g;
    g.a = in.data, g.lda = in.stride;
    g.gather = gathered ? plan.slot_of_row.data() : nullptr, g.gather_divisor = std::int32_t(plan.top_k);
    g.offsets = plan.offsets.data(), g.groups = N, g.max_rows = slots;
    g.w = weight.data, g.w_stride = rows_per_expert * I, g.bias = bias, g.bias_stride = O;
    g.out = out.data, g.ldc = out.stride, g.n = O, g.k = I, g.epilogue = epilogue, g.swiglu = swiglu;
    return g;
  }

  // gelu_pre null: the plain input gradient; else through the GELU at *gelu_pre.
  void grouped_linear_backward_impl(ConstMatrixView<S> in, ConstMatrixView<S> dout, std::span<const Index> offsets,
                                    ConstMatrixView<S> weight, MatrixView<S> din, MatrixView<S> dweight, S* dbias,
                                    const ConstMatrixView<S>* gelu_pre) const {
    const Index O = dout.cols, experts = Index(offsets.size()) - 1;
    // The weight gradients first, as a group: din may alias in, which they read.
    detail::GemmGroup<D, S> group(device_);
    for (Index e = 0; e < experts; ++e) {
      const Index begin = offsets[e], rows = offsets[e + 1] - begin;
      if (rows == 0) continue;
      group.gemm(dweight.row_block(e * O, O), dout.row_block(begin, rows), BlasOp::transpose, in.row_block(begin, rows),
                 BlasOp::none, true);
    }
    group.run();
    if (dbias) add_grouped_column_sums(dout, offsets, dbias);
    if (!din.data) return;
    // Through the GELU with DgeluWeights::transposed: the products read W_e's transposes (TN).
    const Index I = weight.cols;
    const bool transposed = gelu_pre && device_.dgelu_weights() == DgeluWeights::transposed;
    if (transposed) {
      resize(weights_t_, experts * I, O);
      transpose_expert_blocks(weight, experts, weights_t_);
    }
    const ConstMatrixView<S> weights_t = transposed ? MatrixView<S>(weights_t_) : MatrixView<S>{};
    for (Index e = 0; e < experts; ++e) {
      const Index begin = offsets[e], rows = offsets[e + 1] - begin;
      if (rows == 0) continue;
      if (gelu_pre) {
        const ConstMatrixView<S> pre = gelu_pre->row_block(begin, rows);
        // The epilogue only reads aux for dgelu; BlasGemm holds one mutable aux pointer for both uses.
        const MatrixView<S> aux(const_cast<S*>(pre.data), pre.rows, pre.cols, pre.stride);
        const ConstMatrixView<S> w = transposed ? weights_t.row_block(e * I, I) : weight.row_block(e * O, O);
        group.gemm_epilogue(din.row_block(begin, rows), dout.row_block(begin, rows), w,
                            transposed ? BlasOp::transpose : BlasOp::none, Epilogue::dgelu,
                            static_cast<const S*>(nullptr), aux);
      } else {
        group.gemm(din.row_block(begin, rows), dout.row_block(begin, rows), BlasOp::none, weight.row_block(e * O, O),
                   BlasOp::none, false);
      }
    }
    group.run();
  }

  static constexpr Index kChunk = 64;  // tokens per partial of the auxiliary losses' column sums

  D device_;
  mutable Vector<C> partial_;                    // reduction partials
  mutable Vector<std::uint32_t> arrivals_;       // routed_linear_forward's combine: [T * O / 128], zeros
  mutable Matrix weights_t_;                     // [E*I, O] the experts' transposed weights (DgeluWeights::transposed)
  mutable Vector<SoftmaxScale<C>> aux_scale_;    // [T] auxiliary losses: each token's softmax scale
  mutable Vector<double> aux_lse2_;              // [T] its logsumexp^2
  mutable Vector<double> aux_sums_;              // chunk partials, column sums, the two results
};

}  // namespace moe::cuda
