// moe/cuda/nn/embedding.hpp: GPT-2's input embedding on a device (moe/cuda/device.hpp), token
// (wte) plus learned position (wpe), forward then backward: moe::nn::embedding_forward/backward
// (moe/nn/embedding.hpp) with the same semantics and "+=" gradients, written once for CudaDevice
// and EmulatedDevice.
//
// The token ids come from the host (a std::span): they are checked there, before any device
// work, then uploaded into the device's scratch (with the sort's buffers).
//
// Determinism without floating-point atomics: dwte's rows are summed by sorting the (token, row)
// pairs stably, so each token's rows are contiguous and in ascending row order, and one index per
// (distinct token, column) adds them in that order; dwpe[t] is one index per (t, column) adding
// b = 0, 1, ... in order. Same bits run to run, and the CPU version's order of additions.
//
// Where the rows allow (moe/cuda/pack.hpp's packable), an index takes a 16-byte pack of columns (8 bf16), otherwise
// one column: the kernels are written once over that width W, with the same arithmetic per element. A token's run
// of rows is fetched eight rows at a time (fetch_in_batches) and added in row order: a frequent token (a comma: a
// few hundred rows of a GPT-2 batch) is one long walk, which waited on each row's load in turn.
#pragma once

#include <cstdint>
#include <span>

#include "moe/config.hpp"
#include "moe/cuda/buffer.hpp"
#include "moe/cuda/device.hpp"
#include "moe/cuda/device_operands.hpp"
#include "moe/cuda/pack.hpp"
#include "moe/nn/checks.hpp"
#include "moe/host_device.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda::nn {

namespace embedding_detail {

// out[r] = wte[id[r]] + wpe[r % T], an index per pack of W columns.
template <Index W, class S, class D>
void forward_packs(const D& device, const std::int32_t* id, Index T, ConstMatrixView<S> wte, ConstMatrixView<S> wpe,
                   MatrixView<S> out) {
  using Cm = Compute<S>;
  moe::cuda::detail::for_each_2d(device, out.rows, out.cols / W, [=] MOE_HOST_DEVICE(Index r, Index q) {
    const Pack<S, W> token = load_pack_of<W>(&wte(id[r], q * W)), position = load_pack_of<W>(&wpe(r % T, q * W));
    Pack<S, W> sum;
    MOE_UNROLL
    for (Index e = 0; e < W; ++e) sum.v[e] = S(Cm(token.v[e]) + Cm(position.v[e]));
    store_pack_of<W>(&out(r, q * W), sum);
  });
}

// to[c0, c0 + W) += dout(row_of(j), [c0, c0 + W)) for j = begin, ..., end - 1, added in that order in Cm.
template <Index W, class S, class RowOf>
MOE_HOST_DEVICE void add_rows_into(S* to, ConstMatrixView<S> dout, Index c0, Index begin, Index end, RowOf row_of) {
  using Cm = Compute<S>;
  const Pack<S, W> start = load_pack_of<W>(to);
  Cm sum[W];
  MOE_UNROLL
  for (Index e = 0; e < W; ++e) sum[e] = Cm(start.v[e]);
  add_rows_in_order<W>(sum, begin, end, [&](Index j) { return &dout(row_of(j), c0); });
  Pack<S, W> total;
  MOE_UNROLL
  for (Index e = 0; e < W; ++e) total.v[e] = S(sum[e]);
  store_pack_of<W>(to, total);
}

// dwte (if token) from the rows sorted by token: token[i] and row[i] the i-th sorted pair; dwpe (if its data), an
// index per pack of W columns each.
template <Index W, class S, class D>
void backward_packs(const D& device, ConstMatrixView<S> dout, const std::uint32_t* token, const std::int32_t* row,
                    Index B, Index T, MatrixView<S> dwte, MatrixView<S> dwpe) {
  const Index rows = dout.rows, packs = dout.cols / W;
  if (token)
    moe::cuda::detail::for_each_2d(device, rows, packs, [=] MOE_HOST_DEVICE(Index i, Index q) {
      if (i > 0 && token[i - 1] == token[i]) return;  // not the first row of its token
      Index end = i + 1;                              // the run's end (the small sorted ids: cached reads)
      while (end < rows && token[end] == token[i]) ++end;
      add_rows_into<W>(&dwte(Index(token[i]), q * W), dout, q * W, i, end, [=](Index j) { return Index(row[j]); });
    });
  if (dwpe.data)
    moe::cuda::detail::for_each_2d(device, T, packs, [=] MOE_HOST_DEVICE(Index t, Index q) {
      add_rows_into<W>(&dwpe(t, q * W), dout, q * W, 0, B, [=](Index b) { return b * T + t; });
    });
}

}  // namespace embedding_detail

