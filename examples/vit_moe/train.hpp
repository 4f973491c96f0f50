// examples/vit_moe/train.hpp: training one ViT (MoE) image classifier on the CPU: the loop of
// train_loop.hpp with the CPU model's AdamW, checkpoints written straight from their tensors.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "cpu_model.hpp"
#include "moe/nn/adamw.hpp"
#include "train_loop.hpp"

namespace vit {

// Fashion-MNIST's classes, in label order.
inline const std::vector<std::string> kFashionMnistClasses = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                              "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

// The CPU's AdamW at the options' settings (adamw_config).
inline moe::nn::AdamW<float> make_optimizer(const TrainOptions& options) {
  return moe::nn::AdamW<float>(adamw_config(options));
}

// train_loop for a CPU model (cpu_model.hpp) and its AdamW; options.checkpoint, when set, is
// written with save_checkpoint (checkpoint.hpp).
template <class Model>
TrainResult train(Model& model, moe::nn::AdamW<float>& optimizer, const Data& data, const TrainOptions& options,
                  std::int64_t start_step = 0, const std::string& label = "",
                  const std::map<std::string, std::string>& checkpoint_metadata = {}) {
  const Checkpointer write = [&](const std::filesystem::path& path, const std::map<std::string, std::string>& meta) {
    save_checkpoint(path, model, &optimizer, meta);
  };
  return train_loop(model, optimizer, data, options, start_step, label, checkpoint_metadata, write);
}

}  // namespace vit
