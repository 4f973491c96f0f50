// moe/cuda/nn/cross_entropy.hpp: softmax and cross-entropy fused over logits on a device (the
// GPU twin of moe/nn/cross_entropy.hpp: same arguments, same semantics), forward then backward.
// A target of -1 marks a row to ignore (PyTorch's ignore_index = -1). Non-finite logits give what
// the CPU gives: a NaN or +inf in a row makes its loss and gradients NaN; a -inf logit has
// probability 0 (a -inf target: loss +inf).
//
// Targets arrive as a host span, as on the CPU: they are checked on the host (same errors as
// moe::nn's check_cross_entropy) and uploaded to a device buffer (an upload, ordered on the
// stream). Arithmetic runs in Compute<S> (float for bf16). The forward's mean loss comes back to
// the host: that download is this file's one sync point.
//
// The small device buffers (targets, row statistics, partials) live in the device's scratch, so
// the backward needs no sync.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>

#include "moe/config.hpp"
#include "moe/cuda/buffer.hpp"
#include "moe/cuda/device.hpp"
#include "moe/cuda/device_operands.hpp"
#include "moe/cuda/pack.hpp"
#include "moe/cuda/row_packs.hpp"
#include "moe/nn/checks.hpp"
#include "moe/host_device.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda::nn {

using moe::nn::kIgnoreTarget;  // moe/nn/checks.hpp

namespace cross_entropy_detail {

// Rows per partial sum of the mean loss.
inline constexpr Index kLossChunk = 64;

// The checked targets uploaded into `slot` of the device's scratch (after the caller laid out
// every array it needs there).
template <class D>
std::int32_t* upload_targets(const D& device, std::span<const std::int32_t> targets, std::int32_t* slot) {
  device.upload(slot, targets.data(), targets.size() * sizeof(std::int32_t));
  return slot;
}

// max and sum_j exp(row_j - max) of one row of V >= 1 logits, in C, by the device's row work in one read of the row
// (row_max_sum: the online softmax's running pair; in 16-byte packs when Packed, moe/cuda/row_packs.hpp: GPT-2's
// 50,257 logits are 6,282 whole packs of 8 bf16 and one element). A row is ~100 KB: a second read would come from
// DRAM again.
template <bool Packed, class S, class Row, class C = Compute<S>>
MOE_HOST_DEVICE void softmax_stats(const Row& work, const S* row, Index V, C& max, C& sum) {
  const MaxSum<C> stats = row_max_sum<Packed>(work, V, [](Index, S x) { return C(x); }, row);
  max = stats.max, sum = stats.sum;
}

// Row r's loss into losses[r] (0 where ignored): logsumexp - the target's logit; with stat, its max and 1 / sum of
// exponentials into stat[2r], stat[2r + 1] as row_stats writes them (ignored rows: not written).
template <bool Packed, class S, class D, class C = Compute<S>>
void row_losses(const D& device, ConstMatrixView<S> logits, const std::int32_t* target, S* losses, C* stat) {
  const Index V = logits.cols;
  device.for_each_row(logits.rows, [=] MOE_HOST_DEVICE(Index r, const typename D::Row& work) {
    const std::int32_t t = target[r];
    if (t == kIgnoreTarget) {
      if (work.first()) losses[r] = S(0);
      return;
    }
    const S* row = logits.row(r);
    C max, sum;
    softmax_stats<Packed>(work, row, V, max, sum);
    if (work.first()) {
      losses[r] = S(C(std::log(sum)) + max - C(row[t]));
      if (stat) stat[2 * r] = max, stat[2 * r + 1] = C(1) / sum;
    }
  });
}

// Row r's max and 1 / sum of exponentials into stat[2r], stat[2r + 1] (ignored rows: never read, not written).
template <bool Packed, class S, class D, class C = Compute<S>>
void row_stats(const D& device, ConstMatrixView<S> logits, const std::int32_t* target, C* stat) {
  const Index V = logits.cols;
  device.for_each_row(logits.rows, [=] MOE_HOST_DEVICE(Index r, const typename D::Row& work) {
    if (target[r] == kIgnoreTarget) return;
    C max, sum;
    softmax_stats<Packed>(work, logits.row(r), V, max, sum);
    if (work.first()) {
      stat[2 * r] = max;
      stat[2 * r + 1] = C(1) / sum;
    }
  });
}

// d(loss)/d(logit) of element (r, c): scale * (softmax - onehot), 0 in ignored rows; stat from row_stats.
template <class S, class C = Compute<S>>
struct Gradient {
  const std::int32_t* target;
  const C* stat;
  C scale;
  MOE_HOST_DEVICE S operator()(Index r, Index c, S logit) const {
    const std::int32_t t = target[r];
    if (t == kIgnoreTarget) return S(0);
    const C p = C(std::exp(C(logit) - stat[2 * r])) * stat[2 * r + 1];
    return S(scale * p - (c == Index(t) ? scale : C(0)));
  }
};

}  // namespace cross_entropy_detail

