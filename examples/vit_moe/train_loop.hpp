// examples/vit_moe/train_loop.hpp: training and evaluation of one ViT (MoE) image classifier, on
// any backend: the CPU model (train.hpp wraps it with its AdamW and checkpoints) or a device's
// (device_train.hpp, whose checkpoints go through a host copy). No Eigen and no CPU model here, so
// nvcc's translation unit (cuda_train.cu) shares none of their inline code with main.cpp's (which
// compiles it with -march=native): only plain functions (the data's, the reports') are in both.
//
//   for step in [start, steps):
//     lr    = warmup + cosine schedule(step)
//     batch = images order_e[s*B, (s+1)*B) of epoch e = step / S, s = step % S, S = steps per epoch
//     grads = d mean cross-entropy; clip the global norm; AdamW(lr) (a device folds the clip
//             factor into the update: examples/common/gradient_clip.hpp)
//     every eval_every steps: test-set accuracy
//
// order_e is shuffled_order(count, seed, e) (dataset.hpp) and an image's augmentation a draw for
// (seed, e, image): a batch is a pure function of (seed, step). With the Random gate's draw
// counter set from the step too, a run is a pure function of its options, and resuming from a
// checkpoint at step s continues with exactly the bits of an uninterrupted run.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "../common/confusion.hpp"
#include "../common/gradient_clip.hpp"
#include "../common/progress.hpp"
#include "../common/routing_report.hpp"
#include "../common/schedule.hpp"
#include "config.hpp"
#include "dataset.hpp"
#include "moe/cpu/parallel.hpp"  // default_threads (the CPU model's; a device ignores it)
#include "moe/nn/checks.hpp"     // AdamWConfig
#include "moe/tensor.hpp"
#include "router_bias.hpp"

namespace vit {

// The training and test splits, and the normalisation the model sees (measured on training).
struct Data {
  Dataset train, test;
  Normalisation normalisation;
  std::string description;  // where it came from, for logs and reports
};

struct TrainOptions {
  std::int64_t steps = 2000;
  std::int64_t batch = 64;          // B images per step
  double lr = 2e-3;                 // peak learning rate
  std::int64_t warmup = 100;
  double min_lr_ratio = 0.0;        // cosine to 0, as DeiT
  double weight_decay = 0.05;       // DeiT's
  double grad_clip = 1.0;           // max global gradient norm (0: no clipping)
  std::int64_t eval_every = 0;      // steps between test-set accuracies (0: only at the end)
  std::int64_t eval_images = 0;     // test images per evaluation and for the routing statistics (0: all)
  bool augment = false;             // random crop (padding 2) + horizontal flip
  std::uint64_t data_seed = 1337;   // data order and augmentation draws
  int threads = moe::cpu::default_threads();
  std::filesystem::path checkpoint;  // written at the end (and every checkpoint_every steps)
  std::int64_t checkpoint_every = 0;
  std::int64_t log_every = 100;      // plain log lines when stderr is not a terminal
  std::int64_t stop_after = 0;       // end after this step, checkpointed, as an interruption would (0: run to `steps`)

