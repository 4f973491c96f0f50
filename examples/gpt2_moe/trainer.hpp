// examples/gpt2_moe/trainer.hpp: a model and its optimizer behind one interface, gpt2::Trainer,
// which the training loop (train.hpp) drives. It hides the variant (a type), the world (the CPU
// or a CUDA-backend device) and the precision (fp32, or bf16 with fp32 master weights), so one
// loop trains every combination, and the GPU's models can be built in a translation unit of their
// own, compiled by nvcc (cuda_trainer.cu), behind make_cuda_trainer (cuda_trainer.hpp).
//
// ModelTrainer<Model> implements it for any Model of model.hpp over any backend. Checkpoints are
// written by the caller from the host state a trainer hands out (download_state: the parameters
// as fp32 in the CPU model's names and order, the master weights for bf16, and AdamW's moments),
// so a checkpoint is the same file whichever device wrote it. No Eigen, no CUDA headers here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/gradient_clip.hpp"
#include "../common/host_state.hpp"
#include "../common/run_device.hpp"
#include "config.hpp"
#include "model.hpp"
#include "router_bias.hpp"
#include "moe/nn/checks.hpp"
#include "moe/stats.hpp"
#include "moe/tensor.hpp"

namespace gpt2 {

// The arithmetic of a device trainer (examples/common/run_device.hpp): fp32, TF32 or bf16 with fp32
// master weights and optimizer state. The CPU trains in fp32.
using examples::Precision;
using examples::precision_name;
// AdamW's state in host memory (examples/common/host_state.hpp).
using examples::OptimizerState;

class Trainer {
 public:
  virtual ~Trainer() = default;

  virtual const Config& config() const = 0;
  virtual std::string_view variant() const = 0;
  virtual bool is_moe() const = 0;
  virtual std::string description() const = 0;  // where it runs and in which precision, for logs
  virtual Index parameter_count() = 0;
  virtual Index router_parameter_count() const = 0;
  virtual void set_threads(int threads) = 0;  // CPU threads; ignored on a device

  // One micro-batch (host ids): the mean loss; backward adds the gradients (once per forward).
  virtual double forward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets, Index B,
                         Index T) = 0;
  virtual void backward() = 0;
  virtual void zero_grad() = 0;
  // Gradients *= grad_scale (unless 1), then clipped to max_norm (unless 0); returns the norm
  // before clipping (0 when not clipping), non-finite if the gradients are. A device trainer
  // leaves clipping's factor to optimizer_step, which updates with the clipped gradients without
  // a pass of its own over them: between the two calls its stored gradients are not yet clipped.
  virtual double prepare_gradients(float grad_scale, double max_norm) = 0;
  virtual void optimizer_step(double lr) = 0;

  // The Random gate's draw counter (no-op / 0 for the other gates).
  virtual void set_routing_step(std::uint64_t step) = 0;
  virtual std::uint64_t routing_step() = 0;
  // MoE variants only (dense: an error).
  virtual void collect_routing_stats(bool on) = 0;
  virtual void reset_routing_stats() = 0;
  virtual moe::RoutingStats routing_stats(Index layer) const = 0;
  // Each MoE layer's router logits for ln_2's bias (router_bias.hpp), from the parameters now.
  virtual std::vector<std::vector<double>> router_bias_logits() = 0;

  // Host copies for checkpoints: `into` are the host parameters of a CPU model of the same variant
  // and config (model.parameters() names and order; fp32 values, master weights where the trainer
  // keeps them); the optimizer state when `optimizer` is not null.
  virtual void download_state(std::vector<moe::ParamRef<float>>& into, OptimizerState* optimizer) = 0;
  // The reverse: parameters from host values (rounded to the trainer's precision, the fp32 values
  // kept as master weights), the optimizer's state when given, the Random gate's counter.
  virtual void upload_state(std::vector<moe::ParamRef<float>>& from, const OptimizerState* optimizer,
                            std::uint64_t routing_step) = 0;
  // Device memory in use after the last step, in bytes (0 on the CPU: see train::peak_rss_bytes).
  virtual std::int64_t device_memory_in_use() const = 0;
  // The most device memory the library's allocations held at once since the last reset, in bytes
  // (moe/cuda/memory_ledger.hpp; 0 on the CPU), and the reset: the peak starts from what is held.
  virtual std::int64_t device_memory_peak() const = 0;
  virtual void reset_device_memory_peak() = 0;
};

// The Trainer of a Model (model.hpp) and its Optimizer (NnOps<B>::Optimizer), held by reference.
template <class Model>
class ModelTrainer : public Trainer {
 public:
  using S = typename Model::Scalar;
  using Optimizer = typename Model::Optimizer;

