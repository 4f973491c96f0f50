// moe/nn/linear.hpp: dense nn.Linear(I, O) (weight [O, I], optional bias [O]), forward then
// backward, on the deterministic tiled GEMM of moe/cpu/gemm.hpp.
#pragma once

#include <algorithm>
#include <vector>

#include "moe/config.hpp"
#include "moe/nn/checks.hpp"
#include "moe/cpu/gemm.hpp"
#include "moe/cpu/parallel.hpp"
#include "moe/tensor.hpp"

namespace moe::nn {

// in: [T, I], weight: [O, I], bias: [O] or null -> out: [T, O] = in weight^T + bias.
// Nothing is cached: backward takes in again. out must not alias in.
template <class S>
void linear_forward(ConstMatrixView<S> in, ConstMatrixView<S> weight, const S* bias, MatrixView<S> out,
                    int threads) {
  moe::nn::detail::check_linear_forward(in, weight, out);
  cpu::run_gemm(cpu::Gemm<S>{out, in, cpu::Op::none, weight, cpu::Op::transpose, false, bias}, threads);
}

// in: [T, I], dout: [T, O], weight: [O, I]
//   -> din: [T, I] += dout weight        (skipped if din.data is null; = with GradInto::overwrite)
//      dweight: [O, I] += dout^T in      (skipped if dweight.data is null)
//      dbias: [O] += column sums of dout (skipped if null)
// The GEMM tiles and the bias's column blocks are cut from the shapes alone, and each bias column
// adds the rows in order: the same bits on any thread count. din must not alias in, dout or
// weight (the two products run side by side on the threads).
template <class S>
void linear_backward(ConstMatrixView<S> in, ConstMatrixView<S> dout, ConstMatrixView<S> weight, MatrixView<S> din,
                     MatrixView<S> dweight, S* dbias, int threads, GradInto din_into = GradInto::add) {
  const Index T = in.rows, O = weight.rows;
  moe::nn::detail::check_linear_backward(in, dout, weight, din, dweight);

  std::vector<cpu::Gemm<S>> work;
  if (dweight.data) work.push_back({dweight, dout, cpu::Op::transpose, in, cpu::Op::none, true});
  if (din.data) work.push_back({din, dout, cpu::Op::none, weight, cpu::Op::none, din_into == GradInto::add});
  cpu::run_gemms<S>(work, threads);

  if (!dbias) return;
  using cpu::kColumnsPerTask;
  cpu::parallel_chunks(threads, O, kColumnsPerTask, [&](Index begin, Index end) {
    S sum[kColumnsPerTask] = {};
    for (Index t = 0; t < T; ++t) {
      const S* dt = dout.row(t);
      for (Index o = begin; o < end; ++o) sum[o - begin] += dt[o];
    }
    for (Index o = begin; o < end; ++o) dbias[o] += sum[o - begin];
  });
}

}  // namespace moe::nn