// tokens: [B*T] host ids (row b*T + t is sequence b, position t), wte: [V, C], wpe: [maxT, C]
//   -> out: [B*T, C], out[b*T + t] = wte[tokens[b*T + t]] + wpe[t]
// One index per output pack (or element). Nothing is cached: backward takes the tokens again. Throws
// (before any device work) on an id outside [0, V) or T > maxT.
template <class S, class D>
void embedding_forward(const D& device, std::span<const std::int32_t> tokens, Index B, Index T,
                       ConstMatrixView<S> wte, ConstMatrixView<S> wpe, MatrixView<S> out) {
  moe::nn::detail::check_embedding_forward(tokens, B, T, wte, wpe, out);
  const DeviceOperands on_device(device, "embedding_forward");
  on_device("wte", wte); on_device("wpe", wpe); on_device("out", out);
  const Index rows = B * T, C = wte.cols;
  if (rows == 0 || C == 0) return;
  ScratchLayout layout;
  const auto id_slot = layout.add<std::int32_t>(rows);
  std::int32_t* id = id_slot.in(device.scratch(layout.bytes()));
  device.upload(id, tokens.data(), tokens.size() * sizeof(std::int32_t));
  if (packable<S>(C, wte, wpe, out))
    embedding_detail::forward_packs<kPackSize<S>>(device, id, T, wte, wpe, out);
  else
    embedding_detail::forward_packs<1>(device, id, T, wte, wpe, out);
}

// dout: [B*T, C], tokens: [B*T] host ids -> dwte: [V, C] (+=), dwpe: [maxT, C] (+=; rows >= T
// untouched). Either gradient is skipped if its data is null (then its ids / positions are not
// bounded by it).
//   dwte[v] += sum of the dout rows whose token is v, in ascending row order: the (token, row)
//     pairs sorted stably by token (device.stable_sort_pairs), then one index per (sorted
//     position, pack of columns); the index at the start of a token's run sums the run, the others return.
//   dwpe[t] += sum_b dout[b*T + t], b ascending: one index per (t, pack of columns).
template <class S, class D>
void embedding_backward(const D& device, ConstMatrixView<S> dout, std::span<const std::int32_t> tokens, Index B,
                        Index T, MatrixView<S> dwte, MatrixView<S> dwpe) {
  const Index C = dout.cols;
  moe::nn::detail::check_embedding_backward(dout, tokens, B, T, dwte, dwpe);
  const DeviceOperands on_device(device, "embedding_backward");
  on_device("dout", dout); on_device("dwte", dwte); on_device("dwpe", dwpe);
  const Index rows = B * T;
  if (rows == 0 || C == 0) return;

  const std::uint32_t* token = nullptr;
  const std::int32_t* row = nullptr;
  if (dwte.data) {
    check(rows <= Index(INT32_MAX), "embedding_backward: B*T = ", rows, " rows exceed the sort's 32-bit row ids");
    ScratchLayout layout;
    const auto id_slot = layout.add<std::int32_t>(rows), row_id_slot = layout.add<std::int32_t>(rows),
               sorted_row_slot = layout.add<std::int32_t>(rows);
    const auto key_slot = layout.add<std::uint32_t>(rows), sorted_key_slot = layout.add<std::uint32_t>(rows);
    void* scratch = device.scratch(layout.bytes());
    std::int32_t* id = id_slot.in(scratch);
    std::int32_t* row_id = row_id_slot.in(scratch);
    std::uint32_t* key = key_slot.in(scratch);
    device.upload(id, tokens.data(), tokens.size() * sizeof(std::int32_t));
    device.for_each(rows, [=] MOE_HOST_DEVICE(Index r) {
      key[r] = std::uint32_t(id[r]);  // checked >= 0
      row_id[r] = std::int32_t(r);
    });
    // Stable: equal tokens keep ascending rows, the CPU version's order of additions.
    device.stable_sort_pairs(key, sorted_key_slot.in(scratch), row_id, sorted_row_slot.in(scratch), rows,
                             key_bits(dwte.rows));
    token = sorted_key_slot.in(scratch);
    row = sorted_row_slot.in(scratch);
  }
  if (packable<S>(C, dout, dwte, dwpe))
    embedding_detail::backward_packs<kPackSize<S>>(device, dout, token, row, B, T, dwte, dwpe);
  else
    embedding_detail::backward_packs<1>(device, dout, token, row, B, T, dwte, dwpe);
}

}  // namespace moe::cuda::nn
