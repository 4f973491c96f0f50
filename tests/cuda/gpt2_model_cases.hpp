// tests/cuda/gpt2_model_cases.hpp: the GPT-2 MoE model (examples/gpt2_moe/model.hpp) on a
// CUDA-backend device against the CPU model, for one batch: the same initial values, the loss and
// every parameter's gradient (fp32 within 1e-5 for every variant; bf16 storage with fp32
// accumulation within 2e-2), and the same bits on a second run. Written once over the device: the
// including file defines, in namespace cuda_test, `TestDevice` and `make_device()`
// (tests/test_gpt2_device.cpp: the emulated device; tests/cuda/test_cuda_nn.cu: the GPU).
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
#include "../../examples/gpt2_moe/cpu_model.hpp"
#include "../../examples/gpt2_moe/model.hpp"

#ifndef CUDA_TEST_NAME
#define CUDA_TEST_NAME(text) "cuda: " text
#endif

namespace cuda_test::gpt2_model_cases {

using moe::Index;
template <class S>
using DeviceBackend = moe::cuda::BasicBackend<S, TestDevice>;

const gpt2::Config kTiny{.vocab = 37, .context = 8, .layers = 2, .heads = 2, .hidden = 16, .ffn = 24,
                         .experts = 4, .top_k = 2, .seed = 5};

struct Batch {
  std::vector<std::int32_t> tokens, targets;
  Index B = 2, T = 7;
};
Batch make_batch(const gpt2::Config& config) {
  Batch b;
  if (config.context >= 40) b.T = 37;  // across the fused attention's 16-row tiles and 32-key blocks
  for (Index i = 0; i < b.B * b.T; ++i) {
    b.tokens.push_back(std::int32_t((i * 13 + 5) % config.vocab));
    b.targets.push_back(i % 5 == 3 ? -1 : std::int32_t((i * 7 + 2) % config.vocab));  // some ignored
  }
  return b;
}

// The CPU model and the device model of `variant` (scalar S on the device) on one batch: the device
// model starts from the CPU's values (as S stores them); loss and every gradient within tolerance.
template <class S>
void check_model_parity(const std::string& variant, const gpt2::Config& config, double tolerance,
                        examples::AttentionKernel attention = examples::AttentionKernel::fused) {
  CAPTURE(variant);
  CAPTURE(attention == examples::AttentionKernel::fused);
  const Batch batch = make_batch(config);
  gpt2::with_variant<float>(variant, [&](auto cpu_tag) {
    typename decltype(cpu_tag)::type cpu(config);
    cpu.set_threads(1);
    return gpt2::with_variant_on<DeviceBackend<S>>(variant, [&](auto device_tag) {
      using DeviceModel = typename decltype(device_tag)::type;
      DeviceModel device(config, typename DeviceModel::Ops(make_device(), attention));
      start_alike<S>(cpu, device);
      const double cpu_loss = cpu.forward(batch.tokens, batch.targets, batch.B, batch.T);
      const double device_loss = device.forward(batch.tokens, batch.targets, batch.B, batch.T);
      CHECK(std::abs(device_loss - cpu_loss) <= tolerance * std::abs(cpu_loss));
      cpu.backward();
      device.backward();
      check_gradients_match(cpu, device, tolerance);
      return 0;
    });
  });
}

// Two device models of `variant` built alike, one forward and backward each: the same bits.
template <class S>
void check_same_bits(const std::string& variant) {
  CAPTURE(variant);
  const Batch batch = make_batch(kTiny);
  gpt2::with_variant_on<DeviceBackend<S>>(variant, [&](auto tag) {
    using DeviceModel = typename decltype(tag)::type;
    DeviceModel a(kTiny, typename DeviceModel::Ops(make_device())), b(kTiny, typename DeviceModel::Ops(make_device()));
    const double loss_a = a.forward(batch.tokens, batch.targets, batch.B, batch.T);
    const double loss_b = b.forward(batch.tokens, batch.targets, batch.B, batch.T);
    CHECK(loss_a == loss_b);
    a.backward();
    b.backward();
    CHECK(host_tensors(a, true) == host_tensors(b, true));
    return 0;
  });
}

TEST_CASE(CUDA_TEST_NAME("gpt2 model: loss and every gradient match the CPU model in fp32 (every variant)")) {
  for (const std::string_view variant : gpt2::kVariants) check_model_parity<float>(std::string(variant), kTiny, 1e-5);
  gpt2::Config routed = kTiny;
  routed.route_from_residual = true;
  check_model_parity<float>("self", routed, 1e-5);
}

TEST_CASE(CUDA_TEST_NAME("gpt2 model: bf16 storage with fp32 accumulation stays within 2e-2 of the CPU")) {
  for (const std::string_view variant : {"dense", "self"}) check_model_parity<moe::bfloat16>(std::string(variant), kTiny, 2e-2);
  // Head size 32: the fused attention's smallest (kTiny's 8 takes the materialised one), and the materialised one on
  // the same model. Dense only: at this width and T = 37, self-routing's bf16 model sends a token to another expert
  // than the CPU's (its gradients then differ by up to 9%, with either attention). Within 3e-2: at hidden 64 the bf16
  // model's own error reaches 2.3e-2 on some seeds with either attention (a bias gradient summed over 74 rows); the
  // pieces keep to 2e-2 in their own cases.
  gpt2::Config wider = kTiny;
  wider.hidden = 64, wider.ffn = 48, wider.context = 40;
  const examples::NnOps<DeviceBackend<moe::bfloat16>> fused(make_device(), examples::AttentionKernel::fused);
  REQUIRE(fused.uses_fused_attention(wider.hidden, wider.heads));
  REQUIRE_FALSE(fused.uses_fused_attention(kTiny.hidden, kTiny.heads));
  REQUIRE_FALSE(examples::NnOps<DeviceBackend<moe::bfloat16>>(make_device()).uses_fused_attention(wider.hidden, wider.heads));
  for (const auto attention : {examples::AttentionKernel::fused, examples::AttentionKernel::materialized})
    check_model_parity<moe::bfloat16>("dense", wider, 3e-2, attention);
}

TEST_CASE(CUDA_TEST_NAME("gpt2 model: a second model built alike gives the same bits (fp32 and bf16)")) {
  for (const std::string_view variant : {"linear", "random"}) {
    check_same_bits<float>(std::string(variant));
    check_same_bits<moe::bfloat16>(std::string(variant));
  }
}

}  // namespace cuda_test::gpt2_model_cases
