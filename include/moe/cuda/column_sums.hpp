// moe/cuda/column_sums.hpp: db[c] += the sum over rows of m(r, c), in a fixed order and without
// atomics (bias gradients: the experts' blocks, the linear layers). Two launches for any number of
// matrices (moe/cuda/multi_tensor.hpp's tables).
#pragma once

#include <algorithm>
#include <span>

#include "moe/config.hpp"
#include "moe/cuda/device.hpp"
#include "moe/cuda/multi_tensor.hpp"
#include "moe/cuda/pack.hpp"
#include "moe/host_device.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda::detail {

// Rows per partial of a column sum.
inline constexpr Index kColumnSumChunk = 64;
inline Index column_sum_partials(Index rows, Index cols) { return (rows + kColumnSumChunk - 1) / kColumnSumChunk * cols; }

// One matrix of a column sum and where its sums go: db[c] += sum over rows of m(r, c). The
// partials are `chunks * m.cols` values of the caller's buffer; n is the launch's unit count
// (moe/cuda/multi_tensor.hpp's Tensor), set by add_column_sums.
template <class S, class C>
struct ColumnSum {
  ConstMatrixView<S> m;
  S* db;
  C* partial = nullptr;
  Index n = 0;
};

// db_i[c] += sum over rows of m_i(r, c) for every ColumnSum i (an expert's block of rows and its
// bias gradient, or one matrix): chunks of kColumnSumChunk rows add in row order into partial_i[chunk
// * cols + c], then one index per column adds its partials in chunk order. Deterministic without
// atomics; the sums of many matrices go in two launches (multi_tensor.hpp's tables), not two each.
// `partial`: the sum of column_sum_partials over the matrices. Empty matrices are left alone.
template <class D, class S, class C = Compute<S>>
void add_column_sums(const D& device, std::span<ColumnSum<S, C>> sums, C* partial) {
  for (ColumnSum<S, C>& sum : sums) {
    sum.partial = partial, sum.n = column_sum_partials(sum.m.rows, sum.m.cols);
    partial += sum.n;
  }
  using Sum = ColumnSum<S, C>;
  // Where every matrix's rows go in 16-byte packs, a unit takes a pack of columns (one load a row for all of them,
  // as LayerNorm's parameter gradients do): the same sums in the same row order, the same bits.
  constexpr Index P = kPackSize<S>;
  const bool packed = std::all_of(sums.begin(), sums.end(), [](const Sum& s) { return packable<S>(s.m.cols, s.m); });
  if (packed) {
    for (Sum& sum : sums) sum.n /= P;  // a unit per (chunk, pack of columns)
    for_each_tensor_unit(device, std::span<const Sum>(sums), 1, [=] MOE_HOST_DEVICE(const Sum& s, Index u, Index) {
      const Index cols = s.m.cols, packs = cols / P, q = u / packs, c0 = (u % packs) * P;
      const Index end = (q + 1) * kColumnSumChunk < s.m.rows ? (q + 1) * kColumnSumChunk : s.m.rows;
      C total[P] = {};
      add_rows_in_order<P>(total, q * kColumnSumChunk, end, [&](Index r) { return &s.m(r, c0); });
      MOE_UNROLL
      for (Index i = 0; i < P; ++i) s.partial[q * cols + c0 + i] = total[i];
    });
  } else {
    for_each_tensor_unit(device, std::span<const Sum>(sums), 1, [=] MOE_HOST_DEVICE(const Sum& s, Index u, Index) {
      const Index cols = s.m.cols, q = u / cols, c = u % cols;
      const Index end = (q + 1) * kColumnSumChunk < s.m.rows ? (q + 1) * kColumnSumChunk : s.m.rows;
      C total[1] = {};
      add_rows_in_order<1>(total, q * kColumnSumChunk, end, [&](Index r) { return &s.m(r, c); });
      s.partial[u] = total[0];
    });
  }
  for (Sum& sum : sums) sum.n = sum.n > 0 ? sum.m.cols : 0;  // now one unit per column
  for_each_tensor_element(device, std::span<const Sum>(sums), 1, [=] MOE_HOST_DEVICE(const Sum& s, Index c) {
    const Index cols = s.m.cols, chunks = (s.m.rows + kColumnSumChunk - 1) / kColumnSumChunk;
    const C total = sum_in_order<C>(chunks, [&](Index q) { return s.partial[q * cols + c]; });
    s.db[c] = S(C(s.db[c]) + total);
  });
}

// The same for one matrix: db[c] += sum over rows of m(r, c); partial: column_sum_partials(rows, cols).
template <class D, class S, class C = Compute<S>>
void add_column_sums(const D& device, ConstMatrixView<S> m, S* db, C* partial) {
  ColumnSum<S, C> sum{m, db};
  add_column_sums(device, std::span<ColumnSum<S, C>>(&sum, 1), partial);
}

}  // namespace moe::cuda::detail
