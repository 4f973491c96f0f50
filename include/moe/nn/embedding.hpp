// moe/nn/embedding.hpp: GPT-2's input embedding, token (wte) plus learned position (wpe),
// forward then backward.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>

#include "moe/config.hpp"
#include "moe/cpu/parallel.hpp"
#include "moe/nn/checks.hpp"
#include "moe/tensor.hpp"

namespace moe::nn {

// tokens: [B*T] (row b*T + t is sequence b, position t), wte: [V, C], wpe: [maxT, C]
//   -> out: [B*T, C], out[b*T + t] = wte[tokens[b*T + t]] + wpe[t]
// Nothing is cached: backward takes the tokens again. Throws on an id outside [0, V) or T > maxT.
template <class S>
void embedding_forward(std::span<const std::int32_t> tokens, Index B, Index T, ConstMatrixView<S> wte,
                       ConstMatrixView<S> wpe, MatrixView<S> out, int threads) {
  detail::check_embedding_forward(tokens, B, T, wte, wpe, out);
  const Index C = wte.cols;
  const Index rows_per_task = cpu::rows_per_task(C);
  cpu::parallel_chunks(threads, B * T, rows_per_task, [&](Index begin, Index end) {
    for (Index r = begin; r < end; ++r) {
      const S* token_row = wte.row(tokens[r]);
      const S* position_row = wpe.row(r % T);
      S* o = out.row(r);
      for (Index c = 0; c < C; ++c) o[c] = token_row[c] + position_row[c];
    }
  });
}

// dout: [B*T, C], tokens: [B*T] -> dwte: [V, C] (+=), dwpe: [maxT, C] (+=; rows >= T untouched)
// dwte[v] += sum of dout rows whose token is v; dwpe[t] += sum_b dout[b*T + t]. Each task owns a
// block of columns and walks the rows in order, so repeated tokens sum in a fixed order on any
// thread count. Either gradient is skipped if its data is null.
template <class S>
void embedding_backward(ConstMatrixView<S> dout, std::span<const std::int32_t> tokens, Index B, Index T,
                        MatrixView<S> dwte, MatrixView<S> dwpe, int threads) {
  const Index C = dout.cols;
  detail::check_embedding_backward(dout, tokens, B, T, dwte, dwpe);

  using cpu::kColumnsPerTask;
  cpu::parallel_chunks(threads, C, kColumnsPerTask, [&](Index begin, Index end) {
    for (Index r = 0; r < B * T; ++r) {
      const S* d = dout.row(r);
      if (dwte.data) {
        S* w = dwte.row(tokens[r]);
        for (Index c = begin; c < end; ++c) w[c] += d[c];
      }
      if (dwpe.data) {
        S* p = dwpe.row(r % T);
        for (Index c = begin; c < end; ++c) p[c] += d[c];
      }
    }
  });
}

}  // namespace moe::nn