  void validate() const {
    moe::check(steps >= 1, "train: --steps must be >= 1, got ", steps);
    moe::check(batch >= 1, "train: --batch must be >= 1, got ", batch);
    moe::check(eval_every >= 0 && eval_images >= 0 && checkpoint_every >= 0 && stop_after >= 0,
               "train: --eval-every, --eval-images and --checkpoint-every must be >= 0");
    moe::check(grad_clip >= 0 && std::isfinite(grad_clip), "train: --clip must be finite and >= 0, got ", grad_clip);
    moe::check(weight_decay >= 0 && std::isfinite(weight_decay), "train: --weight-decay must be finite and >= 0, got ",
               weight_decay);
    moe::check(threads >= 1, "train: --threads must be >= 1, got ", threads);
    schedule().validate();
  }
  train::Schedule schedule() const { return {lr, warmup, steps, min_lr_ratio}; }
  Augmentation augmentation() const { return {.padding = 2, .flip = true, .seed = data_seed}; }
};

// AdamW as DeiT trains it (betas 0.9, 0.999), at the options' rate and weight decay: the CPU's
// (make_optimizer, train.hpp) and a device's optimizer take these settings.
inline moe::nn::AdamWConfig adamw_config(const TrainOptions& options) {
  return {.lr = options.lr, .beta1 = 0.9, .beta2 = 0.999, .weight_decay = options.weight_decay};
}

// Top-1 accuracy, mean loss and the confusion matrix over the evaluated images.
struct Evaluation {
  double accuracy = NAN, loss = NAN;
  report::ConfusionMatrix confusion;
  std::int64_t images = 0;
};

struct TrainResult {
  std::string variant;
  std::int64_t steps = 0, images = 0;  // optimizer steps run in this call; images trained on
  double train_loss = NAN;             // last step's
  Evaluation test;                     // on the test split, after the last step
  double images_per_second = 0;        // training throughput (forward, backward, optimizer)
  double seconds = 0;
  std::int64_t parameters = 0, router_parameters = 0;
  std::vector<Index> moe_blocks;              // the blocks of `routing`, in order
  std::vector<report::LayerRouting> routing;  // per MoE block, on the test images; empty for dense
  std::int64_t routed_tokens = 0;             // tokens per MoE block in `routing`
  std::int64_t device_memory_bytes = 0;       // a device run's memory in use at the end (0 on the CPU)
  std::int64_t device_memory_peak_bytes = 0;  // its allocations at their most in this call (0 on the CPU)
  std::string trained_on{};                   // a device run's device, precision and attention (empty on the CPU)
};

namespace detail {

// The Random gate's draw counter: one per training step; evaluations use their own range so
// that they never shift the training draws.
inline constexpr std::uint64_t kEvalRoutingBase = std::uint64_t(1) << 40;

// FNV-1a over the training images and labels: a resumed run must see the same data.
inline std::uint64_t fingerprint(const Dataset& data) {
  std::uint64_t hash = 0xcbf29ce484222325ULL ^ std::uint64_t(data.count());
  for (std::uint8_t p : data.pixels) hash = (hash ^ p) * 0x100000001b3ULL;
  for (std::int32_t l : data.labels) hash = (hash ^ std::uint64_t(l)) * 0x100000001b3ULL;
  return hash;
}

// The optimizer's view of the parameters: DeiT does not decay the class token and the position
// embedding (timm's no_weight_decay()), which AdamW would, being more than 1-D; a 1-D shape in
// this view (same values, same gradients) opts them out. Everything else: matrices decay.
template <class S>
std::vector<moe::ParamRef<S>> optimizer_view(std::vector<moe::ParamRef<S>> params) {
  for (moe::ParamRef<S>& p : params)
    if (p.name == "cls_token" || p.name == "pos_embed") p.shape = {Index(p.value.size())};
  return params;
}

}  // namespace detail

// Steps in one pass over the training images (the last partial batch of an epoch is dropped).
inline std::int64_t steps_per_epoch(const Dataset& train, std::int64_t batch) {
  return std::max<std::int64_t>(1, train.count() / std::max<std::int64_t>(batch, 1));
}

// The data must fit the model: image size, channels, labels within its classes.
inline void check_data_fits(const Config& config, const Dataset& data, const std::string& split) {
  moe::check(data.count() > 0, "train: the ", split, " split holds no images");
  moe::check(data.shape.channels == config.channels && data.shape.height == config.image_size &&
                 data.shape.width == config.image_size,
             "train: the ", split, " images are ", data.shape.channels, " x ", data.shape.height, " x ",
             data.shape.width, ", the model takes ", config.channels, " x ", config.image_size, " x ",
             config.image_size, " (see --config)");
  moe::check(data.classes <= config.classes, "train: the ", split, " split has ", data.classes,
             " classes, the model ", config.classes);
}

// The first `max_images` test images (0: all), B at a time, without augmentation: accuracy,
// mean loss, confusion matrix. Routing statistics, when collecting, cover exactly these images.
template <class Model>
Evaluation evaluate(Model& model, const Dataset& data, const Normalisation& normalisation, std::int64_t B,
                    std::int64_t max_images = 0) {
  const std::int64_t count = max_images > 0 ? std::min<std::int64_t>(max_images, data.count()) : data.count();
  moe::check(count >= 1 && B >= 1, "evaluate: needs at least one image and a batch >= 1");
  Evaluation result{NAN, NAN, report::ConfusionMatrix(model.config().classes), count};
  std::vector<float> images;
  std::vector<std::int32_t> labels;
  std::vector<Index> indices;
  double loss_sum = 0;
  for (std::int64_t first = 0; first < count; first += B) {
    indices.clear();
    for (std::int64_t i = first; i < std::min(count, first + B); ++i) indices.push_back(i);
    make_batch(data, indices, normalisation, nullptr, 0, images, labels);
    model.set_routing_step(detail::kEvalRoutingBase + std::uint64_t(first));
    loss_sum += model.forward(images, labels, Index(indices.size())) * double(indices.size());
    const std::vector<std::int32_t> predicted = model.predictions();
    for (std::size_t b = 0; b < indices.size(); ++b) result.confusion.add(labels[b], predicted[b]);
  }
  result.loss = loss_sum / double(count);
  result.accuracy = result.confusion.accuracy();
  return result;
}

// Writes a checkpoint of the run being trained: (file, metadata).
using Checkpointer = std::function<void(const std::filesystem::path&, const std::map<std::string, std::string>&)>;

// Trains `model` (already built, possibly restored from a checkpoint by the caller together with
// `optimizer` and `start_step`) up to options.steps, then evaluates on the test split and collects
// routing statistics there. `label` names the run in the progress bar; `checkpoint_metadata` goes
// into every checkpoint (the options, so that --resume can restore them). The model is the CPU's
// (its AdamW) or a device's (its NnOps' optimizer); `write_checkpoint` writes the checkpoints
// (train.hpp's: straight from a CPU model's tensors; device_train.hpp's: through a host copy), and
// may be empty only when options.checkpoint is.
template <class Model, class Optimizer>
TrainResult train_loop(Model& model, Optimizer& optimizer, const Data& data, const TrainOptions& options,
                       std::int64_t start_step, const std::string& label,
                       const std::map<std::string, std::string>& checkpoint_metadata,
                       const Checkpointer& write_checkpoint) {
  options.validate();
  check_data_fits(model.config(), data.train, "training");
  check_data_fits(model.config(), data.test, "test");
  moe::check(start_step >= 0 && start_step <= options.steps, "train: resuming at step ", start_step,
             " but --steps is ", options.steps);
  const std::int64_t B = options.batch;
  moe::check(B <= data.train.count(), "train: --batch = ", B, " is larger than the training split (",
             data.train.count(), " images)");

  model.set_threads(options.threads);
  if constexpr (requires { optimizer.set_threads(options.threads); }) optimizer.set_threads(options.threads);
  if constexpr (Model::is_moe) model.collect_routing_stats(false);
  const train::Schedule schedule = options.schedule();
  std::vector<moe::ParamRef<typename Model::Scalar>> params = detail::optimizer_view(model.parameters());
  examples::GradientClip<typename Model::Ops, typename Model::Scalar> clip;  // a device's rides in AdamW's update
  moe::check(options.checkpoint.empty() || write_checkpoint, "train: --checkpoint needs the caller's checkpoint writer");
  TrainResult result;
  result.variant = std::string(Model::variant);
  result.parameters = model.parameter_count();
  result.router_parameters = model.router_parameter_count();
  result.moe_blocks = model.moe_blocks();

  const std::string name = label.empty() ? std::string(Model::variant) : label;
  train::Progress progress(name, options.steps, "img", options.log_every);
  const std::int64_t per_epoch = steps_per_epoch(data.train, B);
  const Augmentation augmentation = options.augmentation();
  std::vector<Index> order;
  std::int64_t order_epoch = -1;
  std::vector<float> images;
  std::vector<std::int32_t> labels;

  auto save = [&](std::int64_t step) {
    if (options.checkpoint.empty()) return;
    std::map<std::string, std::string> meta = checkpoint_metadata;
    meta["step"] = std::to_string(step);
    meta["data_fingerprint"] = std::to_string(detail::fingerprint(data.train));
    std::filesystem::create_directories(std::filesystem::absolute(options.checkpoint).parent_path());
    write_checkpoint(options.checkpoint, meta);
  };
  auto evaluation_note = [&](const std::string& what, const Evaluation& e) {
    progress.note(name + " " + what + ": test top-1 " + report::format_fixed(e.accuracy, 4) + ", loss " +
                  report::format_fixed(e.loss, 4) + " (" + std::to_string(e.images) + " images)");
  };

  const std::int64_t end_step = options.stop_after > 0 ? std::min(options.stop_after, options.steps) : options.steps;
  for (std::int64_t step = start_step; step < end_step; ++step) {
    const std::int64_t epoch = step / per_epoch, slot = step % per_epoch;
    if (epoch != order_epoch) order = shuffled_order(data.train.count(), options.data_seed, std::uint64_t(epoch));
    order_epoch = epoch;
    make_batch(data.train, std::span<const Index>(order).subspan(std::size_t(slot * B), std::size_t(B)),
               data.normalisation, options.augment ? &augmentation : nullptr, std::uint64_t(epoch), images, labels);
    model.zero_grad();
    model.set_routing_step(std::uint64_t(step));
    const double loss = model.forward(images, labels, B);
    model.backward();
    const double norm = clip.measure(model.ops(), params, options.grad_clip);
    moe::check(std::isfinite(loss) && std::isfinite(norm), "train: step ", step + 1, " gave a non-finite ",
               std::isfinite(loss) ? "gradient norm" : "loss", "; lower --lr or check the data");
    clip.step(optimizer, params, schedule.lr(step));
    result.train_loss = loss;
    ++result.steps;
    result.images += B;
    progress.update(step + 1, double(result.images), loss);

    const bool last = step + 1 == options.steps;
    if (options.eval_every > 0 && (step + 1) % options.eval_every == 0 && !last)
      evaluation_note("step " + std::to_string(step + 1),
                      evaluate(model, data.test, data.normalisation, B, options.eval_images));
    if (options.checkpoint_every > 0 && (step + 1) % options.checkpoint_every == 0 && !last) save(step + 1);
  }
  result.seconds = progress.elapsed_seconds();
  result.images_per_second = result.seconds > 0 ? double(result.images) / result.seconds : 0;
  save(end_step);
  if (end_step < options.steps) return result;  // interrupted: no final evaluation

  // Accuracy on the test split, with the routing statistics of the same images.
  if constexpr (Model::is_moe) {
    model.reset_routing_stats();
    model.collect_routing_stats(true);
  }
  result.test = evaluate(model, data.test, data.normalisation, B, options.eval_images);
  if constexpr (Model::is_moe) {
    model.collect_routing_stats(false);
    for (Index block : result.moe_blocks) {
      result.routing.push_back(report::LayerRouting::from_stats(model.routing_stats(block)));
      result.routed_tokens = model.routing_stats(block).tokens;
    }
    // Beside them, each router's logits for norm2's bias (router_bias.hpp; none for Random).
    const std::vector<std::vector<double>> bias = router_bias_logits(model);
    for (std::size_t i = 0; i < bias.size(); ++i) result.routing[i].bias_logit = bias[i];
  }
  evaluation_note("final", result.test);
  return result;
}

}  // namespace vit
