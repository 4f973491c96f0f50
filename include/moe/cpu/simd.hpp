// moe/cpu/simd.hpp: reductions, exponentials and square roots over one row, in SIMD packets, in a
// fixed order.
//
// Every loop runs in packets from index 0 and finishes the tail in a padded packet or in scalar
// code: an element's bits depend on the row's values and length alone, never on its address
// (Eigen's own reductions peel to alignment) or on the thread that runs it. That is what lets
// per-row kernels (softmax, cross-entropy, layernorm) keep the same bits on any thread count.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>

#include "moe/config.hpp"

namespace moe::cpu::simd {

template <class S>
using Packet = typename Eigen::internal::packet_traits<S>::type;
template <class S>
inline constexpr Index kLanes = Eigen::internal::unpacket_traits<Packet<S>>::size;

// The lanes of a packet combined left to right (Eigen's predux trips GCC 12's -Wuninitialized
// in its AVX-512 intrinsic headers).
template <class S, class Combine>
S fold_lanes(const Packet<S>& packet, Combine combine) {
  alignas(64) S lanes[kLanes<S>];
  Eigen::internal::pstore(lanes, packet);
  S result = lanes[0];
  for (Index i = 1; i < kLanes<S>; ++i) result = combine(result, lanes[i]);
  return result;
}
template <class S>
S sum_lanes(const Packet<S>& packet) {
  return fold_lanes<S>(packet, [](S a, S b) { return a + b; });
}

// sum_j a[j]: per-lane sums over the full packets, folded left to right, then the tail.
template <class S>
S sum(const S* a, Index n) {
  using namespace Eigen::internal;
  using P = Packet<S>;
  constexpr Index L = kLanes<S>;
  const Index full = n - n % L;
  P lanes = pset1<P>(S(0));
  for (Index j = 0; j < full; j += L) lanes = padd(lanes, ploadu<P>(a + j));
  S total = sum_lanes<S>(lanes);
  for (Index j = full; j < n; ++j) total += a[j];
  return total;
}

// sum_j a[j] b[j], in the same order as sum().
template <class S>
S dot(const S* a, const S* b, Index n) {
  using namespace Eigen::internal;
  using P = Packet<S>;
  constexpr Index L = kLanes<S>;
  const Index full = n - n % L;
  P lanes = pset1<P>(S(0));
  for (Index j = 0; j < full; j += L) lanes = pmadd(ploadu<P>(a + j), ploadu<P>(b + j), lanes);
  S total = sum_lanes<S>(lanes);
  for (Index j = full; j < n; ++j) total += a[j] * b[j];
  return total;
}

// max_j a[j] (n >= 1; NaN handling is that of std::max and pmax, not specified).
template <class S>
S max(const S* a, Index n) {
  using namespace Eigen::internal;
  using P = Packet<S>;
  constexpr Index L = kLanes<S>;
  const Index full = n - n % L;
  P lanes = pset1<P>(a[0]);
  for (Index j = 0; j < full; j += L) lanes = pmax(lanes, ploadu<P>(a + j));
  S result = fold_lanes<S>(lanes, [](S x, S y) { return std::max(x, y); });
  for (Index j = full; j < n; ++j) result = std::max(result, a[j]);
  return result;
}

// Returns sum_j exp((a[j] - shift) * scale) (per-lane sums, folded left to right) and, if out is
// not null, stores the terms in out[0..n) (out may be a). The tail runs in a padded packet, so
// every element goes through the same vector exp.
template <class S>
S exp_and_sum(const S* a, Index n, S shift, S scale, S* out = nullptr) {
  using namespace Eigen::internal;
  using P = Packet<S>;
  constexpr Index L = kLanes<S>;
  const Index full = n - n % L;
  const P shift_p = pset1<P>(shift), scale_p = pset1<P>(scale);
  P sums = pset1<P>(S(0));
  for (Index j = 0; j < full; j += L) {
    const P e = pexp(pmul(psub(ploadu<P>(a + j), shift_p), scale_p));
    if (out) pstoreu(out + j, e);
    sums = padd(sums, e);
  }
  if (full < n) {
    alignas(64) S tail[L];
    for (Index i = 0; i < L; ++i) tail[i] = full + i < n ? a[full + i] : shift;
    pstore(tail, pexp(pmul(psub(pload<P>(tail), shift_p), scale_p)));
    for (Index i = n - full; i < L; ++i) tail[i] = S(0);  // padding lanes add nothing
    sums = padd(sums, pload<P>(tail));
    if (out) std::copy(tail, tail + (n - full), out + full);
  }
  return sum_lanes<S>(sums);
}

// The square root of every lane, correctly rounded as std::sqrt's. (Eigen's psqrt for float
// packets is, under its default EIGEN_FAST_MATH, an approximate reciprocal square root and a
// Newton step: a bit or two off, so the packets and a scalar tail would disagree.)
#if defined(EIGEN_VECTORIZE_AVX512)
inline __m512 exact_sqrt(__m512 x) { return _mm512_sqrt_ps(x); }
inline __m512d exact_sqrt(__m512d x) { return _mm512_sqrt_pd(x); }
#endif
#if defined(EIGEN_VECTORIZE_AVX)
inline __m256 exact_sqrt(__m256 x) { return _mm256_sqrt_ps(x); }
inline __m256d exact_sqrt(__m256d x) { return _mm256_sqrt_pd(x); }
#endif
#if defined(EIGEN_VECTORIZE_SSE2)
inline __m128 exact_sqrt(__m128 x) { return _mm_sqrt_ps(x); }
inline __m128d exact_sqrt(__m128d x) { return _mm_sqrt_pd(x); }
#endif
// Any other packet (another architecture, or S itself where S has no packets): lane by lane.
template <class P>
P exact_sqrt(const P& x) {
  using S = typename Eigen::internal::unpacket_traits<P>::type;
  constexpr Index L = Eigen::internal::unpacket_traits<P>::size;
  if constexpr (L == 1) {
    return P(std::sqrt(x));
  } else {
    alignas(64) S lanes[L];
    Eigen::internal::pstore(lanes, x);
    for (Index i = 0; i < L; ++i) lanes[i] = std::sqrt(lanes[i]);
    return Eigen::internal::pload<P>(lanes);
  }
}

// out[j] = a[j] * factor for j < n (out may be a).
template <class S>
void scale(const S* a, Index n, S factor, S* out) {
  using namespace Eigen::internal;
  using P = Packet<S>;
  constexpr Index L = kLanes<S>;
  const Index full = n - n % L;
  const P factor_p = pset1<P>(factor);
  for (Index j = 0; j < full; j += L) pstoreu(out + j, pmul(ploadu<P>(a + j), factor_p));
  for (Index j = full; j < n; ++j) out[j] = a[j] * factor;
}

}  // namespace moe::cpu::simd
