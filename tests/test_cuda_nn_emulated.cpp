// The CUDA transformer pieces (moe/cuda/nn/: layernorm, embedding, attention, cross-entropy,
// AdamW) on the emulated device, against the CPU functions of moe/nn/ (every CI run, ASan too).
// tests/cuda/test_cuda_nn.cu runs the same cases on a GPU (moe_cuda_tests).
#include "cuda/emulated_test_device.hpp"

#define CUDA_TEST_NAME(text) "cuda nn, emulated device: " text
#include "cuda/cuda_nn_attention_cases.hpp"
#include "cuda/cuda_nn_loss_cases.hpp"
#include "cuda/cuda_nn_norm_cases.hpp"

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
