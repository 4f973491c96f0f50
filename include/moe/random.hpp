// moe/random.hpp: a counter-based generator. Every number is a pure function of
// (seed, stream, counter), so results never depend on call order, threads or the platform's
// <random> implementation, and the same numbers can be drawn on the GPU (normal(): within the last
// bits of a double, below).
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <span>

#include "moe/host_device.hpp"

namespace moe::random {

// SplitMix64's finaliser: a bijective 64-bit mixer with good avalanche.
MOE_HOST_DEVICE constexpr std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The 64 random bits at (seed, stream, counter).
MOE_HOST_DEVICE constexpr std::uint64_t bits(std::uint64_t seed, std::uint64_t stream, std::uint64_t counter) {
  return mix64(mix64(mix64(seed ^ 0x9e3779b97f4a7c15ULL) ^ stream) + counter * 0x9e3779b97f4a7c15ULL);
}

// Uniform in (0, 1): 53 random bits, never exactly 0 (safe for log).
MOE_HOST_DEVICE inline double uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t counter) {
  return (double(bits(seed, stream, counter) >> 11) + 0.5) * 0x1.0p-53;
}

// cos(2 pi u) for u in (0, 1). The GPU takes cospi(2u): its argument needs no reduction, where CUDA's
// cos keeps a path for huge arguments in local memory in every kernel that calls it (the project's GPU
// builds refuse local memory, CMakeLists.txt). Both are within an ulp or two of the exact value, so a
// draw on the GPU may differ from the host's in the last bits of a double (once in a great many draws,
// in the last bit of its float or bf16 rounding).
MOE_HOST_DEVICE inline double cos_two_pi(double u) {
#if defined(__CUDA_ARCH__)
  return ::cospi(2.0 * u);
#else
  return std::cos(2.0 * std::numbers::pi * u);
#endif
}

// Standard normal by Box-Muller from two uniforms at counters 2c and 2c+1.
MOE_HOST_DEVICE inline double normal(std::uint64_t seed, std::uint64_t stream, std::uint64_t counter) {
  const double u1 = uniform(seed, stream, 2 * counter);
  const double u2 = uniform(seed, stream, 2 * counter + 1);
  return std::sqrt(-2.0 * std::log(u1)) * cos_two_pi(u2);
}

// Fills values with N(0, std^2) draws of one stream.
template <class Scalar>
void fill_normal(std::span<Scalar> values, double std_dev, std::uint64_t seed, std::uint64_t stream) {
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = Scalar(std_dev * normal(seed, stream, i));
}

// Stream ids: one per parameter tensor kind, so adding a tensor never shifts another's values.
enum Stream : std::uint64_t {
  kRouterWeight = 1,
  kRandomGateLogits = 2,
  kExpertWeightIn = 3,
  kExpertWeightOut = 4,
};

}  // namespace moe::random