// logits: [N, V] (device), targets: [N] (host; ids in [0, V), or -1 to ignore the row)
//   -> losses: [N] (device; -log softmax(logits[r])[targets[r]], 0 for ignored rows)
// Returns the mean of the losses over the counted rows (0 if every row is ignored, where PyTorch
// gives NaN): the losses (as stored, in S) are summed in double in chunks of kLossChunk rows, the
// chunk partials in chunk order, so the result is the same bits on every run. Downloading it
// waits for the stream (a sync).
// row_stats (optional, device, [2N] of Compute<S>): each counted row's softmax statistics, for
// cross_entropy_backward on the same logits and targets to skip reading the rows for them again.
template <class S, class D>
double cross_entropy_forward(const D& device, ConstMatrixView<S> logits, std::span<const std::int32_t> targets,
                             S* losses, Compute<S>* row_stats = nullptr) {
  const Index N = logits.rows, V = logits.cols;
  const Index valid = moe::nn::detail::check_cross_entropy("cross_entropy_forward", N, V, targets);
  check(losses || N == 0, "cross_entropy_forward: losses [", N, "] must not be null");
  const DeviceOperands on_device(device, "cross_entropy_forward");
  on_device("logits", logits); on_device("losses", losses, N); on_device("row_stats", row_stats, 2 * N);
  if (N == 0) return 0.0;
  const Index chunks = (N + cross_entropy_detail::kLossChunk - 1) / cross_entropy_detail::kLossChunk;
  ScratchLayout layout;
  const auto target_slot = layout.add<std::int32_t>(N);
  const auto sums_slot = layout.add<double>(chunks + 1);  // the partials, then the mean
  void* scratch = device.scratch(layout.bytes());
  const std::int32_t* target = cross_entropy_detail::upload_targets(device, targets, target_slot.in(scratch));
  // One row of work per row: the row's softmax statistics and its loss.
  if (row_packs_fit(logits.data, logits.stride))  // rows start 16-byte aligned: the packed row work
    cross_entropy_detail::row_losses<true>(device, logits, target, losses, row_stats);
  else
    cross_entropy_detail::row_losses<false>(device, logits, target, losses, row_stats);
  // Mean: per-chunk partial sums in double, then one thread adds them in chunk order.
  double* partial = sums_slot.in(scratch);
  double* mean = partial + chunks;
  device.for_each(chunks, [=] MOE_HOST_DEVICE(Index q) {
    const Index begin = q * cross_entropy_detail::kLossChunk;
    const Index end = begin + cross_entropy_detail::kLossChunk < N ? begin + cross_entropy_detail::kLossChunk : N;
    double s = 0;
    for (Index r = begin; r < end; ++r) s += double(losses[r]);
    partial[q] = s;
  });
  const double count = double(valid);
  device.for_each(1, [=] MOE_HOST_DEVICE(Index) {
    const double s = sum_in_order<double>(chunks, [&](Index q) { return partial[q]; });
    *mean = count > 0 ? s / count : 0.0;
  });
  double result = 0;
  device.download(&result, mean, sizeof(double));  // waits for the stream
  return result;
}

