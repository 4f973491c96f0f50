// The GPT-2 example's training loop (examples/gpt2_moe/train.hpp): the schedule, batches that are a
// pure function of (seed, step), exact resume from a checkpoint, gradient accumulation, sampling.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "../examples/common/schedule.hpp"
#include "../examples/gpt2_moe/sample.hpp"
#include "../examples/gpt2_moe/train.hpp"

using moe::Index;

namespace {

const gpt2::Config kTinyTrain{.vocab = 32, .context = 16, .layers = 2, .heads = 2, .hidden = 16, .ffn = 24,
                              .experts = 4, .top_k = 2, .seed = 9};

// A stream with structure to learn: a few repeating phrases.
gpt2::Dataset phrase_dataset() {
  gpt2::Dataset data;
  data.tokenizer = "bytes";
  for (int i = 0; i < 3000; ++i) data.train.push_back(std::uint16_t((i * 7 + i / 11) % 29));
  for (int i = 0; i < 400; ++i) data.val.push_back(std::uint16_t((i * 7 + i / 11 + 3) % 29));
  return data;
}

gpt2::TrainOptions train_options(std::int64_t steps) {
  gpt2::TrainOptions o;
  o.steps = steps;
  o.batch = 3;
  o.seq = 12;
  o.warmup = 2;
  o.lr = 3e-3;
  o.eval_every = 0;
  o.eval_tokens = 96;
  o.stats_tokens = 192;
  o.threads = 1;
  o.log_every = 1000;
  return o;
}

std::vector<float> all_values(auto& model) {
  std::vector<float> values;
  for (auto& p : model.parameters()) values.insert(values.end(), p.value.begin(), p.value.end());
  return values;
}

std::filesystem::path train_temp_file(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / "moe_test_gpt2_train";
  std::filesystem::create_directories(dir);
  return dir / name;
}

// 6 steps straight vs 3 steps, checkpoint, fresh model and optimizer, load, 3 more: same bits.
template <class Model>
void check_exact_resume(std::int64_t accumulation) {
  const gpt2::Dataset data = phrase_dataset();
  gpt2::TrainOptions options = train_options(6);
  options.accumulation = accumulation;

  Model straight(kTinyTrain);
  moe::nn::AdamW<float> straight_optimizer({.lr = options.lr});
  const gpt2::TrainResult full = gpt2::train(straight, straight_optimizer, data, options);

  gpt2::TrainOptions interrupted = options;
  interrupted.checkpoint = train_temp_file(std::string(Model::variant) + ".safetensors");
  interrupted.stop_after = 3;
  {
    Model first(kTinyTrain);
    moe::nn::AdamW<float> first_optimizer({.lr = options.lr});
    const gpt2::TrainResult half = gpt2::train(first, first_optimizer, data, interrupted);
    CHECK(half.steps == 3);
    CHECK(std::isnan(half.val_loss));  // no evaluation when interrupted
  }
  Model resumed(kTinyTrain);
  moe::nn::AdamW<float> resumed_optimizer({.lr = options.lr});
  gpt2::load_checkpoint(interrupted.checkpoint, resumed, &resumed_optimizer);
  CHECK(resumed_optimizer.step_count() == 3);
  const gpt2::TrainResult rest = gpt2::train(resumed, resumed_optimizer, data, options, 3);
  CHECK(rest.steps == 3);
  CHECK(all_values(resumed) == all_values(straight));
  CHECK(rest.val_loss == full.val_loss);
  CHECK(rest.train_loss == full.train_loss);
}

}  // namespace

TEST_CASE("schedule: linear warmup to the peak, cosine down to min_ratio at the end") {
  const train::Schedule s{.peak_lr = 1.0, .warmup_steps = 4, .total_steps = 14, .min_ratio = 0.1};
  CHECK(s.lr(0) == doctest::Approx(0.25));
  CHECK(s.lr(3) == doctest::Approx(1.0));
  CHECK(s.lr(4) == doctest::Approx(1.0));
  CHECK(s.lr(9) == doctest::Approx(0.55));  // half way down the cosine
  CHECK(s.lr(14) == doctest::Approx(0.1));
  CHECK_THROWS_AS((train::Schedule{.peak_lr = 1, .warmup_steps = 20, .total_steps = 10}.validate()), moe::Error);
}

