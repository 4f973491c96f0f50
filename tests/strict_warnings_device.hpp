// What the strict-warnings builds (tests/CMakeLists.txt) share: a MoE layer's training step over any
// backend, and the device half: that step and every transformer piece of moe::cuda::nn over any
// CUDA-backend device. strict_warnings.cpp instantiates them on the CPU and the emulated device with
// the host compiler, cuda/strict_warnings.cu on CudaDevice with nvcc. Built, never run.
#pragma once

#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>

#include "moe/cuda/nn/adamw.hpp"
#include "moe/cuda/nn/attention.hpp"
#include "moe/cuda/nn/cross_entropy.hpp"
#include "moe/cuda/nn/embedding.hpp"
#include "moe/cuda/nn/fused_attention.hpp"
#include "moe/cuda/nn/layernorm.hpp"
#include "moe/cuda/nn/linear.hpp"
#include "moe/layer.hpp"

namespace strict {

// A forward, a backward, then update(layer.backend(), parameters): the clipped AdamW step of the
// backend's world (the CPU's in strict_warnings.cpp, a device's below).
template <template <class> class Gate, template <class> class Experts, class B, class Update>
bool trains_a_step(B backend, Update update) {
  moe::MoELayer<Gate, Experts, B> layer({.hidden = 16, .ffn = 32, .experts = 4, .top_k = 2}, 7, {}, {},
                                        std::move(backend));
  typename B::Matrix x(3, 16);
  layer.backend().fill_normal(x, 1.0, 1, 1);
  const auto y = layer.forward(x);
  const auto dx = layer.backward(y);
  auto params = layer.parameters();
  update(layer.backend(), params);
  return y.rows() == 3 && dx.cols() == 16 && layer.stats().tokens == 3;
}

// trains_a_step on a device backend B (moe::cuda::nn's clipping and AdamW).
template <template <class> class Gate, template <class> class Experts, class B>
bool trains_a_step_on_device(B backend) {
  return trains_a_step<Gate, Experts>(std::move(backend), [](const B& b, auto& params) {
    const auto& device = b.device();
    moe::cuda::nn::clip_grad_norm(device, params, 1.0);
    moe::cuda::nn::AdamW<typename B::Scalar, std::remove_cvref_t<decltype(device)>> optimizer(device);
    optimizer.step(params);
  });
}

// Every transformer piece's forward and backward on a device (float and bf16; the fused attention
// takes bf16 only).
template <class S, class D>
void device_pieces(const D& device, std::span<const std::int32_t> ids, moe::MatrixView<S> m, S* p,
                   moe::Compute<S>* c, float* lse) {
  namespace nn = moe::cuda::nn;
  nn::layernorm_forward<S>(device, m, p, p, m, c, c);
  nn::layernorm_backward<S>(device, m, m, p, c, c, m, p, p);
  nn::linear_forward<S>(device, m, m, p, m);
  nn::linear_backward<S>(device, m, m, m, m, m, p);
  nn::embedding_forward<S>(device, ids, 1, 1, m, m, m);
  nn::embedding_backward<S>(device, m, ids, 1, 1, m, m);
  nn::attention_forward<S>(device, m, 1, 1, 1, true, m, p);
  nn::attention_backward<S>(device, m, m, p, 1, 1, 1, true, m);
  nn::cross_entropy_forward<S>(device, m, ids, p, c);
  nn::cross_entropy_backward<S>(device, m, ids, 1.0, m, c);
  if constexpr (std::is_same_v<S, moe::bfloat16>) {
    nn::fused_attention_forward<S>(device, m, 1, 1, 1, true, m, lse);
    nn::fused_attention_backward<S>(device, m, m, m, lse, 1, 1, 1, true, m);
  }
}

// Both element types' pieces on one device.
template <class D>
void every_device_piece(const D& device, std::span<const std::int32_t> ids, moe::MatrixView<float> m, float* p,
                        moe::MatrixView<moe::bfloat16> h, moe::bfloat16* q, float* lse) {
  device_pieces<float>(device, ids, m, p, p, lse);
  device_pieces<moe::bfloat16>(device, ids, h, q, p, lse);
}

}  // namespace strict
