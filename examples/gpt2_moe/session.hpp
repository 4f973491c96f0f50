// examples/gpt2_moe/session.hpp: where a run trains (--device, --precision) and how its
// checkpoints are read and written, whichever the device: a Session is a Trainer (trainer.hpp)
// with its checkpoint I/O.
//
//   cpu       the CPU model (cpu_model.hpp), fp32; checkpoints straight from its tensors
//   cuda      the GPU (cuda_trainer.hpp; needs a build with CUDA and a device)
//   emulated  the GPU's code on the host (emulated_trainer.hpp): slow, for tests
//
// A device trainer's checkpoint goes through a host mirror: a CPU model and AdamW of the same
// variant and config, filled from the trainer's fp32 state (master weights for bf16) and written
// by save_checkpoint; loading reads into the mirror and uploads. So a checkpoint trained on the
// GPU resumes on the CPU and the other way round, and a Hugging Face GPT-2 file loads anywhere.
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint.hpp"
#include "cpu_model.hpp"
#include "cuda_trainer.hpp"
#include "emulated_trainer.hpp"
#include "train.hpp"
#include "trainer.hpp"

#ifndef MOE_GPT2_CUDA
#define MOE_GPT2_CUDA 0
#endif

namespace gpt2 {

using examples::Device;  // examples/common/run_device.hpp
using examples::parse_device;
using examples::parse_precision;

struct Session {
  std::unique_ptr<Trainer> trainer;
  Checkpointer save;                                              // the trainer's state -> a file
  std::function<CheckpointHeader(const std::filesystem::path&)> load;  // a file -> the trainer (and its optimizer)
};

namespace session_detail {

// A CPU model and AdamW of a trainer's variant and config, built on first use, through which the
// trainer's checkpoints are written and read.
class HostMirror {
 public:
  HostMirror(std::string variant, const Config& config, const moe::nn::AdamWConfig& adamw)
      : variant_(std::move(variant)), config_(config), adamw_(adamw) {}

  void save(Trainer& trainer, const std::filesystem::path& path, const std::map<std::string, std::string>& meta) {
    build();
    save_(trainer, path, meta);
  }
  CheckpointHeader load(Trainer& trainer, const std::filesystem::path& path) {
    build();
    return load_(trainer, path);
  }

 private:
  void build() {
    if (save_) return;
    with_variant<float>(variant_, [&](auto tag) {
      using M = typename decltype(tag)::type;
      auto parts = std::make_shared<OwningTrainer<M>>(config_, adamw_, typename M::Ops(1));
      save_ = [parts](Trainer& trainer, const std::filesystem::path& path,
                      const std::map<std::string, std::string>& meta) {
        auto params = parts->model().parameters();
        OptimizerState state;
        trainer.download_state(params, &state);
        parts->optimizer().set_state(state.step, std::move(state.m), std::move(state.v));
        parts->model().set_routing_step(trainer.routing_step());
        save_checkpoint(path, parts->model(), &parts->optimizer(), meta);
      };
      load_ = [parts](Trainer& trainer, const std::filesystem::path& path) {
        const CheckpointHeader header = load_checkpoint(path, parts->model(), &parts->optimizer());
        auto params = parts->model().parameters();
        OptimizerState state{parts->optimizer().step_count(), parts->optimizer().m(), parts->optimizer().v()};
        trainer.upload_state(params, header.has_optimizer_state ? &state : nullptr, parts->model().routing_step());
        return header;
      };
      return 0;
    });
  }

  std::string variant_;
  Config config_;
  moe::nn::AdamWConfig adamw_;
  std::function<void(Trainer&, const std::filesystem::path&, const std::map<std::string, std::string>&)> save_;
  std::function<CheckpointHeader(Trainer&, const std::filesystem::path&)> load_;
};

}  // namespace session_detail

// Throws moe::Error naming the flag for a device, precision and attention that cannot run together
// (bf16 or another attention on the CPU, tf32 on the emulated device, cuda in a build without CUDA
// or on a machine without a usable GPU): what make_session refuses, asked before the data loads.
inline void check_session(Device device, Precision precision, examples::AttentionKernel attention) {
  examples::check_precision(device, precision);
  examples::check_attention(device, attention);
  if (device == Device::cuda) {
#if MOE_GPT2_CUDA
    std::string why;
    moe::check(cuda_available(&why), "--device cuda: ", why);
#else
    moe::fail("--device cuda: this gpt2_moe was built without CUDA (configure with nvcc on the PATH, or "
              "-DMOE_ENABLE_CUDA=ON)");
#endif
  }
}

// A trainer of `variant` on `device` in `precision`, with its checkpoint I/O. (--device cuda
// exists in programs compiled with MOE_GPT2_CUDA=1 and linked with cuda_trainer.cu.) Throws moe::Error
// naming the flag for a combination that cannot run (check_session).
inline Session make_session(Device device, Precision precision, std::string_view variant, const Config& config,
                            const moe::nn::AdamWConfig& adamw,
                            examples::AttentionKernel attention = examples::kDefaultAttention) {
  check_session(device, precision, attention);
  Session session;
  if (device == Device::cpu) {
    with_variant<float>(variant, [&](auto tag) {
      using M = typename decltype(tag)::type;
      auto owned = std::make_unique<OwningTrainer<M>>(config, adamw);
      OwningTrainer<M>* trainer = owned.get();
      session.save = [trainer](const std::filesystem::path& path, const std::map<std::string, std::string>& meta) {
        save_checkpoint(path, trainer->model(), &trainer->optimizer(), meta);
      };
      session.load = [trainer](const std::filesystem::path& path) {
        return load_checkpoint(path, trainer->model(), &trainer->optimizer());
      };
      session.trainer = std::move(owned);
      return 0;
    });
    return session;
  }
  if (device == Device::cuda) {
#if MOE_GPT2_CUDA
    session.trainer = make_cuda_trainer(variant, config, adamw, precision, attention);
#endif
  } else {
    session.trainer = make_emulated_trainer(variant, config, adamw, precision, attention);
  }
  auto mirror = std::make_shared<session_detail::HostMirror>(std::string(variant), config, adamw);
  Trainer* trainer = session.trainer.get();
  session.save = [mirror, trainer](const std::filesystem::path& path, const std::map<std::string, std::string>& meta) {
    mirror->save(*trainer, path, meta);
  };
  session.load = [mirror, trainer](const std::filesystem::path& path) { return mirror->load(*trainer, path); };
  return session;
}

}  // namespace gpt2