// logits: [N, V] (device), targets: [N] (host), dloss: d(loss)/d(mean loss) (1 for a plain loss)
//   -> dlogits: [N, V] (device) = dloss * (softmax(logits) - onehot(targets)) / n_valid, zero
//      rows where ignored.
// dlogits is WRITTEN, not accumulated (the logits end the graph), and may alias logits: the row
// statistics are computed first, then each element reads only its own logit before writing it.
// row_stats: what cross_entropy_forward wrote there for these logits and targets (the same bits
// as computing them here), or null to compute them. No sync.
template <class S, class D>
void cross_entropy_backward(const D& device, ConstMatrixView<S> logits, std::span<const std::int32_t> targets,
                            double dloss, MatrixView<S> dlogits, const Compute<S>* row_stats = nullptr) {
  using C = Compute<S>;
  const Index N = logits.rows, V = logits.cols;
  const Index valid = moe::nn::detail::check_cross_entropy("cross_entropy_backward", N, V, targets);
  check(dlogits.rows == N && dlogits.cols == V, "cross_entropy_backward: dlogits is [", dlogits.rows, ", ",
        dlogits.cols, "], logits is [", N, ", ", V, "]");
  const DeviceOperands on_device(device, "cross_entropy_backward");
  on_device("logits", logits); on_device("dlogits", dlogits); on_device("row_stats", row_stats, 2 * N);
  if (N == 0) return;
  ScratchLayout layout;
  const auto target_slot = layout.add<std::int32_t>(N);
  const auto stats_slot = layout.add<C>(2 * N);
  void* scratch = device.scratch(layout.bytes());
  const std::int32_t* target = cross_entropy_detail::upload_targets(device, targets, target_slot.in(scratch));
  // One row of work per row: max and 1 / sum of the row's exponentials (unless the forward's are given).
  const bool packed = row_packs_fit(logits.data, logits.stride) && row_packs_fit(dlogits.data, dlogits.stride);
  const C* stat = row_stats;
  if (!stat) {
    C* computed = stats_slot.in(scratch);
    if (row_packs_fit(logits.data, logits.stride))  // as the forward picks: the same bits
      cross_entropy_detail::row_stats<true>(device, logits, target, computed);
    else
      cross_entropy_detail::row_stats<false>(device, logits, target, computed);
    stat = computed;
  }
  // One index per element, or per 16-byte pack of elements where the rows start aligned (the same formula; a row's
  // partial last pack element by element).
  const C scale = valid ? C(dloss / double(valid)) : C(0);
  const cross_entropy_detail::Gradient<S> gradient{target, stat, scale};
  if (packed) {
    constexpr Index P = kPackSize<S>;
    moe::cuda::detail::for_each_2d(device, N, (V + P - 1) / P, [=] MOE_HOST_DEVICE(Index r, Index q) {
      if ((q + 1) * P > V) {
        for (Index c = q * P; c < V; ++c) dlogits(r, c) = gradient(r, c, logits(r, c));
        return;
      }
      Pack<S> x = load_pack(logits.row(r) + q * P);
      for (Index i = 0; i < P; ++i) x.v[i] = gradient(r, q * P + i, x.v[i]);
      store_pack(dlogits.row(r) + q * P, x);
    });
  } else {
    moe::cuda::detail::for_each_2d(device, N, V,
                                   [=] MOE_HOST_DEVICE(Index r, Index c) { dlogits(r, c) = gradient(r, c, logits(r, c)); });
  }
}

}  // namespace moe::cuda::nn
