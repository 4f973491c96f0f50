// moe/cuda/row_packs.hpp: a row's sums, maxima and updates in 16-byte packs (moe/cuda/pack.hpp), through the row
// work of a device (moe/cuda/device.hpp's D::Row: a warp per row on the GPU).
//
// Row work reads a row column by column: lane l takes c = l, l + 32, ... A warp then moves 32 elements per load, 64
// bytes in bf16, and a softmax over attention's [T, T] probabilities or the logits' [N, V] is bound by exactly those
// loads. Here lane l takes packs l, l + 32, ... instead (8 bf16 or 4 float per load) and folds each pack's elements in
// order before the butterfly. Both orders are fixed, so each gives the same bits run to run; they differ from each
// other in the last bits of a sum, so the caller picks one by shapes and alignments alone (row_packs_fit), as
// pack.hpp's kernels do.
//
// Each function takes one or more rows of the same element type, read at the same columns: f(c, row[c], more[c]...).
//   row_sum<Packed>(work, n, f, rows...)     sum over c in [0, n) of f(c, ...)
//   row_max<Packed>(work, n, f, rows...)     max over c in [0, n) of f(c, ...) (-inf for n = 0; `>` decides NaNs)
//   row_max_sum<Packed>(work, n, f, row, scale = 1)
//                                            {max, sum of exp((f - max) * scale)} over c in [0, n) (scale > 0) in
//                                            ONE read of the row (the online softmax's running pair, a whole pack
//                                            folded in at once; {-inf, 0} for n = 0; a NaN sum where a value is NaN
//                                            or +inf, as the CPU's)
//   row_update<Packed>(work, n, f, out, rows...)
//                                            out[c] = f(c, out[c], row[c]...) for every c in [0, n)
//   row_update_live<Packed>(work, n, live, f, out, rows...)
//                                            the same for c in [0, live), and out[c] = 0 for c in [live, n) with
//                                            nothing read there: a causal row's masked tail costs a store, not a
//                                            load of each row and a store
// Packed = true needs every row to start 16-byte aligned (row_packs_fit); n is free. A whole pack moves as one 16-byte
// load or store; a row's last, partial pack (n not a multiple of the pack: GPT-2's vocabulary of 50,257 logits, a
// causal row of attention) element by element, in the same order, so nothing past n is read or written.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "moe/config.hpp"
#include "moe/cuda/pack.hpp"
#include "moe/host_device.hpp"

