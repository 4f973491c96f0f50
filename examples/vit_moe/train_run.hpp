// examples/vit_moe/train_run.hpp: a vit_moe run where its command line says (--device,
// --precision: examples/common/run_device.hpp), the same train() loop on each:
//
//   cpu       the CPU model (cpu_model.hpp) and its AdamW, fp32; checkpoints straight from its tensors
//   cuda      the GPU: train_on_cuda (cuda_train.cu, compiled by nvcc where the build has CUDA)
//   emulated  the GPU's code on the host (moe::cuda::EmulatedDevice): slow, for tests
//
// Host code only (main.cpp, the tests): the nvcc translation unit sees device_train.hpp alone.
#pragma once

#include <string>

#include "device_train.hpp"
#include "moe/cuda/emulated_device.hpp"

namespace vit {

// --device cuda needs a build with CUDA and a usable GPU: refused naming the flag otherwise.
inline void check_device(Device device) {
  if (device != Device::cuda) return;
#if MOE_VIT_CUDA
  std::string why;
  moe::check(cuda_available(&why), "--device cuda: ", why);
#else
  moe::fail("--device cuda: this vit_moe was built without CUDA (configure with nvcc on the PATH, or "
            "-DMOE_ENABLE_CUDA=ON)");
#endif
}

// `run` where it says: the CPU, the GPU or the emulated device. Throws moe::Error naming the flag
// for a combination that cannot run (bf16 on the CPU, cuda in a build without CUDA or without a GPU).
inline TrainResult train_run(const Run& run, const Data& data) {
  examples::check_precision(run.device, run.precision);
  examples::check_attention(run.device, run.attention);
  check_device(run.device);
  if (run.device == Device::cpu) {
    return with_variant<float>(run.variant, [&](auto tag) {
      typename decltype(tag)::type model(run.config);
      moe::nn::AdamW<float> optimizer = make_optimizer(run.options);
      if (!run.resume.empty()) load_checkpoint(run.resume, model, &optimizer);
      detail::announce(run);
      return train(model, optimizer, data, run.options, run.start_step, run.label, run.metadata);
    });
  }
  if (run.device == Device::emulated) return train_on_device(run, data, moe::cuda::EmulatedDevice{});
#if MOE_VIT_CUDA
  return train_on_cuda(run, data);
#else
  moe::fail("unreachable: check_device refuses --device cuda here");
#endif
}

}  // namespace vit
