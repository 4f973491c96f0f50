// The CUDA transformer pieces (moe/cuda/nn/: layernorm, embedding, attention, cross-entropy,
// AdamW) on the emulated device, against the CPU functions of moe/nn/ (every CI run, ASan too).
// tests/cuda/test_cuda_nn.cu runs the same cases on a GPU (moe_cuda_tests).
#include "cuda/emulated_test_device.hpp"

#include <cmath>
#include <vector>

#define CUDA_TEST_NAME(text) "cuda nn, emulated device: " text
#include "cuda/cuda_nn_attention_cases.hpp"
#include "cuda/cuda_nn_fused_attention_cases.hpp"
#include "cuda/cuda_nn_loss_cases.hpp"
#include "cuda/cuda_nn_norm_cases.hpp"
#include "cuda/cuda_nn_operand_cases.hpp"

TEST_CASE("cuda nn, emulated device: an AdamW step and a clipping go in a few launches, not one per tensor") {
  // GPT-2 small with MoE blocks has about 170 parameter tensors.
  using moe::cuda::nn::adamw_detail::GradTensor;
  using moe::cuda::nn::adamw_detail::UpdatedTensor;
  const cuda_test::TestDevice device;
  constexpr int kTensors = 170;
  std::vector<cuda_nn_loss_test::ParamSpec> specs;
  for (int i = 0; i < kTensors; ++i) specs.push_back({std::string("p").append(std::to_string(i)), {moe::Index(1 + i % 3), 100}, true, true});
  auto params = cuda_nn_loss_test::make_params<float>(device, 3, specs);
  moe::cuda::nn::AdamW<float, cuda_test::TestDevice> adamw(device);
  for (int t = 1; t <= 2; ++t) {
    cuda_nn_loss_test::set_gradients(device, params, 10 + std::uint64_t(t), 1.f);
    auto list = cuda_nn_loss_test::device_refs(params);
    const std::uint64_t before = device.launch_count();
    const double norm = moe::cuda::nn::clip_grad_norm(device, list, 1.0);
    REQUIRE(norm > 1.0);  // so the gradients are scaled
    const auto ceil_div = [](int a, int b) { return std::uint64_t((a + b - 1) / b); };
    const std::uint64_t table = ceil_div(kTensors, moe::cuda::kTensorsPerLaunch<GradTensor<float>>);
    CHECK(device.launch_count() - before == table + 2 + table);  // squares, their two-level ordered sum, the scaling
    const std::uint64_t before_step = device.launch_count();
    adamw.step(list);
    const std::uint64_t first_update = t == 1 ? 2 * kTensors : 0;  // zeroed moments, m and v per tensor, once
    CHECK(device.launch_count() - before_step ==
          first_update + ceil_div(kTensors, moe::cuda::kTensorsPerLaunch<UpdatedTensor<float>>));
  }
}

TEST_CASE("cuda warp tiles: the emulated device refuses what the tensor cores' loads refuse") {
  {
    const cuda_test::TestDevice device = cuda_test::make_device();
    CHECK_THROWS_WITH_AS(device.for_each_warp(1, moe::cuda::kWarpStagingMax + 1, [](moe::Index, const auto&) {}),
                         doctest::Contains("49153 bytes of staging a warp, over the 49152"), moe::Error);
    const auto load_at = [&](moe::Index offset, moe::Index ld) {
      device.for_each_warp(1, 4096, [=](moe::Index, const typename cuda_test::TestDevice::Warp& warp) {
        typename cuda_test::TestDevice::Warp::ARows a;
        warp.load_a(a, reinterpret_cast<const moe::bfloat16*>(warp.staging()) + offset, ld);
      });
    };
    CHECK_NOTHROW(load_at(16, 24));
    CHECK_THROWS_WITH_AS(load_at(8, 24), doctest::Contains("load_a at an address aligned to 16 bytes"), moe::Error);
    CHECK_THROWS_WITH_AS(load_at(0, 20), doctest::Contains("load_a with ld = 20"), moe::Error);
    // bf16 tiles come from the staging only (ldmatrix): the last row must end inside its 4096 bytes (2048 bf16),
    // here exactly at its end, then 16 elements past it.
    CHECK_NOTHROW(load_at(2048 - 15 * 16 - 16, 16));
    CHECK_THROWS_WITH_AS(load_at(2048 - 15 * 16, 16), doctest::Contains("load_a reads a tile outside the warp's staging"),
                         moe::Error);
    moe::cuda::DeviceArray<moe::bfloat16, cuda_test::TestDevice> global(16 * 16);
    const moe::bfloat16* in_memory = global.data();
    CHECK_THROWS_WITH_AS(device.for_each_warp(1, 4096,
                                              [=](moe::Index, const typename cuda_test::TestDevice::Warp& warp) {
                                                typename cuda_test::TestDevice::Warp::BCols b;
                                                warp.load_bt(b, in_memory, 16);
                                              }),
                         doctest::Contains("load_bt reads a tile outside the warp's staging"), moe::Error);

    // copy_rows lands at the wait that finishes its batch (before it the staging still holds its poison), zeros the
    // rows past `valid`, and refuses misaligned rows and a body that returns with copies in flight.
    std::vector<moe::bfloat16> host(3 * 24);
    for (std::size_t i = 0; i < host.size(); ++i) host[i] = moe::bfloat16(float(i + 1));
    moe::cuda::DeviceArray<moe::bfloat16, cuda_test::TestDevice> rows(moe::Index(host.size()));
    device.upload(rows.data(), host.data(), host.size() * sizeof(moe::bfloat16));
    const moe::bfloat16* src = rows.data();
    std::vector<float> before, after;
    device.for_each_warp(1, 4096, [&](moe::Index, const typename cuda_test::TestDevice::Warp& warp) {
      auto* dst = reinterpret_cast<moe::bfloat16*>(warp.staging());
      warp.copy_rows(dst, 32, 4, 3, 16, [&](moe::Index r) { return src + r * 24; });
      warp.commit_copies();
      before.push_back(float(dst[0]));
      warp.wait_copies(0);
      for (moe::Index r = 0; r < 4; ++r)
        for (moe::Index c = 0; c < 16; ++c) after.push_back(float(dst[r * 32 + c]));
    });
    CHECK(std::isnan(before[0]));
    bool copied = true;
    for (moe::Index r = 0; r < 4; ++r)
      for (moe::Index c = 0; c < 16; ++c)
        copied = copied && after[std::size_t(r * 16 + c)] == (r < 3 ? float(r * 24 + c + 1) : 0.f);
    CHECK(copied);
    CHECK_THROWS_WITH_AS(device.for_each_warp(1, 4096,
                                              [&](moe::Index, const typename cuda_test::TestDevice::Warp& warp) {
                                                auto* dst = reinterpret_cast<moe::bfloat16*>(warp.staging());
                                                warp.copy_rows(dst, 32, 2, 2, 16, [&](moe::Index r) { return src + r * 24; });
                                                warp.commit_copies();
                                              }),
                         doctest::Contains("returned with copies in flight (1 committed batches"), moe::Error);
    CHECK_THROWS_WITH_AS(device.for_each_warp(1, 4096,
                                              [&](moe::Index, const typename cuda_test::TestDevice::Warp& warp) {
                                                auto* dst = reinterpret_cast<moe::bfloat16*>(warp.staging());
                                                warp.copy_rows(dst, 32, 2, 2, 16, [&](moe::Index r) { return src + r * 21; });
                                              }),
                         doctest::Contains("copy_rows's row 1 is not 16-byte aligned"), moe::Error);
  }
}
