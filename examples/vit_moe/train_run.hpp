// examples/vit_moe/train_run.hpp: a vit_moe run where its command line says (--device,
// --precision: examples/common/run_device.hpp), the same loop (train_loop.hpp) on each:
//
//   cpu       the CPU model (cpu_model.hpp) and its AdamW, fp32 (train.hpp); checkpoints straight from its tensors
//   cuda      the GPU: train_on_cuda (cuda_train.cu, compiled by nvcc where the build has CUDA)
//   emulated  the GPU's code on the host: train_on_emulated (emulated_train.cpp), slow, for tests
//
// Host code only (main.cpp, the tests): the nvcc translation unit sees device_train.hpp alone, and
// reaches the device runs' checkpoints through the HostCopy built here.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint.hpp"
#include "cpu_model.hpp"
#include "device_train.hpp"
#include "train.hpp"

namespace vit {

namespace detail {

// HostCopy over a CPU model M and its AdamW: checkpoints read and written by checkpoint.hpp.
template <class M>
class CpuHostCopy final : public HostCopy {
 public:
  CpuHostCopy(const Config& config, const TrainOptions& options)
      : model_(config, typename M::Ops(1)), optimizer_(make_optimizer(options)) {}

  std::vector<moe::ParamRef<float>> parameters() override { return model_.parameters(); }
  bool load(const std::filesystem::path& path, examples::OptimizerState* optimizer,
            std::uint64_t* routing_step) override {
    const CheckpointHeader header = load_checkpoint(path, model_, &optimizer_);
    *optimizer = {optimizer_.step_count(), optimizer_.m(), optimizer_.v()};
    *routing_step = model_.routing_step();
    return header.has_optimizer_state;
  }
  void save(const std::filesystem::path& path, examples::OptimizerState optimizer, std::uint64_t routing_step,
            const std::map<std::string, std::string>& metadata) override {
    optimizer_.set_state(optimizer.step, std::move(optimizer.m), std::move(optimizer.v));
    model_.set_routing_step(routing_step);
    save_checkpoint(path, model_, &optimizer_, metadata);
  }

 private:
  M model_;
  moe::nn::AdamW<float> optimizer_;
};

}  // namespace detail

// The host copy of `run`'s model (its variant and config) for a device run's checkpoints.
inline std::unique_ptr<HostCopy> make_host_copy(const Run& run) {
  return with_variant<float>(run.variant, [&](auto tag) -> std::unique_ptr<HostCopy> {
    return std::make_unique<detail::CpuHostCopy<typename decltype(tag)::type>>(run.config, run.options);
  });
}

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
  const std::unique_ptr<HostCopy> host = make_host_copy(run);
  if (run.device == Device::emulated) return train_on_emulated(run, data, *host);
#if MOE_VIT_CUDA
  return train_on_cuda(run, data, *host);
#else
  moe::fail("unreachable: check_device refuses --device cuda here");
#endif
}

}  // namespace vit