TEST_CASE("train: interrupted at step 3 and resumed from the checkpoint, every bit equals a straight run") {
  SUBCASE("self") { check_exact_resume<gpt2::MoEModel<moe::SelfRoute, float>>(1); }
  SUBCASE("linear, 2 micro-batches") { check_exact_resume<gpt2::MoEModel<moe::Linear, float>>(2); }
  SUBCASE("random") { check_exact_resume<gpt2::MoEModel<moe::Random, float>>(1); }
  SUBCASE("fixed-random") { check_exact_resume<gpt2::MoEModel<moe::FixedRandom, float>>(1); }
  SUBCASE("dense") { check_exact_resume<gpt2::DenseModel<float>>(1); }
}

TEST_CASE("train: the loss drops, routing statistics cover the held-out tokens, same bits on 1 and 2 threads") {
  const gpt2::Dataset data = phrase_dataset();
  gpt2::TrainOptions options = train_options(40);
  auto run = [&](int threads) {
    options.threads = threads;
    gpt2::MoEModel<moe::SelfRoute, float> model(kTinyTrain);
    moe::nn::AdamW<float> optimizer({.lr = options.lr});
    gpt2::TrainResult r = gpt2::train(model, optimizer, data, options);
    return std::make_pair(r, all_values(model));
  };
  const auto [one, values_one] = run(1);
  const auto [two, values_two] = run(2);
  CHECK(values_one == values_two);
  CHECK(one.val_loss == two.val_loss);
  CHECK(one.val_loss < 0.85 * std::log(29.0));  // well below a uniform guess over the 29 ids used (3.37)
  REQUIRE(one.routing.size() == 2);
  CHECK(one.routed_tokens == 192);  // stats_tokens / seq windows of seq tokens
  double sum = 0;
  for (double f : one.routing[0].fractions) sum += f;
  CHECK(sum == doctest::Approx(1.0));
  CHECK(one.tokens == 40 * 3 * 12);
}

TEST_CASE("train: bad options and data name the problem") {
  const gpt2::Dataset data = phrase_dataset();
  gpt2::MoEModel<moe::SelfRoute, float> model(kTinyTrain);
  moe::nn::AdamW<float> optimizer;
  gpt2::TrainOptions options = train_options(2);
  options.seq = 17;  // > context 16
  CHECK_THROWS_WITH_AS(gpt2::train(model, optimizer, data, options), doctest::Contains("--seq = 17"), moe::Error);
  gpt2::Dataset wide = data;
  wide.train[5] = 40;  // outside vocab 32
  CHECK_THROWS_WITH_AS(gpt2::train(model, optimizer, wide, train_options(2)), doctest::Contains("token id 40"),
                       moe::Error);
  gpt2::Dataset tiny_val = data;
  tiny_val.val.resize(5);
  CHECK_THROWS_WITH_AS(gpt2::train(model, optimizer, tiny_val, train_options(2)),
                       doctest::Contains("validation split holds 5"), moe::Error);
}

TEST_CASE("sample: greedy picks the largest logit (ties to the lower id), top-k limits the choice") {
  const std::vector<float> logits{0.5f, 2.0f, 2.0f, -1.0f};
  CHECK(gpt2::pick_token(logits, 0.0, 0, 0.7) == 1);
  for (double u : {0.0, 0.3, 0.6, 0.99}) {
    const std::int32_t id = gpt2::pick_token(logits, 1.0, 2, u);
    CHECK((id == 1 || id == 2));
  }
  CHECK(gpt2::pick_token(logits, 1.0, 2, 0.0) == 1);
  CHECK(gpt2::pick_token(logits, 1.0, 2, 0.999) == 2);
  // Same seed, same text; the prompt is kept.
  gpt2::MoEModel<moe::SelfRoute, float> model(kTinyTrain);
  model.set_threads(1);
  const gpt2::SampleOptions options{.tokens = 10, .temperature = 1.0, .top_k = 5, .seed = 3};
  const auto a = gpt2::generate(model, {1, 2, 3}, options), b = gpt2::generate(model, {1, 2, 3}, options);
  CHECK(a == b);
  CHECK(a.size() == 13);
  CHECK(a[0] == 1);
}
