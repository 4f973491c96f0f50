// examples/gpt2_moe/emulated_trainer.cpp: the GPT-2 MoE trainers on the emulated device
// (emulated_trainer.hpp): model.hpp over moe::cuda::BasicBackend<S, EmulatedDevice>, the code
// cuda_trainer.cu runs on the GPU.
#include "emulated_trainer.hpp"

#include "device_trainer.hpp"
#include "moe/cuda/emulated_device.hpp"

namespace gpt2 {

std::unique_ptr<Trainer> make_emulated_trainer(std::string_view variant, const Config& config,
                                               const moe::nn::AdamWConfig& adamw, Precision precision,
                                               examples::AttentionKernel attention) {
  return make_device_trainer(variant, config, adamw, precision, moe::cuda::EmulatedDevice{}, attention);
}

}  // namespace gpt2
