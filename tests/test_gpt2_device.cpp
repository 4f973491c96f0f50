// The GPT-2 MoE model on a CUDA-backend device (examples/gpt2_moe/model.hpp over
// moe::cuda::BasicBackend), run here on the host-emulated device: the model cases of
// tests/cuda/gpt2_model_cases.hpp (initial values, loss and every gradient against the CPU model,
// same bits twice; moe_cuda_tests runs them on a GPU), then training through sessions
// (session.hpp): same bits run to run, bit-exact resume in fp32 and bf16, and checkpoints that
// move between devices: trained on one, resumed on the other.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "../examples/gpt2_moe/device_trainer.hpp"
#include "../examples/gpt2_moe/session.hpp"
#include "moe/cuda/emulated_device.hpp"
#include "cuda/emulated_test_device.hpp"

#define CUDA_TEST_NAME(text) "cuda, emulated device: " text
#include "cuda/gpt2_model_cases.hpp"

using moe::Index;

namespace {

using cuda_test::gpt2_model_cases::kTiny;
using cuda_test::relative_error;

// One training step of a trainer as the training loop takes it (zero, forward, backward, clipping's
// norm, AdamW) on B sequences of T random tokens and targets drawn from step number s.
// Step s's batch of B sequences of T random tokens and targets.
struct StepTokens {
  std::vector<std::int32_t> tokens, targets;
};
StepTokens step_batch(const gpt2::Config& config, Index B, Index T, int s) {
  StepTokens b;
  for (Index i = 0; i < B * T; ++i) {
    b.tokens.push_back(std::int32_t(moe::random::bits(7, std::uint64_t(s), std::uint64_t(i)) % config.vocab));
    b.targets.push_back(std::int32_t(moe::random::bits(8, std::uint64_t(s), std::uint64_t(i)) % config.vocab));
  }
  return b;
}

// The rest of a training step after its forward.
void finish_step(gpt2::Trainer& trainer) {
  trainer.backward();
  trainer.prepare_gradients(1.0f, 1.0);
  trainer.optimizer_step(1e-3);
}

// A training step on step_batch(s); returns its loss.
double train_step(gpt2::Trainer& trainer, const gpt2::Config& config, Index B, Index T, int s) {
  const StepTokens b = step_batch(config, B, T, s);
  trainer.zero_grad();
  const double loss = trainer.forward(b.tokens, b.targets, B, T);
  finish_step(trainer);
  return loss;
}

gpt2::Dataset tiny_dataset() {
  gpt2::Dataset data;
  data.tokenizer = "bytes";
  for (int i = 0; i < 2000; ++i) data.train.push_back(std::uint16_t((i * 7 + i / 11) % 29));
  for (int i = 0; i < 300; ++i) data.val.push_back(std::uint16_t((i * 7 + i / 11 + 3) % 29));
  return data;
}

gpt2::TrainOptions tiny_options(std::int64_t steps) {
  gpt2::TrainOptions o;
  o.steps = steps;
  o.batch = 2;
  o.seq = 8;
  o.warmup = 1;
  o.lr = 3e-3;
  o.eval_every = 0;
  o.eval_tokens = 48;
  o.stats_tokens = 64;
  o.threads = 1;
  o.log_every = 1000;
  return o;
}

std::filesystem::path temp_file(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / "moe_test_gpt2_device";
  std::filesystem::create_directories(dir);
  return dir / name;
}

gpt2::Session session(gpt2::Device device, gpt2::Precision precision, const std::string& variant,
                      const gpt2::TrainOptions& o) {
  return gpt2::make_session(device, precision, variant, kTiny, {.lr = o.lr, .weight_decay = o.weight_decay});
}

// Every parameter of a session's trainer as host floats (master weights for bf16).
std::vector<std::vector<float>> trainer_values(gpt2::Trainer& trainer) {
  std::vector<std::vector<float>> out;
  gpt2::with_variant<float>(trainer.variant(), [&](auto tag) {
    typename decltype(tag)::type mirror(trainer.config(), typename decltype(tag)::type::Ops(1));
    auto params = mirror.parameters();
    trainer.download_state(params, nullptr);
    for (auto& p : params) out.emplace_back(p.value.begin(), p.value.end());
    return 0;
  });
  return out;
}

// `steps` straight on `device`, against `first` steps on `first_device`, a checkpoint, and the rest
// resumed on `second_device`. Returns the two results (straight, resumed) and their values.
struct ResumeRun {
  gpt2::TrainResult straight, resumed;
  std::vector<std::vector<float>> straight_values, resumed_values;
};
ResumeRun run_resume(const std::string& variant, gpt2::Device first_device, gpt2::Precision first_precision,
                     gpt2::Device second_device, gpt2::Precision second_precision) {
  const gpt2::Dataset data = tiny_dataset();
  const gpt2::TrainOptions options = tiny_options(4);
  ResumeRun run;
  {
    gpt2::Session s = session(second_device, second_precision, variant, options);
    run.straight = gpt2::train(*s.trainer, s.save, data, options);
    run.straight_values = trainer_values(*s.trainer);
  }
  gpt2::TrainOptions interrupted = options;
  interrupted.checkpoint = temp_file(variant + ".safetensors");
  interrupted.stop_after = 2;
  {
    gpt2::Session s = session(first_device, first_precision, variant, options);
    gpt2::train(*s.trainer, s.save, data, interrupted);
  }
  gpt2::Session s = session(second_device, second_precision, variant, options);
  const gpt2::CheckpointHeader header = s.load(interrupted.checkpoint);
  CHECK(header.variant == variant);
  CHECK(header.has_optimizer_state);
  run.resumed = gpt2::train(*s.trainer, s.save, data, options, 2);
  run.resumed_values = trainer_values(*s.trainer);
  return run;
}

}  // namespace

