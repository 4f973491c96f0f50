// moe/cuda/nn/layernorm.hpp: LayerNorm over the last dimension on a device (moe/cuda/device.hpp),
// forward then backward: moe::nn::layernorm_forward/backward (moe/nn/layernorm.hpp) with the same
// semantics (eps 1e-5, biased variance, "+=" gradients), written once for CudaDevice and
// EmulatedDevice. Arithmetic in Compute<S> (float for bfloat16); the cached mean and rstd are
// Compute<S> arrays, so bf16 activations do not round their statistics.
//
// Determinism: the row-wise work is the device's row work (moe/cuda/device.hpp: a warp per row on
// the GPU, its lanes' partials meeting in a fixed butterfly); the parameter gradients (sums down
// the rows) go through per-chunk partials summed in chunk order. No floating-point atomics, so the
// result is the same bits run to run.
#pragma once

#include <cmath>

#include "moe/config.hpp"
#include "moe/cuda/buffer.hpp"
#include "moe/cuda/device.hpp"
#include "moe/cuda/device_operands.hpp"
#include "moe/cuda/row_packs.hpp"
#include "moe/host_device.hpp"
#include "moe/nn/checks.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda::nn {

inline constexpr double kLayerNormEps = 1e-5;  // PyTorch's nn.LayerNorm default, as moe::nn
inline constexpr Index kLayerNormRowChunk = 64;  // rows per partial of the parameter gradients

namespace layernorm_detail {

// The forward's rows: one row of work per row (in 16-byte packs when Packed: moe/cuda/row_packs.hpp), two passes (mean,
// then the centred sum of squares), then the normalised, scaled and shifted row; mean and rstd kept.
template <bool Packed, class S, class D, class Cm = Compute<S>>
void forward_rows(const D& device, ConstMatrixView<S> x, const S* weight, const S* bias, MatrixView<S> out, Cm* mean,
                  Cm* rstd) {
  const Index C = x.cols;
  const Cm eps = Cm(kLayerNormEps);
  device.for_each_row(x.rows, [=] MOE_HOST_DEVICE(Index t, const typename D::Row& row) {
    const S* xt = x.row(t);
    const Cm m = row_sum<Packed>(row, C, [](Index, S v) { return Cm(v); }, xt) / Cm(C);
    const Cm squares = row_sum<Packed>(
        row, C,
        [&](Index, S v) {
          const Cm d = Cm(v) - m;
          return d * d;
        },
        xt);
    const Cm s = Cm(1) / std::sqrt(squares / Cm(C) + eps);
    row_update<Packed>(
        row, C, [&](Index, S, S v, S w, S b) { return S((Cm(v) - m) * s * Cm(w) + Cm(b)); }, out.row(t), xt, weight,
        bias);
    if (row.first()) {
      mean[t] = m;
      rstd[t] = s;
    }
  });
}

// The backward's input gradient rows: dx += rstd * (dn - mean_c(dn) - n * mean_c(dn * n)), one row of work per row.
template <bool Packed, class S, class D, class Cm = Compute<S>>
void input_gradient_rows(const D& device, ConstMatrixView<S> dout, ConstMatrixView<S> x, const S* weight,
                         const Cm* mean, const Cm* rstd, MatrixView<S> dx) {
  const Index C = x.cols;
  device.for_each_row(x.rows, [=] MOE_HOST_DEVICE(Index t, const typename D::Row& row) {
    const S* xt = x.row(t);
    const S* dt = dout.row(t);
    const Cm m = mean[t], s = rstd[t];
    const Cm dn_mean = row_sum<Packed>(row, C, [](Index, S d, S w) { return Cm(d) * Cm(w); }, dt, weight) / Cm(C);
    const Cm dn_n_mean =
        row_sum<Packed>(
            row, C, [&](Index, S d, S w, S v) { return Cm(d) * Cm(w) * ((Cm(v) - m) * s); }, dt, weight, xt) /
        Cm(C);
    row_update<Packed>(
        row, C,
        [&](Index, S o, S d, S w, S v) {
          const Cm dn = Cm(d) * Cm(w);
          const Cm n = (Cm(v) - m) * s;
          return S(Cm(o) + s * (dn - dn_mean - n * dn_n_mean));
        },
        dx.row(t), dt, weight, xt);
  });
}

}  // namespace layernorm_detail

// x: [T, C], weight: [C], bias: [C] -> out: [T, C]; cached for backward: mean: [T], rstd: [T]
// (Compute<S>, device memory). out[t] = (x[t] - mean[t]) * rstd[t] * weight + bias,
// rstd = 1 / sqrt(var + eps). One row of work per row, two passes (mean, then the centred sum of
// squares: no cancellation when |mean| >> std), in 16-byte packs where every row and parameter
// array allows. out may alias x: each column is read and then written by the same lane.
template <class S, class D>
void layernorm_forward(const D& device, ConstMatrixView<S> x, const S* weight, const S* bias, MatrixView<S> out,
                       Compute<S>* mean, Compute<S>* rstd) {
  moe::nn::detail::check_layernorm_forward(x, weight, bias, out, mean, rstd);
  const DeviceOperands on_device(device, "layernorm_forward");
  on_device("x", x); on_device("out", out); on_device("weight", weight, x.cols); on_device("bias", bias, x.cols);
  on_device("mean", mean, x.rows); on_device("rstd", rstd, x.rows);
  if (x.rows == 0) return;
  const bool packed = row_packs_fit(x.data, x.stride) &&
                      row_packs_fit(static_cast<const S*>(out.data), out.stride) && row_packs_fit(weight, 0) &&
                      row_packs_fit(bias, 0);
  if (packed)
    layernorm_detail::forward_rows<true>(device, x, weight, bias, out, mean, rstd);
  else
    layernorm_detail::forward_rows<false>(device, x, weight, bias, out, mean, rstd);
}

