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

#include "config.hpp"
#include "model.hpp"
#include "moe/nn/checks.hpp"
#include "moe/stats.hpp"
#include "moe/tensor.hpp"

namespace gpt2 {

// The arithmetic of a device trainer: fp32 (cuBLAS exact fp32: what parity is checked with), fp32
// with TF32 tensor-core products, or bf16 storage and products with fp32 accumulation, fp32
// master weights and fp32 optimizer state (mixed precision). The CPU trains in fp32.
enum class Precision { fp32, tf32, bf16 };

inline std::string_view precision_name(Precision p) {
  return p == Precision::fp32 ? "fp32" : p == Precision::tf32 ? "tf32" : "bf16";
}

// AdamW's state in host memory: step count and, per parameter, the moments (empty where the
// parameter was never updated).
struct OptimizerState {
  int step = 0;
  std::vector<std::vector<float>> m, v;
};

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
    if (max_norm <= 0) return 0.0;
    if constexpr (kClipInUpdate) {
      const double norm = model_.ops().grad_norm(params_);
      clip_factor_ = model_.ops().clip_factor(norm, max_norm);
      return norm;
    } else {
      return model_.ops().clip_grad_norm(params_, max_norm);
    }
  }
  void optimizer_step(double lr) override {
    bind();
    if constexpr (kClipInUpdate) {
      optimizer_.step(params_, lr, clip_factor_);
      clip_factor_ = 1;
    } else {
      optimizer_.step(params_, lr);
    }
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

  void download_state(std::vector<moe::ParamRef<float>>& into, OptimizerState* optimizer) override {
    bind();
    check_list(into);
    std::vector<std::vector<float>> master;
    if constexpr (requires { optimizer_.master_weights(); }) master = optimizer_.master_weights();
    for (std::size_t i = 0; i < params_.size(); ++i) {
      if (i < master.size() && !master[i].empty())
        std::copy(master[i].begin(), master[i].end(), into[i].value.begin());
      else if (!same_memory(into[i].value, params_[i].value))
        model_.ops().download(params_[i].value, into[i].value);
    }
    if (!optimizer) return;
    optimizer->step = optimizer_.step_count();
    optimizer->m = to_float(optimizer_.m());
    optimizer->v = to_float(optimizer_.v());
  }

  void upload_state(std::vector<moe::ParamRef<float>>& from, const OptimizerState* optimizer,
                    std::uint64_t routing_step) override {
    bind();
    check_list(from);
    for (std::size_t i = 0; i < params_.size(); ++i)
      if (!same_memory(from[i].value, params_[i].value)) model_.ops().upload(from[i].value, params_[i].value);
    if constexpr (requires { optimizer_.set_master_weights({}); }) {
      std::vector<std::vector<float>> master(from.size());
      for (std::size_t i = 0; i < from.size(); ++i) master[i].assign(from[i].value.begin(), from[i].value.end());
      optimizer_.set_master_weights(master);
    }
    if (optimizer) optimizer_.set_state(optimizer->step, from_float(optimizer->m), from_float(optimizer->v));
    model_.set_routing_step(routing_step);
  }

  std::int64_t device_memory_in_use() const override {
    if constexpr (requires { model_.ops().memory_in_use(); }) return model_.ops().memory_in_use();
    return 0;
  }

 private:
  // A device's clipping is applied by the update (NnOps::grad_norm, clip_factor); the CPU's
  // scales the gradients in place, as PyTorch does.
  static constexpr bool kClipInUpdate = requires(const typename Model::Ops& ops, std::vector<moe::ParamRef<S>>& p) {
    ops.grad_norm(p);
    ops.clip_factor(1.0, 1.0);
  };
  moe::Compute<S> clip_factor_ = 1;  // from prepare_gradients to optimizer_step

  // The parameter list, taken once (the model's tensors never move).
  void bind() {
    if (params_.empty()) params_ = model_.parameters();
  }
  void check_list(const std::vector<moe::ParamRef<float>>& host) const {
    moe::check(host.size() == params_.size(), "gpt2: ", host.size(), " host parameters for a model with ",
               params_.size());
    for (std::size_t i = 0; i < host.size(); ++i)
      moe::check(host[i].name == params_[i].name && host[i].value.size() == params_[i].value.size(),
                 "gpt2: host parameter ", i, " is '", host[i].name, "' with ", host[i].value.size(),
                 " values, the model's is '", params_[i].name, "' with ", params_[i].value.size());
  }
  // A CPU fp32 trainer asked to copy into (or from) its own model: nothing to do.
  static bool same_memory(std::span<const float> host, std::span<const S> ours) {
    return static_cast<const void*>(host.data()) == static_cast<const void*>(ours.data());
  }
  template <class T>
  static std::vector<std::vector<float>> to_float(const std::vector<std::vector<T>>& in) {
    std::vector<std::vector<float>> out(in.size());
    for (std::size_t i = 0; i < in.size(); ++i) out[i].assign(in[i].begin(), in[i].end());
    return out;
  }
  static auto from_float(const std::vector<std::vector<float>>& in) {
    using Moment = typename std::remove_cvref_t<decltype(std::declval<Optimizer&>().m())>::value_type::value_type;
    std::vector<std::vector<Moment>> out(in.size());
    for (std::size_t i = 0; i < in.size(); ++i) out[i].assign(in[i].begin(), in[i].end());
    return out;
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