TEST_CASE("gpt2 on the emulated device: two training runs give the same bits (fp32 and bf16)") {
  for (const gpt2::Precision precision : {gpt2::Precision::fp32, gpt2::Precision::bf16}) {
    CAPTURE(gpt2::precision_name(precision));
    const gpt2::Dataset data = tiny_dataset();
    const gpt2::TrainOptions options = tiny_options(3);
    gpt2::Session a = session(gpt2::Device::emulated, precision, "linear", options);
    gpt2::Session b = session(gpt2::Device::emulated, precision, "linear", options);
    const gpt2::TrainResult ra = gpt2::train(*a.trainer, a.save, data, options);
    const gpt2::TrainResult rb = gpt2::train(*b.trainer, b.save, data, options);
    CHECK(ra.train_loss == rb.train_loss);
    CHECK(ra.val_loss == rb.val_loss);
    CHECK(trainer_values(*a.trainer) == trainer_values(*b.trainer));
    REQUIRE(ra.routing.size() == std::size_t(kTiny.layers));
    CHECK(ra.routing[0].fractions == rb.routing[0].fractions);
  }
}

TEST_CASE("gpt2 on the emulated device: a run reports its peak device memory, activations included; the CPU none") {
  const gpt2::Dataset data = tiny_dataset();
  std::int64_t peaks[2] = {};
  for (const std::int64_t batch : {2, 4}) {
    gpt2::TrainOptions options = tiny_options(2);
    options.batch = batch;
    gpt2::Session s = session(gpt2::Device::emulated, gpt2::Precision::fp32, "self", options);
    const gpt2::TrainResult r = gpt2::train(*s.trainer, s.save, data, options);
    // fp32: each parameter's value, gradient and AdamW's two moments, at least.
    CHECK(r.device_memory_peak_bytes >= 16 * s.trainer->parameter_count());
    CHECK(r.device_memory_peak_bytes >= std::int64_t(moe::cuda::EmulatedDevice::memory_use().in_use));
    peaks[batch / 4] = r.device_memory_peak_bytes;
  }
  CHECK(peaks[1] > peaks[0]);  // twice the tokens, more activations: the peak counts them
  const gpt2::TrainOptions options = tiny_options(1);
  gpt2::Session cpu = session(gpt2::Device::cpu, gpt2::Precision::fp32, "self", options);
  CHECK(gpt2::train(*cpu.trainer, cpu.save, data, options).device_memory_peak_bytes == 0);
}

