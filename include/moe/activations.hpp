// moe/activations.hpp: the experts' nonlinearities as scalar formulas. Backends implement them
// (vectorised); tests hold them up against these.
#pragma once

#include <cmath>

#include "moe/host_device.hpp"

namespace moe::activation {

// GPT-2's tanh approximation of GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
inline constexpr double kGeluScale = 0.7978845608028654;  // sqrt(2/pi)
inline constexpr double kGeluCubic = 0.044715;

template <class S>
MOE_HOST_DEVICE S gelu(S x) {
  const S inner = S(kGeluScale) * (x + S(kGeluCubic) * x * x * x);
  return S(0.5) * x * (S(1) + std::tanh(inner));
}

template <class S>
MOE_HOST_DEVICE S gelu_grad(S x) {
  const S t = std::tanh(S(kGeluScale) * (x + S(kGeluCubic) * x * x * x));
  return S(0.5) * (S(1) + t) + S(0.5) * x * (S(1) - t * t) * S(kGeluScale) * (S(1) + S(3 * kGeluCubic) * x * x);
}

// SiLU (swish): x * sigmoid(x); SwiGLU's output is silu(gate) * up.
template <class S>
MOE_HOST_DEVICE S sigmoid(S x) {
  return S(1) / (S(1) + std::exp(-x));
}

template <class S>
MOE_HOST_DEVICE S silu(S x) {
  return x * sigmoid(x);
}

template <class S>
MOE_HOST_DEVICE S silu_grad(S x) {
  const S s = sigmoid(x);
  return s * (S(1) + x * (S(1) - s));
}

}  // namespace moe::activation
