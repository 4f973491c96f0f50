// moe/nn/cross_entropy.hpp: softmax and cross-entropy fused over logits (GPT-2's output loss),
// forward then backward. A target of -1 marks a row to ignore (PyTorch's ignore_index = -1).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>

#include "moe/config.hpp"
#include "moe/cpu/parallel.hpp"
#include "moe/cpu/simd.hpp"
#include "moe/nn/checks.hpp"
#include "moe/tensor.hpp"

namespace moe::nn {

namespace detail {
// max and sum_j exp(row_j - max) of one row of logits (exp_terms, if not null, gets the terms).
template <class S>
void softmax_stats(const S* row, Index V, S& max, S& sum, S* exp_terms = nullptr) {
  max = cpu::simd::max(row, V);
  sum = cpu::simd::exp_and_sum(row, V, max, S(1), exp_terms);
}
}  // namespace detail

// logits: [N, V], targets: [N] (ids in [0, V), or -1 to ignore the row)
//   -> losses: [N] (-log softmax(logits[r])[targets[r]], 0 for ignored rows)
// Returns the mean of the losses over the n_valid counted rows, summed in double in row order
// (0 if every row is ignored, where PyTorch gives NaN). Nothing is cached: backward recomputes
// the softmax from the logits, which is cheaper to keep than an [N, V] probability matrix.
template <class S>
double cross_entropy_forward(ConstMatrixView<S> logits, std::span<const std::int32_t> targets, S* losses,
                             int threads) {
  const Index N = logits.rows, V = logits.cols;
  const Index valid = detail::check_cross_entropy("cross_entropy_forward", N, V, targets);
  check(losses || N == 0, "cross_entropy_forward: losses [", N, "] must not be null");
  const Index rows_per_task = cpu::rows_per_task(V);
  cpu::parallel_chunks(threads, N, rows_per_task, [&](Index begin, Index end) {
    for (Index r = begin; r < end; ++r) {
      if (targets[r] == kIgnoreTarget) {
        losses[r] = 0;
        continue;
      }
      const S* row = logits.row(r);
      S max, sum;
      detail::softmax_stats(row, V, max, sum);
      losses[r] = std::log(sum) + max - row[targets[r]];  // logsumexp - logit of the target
    }
  });
  double total = 0;
  for (Index r = 0; r < N; ++r) total += double(losses[r]);
  return valid ? total / double(valid) : 0.0;
}

// logits: [N, V], targets: [N], dloss: d(loss)/d(mean loss) (1 for a plain loss)
//   -> dlogits: [N, V] = dloss * (softmax(logits) - onehot(targets)) / n_valid, zero rows where ignored.
// dlogits is WRITTEN, not accumulated (unlike the other backward passes: the logits are the
// end of the graph, nothing else adds to them), and may alias logits to save the [N, V] buffer.
template <class S>
void cross_entropy_backward(ConstMatrixView<S> logits, std::span<const std::int32_t> targets, double dloss,
                            MatrixView<S> dlogits, int threads) {
  const Index N = logits.rows, V = logits.cols;
  const Index valid = detail::check_cross_entropy("cross_entropy_backward", N, V, targets);
  check(dlogits.rows == N && dlogits.cols == V, "cross_entropy_backward: dlogits is [", dlogits.rows, ", ",
        dlogits.cols, "], logits is [", N, ", ", V, "]");
  const S scale = valid ? S(dloss / double(valid)) : S(0);
  const Index rows_per_task = cpu::rows_per_task(V);
  cpu::parallel_chunks(threads, N, rows_per_task, [&](Index begin, Index end) {
    for (Index r = begin; r < end; ++r) {
      S* d = dlogits.row(r);
      if (targets[r] == kIgnoreTarget) {
        std::fill(d, d + V, S(0));
        continue;
      }
      S max, sum;
      detail::softmax_stats(logits.row(r), V, max, sum, d);  // d = exp(row - max); d may be the row itself
      cpu::simd::scale(d, V, scale / sum, d);
      d[targets[r]] -= scale;
    }
  });
}

}  // namespace moe::nn
