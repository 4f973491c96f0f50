// moe/bfloat16.hpp: a 16-bit brain float (1 sign, 8 exponent, 7 mantissa bits): the upper half
// of an IEEE float, bit-compatible with CUDA's __nv_bfloat16 and PyTorch's torch.bfloat16.
// Storage only: arithmetic converts to float (compute_type), so sums accumulate in fp32.
#pragma once

#include <cstdint>
#include <cstring>

#include "moe/host_device.hpp"

namespace moe {

struct bfloat16 {
  using compute_type = float;
  std::uint16_t bits = 0;

  bfloat16() = default;
  // Round to nearest, ties to even; NaN stays NaN (quietened), +-inf stays +-inf.
  MOE_HOST_DEVICE explicit bfloat16(float value) : bits(round(value)) {}
  MOE_HOST_DEVICE explicit bfloat16(double value) : bfloat16(float(value)) {}
  MOE_HOST_DEVICE explicit bfloat16(int value) : bfloat16(float(value)) {}
  MOE_HOST_DEVICE explicit operator float() const {
    const std::uint32_t wide = std::uint32_t(bits) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof value);
    return value;
  }
  MOE_HOST_DEVICE explicit operator double() const { return double(float(*this)); }

  static bfloat16 from_bits(std::uint16_t b) {
    bfloat16 h;
    h.bits = b;
    return h;
  }
  friend bool operator==(bfloat16 a, bfloat16 b) { return a.bits == b.bits; }

 private:
  MOE_HOST_DEVICE static std::uint16_t round(float value) {
    std::uint32_t wide;
    std::memcpy(&wide, &value, sizeof wide);
    if ((wide & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((wide >> 16) | 0x40u);  // NaN: keep it one
    const std::uint32_t lsb = (wide >> 16) & 1u;
    return std::uint16_t((wide + 0x7fffu + lsb) >> 16);  // overflow rounds to inf, as it should
  }
};
static_assert(sizeof(bfloat16) == 2, "bfloat16 must be two bytes, the layout cuBLAS and safetensors use");

}  // namespace moe
