// moe/nn/layernorm.hpp: LayerNorm over the last dimension (PyTorch's nn.LayerNorm(C): eps 1e-5,
// biased variance), forward then backward.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "moe/config.hpp"
#include "moe/cpu/parallel.hpp"
#include "moe/cpu/simd.hpp"
#include "moe/nn/checks.hpp"
#include "moe/tensor.hpp"

namespace moe::nn {

inline constexpr double kLayerNormEps = 1e-5;

// x: [T, C], weight: [C], bias: [C] -> out: [T, C]
// out[t] = (x[t] - mean[t]) * rstd[t] * weight + bias, with rstd = 1 / sqrt(var + eps).
// Cached for backward: mean: [T] and rstd: [T] (plus x itself). out may alias x.
template <class S>
void layernorm_forward(ConstMatrixView<S> x, const S* weight, const S* bias, MatrixView<S> out, S* mean, S* rstd,
                       int threads) {
  const Index T = x.rows, C = x.cols;
  detail::check_layernorm_forward(x, weight, bias, out, mean, rstd);
  const Index rows_per_task = cpu::rows_per_task(C);  // from the shape: same bits on any thread count
  cpu::parallel_chunks(threads, T, rows_per_task, [&](Index begin, Index end) {
    std::vector<S> centered(static_cast<std::size_t>(C));
    S* xc = centered.data();
    for (Index t = begin; t < end; ++t) {
      const S* xt = x.row(t);
      const S m = cpu::simd::sum(xt, C) / S(C);
      for (Index c = 0; c < C; ++c) xc[c] = xt[c] - m;
      // two passes: no cancellation when |mean| >> std
      const S s = S(1) / std::sqrt(cpu::simd::dot(xc, xc, C) / S(C) + S(kLayerNormEps));
      S* ot = out.row(t);
      for (Index c = 0; c < C; ++c) ot[c] = xc[c] * s * weight[c] + bias[c];
      mean[t] = m;
      rstd[t] = s;
    }
  });
}

// dout: [T, C], x: [T, C], weight: [C], mean: [T], rstd: [T] (from forward)
//   -> dx: [T, C] (+=; skipped if dx.data is null), dweight: [C] (+=), dbias: [C] (+=; each
//      skipped if null)
// With n = (x - mean) * rstd and dn = dout * weight, per row:
//   dx += rstd * (dn - mean_c(dn) - n * mean_c(dn * n)),  dweight += sum_t dout * n,  dbias += sum_t dout.
// The parameter gradients are sums down the rows: each task owns a block of columns and adds
// the rows in order, so the sum is the same on any thread count. dx must not alias dout or x.
template <class S>
void layernorm_backward(ConstMatrixView<S> dout, ConstMatrixView<S> x, const S* weight, const S* mean,
                        const S* rstd, MatrixView<S> dx, S* dweight, S* dbias, int threads) {
  const Index T = x.rows, C = x.cols;
  detail::check_layernorm_backward(dout, x, weight, mean, rstd, dx);

  if (dx.data) {
    const Index rows_per_task = cpu::rows_per_task(C);
    cpu::parallel_chunks(threads, T, rows_per_task, [&](Index begin, Index end) {
      std::vector<S> scratch(static_cast<std::size_t>(2 * C));
      S* dn = scratch.data();
      S* n = dn + C;
      for (Index t = begin; t < end; ++t) {
        const S* xt = x.row(t);
        const S* dt = dout.row(t);
        const S m = mean[t], s = rstd[t];
        for (Index c = 0; c < C; ++c) {
          dn[c] = dt[c] * weight[c];
          n[c] = (xt[c] - m) * s;
        }
        const S dn_mean = cpu::simd::sum(dn, C) / S(C), dn_n_mean = cpu::simd::dot(dn, n, C) / S(C);
        S* dxt = dx.row(t);
        for (Index c = 0; c < C; ++c) dxt[c] += s * (dn[c] - dn_mean - n[c] * dn_n_mean);
      }
    });
  }

  if (!dweight && !dbias) return;
  using cpu::kColumnsPerTask;
  cpu::parallel_chunks(threads, C, kColumnsPerTask, [&](Index begin, Index end) {
    S dw[kColumnsPerTask] = {}, db[kColumnsPerTask] = {};
    for (Index t = 0; t < T; ++t) {
      const S* xt = x.row(t);
      const S* dt = dout.row(t);
      for (Index c = begin; c < end; ++c) {
        dw[c - begin] += dt[c] * (xt[c] - mean[t]) * rstd[t];
        db[c - begin] += dt[c];
      }
    }
    for (Index c = begin; c < end; ++c) {
      if (dweight) dweight[c] += dw[c - begin];
      if (dbias) dbias[c] += db[c - begin];
    }
  });
}

}  // namespace moe::nn
