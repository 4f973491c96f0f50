// examples/gpt2_moe/train.hpp: training and evaluation of one GPT-2 (MoE) model.
//
//   for step in [start, steps):
//     lr    = warmup + cosine schedule(step)
//     grads = mean over `accumulation` micro-batches of d loss       (each B x T tokens)
//     clip the global gradient norm; AdamW(lr); every eval_every steps: validation loss
//
// Every micro-batch is a pure function of (data seed, step, micro-batch): B windows of T + 1
// tokens at pseudo-random offsets of the training stream. With the Random gate's draw counter set
// from the same numbers, a run is a pure function of its options, and resuming from a checkpoint
// at step s continues with exactly the bits an uninterrupted run would have (on the same device).
//
// The loop drives a gpt2::Trainer (trainer.hpp): any variant, on the CPU or a GPU, in fp32 or
// bf16; checkpoints go through a Checkpointer, which writes the trainer's state.
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

#include "../common/progress.hpp"
#include "../common/routing_report.hpp"
#include "../common/schedule.hpp"
#include "checkpoint.hpp"
#include "cpu_model.hpp"
#include "trainer.hpp"

namespace gpt2 {

// Token streams for training and validation (ids < 65536: llm.c shards hold uint16).
struct Dataset {
  std::vector<std::uint16_t> train, val;
  std::string tokenizer;    // "bytes" or "gpt2-bpe": how ids map to text (sampling decodes with it)
  std::string description;  // where it came from, for logs and reports
};

struct TrainOptions {
  std::int64_t steps = 500;
  std::int64_t batch = 16;        // B sequences per micro-batch
  std::int64_t seq = 128;         // T tokens per sequence (<= the model's context)
  std::int64_t accumulation = 1;  // micro-batches per optimizer step
  double lr = 2e-3;               // peak learning rate
  std::int64_t warmup = 50;
  double min_lr_ratio = 0.1;
  double weight_decay = 0.1;
  double grad_clip = 1.0;          // max global gradient norm (0: no clipping)
  std::int64_t eval_every = 250;   // steps between validation losses (0: only at the end)
  std::int64_t eval_tokens = 65536;     // validation tokens per evaluation
  std::int64_t stats_tokens = 262144;   // held-out tokens for the final routing statistics
  std::uint64_t data_seed = 1337;
  int threads = moe::cpu::default_threads();
  std::filesystem::path checkpoint;     // written at the end (and every checkpoint_every steps)
  std::int64_t checkpoint_every = 0;
  std::int64_t log_every = 50;          // plain log lines when stderr is not a terminal
  std::int64_t stop_after = 0;          // end after this step, checkpointed, as an interruption would (0: run to `steps`)

