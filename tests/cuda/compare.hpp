// tests/cuda/compare.hpp: how the device test cases compare results with their CPU references.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace cuda_test {

// max |a - b| / max |b|: one number per tensor, robust to entries near zero. Infinite where only one side has a NaN
// at an entry (std::max would skip it).
inline double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) != std::isnan(b[i])) return INFINITY;
    diff = std::max(diff, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

// The same bytes (a run repeated must reproduce them exactly).
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// A GPU device's side streams for its GEMM groups (CudaDevice::set_gemm_lanes; 1: in order on the
// stream); nothing on a device without them (the emulated one runs a group in its launch order).
template <class D>
void set_gemm_lanes(const D& device, int lanes) {
  if constexpr (requires { device.set_gemm_lanes(1); }) device.set_gemm_lanes(lanes);
}

}  // namespace cuda_test