namespace moe::cuda {

// Whether rows that start at base + r * stride (elements of S, r >= 0; stride 0: one row read for every row) can go in
// packs: every row starts 16-byte aligned (the base is, and the stride is a whole number of packs).
template <class S>
bool row_packs_fit(const S* base, Index stride) {
  return pack_aligned(base) && stride % kPackSize<S> == 0;
}

namespace row_packs_detail {

// f over the elements c < n of pack q of every row, folded in order by `fold` from `init`: a 16-byte load per row for
// a whole pack, element by element for the partial last one.
template <class T, class Fold, class F, class S, class... More>
MOE_HOST_DEVICE T fold_pack(Index q, Index n, T init, Fold fold, F f, const S* row, const More*... more) {
  constexpr Index P = kPackSize<S>;
  static_assert((std::is_same_v<S, More> && ...), "moe::cuda row packs: every row holds the same element type");
  T acc = init;
  if ((q + 1) * P <= n) {
    [&](const Pack<S>& x, const auto&... y) {
      for (Index i = 0; i < P; ++i) acc = fold(acc, f(q * P + i, x.v[i], y.v[i]...));
    }(load_pack(row + q * P), load_pack(more + q * P)...);
  } else {
    for (Index c = q * P; c < n; ++c) acc = fold(acc, f(c, row[c], more[c]...));
  }
  return acc;
}

}  // namespace row_packs_detail

template <bool Packed, class Row, class F, class S, class... More>
MOE_HOST_DEVICE auto row_sum(const Row& work, Index n, F f, const S* row, const More*... more) {
  using T = decltype(f(Index{}, row[0], more[0]...));
  if constexpr (Packed) {
    constexpr Index P = kPackSize<S>;
    const auto add = [](T a, T b) { return a + b; };
    return work.sum((n + P - 1) / P,
                    [&](Index q) { return row_packs_detail::fold_pack(q, n, T(0), add, f, row, more...); });
  } else {
    return work.sum(n, [&](Index c) { return f(c, row[c], more[c]...); });
  }
}

template <bool Packed, class Row, class F, class S, class... More>
MOE_HOST_DEVICE auto row_max(const Row& work, Index n, F f, const S* row, const More*... more) {
  using T = decltype(f(Index{}, row[0], more[0]...));
  if constexpr (Packed) {
    constexpr Index P = kPackSize<S>;
    const auto larger = [](T a, T b) { return b > a ? b : a; };  // the row work's own rule
    return work.max((n + P - 1) / P,
                    [&](Index q) { return row_packs_detail::fold_pack(q, n, -T(INFINITY), larger, f, row, more...); });
  } else {
    return work.max(n, [&](Index c) { return f(c, row[c], more[c]...); });
  }
}

// A softmax's running pair over some values: their max and the sum of exp((value - max) * scale),
// scale > 0 (attention's 1 / sqrt(head size) inside the exponent; 1 for cross-entropy, exactly).
template <class C>
struct MaxSum {
  C max, sum;
};

// The pair with one value more: a larger value rescales the sum to it (one exp either way). A value
// of -inf adds nothing; a NaN or a +inf makes the sum NaN, as exp(x - max) does on the CPU (its own
// term is exp(inf - inf): x - x adds 0 to a finite x's 1, NaN to an infinite one's).
template <class C>
MOE_HOST_DEVICE MaxSum<C> max_sum_add(MaxSum<C> acc, C x, C scale = C(1)) {
  if (x > acc.max) return {x, acc.sum * C(std::exp((acc.max - x) * scale)) + C(1) + (x - x)};
  if (acc.sum == C(0) && !(x == x)) return {acc.max, x};     // a NaN first (nothing else seen): NaN sum
  if (acc.sum == C(0) && x == -C(INFINITY)) return acc;      // -inf into nothing: still nothing
  return {acc.max, acc.sum + C(std::exp((x - acc.max) * scale))};
}

// The pair with P values more at once (a whole pack's): their max first, so the sum rescales once at most, then
// their P exponentials, independent of each other (max_sum_add value by value chains a compare, a branch and an exp
// on the pair's last max). Non-finite values as max_sum_add: -inf adds nothing, a NaN or a +inf makes the sum NaN.
// The same pair as P max_sum_adds up to the rounding of the sum.
template <class C, Index P>
MOE_HOST_DEVICE MaxSum<C> max_sum_add_all(MaxSum<C> acc, const C (&x)[P], C scale = C(1)) {
  C max = acc.max;
  MOE_UNROLL
  for (Index i = 0; i < P; ++i) max = x[i] > max ? x[i] : max;  // `>`: a NaN never becomes the max
  if (max == -C(INFINITY)) {  // nothing above -inf yet: only a NaN changes the pair
    MOE_UNROLL
    for (Index i = 0; i < P; ++i) acc.sum = x[i] == x[i] ? acc.sum : x[i];
    return acc;
  }
  if (max > acc.max) acc = {max, acc.sum * C(std::exp((acc.max - max) * scale))};
  C terms = 0;
  MOE_UNROLL
  for (Index i = 0; i < P; ++i) terms += C(std::exp((x[i] - max) * scale));  // exp(inf - inf), exp(NaN): NaN
  return {acc.max, acc.sum + terms};
}

// Two pairs as one, the same bits in either order (the larger max first; equal maxes: the larger
// sum first), so every lane of a butterfly ends with the same pair. An empty pair ({-inf, 0}) is
// the identity.
template <class C>
MOE_HOST_DEVICE MaxSum<C> max_sum_combine(MaxSum<C> a, MaxSum<C> b, C scale = C(1)) {
  const bool a_first = a.max > b.max || (a.max == b.max && a.sum >= b.sum);
  const MaxSum<C> hi = a_first ? a : b, lo = a_first ? b : a;
  if (lo.sum == C(0)) return hi;
  return {hi.max, hi.sum + lo.sum * C(std::exp((lo.max - hi.max) * scale))};
}

template <bool Packed, class Row, class F, class S, class C = decltype(std::declval<F>()(Index{}, std::declval<S>()))>
MOE_HOST_DEVICE MaxSum<C> row_max_sum(const Row& work, Index n, F f, const S* row, C scale = C(1)) {
  const MaxSum<C> empty{-C(INFINITY), C(0)};
  const auto combine = [scale](MaxSum<C> a, MaxSum<C> b) { return max_sum_combine(a, b, scale); };
  const auto add = [scale](MaxSum<C> a, C x) { return max_sum_add(a, x, scale); };
  if constexpr (Packed) {
    constexpr Index P = kPackSize<S>;
    return work.reduce((n + P - 1) / P, empty, [&](MaxSum<C> acc, Index q) {
      if ((q + 1) * P > n) return row_packs_detail::fold_pack(q, n, acc, add, f, row);  // the partial last pack
      const Pack<S> pack = load_pack(row + q * P);
      C x[P];
      MOE_UNROLL
      for (Index i = 0; i < P; ++i) x[i] = f(q * P + i, pack.v[i]);
      return max_sum_add_all(acc, x, scale);
    }, combine);
  } else {
    return work.reduce(n, empty, [&](MaxSum<C> acc, Index c) { return add(acc, f(c, row[c])); }, combine);
  }
}

template <bool Packed, class Row, class F, class S, class... More>
MOE_HOST_DEVICE void row_update_live(const Row& work, Index n, Index live, F f, S* out, const More*... more) {
  if constexpr (Packed) {
    constexpr Index P = kPackSize<S>;
    work.for_each((n + P - 1) / P, [&](Index q) {
      const bool whole = (q + 1) * P <= n;
      if (q * P >= live) {  // wholly past live: zeros, nothing read
        if (whole) {
          Pack<S> zero;
          for (Index i = 0; i < P; ++i) zero.v[i] = S(0);
          store_pack(out + q * P, zero);
        } else {
          for (Index c = q * P; c < n; ++c) out[c] = S(0);
        }
        return;
      }
      if (!whole || (q + 1) * P > live) {  // the partial last pack, or the one live ends in: element by element
        for (Index c = q * P; c < n && c < (q + 1) * P; ++c) out[c] = c < live ? f(c, out[c], more[c]...) : S(0);
        return;
      }
      [&](Pack<S> x, const auto&... y) {
        for (Index i = 0; i < P; ++i) x.v[i] = f(q * P + i, x.v[i], y.v[i]...);
        store_pack(out + q * P, x);
      }(load_pack(out + q * P), load_pack(more + q * P)...);
    });
  } else {
    work.for_each(n, [&](Index c) { out[c] = c < live ? f(c, out[c], more[c]...) : S(0); });
  }
}

// row_update_live with every column live: the same loads, stores and bits.
template <bool Packed, class Row, class F, class S, class... More>
MOE_HOST_DEVICE void row_update(const Row& work, Index n, F f, S* out, const More*... more) {
  row_update_live<Packed>(work, n, n, f, out, more...);
}

}  // namespace moe::cuda