TEST_CASE("gpt2 on the emulated device: the trainer's router logits for ln_2's bias come from its trained state") {
  // Linear's: the trained router weight times the trained ln_2 bias, as the forward reads them
  // (bf16: the master weights rounded to bf16); after training, so that neither is still its initial value.
  const gpt2::Dataset data = tiny_dataset();
  for (const gpt2::Precision precision : {gpt2::Precision::fp32, gpt2::Precision::bf16}) {
    CAPTURE(int(precision));
    const gpt2::TrainOptions options = tiny_options(3);
    gpt2::Session s = session(gpt2::Device::emulated, precision, "linear", options);
    const gpt2::TrainResult result = gpt2::train(*s.trainer, s.save, data, options);
    const std::vector<std::vector<double>> bias = s.trainer->router_bias_logits();
    REQUIRE(result.routing.size() == bias.size());  // train() reports them beside the statistics
    for (std::size_t l = 0; l < bias.size(); ++l) CHECK(result.routing[l].bias_logit == bias[l]);
    std::map<std::string, std::vector<float>> values;
    gpt2::MoEModel<moe::Linear, float> names(kTiny);
    const std::vector<std::vector<float>> trained = trainer_values(*s.trainer);
    const auto params = names.parameters();
    for (std::size_t i = 0; i < params.size(); ++i) values[params[i].name] = trained[i];
    if (precision == gpt2::Precision::bf16)
      for (auto& [name, v] : values)
        for (float& x : v) x = float(moe::bfloat16(x));
    REQUIRE(bias.size() == std::size_t(kTiny.layers));
    for (Index l = 0; l < kTiny.layers; ++l) {
      const std::string block = "h." + std::to_string(l) + ".";
      const std::vector<float>& b = values.at(block + "ln_2.bias");
      const std::vector<float>& w = values.at(block + "moe.router.weight");  // [N, H]
      CHECK(std::any_of(b.begin(), b.end(), [](float v) { return v != 0; }));  // trained away from zero
      REQUIRE(bias[std::size_t(l)].size() == std::size_t(kTiny.experts));
      for (Index e = 0; e < kTiny.experts; ++e) {
        double expected = 0;
        for (Index h = 0; h < kTiny.hidden; ++h) expected += double(w[std::size_t(e * kTiny.hidden + h)]) * b[std::size_t(h)];
        CAPTURE(l);
        CAPTURE(e);
        CHECK(bias[std::size_t(l)][std::size_t(e)] == expected);  // the same doubles summed in the same order
      }
    }
  }
  // A CPU trainer's come straight from its model; Random's logits have no such part.
  const gpt2::TrainOptions options = tiny_options(1);
  gpt2::Session cpu = session(gpt2::Device::cpu, gpt2::Precision::fp32, "self", options);
  CHECK(cpu.trainer->router_bias_logits().size() == std::size_t(kTiny.layers));
  gpt2::Session random = session(gpt2::Device::emulated, gpt2::Precision::fp32, "random", options);
  CHECK(random.trainer->router_bias_logits().empty());
}

TEST_CASE("gpt2 on the emulated device: resuming its own checkpoint continues with the same bits, bf16 included") {
  // bf16: the checkpoint holds the fp32 master weights, so the resumed run rounds the same values.
  for (const gpt2::Precision precision : {gpt2::Precision::fp32, gpt2::Precision::bf16}) {
    CAPTURE(gpt2::precision_name(precision));
    const ResumeRun run = run_resume("random", gpt2::Device::emulated, precision, gpt2::Device::emulated, precision);
    CHECK(run.resumed.train_loss == run.straight.train_loss);
    CHECK(run.resumed.val_loss == run.straight.val_loss);
    CHECK(run.resumed_values == run.straight_values);
  }
}