  ModelTrainer(Model& model, Optimizer& optimizer) : model_(model), optimizer_(optimizer) {}

  Model& model() { return model_; }
  Optimizer& optimizer() { return optimizer_; }

  const Config& config() const override { return model_.config(); }
  std::string_view variant() const override { return Model::variant; }
  bool is_moe() const override { return Model::is_moe; }
  std::string description() const override { return model_.ops().description(); }
  Index parameter_count() override { return model_.parameter_count(); }
  Index router_parameter_count() const override { return model_.router_parameter_count(); }
  void set_threads(int threads) override {
    model_.set_threads(threads);
    if constexpr (requires { optimizer_.set_threads(threads); }) optimizer_.set_threads(threads);
  }

  double forward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets, Index B,
                 Index T) override {
    return model_.forward(tokens, targets, B, T);
  }
  void backward() override { model_.backward(); }
  void zero_grad() override { model_.zero_grad(); }
  double prepare_gradients(float grad_scale, double max_norm) override {
    bind();
    if (grad_scale != 1.0f) model_.ops().scale_gradients(params_, grad_scale);
    return clip_.measure(model_.ops(), params_, max_norm);
  }
  void optimizer_step(double lr) override {
    bind();
    clip_.step(optimizer_, params_, lr);
  }

  void set_routing_step(std::uint64_t step) override { model_.set_routing_step(step); }
  std::uint64_t routing_step() override { return model_.routing_step(); }
  void collect_routing_stats(bool on) override {
    if constexpr (Model::is_moe) model_.collect_routing_stats(on);
    else moe::fail("gpt2: the dense model has no routing statistics");
  }
  void reset_routing_stats() override {
    if constexpr (Model::is_moe) model_.reset_routing_stats();
    else moe::fail("gpt2: the dense model has no routing statistics");
  }
  moe::RoutingStats routing_stats(Index layer) const override {
    if constexpr (Model::is_moe) return model_.routing_stats(layer);
    else moe::fail("gpt2: the dense model has no routing statistics");
  }
  std::vector<std::vector<double>> router_bias_logits() override { return gpt2::router_bias_logits(model_); }

  void download_state(std::vector<moe::ParamRef<float>>& into, OptimizerState* optimizer) override {
    bind();
    examples::download_state("gpt2", model_, optimizer_, std::span<moe::ParamRef<S>>(params_), into, optimizer);
  }

  void upload_state(std::vector<moe::ParamRef<float>>& from, const OptimizerState* optimizer,
                    std::uint64_t routing_step) override {
    bind();
    examples::upload_state("gpt2", model_, optimizer_, std::span<moe::ParamRef<S>>(params_), from, optimizer);
    model_.set_routing_step(routing_step);
  }

  std::int64_t device_memory_in_use() const override {
    if constexpr (requires { model_.ops().memory_in_use(); }) return model_.ops().memory_in_use();
    return 0;
  }
  std::int64_t device_memory_peak() const override {
    if constexpr (requires { model_.ops().memory_peak(); }) return model_.ops().memory_peak();
    return 0;
  }
  void reset_device_memory_peak() override {
    if constexpr (requires { model_.ops().reset_memory_peak(); }) model_.ops().reset_memory_peak();
  }

 private:
  // A device's clipping is applied by the update; the CPU's scales the gradients in place.
  examples::GradientClip<typename Model::Ops, S> clip_;  // from prepare_gradients to optimizer_step

  // The parameter list, taken once (the model's tensors never move).
  void bind() {
    if (params_.empty()) params_ = model_.parameters();
  }
  Model& model_;
  Optimizer& optimizer_;
  std::vector<moe::ParamRef<S>> params_;
};

// A model and its optimizer owned together with their trainer (what the factories return).
template <class Model>
class OwningTrainer final : public ModelTrainer<Model> {
  struct Parts {
    Model model;
    typename Model::Optimizer optimizer;
  };

 public:
  OwningTrainer(const Config& config, const moe::nn::AdamWConfig& adamw,
                typename Model::Ops ops = typename Model::Ops())
      : OwningTrainer(std::unique_ptr<Parts>(new Parts{Model(config, ops), ops.make_optimizer(adamw)})) {}

 private:
  explicit OwningTrainer(std::unique_ptr<Parts> parts)
      : ModelTrainer<Model>(parts->model, parts->optimizer), parts_(std::move(parts)) {}
  std::unique_ptr<Parts> parts_;
};

}  // namespace gpt2
