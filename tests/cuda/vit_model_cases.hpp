// tests/cuda/vit_model_cases.hpp: the ViT MoE model (examples/vit_moe/model.hpp) on a CUDA-backend
// device against the CPU model, for one batch: the same initial values, the loss, the logits, the
// predictions and every parameter's gradient (fp32 within 1e-5 for every variant; bf16 storage with
// fp32 accumulation within 2e-2), and the same bits on a second run. Written once over the device:
// the including file defines, in namespace cuda_test, `TestDevice` and `make_device()`
// (tests/test_vit_device.cpp: the emulated device; tests/cuda/test_cuda_nn.cu: the GPU).
#pragma once

#include <doctest/doctest.h>

#include "cuda/compare.hpp"
#include "cuda/model_parity.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../../examples/common/nn_ops_cuda.hpp"
#include "../../examples/vit_moe/cpu_model.hpp"
#include "../../examples/vit_moe/model.hpp"

#ifndef CUDA_TEST_NAME
#define CUDA_TEST_NAME(text) "cuda: " text
#endif

namespace cuda_test::vit_model_cases {

using moe::Index;
template <class S>
using DeviceBackend = moe::cuda::BasicBackend<S, TestDevice>;

// 8x8 images of 2 channels in 4 patches of 4x4 (T = 5 tokens), 4 blocks of which 1 and 3 are MoE.
const vit::Config kTiny{.image_size = 8, .channels = 2, .patch = 4, .classes = 5, .layers = 4, .heads = 2,
                        .hidden = 16, .ffn = 24, .experts = 4, .top_k = 2, .moe_every = 2, .seed = 7};

struct Images {
  std::vector<float> pixels;
  std::vector<std::int32_t> labels;
  Index B = 3;
};
Images make_images(const vit::Config& config) {
  Images b;
  for (Index i = 0; i < b.B * config.pixels(); ++i) b.pixels.push_back(float(moe::random::normal(3, 1, std::uint64_t(i))));
  for (Index i = 0; i < b.B; ++i) b.labels.push_back(std::int32_t((i * 3 + 1) % config.classes));
  return b;
}

// The CPU model and the device model of `variant` (scalar S on the device) on one batch: the device
// model starts from the CPU's values (as S stores them); loss, logits and every gradient within
// tolerance, and the same predictions.
template <class S>
void check_model_parity(const std::string& variant, const vit::Config& config, double tolerance,
                        double gradient_tolerance = 0) {
  if (gradient_tolerance == 0) gradient_tolerance = tolerance;
  CAPTURE(variant);
  const Images batch = make_images(config);
  vit::with_variant<float>(variant, [&](auto cpu_tag) {
    typename decltype(cpu_tag)::type cpu(config);
    cpu.set_threads(1);
    return vit::with_variant_on<DeviceBackend<S>>(variant, [&](auto device_tag) {
      using DeviceModel = typename decltype(device_tag)::type;
      DeviceModel device(config, typename DeviceModel::Ops(make_device()));
      start_alike<S>(cpu, device);
      const double cpu_loss = cpu.forward(batch.pixels, batch.labels, batch.B);
      const double device_loss = device.forward(batch.pixels, batch.labels, batch.B);
      CHECK(std::abs(device_loss - cpu_loss) <= tolerance * std::abs(cpu_loss));
      CHECK(relative_error(device.host_logits(), cpu.host_logits()) < tolerance);
      if (std::is_same_v<S, float>) CHECK(device.predictions() == cpu.predictions());
      cpu.backward();
      device.backward();
      check_gradients_match(cpu, device, gradient_tolerance);
      return 0;
    });
  });
}

// Two device models of `variant` built alike, one forward and backward each: the same bits; and a
// second step on the first (gradients added to its zeroed ones) gives them again.
template <class S>
void check_same_bits(const std::string& variant) {
  CAPTURE(variant);
  const Images batch = make_images(kTiny);
  vit::with_variant_on<DeviceBackend<S>>(variant, [&](auto tag) {
    using DeviceModel = typename decltype(tag)::type;
    DeviceModel a(kTiny, typename DeviceModel::Ops(make_device())), b(kTiny, typename DeviceModel::Ops(make_device()));
    a.set_routing_step(0), b.set_routing_step(0);
    const double loss_a = a.forward(batch.pixels, batch.labels, batch.B);
    const double loss_b = b.forward(batch.pixels, batch.labels, batch.B);
    CHECK(loss_a == loss_b);
    a.backward();
    b.backward();
    const auto grads = host_tensors(a, true);
    CHECK(grads == host_tensors(b, true));
    a.zero_grad();
    a.set_routing_step(0);
    CHECK(a.forward(batch.pixels, batch.labels, batch.B) == loss_a);
    a.backward();
    CHECK(host_tensors(a, true) == grads);
    return 0;
  });
}

TEST_CASE(CUDA_TEST_NAME("vit model: loss, logits and every gradient match the CPU model in fp32 (every variant)")) {
  for (const std::string_view variant : vit::kVariants) check_model_parity<float>(std::string(variant), kTiny, 1e-5);
  vit::Config every = kTiny;  // every block MoE, 3 of 8 experts: the class token and patches routed everywhere
  every.moe_every = 1, every.experts = 8, every.top_k = 3;
  check_model_parity<float>("self", every, 1e-5);
}

TEST_CASE(CUDA_TEST_NAME("vit model: bf16 storage with fp32 accumulation stays within 2e-2 of the CPU")) {
  check_model_parity<moe::bfloat16>("dense", kTiny, 2e-2);
  // The routed variants' loss and logits keep to 2e-2; their gradients to 5e-2. The softmax over a
  // token's k chosen logits passes back w (dw - sum_j w_j dw_j), a difference of near-equal terms
  // at this width: the bf16 model's router weights (linear) and the norm2 weights whose last N
  // columns self-routing reads as logits come out up to 4.7% off, every other tensor within 2e-2.
  for (const std::string_view variant : {"self", "linear"}) check_model_parity<moe::bfloat16>(std::string(variant), kTiny, 2e-2, 5e-2);
}

TEST_CASE(CUDA_TEST_NAME("vit model: a second model built alike gives the same bits (fp32 and bf16)")) {
  for (const std::string_view variant : {"self", "random"}) {
    check_same_bits<float>(std::string(variant));
    check_same_bits<moe::bfloat16>(std::string(variant));
  }
}

}  // namespace cuda_test::vit_model_cases