// dout: [T, C], x: [T, C], weight: [C], mean: [T], rstd: [T] (from forward, Compute<S>)
//   -> dx: [T, C] (+=; skipped if dx.data is null), dweight: [C] (+=), dbias: [C] (+=; each
//      skipped if null)
// With n = (x - mean) * rstd and dn = dout * weight, per row (the device's row work):
//   dx += rstd * (dn - mean_c(dn) - n * mean_c(dn * n)),  dweight += sum_t dout * n,  dbias += sum_t dout.
// dweight/dbias: chunks of kLayerNormRowChunk rows sum in row order into partials, then one index
// per column adds the partials in chunk order. The partials live in the device's scratch.
// dx must not alias dout or x.
template <class S, class D>
void layernorm_backward(const D& device, ConstMatrixView<S> dout, ConstMatrixView<S> x, const S* weight,
                        const Compute<S>* mean, const Compute<S>* rstd, MatrixView<S> dx, S* dweight, S* dbias) {
  using Cm = Compute<S>;
  const Index T = x.rows, C = x.cols;
  const DeviceOperands on_device(device, "layernorm_backward");
  moe::nn::detail::check_layernorm_backward(dout, x, weight, mean, rstd, dx, [&] {
    on_device("dout", dout); on_device("x", x); on_device("weight", weight, C); on_device("mean", mean, T);
    on_device("rstd", rstd, T); on_device("dx", dx); on_device("dweight", dweight, C); on_device("dbias", dbias, C);
  });

  if (dx.data && T > 0) {
    const bool packed = row_packs_fit(dout.data, dout.stride) && row_packs_fit(x.data, x.stride) &&
                        row_packs_fit(static_cast<const S*>(dx.data), dx.stride) && row_packs_fit(weight, 0);
    if (packed)
      layernorm_detail::input_gradient_rows<true>(device, dout, x, weight, mean, rstd, dx);
    else
      layernorm_detail::input_gradient_rows<false>(device, dout, x, weight, mean, rstd, dx);
  }

  if (!dweight && !dbias) return;
  const Index chunks = (T + kLayerNormRowChunk - 1) / kLayerNormRowChunk;
  if (chunks == 0) return;  // no rows: nothing to add
  // partial[q * C + c]: dweight's partial of chunk q; partial[(chunks + q) * C + c]: dbias's.
  ScratchLayout layout;
  const auto partial_slot = layout.add<Cm>(2 * chunks * C);
  Cm* partial = partial_slot.in(device.scratch(layout.bytes()));
  // Each column's partial adds its rows in row order. Where the rows go in 16-byte packs, a thread
  // takes a pack of kPackSize columns (one load per row for all of them): the same sums, the same
  // bits (explicit fused multiply-adds in both loops, so no compiler fuses one and not the other).
  constexpr Index P = kPackSize<S>;
  if (row_packs_fit(dout.data, dout.stride) && row_packs_fit(x.data, x.stride) && C % P == 0) {
    moe::cuda::detail::for_each_2d(device, chunks, C / P, [=] MOE_HOST_DEVICE(Index q, Index pack) {
      const Index begin = q * kLayerNormRowChunk, c0 = pack * P;
      const Index end = begin + kLayerNormRowChunk < T ? begin + kLayerNormRowChunk : T;
      Cm dw[P], db[P];
      MOE_UNROLL
      for (Index i = 0; i < P; ++i) dw[i] = 0, db[i] = 0;
      struct RowTerms {  // one row's packs and statistics, fetched eight rows at a time
        Pack<S> d, xs;
        Cm mean, rstd;
      };
      // Eight rows in flight: a chunk of 64 rows is 8 waits for memory (16 at four, 35 µs a launch on an H100).
      fetch_in_batches<8>(
          begin, end, [&](Index t) { return RowTerms{load_pack(&dout(t, c0)), load_pack(&x(t, c0)), mean[t], rstd[t]}; },
          [&](const RowTerms& v) {
            MOE_UNROLL
            for (Index i = 0; i < P; ++i) {
              dw[i] = std::fma(Cm(v.d.v[i]), (Cm(v.xs.v[i]) - v.mean) * v.rstd, dw[i]);
              db[i] += Cm(v.d.v[i]);
            }
          });
      MOE_UNROLL
      for (Index i = 0; i < P; ++i) {
        partial[q * C + c0 + i] = dw[i];
        partial[(chunks + q) * C + c0 + i] = db[i];
      }
    });
  } else {
    moe::cuda::detail::for_each_2d(device, chunks, C, [=] MOE_HOST_DEVICE(Index q, Index c) {
      const Index begin = q * kLayerNormRowChunk;
      const Index end = begin + kLayerNormRowChunk < T ? begin + kLayerNormRowChunk : T;
      Cm dw = 0, db = 0;
      for (Index t = begin; t < end; ++t) {
        const Cm d = Cm(dout(t, c));
        dw = std::fma(d, (Cm(x(t, c)) - mean[t]) * rstd[t], dw);
        db += d;
      }
      partial[q * C + c] = dw;
      partial[(chunks + q) * C + c] = db;
    });
  }
  device.for_each(C, [=] MOE_HOST_DEVICE(Index c) {
    const Cm dw = sum_in_order<Cm>(chunks, [&](Index q) { return partial[q * C + c]; });
    const Cm db = sum_in_order<Cm>(chunks, [&](Index q) { return partial[(chunks + q) * C + c]; });
    if (dweight) dweight[c] = S(Cm(dweight[c]) + dw);
    if (dbias) dbias[c] = S(Cm(dbias[c]) + db);
  });
}

}  // namespace moe::cuda::nn
