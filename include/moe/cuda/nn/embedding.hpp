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
#pragma once

#include <cstdint>
#include <span>

#include "moe/config.hpp"
#include "moe/cuda/backend.hpp"
#include "moe/cuda/buffer.hpp"
#include "moe/cuda/device.hpp"
#include "moe/nn/checks.hpp"
#include "moe/host_device.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda::nn {

// tokens: [B*T] host ids (row b*T + t is sequence b, position t), wte: [V, C], wpe: [maxT, C]
//   -> out: [B*T, C], out[b*T + t] = wte[tokens[b*T + t]] + wpe[t]
// One index per output element. Nothing is cached: backward takes the tokens again. Throws
// (before any device work) on an id outside [0, V) or T > maxT.
template <class S, class D>
void embedding_forward(const D& device, std::span<const std::int32_t> tokens, Index B, Index T,
                       ConstMatrixView<S> wte, ConstMatrixView<S> wpe, MatrixView<S> out) {
  using Cm = Compute<S>;
  moe::nn::detail::check_embedding_forward(tokens, B, T, wte, wpe, out);
  const Index rows = B * T, C = wte.cols;
  if (rows == 0 || C == 0) return;
  ScratchLayout layout;
  const auto id_slot = layout.add<std::int32_t>(rows);
  std::int32_t* id = id_slot.in(device.scratch(layout.bytes()));
  device.upload(id, tokens.data(), tokens.size() * sizeof(std::int32_t));
  moe::cuda::detail::for_each_2d(device, rows, C, [=] MOE_HOST_DEVICE(Index r, Index c) {
    out(r, c) = S(Cm(wte(id[r], c)) + Cm(wpe(r % T, c)));
  });
}

// dout: [B*T, C], tokens: [B*T] host ids -> dwte: [V, C] (+=), dwpe: [maxT, C] (+=; rows >= T
// untouched). Either gradient is skipped if its data is null (then its ids / positions are not
// bounded by it).
//   dwte[v] += sum of the dout rows whose token is v, in ascending row order: the (token, row)
//     pairs sorted stably by token (device.stable_sort_pairs), then one index per (sorted
//     position, column); the index at the start of a token's run sums the run, the others return.
//   dwpe[t] += sum_b dout[b*T + t], b ascending: one index per (t, column).
template <class S, class D>
void embedding_backward(const D& device, ConstMatrixView<S> dout, std::span<const std::int32_t> tokens, Index B,
                        Index T, MatrixView<S> dwte, MatrixView<S> dwpe) {
  using Cm = Compute<S>;
  const Index C = dout.cols;
  moe::nn::detail::check_embedding_backward(dout, tokens, B, T, dwte, dwpe);
  const Index rows = B * T;
  if (rows == 0 || C == 0) return;

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
    const std::uint32_t* token = sorted_key_slot.in(scratch);
    const std::int32_t* row = sorted_row_slot.in(scratch);
    moe::cuda::detail::for_each_2d(device, rows, C, [=] MOE_HOST_DEVICE(Index i, Index c) {
      if (i > 0 && token[i - 1] == token[i]) return;  // not the first row of its token
      const Index v = Index(token[i]);
      Cm sum = Cm(dwte(v, c));
      for (Index j = i; j < rows && token[j] == token[i]; ++j) sum += Cm(dout(row[j], c));
      dwte(v, c) = S(sum);
    });
  }

  if (dwpe.data)
    moe::cuda::detail::for_each_2d(device, T, C, [=] MOE_HOST_DEVICE(Index t, Index c) {
      Cm sum = Cm(dwpe(t, c));
      for (Index b = 0; b < B; ++b) sum += Cm(dout(b * T + t, c));
      dwpe(t, c) = S(sum);
    });
}

}  // namespace moe::cuda::nn
