// examples/vit_moe/device_train.hpp: one variant's training run on a CUDA-backend device D (the
// GPU's moe::cuda::CudaDevice, the emulated device), through the same loop as the CPU's
// (train_loop.hpp). train_run.hpp picks the device from the command line (--device, --precision:
// examples/common/run_device.hpp); cuda_train.cu, compiled by nvcc, instantiates this for the GPU,
// emulated_train.cpp for the emulated device.
//
// A device model's checkpoints go through a host copy (HostCopy): a CPU model and AdamW of the
// same variant and config, filled from the device's fp32 state (master weights for bf16) and
// written by save_checkpoint; a resume reads into the copy and uploads. So a checkpoint trained on
// the GPU resumes on the CPU and the other way round. The copy is built by the host's code
// (train_run.hpp) and reached here through an interface only: nvcc's translation unit never sees
// the CPU model or Eigen, whose inline functions main.cpp compiles with other flags.
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/host_state.hpp"
#include "../common/nn_ops_cuda.hpp"
#include "../common/run_device.hpp"
#include "model.hpp"
#include "moe/bfloat16.hpp"
#include "train_loop.hpp"

#ifndef MOE_VIT_CUDA
#define MOE_VIT_CUDA 0
#endif

namespace vit {

using examples::Device;
using examples::Precision;

// One variant's run: train()'s arguments, the checkpoint it starts from and where it trains.
struct Run {
  std::string variant{};
  Config config{};
  TrainOptions options{};
  std::int64_t start_step = 0;
  std::filesystem::path resume{};  // a checkpoint to load first (empty: the model as built)
  std::string label{};             // the progress bar's name (empty: the variant)
  std::map<std::string, std::string> metadata{};  // into every checkpoint
  Device device = Device::cpu;
  Precision precision = Precision::fp32;
  examples::AttentionKernel attention = examples::kDefaultAttention;  // the device models' (run_device.hpp)
  std::string announce{};  // printed to stderr once the model is ready (after the resume's load), if any
};

// The checkpoints' host side of a device run: a CPU model and its AdamW of the run's variant and
// config (train_run.hpp's make_host_copy), seen as fp32 tensors in the CPU model's names and order.
class HostCopy {
 public:
  virtual ~HostCopy() = default;
  // Views of the copy's parameters (model.parameters() of the CPU model), to fill or read.
  virtual std::vector<moe::ParamRef<float>> parameters() = 0;
  // Reads a checkpoint into the copy and sets *routing_step (the Random gate's counter); returns
  // true and the optimizer's state in *optimizer when the file holds it.
  virtual bool load(const std::filesystem::path& path, examples::OptimizerState* optimizer,
                    std::uint64_t* routing_step) = 0;
  // Writes the copy's parameters, `optimizer` and `routing_step` as a checkpoint with `metadata`.
  virtual void save(const std::filesystem::path& path, examples::OptimizerState optimizer, std::uint64_t routing_step,
                    const std::map<std::string, std::string>& metadata) = 0;
};

namespace detail {
inline void announce(const Run& run) {
  if (!run.announce.empty()) std::fprintf(stderr, "%s\n", run.announce.c_str());
}
}  // namespace detail

// `run` on device D (moe::cuda::CudaDevice or EmulatedDevice) in the run's precision: the model
// starts from the CPU model's initial values (as S stores them), or from run.resume through
// `host`, which also writes its checkpoints.
template <class D>
TrainResult train_on_device(const Run& run, const Data& data, D device, HostCopy& host) {
  const auto build = [&]<class S>(std::type_identity<S>) {
    return with_variant_on<moe::cuda::BasicBackend<S, D>>(run.variant, [&](auto tag) {
      using M = typename decltype(tag)::type;
      M model(run.config, typename M::Ops(device, run.attention));
      auto optimizer = model.ops().make_optimizer(adamw_config(run.options));
      std::vector<moe::ParamRef<S>> params = model.parameters();
      const auto ours = std::span<moe::ParamRef<S>>(params);
      if (!run.resume.empty()) {
        examples::OptimizerState state;
        std::uint64_t routing_step = 0;
        const bool has_state = host.load(run.resume, &state, &routing_step);
        std::vector<moe::ParamRef<float>> host_params = host.parameters();
        examples::upload_state("vit", model, optimizer, ours, host_params, has_state ? &state : nullptr);
        model.set_routing_step(routing_step);
      }
      const Checkpointer write = [&](const std::filesystem::path& path, const std::map<std::string, std::string>& meta) {
        std::vector<moe::ParamRef<float>> host_params = host.parameters();
        examples::OptimizerState state;
        examples::download_state("vit", model, optimizer, ours, host_params, &state);
        host.save(path, std::move(state), model.routing_step(), meta);
      };
      detail::announce(run);
      std::fprintf(stderr, "vit_moe: %s on %s\n", run.variant.c_str(), model.ops().description().c_str());
      model.ops().reset_memory_peak();  // this run's peak: from the model and optimizer as built
      TrainResult result =
          train_loop(model, optimizer, data, run.options, run.start_step, run.label, run.metadata, write);
      result.device_memory_bytes = model.ops().memory_in_use();
      result.device_memory_peak_bytes = model.ops().memory_peak();
      result.trained_on = model.ops().description();
      return result;
    });
  };
  if (run.precision == Precision::bf16) return build(std::type_identity<moe::bfloat16>{});
  return build(std::type_identity<float>{});
}

// train_on_device on the emulated device (emulated_train.cpp: a translation unit of its own, which
// the build compiles at -O1; the host's other code never instantiates it).
TrainResult train_on_emulated(const Run& run, const Data& data, HostCopy& host);

#if MOE_VIT_CUDA
// Whether a GPU can run --device cuda (cuda_train.cu); if not, why.
bool cuda_available(std::string* why_not);
// train_on_device on the GPU (cuda_train.cu).
TrainResult train_on_cuda(const Run& run, const Data& data, HostCopy& host);
#endif

}  // namespace vit