  void validate(const Config& config) const {
    moe::check(steps >= 1, "train: --steps must be >= 1, got ", steps);
    moe::check(batch >= 1 && accumulation >= 1, "train: --batch and --accumulation must be >= 1");
    moe::check(seq >= 1 && seq <= config.context, "train: --seq = ", seq, " must lie in [1, context = ",
               config.context, "]");
    moe::check(eval_tokens >= seq && stats_tokens >= seq, "train: --eval-tokens and --stats-tokens must be >= --seq");
    moe::check(grad_clip >= 0 && weight_decay >= 0, "train: --clip and --weight-decay must be >= 0");
    train::Schedule{lr, warmup, steps, min_lr_ratio}.validate();
  }
  train::Schedule schedule() const { return {lr, warmup, steps, min_lr_ratio}; }
};

struct TrainResult {
  std::string variant;  // its name: gpt2::variant_name (self-per-layer where the self gate reads per-layer slices)
  std::int64_t steps = 0, tokens = 0;  // optimizer steps run in this call; tokens trained on
  double train_loss = NAN;             // last step's
  double val_loss = NAN;
  double tokens_per_second = 0;        // training throughput (forward, backward, optimizer)
  double seconds = 0;
  std::int64_t parameters = 0, router_parameters = 0;
  std::vector<report::LayerRouting> routing;  // per MoE layer, on held-out tokens; empty for dense
  std::int64_t routed_tokens = 0;
  std::int64_t device_memory_bytes = 0;        // device memory in use after training (0 on the CPU)
  std::int64_t device_memory_peak_bytes = 0;   // the library's device allocations at their most in this call (0 on the CPU)
};

namespace detail {

// A window start in [0, n - T - 1], from (seed, step, micro, b).
inline std::int64_t window_start(std::uint64_t seed, std::int64_t step, std::int64_t micro, std::int64_t b,
                                 std::int64_t n, std::int64_t T) {
  const std::uint64_t key = moe::random::mix64(seed ^ 0x6a09e667f3bcc909ULL) ^ std::uint64_t(micro) * 0x9e3779b97f4a7c15ULL;
  return std::int64_t(moe::random::bits(key, std::uint64_t(step), std::uint64_t(b)) % std::uint64_t(n - T));
}

// B windows of T + 1 tokens: inputs [B*T] and next-token targets [B*T].
inline void fill_batch(std::span<const std::uint16_t> stream, std::span<const std::int64_t> starts, std::int64_t T,
                       std::vector<std::int32_t>& tokens, std::vector<std::int32_t>& targets) {
  tokens.resize(starts.size() * std::size_t(T));
  targets.resize(tokens.size());
  for (std::size_t b = 0; b < starts.size(); ++b)
    for (std::int64_t t = 0; t < T; ++t) {
      tokens[b * std::size_t(T) + std::size_t(t)] = stream[std::size_t(starts[b] + t)];
      targets[b * std::size_t(T) + std::size_t(t)] = stream[std::size_t(starts[b] + t + 1)];
    }
}

// The Random gate's draw counter: one per training micro-batch; evaluations use their own range
// so that they never shift the training draws.
inline std::uint64_t routing_step(std::int64_t step, std::int64_t micro, std::int64_t accumulation) {
  return std::uint64_t(step * accumulation + micro);
}
inline constexpr std::uint64_t kEvalRoutingBase = std::uint64_t(1) << 40;

inline std::uint64_t fingerprint(std::span<const std::uint16_t> tokens) {
  std::uint64_t hash = 0xcbf29ce484222325ULL ^ tokens.size();
  for (std::uint16_t t : tokens) hash = (hash ^ t) * 0x100000001b3ULL;
  return hash;
}

}  // namespace detail

// Mean loss over the first `max_tokens` tokens of `stream` in consecutive windows of T (B at a
// time). Routing statistics, when collecting, cover exactly these tokens.
inline double evaluate(Trainer& trainer, std::span<const std::uint16_t> stream, std::int64_t B, std::int64_t T,
                       std::int64_t max_tokens) {
  const std::int64_t windows = std::min<std::int64_t>((std::int64_t(stream.size()) - 1) / T, max_tokens / T);
  moe::check(windows >= 1, "evaluate: the validation split holds ", stream.size(), " tokens, fewer than one window of ",
             T + 1);
  std::vector<std::int32_t> tokens, targets;
  std::vector<std::int64_t> starts;
  double sum = 0;
  for (std::int64_t first = 0; first < windows; first += B) {
    starts.clear();
    for (std::int64_t w = first; w < std::min(windows, first + B); ++w) starts.push_back(w * T);
    detail::fill_batch(stream, starts, T, tokens, targets);
    trainer.set_routing_step(detail::kEvalRoutingBase + std::uint64_t(first));
    sum += trainer.forward(tokens, targets, std::int64_t(starts.size()), T) * double(starts.size());
  }
  return sum / double(windows);
}

// What train() reports back while it runs (validation results, checkpoints); may be empty.
using Logger = std::function<void(const std::string&)>;

// Writes a checkpoint of the trainer's current state to a path, with these metadata entries.
using Checkpointer = std::function<void(const std::filesystem::path&, const std::map<std::string, std::string>&)>;

// Trains the trainer's model (already built, possibly restored from a checkpoint by the caller,
// optimizer state and `start_step` included) up to options.steps, then evaluates and collects
// routing statistics on held-out tokens. `label` names the run in the progress bar; `save` writes
// the checkpoints (options.checkpoint, every options.checkpoint_every steps and at the end).
inline TrainResult train(Trainer& trainer, const Checkpointer& save_state, const Dataset& data,
                         const TrainOptions& options, std::int64_t start_step = 0, const std::string& label = "",
                         const std::map<std::string, std::string>& checkpoint_metadata = {}) {
  options.validate(trainer.config());
  const std::int64_t T = options.seq, B = options.batch;
  moe::check(std::int64_t(data.train.size()) > T + 1, "train: the training split holds ", data.train.size(),
             " tokens, too few for one window of --seq + 1 = ", T + 1);
  moe::check(std::int64_t(data.val.size()) > T, "train: the validation split holds ", data.val.size(),
             " tokens, too few for one window of --seq + 1 = ", T + 1);
  for (const std::vector<std::uint16_t>* split : {&data.train, &data.val})  // both, before any step
    for (std::uint16_t id : *split)
      moe::check(id < trainer.config().vocab, "train: token id ", id, " in the ",
                 split == &data.train ? "training" : "validation", " data is outside the model's vocabulary (",
                 trainer.config().vocab, "); the data and the config do not match");
  moe::check(start_step >= 0 && start_step <= options.steps, "train: resuming at step ", start_step,
             " but --steps is ", options.steps);

  trainer.set_threads(options.threads);
  if (trainer.is_moe()) trainer.collect_routing_stats(false);
  trainer.reset_device_memory_peak();  // this run's peak: from the model and optimizer as built
  const train::Schedule schedule = options.schedule();
  TrainResult result;
  result.variant = variant_name(trainer.variant(), trainer.config());  // self-per-layer for per-layer slices
  result.parameters = trainer.parameter_count();
  result.router_parameters = trainer.router_parameter_count();

  const std::string name = label.empty() ? result.variant : label;
  train::Progress progress(name, options.steps, "tok", options.log_every);
  std::vector<std::int32_t> tokens, targets;
  std::vector<std::int64_t> starts(static_cast<std::size_t>(B));
  const std::int64_t n = std::int64_t(data.train.size());

  auto save = [&](std::int64_t step) {
    if (options.checkpoint.empty()) return;
    std::map<std::string, std::string> meta = checkpoint_metadata;
    meta["step"] = std::to_string(step);
    meta["tokenizer"] = data.tokenizer;
    meta["data_fingerprint"] = std::to_string(detail::fingerprint(data.train));
    std::filesystem::create_directories(std::filesystem::absolute(options.checkpoint).parent_path());
    save_state(options.checkpoint, meta);
  };

  const std::int64_t end_step = options.stop_after > 0 ? std::min(options.stop_after, options.steps) : options.steps;
  for (std::int64_t step = start_step; step < end_step; ++step) {
    trainer.zero_grad();
    double loss = 0;
    for (std::int64_t micro = 0; micro < options.accumulation; ++micro) {
      for (std::int64_t b = 0; b < B; ++b)
        starts[std::size_t(b)] = detail::window_start(options.data_seed, step, micro, b, n, T);
      detail::fill_batch(data.train, starts, T, tokens, targets);
      trainer.set_routing_step(detail::routing_step(step, micro, options.accumulation));
      loss += trainer.forward(tokens, targets, B, T);
      trainer.backward();
    }
    loss /= double(options.accumulation);
    // The mean over micro-batches, not the sum; then clipping.
    const float grad_scale = options.accumulation > 1 ? 1.0f / float(options.accumulation) : 1.0f;
    const double norm = trainer.prepare_gradients(grad_scale, options.grad_clip);
    moe::check(std::isfinite(loss) && std::isfinite(norm), "train: step ", step + 1, " gave a non-finite ",
               std::isfinite(loss) ? "gradient norm" : "loss", "; lower --lr or check the data");
    trainer.optimizer_step(schedule.lr(step));
    result.train_loss = loss;
    ++result.steps;
    result.tokens += B * T * options.accumulation;
    progress.update(step + 1, double(result.tokens), loss);

    const bool last = step + 1 == options.steps;
    if (options.eval_every > 0 && (step + 1) % options.eval_every == 0 && !last) {
      const double val = evaluate(trainer, data.val, B, T, options.eval_tokens);
      progress.note(name + " step " + std::to_string(step + 1) + ": val loss " + std::to_string(val) +
                    ", perplexity " + std::to_string(std::exp(val)));
    }
    if (options.checkpoint_every > 0 && (step + 1) % options.checkpoint_every == 0 && !last) save(step + 1);
  }
  result.seconds = progress.elapsed_seconds();
  result.tokens_per_second = result.seconds > 0 ? double(result.tokens) / result.seconds : 0;
  result.device_memory_bytes = trainer.device_memory_in_use();
  result.device_memory_peak_bytes = trainer.device_memory_peak();
  save(end_step);
  if (end_step < options.steps) return result;  // interrupted: no final evaluation

  // Validation loss, then routing statistics on held-out tokens (the validation split, from its start).
  result.val_loss = evaluate(trainer, data.val, B, T, options.eval_tokens);
  if (trainer.is_moe()) {
    trainer.reset_routing_stats();
    trainer.collect_routing_stats(true);
    evaluate(trainer, data.val, B, T, options.stats_tokens);
    trainer.collect_routing_stats(false);
    for (moe::Index l = 0; l < trainer.config().layers; ++l) {
      const moe::RoutingStats stats = trainer.routing_stats(l);
      result.routing.push_back(report::LayerRouting::from_stats(stats));
      result.routed_tokens = stats.tokens;
    }
    // Beside them, each router's logits for ln_2's bias (router_bias.hpp; none for Random).
    const std::vector<std::vector<double>> bias = trainer.router_bias_logits();
    for (std::size_t l = 0; l < bias.size(); ++l) result.routing[l].bias_logit = bias[l];
  }
  progress.note(name + ": val loss " + std::to_string(result.val_loss) + ", perplexity " +
                std::to_string(std::exp(result.val_loss)));
  result.device_memory_peak_bytes = trainer.device_memory_peak();  // the statistics' counters included
  return result;
}

// train() for a CPU model and optimizer the caller has built (tests, benchmarks): checkpoints are
// written straight from them.
template <class Model>
TrainResult train(Model& model, typename Model::Optimizer& optimizer, const Dataset& data, const TrainOptions& options,
                  std::int64_t start_step = 0, const std::string& label = "",
                  const std::map<std::string, std::string>& checkpoint_metadata = {}) {
  ModelTrainer<Model> trainer(model, optimizer);
  const Checkpointer save = [&](const std::filesystem::path& path, const std::map<std::string, std::string>& meta) {
    save_checkpoint(path, model, &optimizer, meta);
  };
  return train(trainer, save, data, options, start_step, label, checkpoint_metadata);
}

}  // namespace gpt2