TEST_CASE("gpt2 checkpoints move between devices: device -> CPU and CPU -> device resume within fp32 rounding") {
  using gpt2::Device;
  using gpt2::Precision;
  for (const auto& [from, to] : {std::pair{Device::emulated, Device::cpu}, std::pair{Device::cpu, Device::emulated}}) {
    const ResumeRun run = run_resume("self", from, Precision::fp32, to, Precision::fp32);
    CHECK(std::abs(run.resumed.val_loss - run.straight.val_loss) <= 1e-4 * run.straight.val_loss);
    // 1e-3: AdamW's first steps divide by sqrt(v), so a gradient near zero turns the devices'
    // float-rounding differences into steps of lr's size (seen: 3e-4 on the biases).
    for (std::size_t i = 0; i < run.straight_values.size(); ++i)
      CHECK(relative_error(run.resumed_values[i], run.straight_values[i]) < 1e-3);
  }
  // A bf16 run's checkpoint: fp32 master weights, which the CPU resumes from.
  const ResumeRun run = run_resume("dense", Device::emulated, Precision::bf16, Device::cpu, Precision::fp32);
  CHECK(std::isfinite(run.resumed.val_loss));
  CHECK(std::abs(run.resumed.val_loss - run.straight.val_loss) <= 2e-2 * run.straight.val_loss);
}

TEST_CASE("gpt2 bf16 checkpoints hold the fp32 master weights, not their bf16 rounding") {
  const gpt2::Dataset data = tiny_dataset();
  gpt2::TrainOptions options = tiny_options(2);
  options.checkpoint = temp_file("bf16-master.safetensors");
  gpt2::Session s = session(gpt2::Device::emulated, gpt2::Precision::bf16, "self", options);
  gpt2::train(*s.trainer, s.save, data, options);
  const moe::io::SafetensorsFile file(options.checkpoint);
  std::vector<float> wte(std::size_t(kTiny.vocab * kTiny.hidden));
  file.read("wte.weight", std::span<float>(wte), std::vector<std::int64_t>{kTiny.vocab, kTiny.hidden});
  const bool any_beyond_bf16 =
      std::any_of(wte.begin(), wte.end(), [](float v) { return float(moe::bfloat16(v)) != v; });
  CHECK(any_beyond_bf16);
  const auto values = trainer_values(*s.trainer);
  CHECK(values[0] == wte);  // the trainer's master weights are what the file holds
}

TEST_CASE("gpt2 sessions: unusable device and precision combinations are refused, naming the flag") {
  const gpt2::TrainOptions options = tiny_options(1);
  CHECK_THROWS_WITH_AS(session(gpt2::Device::cpu, gpt2::Precision::bf16, "self", options),
                       doctest::Contains("--precision bf16 needs --device cuda"), moe::Error);
  CHECK_THROWS_WITH_AS(session(gpt2::Device::emulated, gpt2::Precision::tf32, "self", options),
                       doctest::Contains("--precision tf32 needs --device cuda"), moe::Error);
  CHECK_THROWS_WITH_AS(session(gpt2::Device::cuda, gpt2::Precision::bf16, "self", options),
                       doctest::Contains("--device cuda"), moe::Error);
  CHECK_THROWS_WITH_AS(gpt2::parse_device("gpu"), doctest::Contains("--device must be cpu, cuda or emulated"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(gpt2::parse_precision("fp16"), doctest::Contains("--precision must be fp32, tf32 or bf16"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(session(gpt2::Device::emulated, gpt2::Precision::fp32, "moe", options),
                       doctest::Contains("unknown variant 'moe'"), moe::Error);
  // --attention: a device's choice; the CPU has one attention.
  const moe::nn::AdamWConfig adamw{.lr = options.lr, .weight_decay = options.weight_decay};
  CHECK_THROWS_WITH_AS(gpt2::make_session(gpt2::Device::cpu, gpt2::Precision::fp32, "self", kTiny, adamw,
                                          examples::AttentionKernel::fused),
                       doctest::Contains("--attention fused needs --device cuda or emulated"), moe::Error);
  CHECK_THROWS_WITH_AS(examples::parse_attention("flash"), doctest::Contains("--attention must be fused or materialized"),
                       moe::Error);
  CHECK(examples::parse_attention("materialized") == examples::AttentionKernel::materialized);
  // The default is materialized (measured faster on an H100); the description names the attention.
  CHECK(examples::kDefaultAttention == examples::AttentionKernel::materialized);
  const gpt2::Session fused = gpt2::make_session(gpt2::Device::emulated, gpt2::Precision::bf16, "self", kTiny, adamw,
                                                 examples::AttentionKernel::fused);
  CHECK(fused.trainer->description().find("fused attention") != std::string::npos);
  CHECK(session(gpt2::Device::emulated, gpt2::Precision::bf16, "self", options).trainer->description().find(
            "materialized attention") != std::string::npos);
}

// What a GPU step costs the host besides its launches: after the first step (which sizes every
// buffer) a training step allocates no device memory (cudaMalloc and cudaFree wait for the whole
// device) and waits for the stream exactly once per MoE layer (the expert offsets the per-expert
// GEMMs need on the host), once for the loss and once for the gradient norm. Batches differ from
// step to step, so the experts' row counts do too: no buffer may be sized by them.
// The MoE blocks' forward products from the routing plan (ExpertGemm::grouped) inside the model: the
// layer reads the block's LayerNorm output in place (input_kept) and self routes from the residual
// stream (a separate router input). Shapes the grouped tiles take (H = 128, F = 256); bf16 (its
// only precision). Three steps: the same losses and parameters, bit for bit, as the per-expert path.
TEST_CASE("gpt2 on the emulated device: training with the grouped expert products gives the per-expert bits") {
  gpt2::Config config = kTiny;
  config.hidden = 128, config.ffn = 256;
  const Index B = 2, T = config.context;
  for (const std::string_view variant : {std::string_view("self"), std::string_view("linear")}) {
    CAPTURE(variant);
    std::vector<double> losses[2];
    std::vector<std::vector<float>> values[2];
    for (const bool grouped : {false, true}) {
      const moe::cuda::EmulatedDevice device;
      device.set_expert_gemm(grouped ? moe::cuda::ExpertGemm::grouped : moe::cuda::ExpertGemm::per_expert);
      const std::unique_ptr<gpt2::Trainer> trainer =
          gpt2::make_device_trainer(variant, config, {}, gpt2::Precision::bf16, device);
      trainer->collect_routing_stats(false);
      for (int s = 0; s < 3; ++s) {
        const StepTokens b = step_batch(config, B, T, s);
        trainer->zero_grad();
        const std::uint64_t syncs = device.sync_count();
        losses[grouped].push_back(trainer->forward(b.tokens, b.targets, B, T));
        // The loss's download is the forward's one wait; the per-expert path adds one a MoE layer.
        CHECK(device.sync_count() - syncs == (grouped ? 1 : 1 + std::uint64_t(config.layers)));
        finish_step(*trainer);
      }
      values[grouped] = trainer_values(*trainer);
    }
    CHECK(losses[1] == losses[0]);
    CHECK(values[1] == values[0]);
  }
}

TEST_CASE("gpt2 on the emulated device: a steady training step allocates nothing and syncs once per MoE layer") {
  const gpt2::Config config = kTiny;
  const Index B = 2, T = config.context;
  for (const std::string_view variant : gpt2::kVariants) {
    for (const gpt2::Precision precision : {gpt2::Precision::fp32, gpt2::Precision::bf16}) {
      CAPTURE(variant);
      CAPTURE(gpt2::precision_name(precision));
      const moe::cuda::EmulatedDevice device;
      const std::unique_ptr<gpt2::Trainer> trainer =
          gpt2::make_device_trainer(variant, config, {}, precision, device);
      if (trainer->is_moe()) trainer->collect_routing_stats(false);  // as the training loop's steps
      const auto step = [&](int s) { train_step(*trainer, config, B, T, s); };
      step(0);
      const std::uint64_t syncs_per_step = (trainer->is_moe() ? std::uint64_t(config.layers) : 0) + 2;
      for (int s = 1; s <= 3; ++s) {
        const std::uint64_t allocations = moe::cuda::EmulatedDevice::allocation_count(), syncs = device.sync_count();
        step(s);
        CHECK(moe::cuda::EmulatedDevice::allocation_count() == allocations);
        CHECK(device.sync_count() - syncs == syncs_per_step);
      }
      if (!trainer->is_moe()) continue;
      // Statistics, when collected, add one download of counters per MoE layer.
      trainer->collect_routing_stats(true);
      const std::uint64_t syncs = device.sync_count();
      step(4);
      CHECK(device.sync_count() - syncs == syncs_per_step + std::uint64_t(config.layers));
    }
  }
}

// The launches of a steady training step: 6 GEMMs per expert and MoE layer (two forward, four backward),
// the rest of each block (attention, LayerNorms, residual adds, routing, dispatch and combine), and
// what runs once (embedding, ln_f, the classifier and its loss, clipping, AdamW, zeroing the
// gradients). A GPT-2-small self step in bf16 takes 23 + 12 x (44 + 6 x 8) = 1,127 with the default
// (materialised) attention, 23 + 12 x (38 + 6 x 8) = 1,055 with the fused one, each launch a few
// microseconds of the host's time and a gap on the GPU. These are budgets, not counts: a change that
// adds launches (a fill per parameter, a kernel per expert) fails here and raises them with a reason;
// one that saves some passes and should lower them. The fused attention runs in bf16 (head size 32).
TEST_CASE("gpt2 on the emulated device: a steady training step stays within its launch budget") {
  const gpt2::Config config{.vocab = 37, .context = 32, .layers = 2, .heads = 2, .hidden = 64, .ffn = 96,
                            .experts = 4, .top_k = 2, .seed = 5};
  const Index B = 2, T = config.context;
  struct Budget {
    std::string_view variant;
    std::uint64_t materialized, fused;  // launches per block besides the experts' GEMMs, by attention
  };
  constexpr Budget kPerBlock[] = {
      {"dense", 42, 36}, {"linear", 46, 40}, {"self", 44, 38}, {"fixed-random", 45, 39}, {"random", 43, 37}};
  constexpr std::uint64_t kOnce = 23, kPerExpert = 6;
  struct Run {
    gpt2::Precision precision;
    examples::AttentionKernel attention;
  };
  constexpr Run kRuns[] = {{gpt2::Precision::fp32, examples::AttentionKernel::materialized},
                           {gpt2::Precision::bf16, examples::AttentionKernel::materialized},
                           {gpt2::Precision::bf16, examples::AttentionKernel::fused}};
  for (const Budget& budget : kPerBlock) {
    for (const Run& run : kRuns) {
      const gpt2::Precision precision = run.precision;
      CAPTURE(budget.variant);
      CAPTURE(gpt2::precision_name(precision));
      CAPTURE(examples::attention_name(run.attention));
      const moe::cuda::EmulatedDevice device;
      const std::unique_ptr<gpt2::Trainer> trainer =
          gpt2::make_device_trainer(budget.variant, config, {}, precision, device, run.attention);
      if (trainer->is_moe()) trainer->collect_routing_stats(false);
      const auto step = [&](int s) { train_step(*trainer, config, B, T, s); };
      step(0);
      const std::uint64_t before = device.launch_count();
      step(1);
      const std::uint64_t launches = device.launch_count() - before;
      const std::uint64_t per_block =
          run.attention == examples::AttentionKernel::fused ? budget.fused : budget.materialized;
      const std::uint64_t experts = trainer->is_moe() ? kPerExpert * std::uint64_t(config.experts) : 0;
      INFO("launches in the step: ", launches);
      CHECK(launches <= kOnce + std::uint64_t(config.layers) * (per_block + experts));
    }
  }
}
