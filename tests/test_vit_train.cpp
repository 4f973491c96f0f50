// The ViT example's training loop and checkpoints (examples/vit_moe/train_loop.hpp through the
// CPU's train.hpp, checkpoint.hpp) and the confusion matrix (examples/common/confusion.hpp): exact
// resume, the same bits on any thread count, bad options, checkpoints that round-trip and corrupt
// ones that are refused by name.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "../examples/vit_moe/train.hpp"
#include "vit_test_images.hpp"

using moe::Index;

namespace {

// 8 x 8 one-channel images in 4 patches of 4 x 4 (T = 5), 2 blocks of which block 1 is MoE.
const vit::Config kTinyTrain{.image_size = 8, .channels = 1, .patch = 4, .classes = 4, .layers = 2, .heads = 2,
                             .hidden = 16, .ffn = 24, .experts = 4, .top_k = 2, .moe_every = 2, .seed = 5};

using vit_test::brightness_images;

vit::Data tiny_data() {
  vit::Data data{brightness_images(48, 1), brightness_images(20, 2), {}, "brightness"};
  data.normalisation = vit::measure_normalisation(data.train);
  return data;
}

vit::TrainOptions tiny_options(std::int64_t steps) {
  vit::TrainOptions o;
  o.steps = steps;
  o.batch = 8;  // 6 steps per epoch: the runs below cross epochs
  o.warmup = 2;
  o.lr = 3e-3;
  o.augment = true;
  o.threads = 1;
  o.log_every = 1000;
  return o;
}

std::vector<float> all_values(auto& model) {
  std::vector<float> values;
  for (auto& p : model.parameters()) values.insert(values.end(), p.value.begin(), p.value.end());
  return values;
}

std::filesystem::path temp_file(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / "moe_test_vit_train";
  std::filesystem::create_directories(dir);
  return dir / name;
}

std::vector<char> file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_bytes(const std::filesystem::path& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

// 10 steps straight vs 5 steps, checkpoint, fresh model and optimizer, load, 5 more: same bits.
template <class Model>
void check_exact_resume() {
  const vit::Data data = tiny_data();
  const vit::TrainOptions options = tiny_options(10);

  Model straight(kTinyTrain);
  moe::nn::AdamW<float> straight_optimizer = vit::make_optimizer(options);
  const vit::TrainResult full = vit::train(straight, straight_optimizer, data, options);

  vit::TrainOptions interrupted = options;
  interrupted.checkpoint = temp_file(std::string(Model::variant) + ".safetensors");
  interrupted.stop_after = 5;
  {
    Model first(kTinyTrain);
    moe::nn::AdamW<float> first_optimizer = vit::make_optimizer(options);
    const vit::TrainResult half = vit::train(first, first_optimizer, data, interrupted);
    CHECK(half.steps == 5);
    CHECK(std::isnan(half.test.accuracy));  // no evaluation when interrupted
  }
  Model resumed(kTinyTrain);
  moe::nn::AdamW<float> resumed_optimizer = vit::make_optimizer(options);
  const vit::CheckpointHeader header = vit::load_checkpoint(interrupted.checkpoint, resumed, &resumed_optimizer);
  CHECK(header.metadata.at("step") == "5");
  CHECK(resumed_optimizer.step_count() == 5);
  const vit::TrainResult rest = vit::train(resumed, resumed_optimizer, data, options, 5);
  CHECK(rest.steps == 5);
  CHECK(all_values(resumed) == all_values(straight));
  CHECK(rest.train_loss == full.train_loss);
  CHECK(rest.test.loss == full.test.loss);
  CHECK(rest.test.confusion.counts == full.test.confusion.counts);
}

}  // namespace

TEST_CASE("vit train: interrupted at step 5 and resumed from the checkpoint, every bit equals a straight run") {
  SUBCASE("self") { check_exact_resume<vit::MoEModel<moe::SelfRoute, float>>(); }
  SUBCASE("linear") { check_exact_resume<vit::MoEModel<moe::Linear, float>>(); }
  SUBCASE("fixed-random") { check_exact_resume<vit::MoEModel<moe::FixedRandom, float>>(); }
  SUBCASE("random") { check_exact_resume<vit::MoEModel<moe::Random, float>>(); }
  SUBCASE("dense") { check_exact_resume<vit::DenseModel<float>>(); }
}

TEST_CASE("vit train: the loss drops, routing statistics cover the test images, same bits on 1 and 2 threads") {
  const vit::Data data = tiny_data();
  vit::TrainOptions options = tiny_options(60);
  options.augment = false;
  options.lr = 1e-2;
  std::vector<float> values[2];
  vit::TrainResult results[2];
  for (int threads : {1, 2}) {
    options.threads = threads;
    vit::MoEModel<moe::SelfRoute, float> model(kTinyTrain);
    moe::nn::AdamW<float> optimizer = vit::make_optimizer(options);
    results[threads - 1] = vit::train(model, optimizer, data, options);
    values[threads - 1] = all_values(model);
  }
  const vit::TrainResult& r = results[0];
  CHECK(values[0] == values[1]);
  CHECK(r.train_loss == results[1].train_loss);
  CHECK(r.test.confusion.counts == results[1].test.confusion.counts);
  CHECK(r.test.loss < std::log(4.0) * 0.5);  // well below chance (ln 4) after 10 epochs
  CHECK(r.test.accuracy > 0.6);
  CHECK(r.test.images == 20);
  CHECK(r.test.confusion.total() == 20);
  CHECK(r.moe_blocks == std::vector<Index>{1});
  REQUIRE(r.routing.size() == 1);
  CHECK(r.routed_tokens == 20 * kTinyTrain.tokens());  // every test image's tokens, the class token included
  double sum = 0;
  for (double f : r.routing[0].fractions) sum += f;
  CHECK(sum == doctest::Approx(1.0));
  CHECK(r.router_parameters == 0);
}

TEST_CASE("vit train: --epochs counts whole passes; a batch is drawn from one epoch's shuffle") {
  const vit::Data data = tiny_data();
  CHECK(vit::steps_per_epoch(data.train, 8) == 6);
  CHECK(vit::steps_per_epoch(data.train, 10) == 4);  // the last partial batch is dropped
  CHECK(vit::steps_per_epoch(data.train, 48) == 1);
}

TEST_CASE("vit train: the class token and the position embedding are not decayed, the matrices are") {
  const vit::Data data = tiny_data();
  vit::DenseModel<float> model(kTinyTrain);
  vit::TrainOptions options = tiny_options(1);
  options.weight_decay = 0.5;
  auto params = vit::detail::optimizer_view(model.parameters());
  const std::vector<float> before = all_values(model);
  moe::nn::AdamW<float> optimizer = vit::make_optimizer(options);
  model.zero_grad();  // zero gradients: AdamW's update is 0, only the decay moves a value
  optimizer.step(params, 0.1);
  std::size_t at = 0;
  for (auto& p : model.parameters()) {
    CAPTURE(p.name);
    const bool decayed = p.name != "cls_token" && p.name != "pos_embed" && p.shape.size() >= 2;
    for (std::size_t i = 0; i < p.value.size(); ++i, ++at)
      if (before[at] != 0) CHECK((p.value[i] == before[at]) == !decayed);
  }
}

TEST_CASE("vit train: bad options and data name the problem") {
  const vit::Data data = tiny_data();
  vit::MoEModel<moe::SelfRoute, float> model(kTinyTrain);
  moe::nn::AdamW<float> optimizer;
  const auto fails = [&](vit::TrainOptions o, const vit::Data& d, const char* phrase) {
    CAPTURE(phrase);
    CHECK_THROWS_WITH_AS(vit::train(model, optimizer, d, o), doctest::Contains(phrase), moe::Error);
  };
  vit::TrainOptions o = tiny_options(4);
  o.steps = 0;
  fails(o, data, "--steps must be >= 1");
  o = tiny_options(4);
  o.batch = 49;
  fails(o, data, "--batch = 49 is larger than the training split (48 images)");
  o = tiny_options(4);
  o.warmup = 5;
  fails(o, data, "warmup = 5");
  o = tiny_options(4);
  o.grad_clip = -1;
  fails(o, data, "--clip");
  o = tiny_options(4);
  o.lr = NAN;
  fails(o, data, "learning rate");
  vit::Data wrong = data;
  wrong.train.shape = {1, 4, 16};
  fails(tiny_options(4), wrong, "training images are 1 x 4 x 16, the model takes 1 x 8 x 8");
  wrong = data;
  wrong.test.classes = 7;
  fails(tiny_options(4), wrong, "test split has 7 classes, the model 4");
  CHECK_THROWS_WITH_AS(vit::train(model, optimizer, data, tiny_options(4), 5), doctest::Contains("resuming at step 5"),
                       moe::Error);
}

TEST_CASE("vit checkpoint: parameters, optimizer state and config round-trip; timm names in the file") {
  const vit::Data data = tiny_data();
  vit::TrainOptions options = tiny_options(3);
  options.checkpoint = temp_file("roundtrip.safetensors");
  vit::MoEModel<moe::Linear, float> model(kTinyTrain);
  moe::nn::AdamW<float> optimizer = vit::make_optimizer(options);
  vit::train(model, optimizer, data, options, 0, "", {{"train.note", "kept"}});

  const vit::CheckpointHeader header = vit::read_checkpoint_header(options.checkpoint);
  CHECK(header.variant == "linear");
  CHECK(header.config.hidden == 16);
  CHECK(header.config.moe_every == 2);
  CHECK(header.has_optimizer_state);
  CHECK(header.metadata.at("train.note") == "kept");
  const moe::io::SafetensorsFile file(options.checkpoint);
  for (const char* name : {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                           "blocks.0.mlp.fc1.weight", "blocks.1.moe.router.weight", "blocks.1.moe.experts.fc.weight",
                           "norm.weight", "head.weight", "optimizer.m.head.weight"}) {
    CAPTURE(name);
    CHECK(file.contains(name));
  }
  CHECK(file.info("patch_embed.proj.weight").shape == std::vector<std::int64_t>{16, 1, 4, 4});

  vit::MoEModel<moe::Linear, float> loaded(kTinyTrain);
  moe::nn::AdamW<float> loaded_optimizer;
  vit::load_checkpoint(options.checkpoint, loaded, &loaded_optimizer);
  CHECK(all_values(loaded) == all_values(model));
  CHECK(loaded_optimizer.step_count() == 3);
  CHECK(loaded_optimizer.m() == optimizer.m());
  CHECK(loaded_optimizer.v() == optimizer.v());
}

TEST_CASE("vit checkpoint: another variant, another config, truncation and corruption are refused by name") {
  const auto path = temp_file("good.safetensors");
  vit::MoEModel<moe::SelfRoute, float> model(kTinyTrain);
  vit::save_checkpoint(path, model, nullptr, {{"step", "0"}});
  const std::vector<float> original = all_values(model);

  SUBCASE("another variant") {
    vit::MoEModel<moe::Linear, float> linear(kTinyTrain);
    CHECK_THROWS_WITH_AS(vit::load_checkpoint(path, linear), doctest::Contains("variant is \"self\""), moe::Error);
  }
  SUBCASE("another config") {
    vit::Config wider = kTinyTrain;
    wider.hidden = 32;
    vit::MoEModel<moe::SelfRoute, float> other(wider);
    CHECK_THROWS_WITH_AS(vit::load_checkpoint(path, other),
                         doctest::Contains("config.hidden is 16 in the checkpoint, 32 in the model"), moe::Error);
  }
  SUBCASE("a reserved metadata key") {
    CHECK_THROWS_WITH_AS(vit::save_checkpoint(path, model, nullptr, {{"config.hidden", "3"}}),
                         doctest::Contains("reserved"), moe::Error);
  }
  SUBCASE("every truncation") {
    const std::vector<char> bytes = file_bytes(path);
    const auto cut = temp_file("cut.safetensors");
    for (std::size_t length : {std::size_t(0), std::size_t(4), std::size_t(8), std::size_t(40), bytes.size() / 2,
                               bytes.size() - 1}) {
      CAPTURE(length);
      write_bytes(cut, std::vector<char>(bytes.begin(), bytes.begin() + std::ptrdiff_t(length)));
      vit::MoEModel<moe::SelfRoute, float> target(kTinyTrain);
      const std::vector<float> untouched = all_values(target);
      CHECK_THROWS_WITH_AS(vit::load_checkpoint(cut, target), doctest::Contains(cut.string().c_str()), moe::Error);
      CHECK(all_values(target) == untouched);  // nothing changed before the error
    }
  }
  SUBCASE("mutated bytes: a clean error naming the file, or a load of finite values") {
    const std::vector<char> bytes = file_bytes(path);
    const auto mutated = temp_file("mutated.safetensors");
    for (std::uint64_t trial = 0; trial < 200; ++trial) {
      std::vector<char> copy = bytes;
      const std::size_t at = std::size_t(moe::random::bits(3, 0, trial) % copy.size());
      copy[at] = char(moe::random::bits(3, 1, trial));
      write_bytes(mutated, copy);
      vit::MoEModel<moe::SelfRoute, float> target(kTinyTrain);
      try {
        vit::load_checkpoint(mutated, target);
        const std::vector<float> values = all_values(target);
        CHECK(std::all_of(values.begin(), values.end(), [](float v) { return std::isfinite(v); }));
      } catch (const moe::Error& error) {
        CHECK(std::string(error.what()).find(mutated.string()) != std::string::npos);
      }
    }
  }
  SUBCASE("a non-finite value") {
    std::vector<char> bytes = file_bytes(path);
    std::uint64_t header_length = 0;
    std::memcpy(&header_length, bytes.data(), 8);
    const float nan = NAN;
    std::memcpy(bytes.data() + 8 + header_length, &nan, 4);  // the first value of the first tensor
    const auto poisoned = temp_file("nan.safetensors");
    write_bytes(poisoned, bytes);
    CHECK_THROWS_WITH_AS(vit::load_checkpoint(poisoned, model), doctest::Contains("non-finite"), moe::Error);
    CHECK(all_values(model) == original);
  }
  SUBCASE("a config in the metadata that disagrees with the tensors, before any allocation") {
    const auto edited = temp_file("edited.safetensors");
    const auto header_error = [&](const std::string& key, const std::string& value) {
      const moe::io::SafetensorsFile file(path);
      std::vector<moe::io::TensorToWrite> tensors;
      for (const std::string& name : file.names()) {
        const auto& info = file.info(name);
        tensors.push_back({name, info.dtype, info.shape, file.data(name)});
      }
      std::map<std::string, std::string> metadata = file.metadata();
      metadata[key] = value;
      moe::io::save_safetensors(edited, tensors, metadata);
      try {
        vit::read_checkpoint_header(edited);
      } catch (const moe::Error& error) {
        return std::string(error.what());
      }
      return std::string();
    };
    CHECK(header_error("config.layers", "16000000").find("config.layers = 16000000, the file has 2 blocks") !=
          std::string::npos);
    CHECK(header_error("config.hidden", "64").find("tensor \"cls_token\" has shape [1, 1, 16]") != std::string::npos);
    CHECK(header_error("config.classes", "7").find("tensor \"head.weight\"") != std::string::npos);
    CHECK(header_error("config.patch", "2").find("tensor \"pos_embed\"") != std::string::npos);
    CHECK(header_error("config.channels", "3").find("tensor \"patch_embed.proj.weight\"") != std::string::npos);
    CHECK(header_error("config.ffn", "48").find("config.ffn and config.hidden") != std::string::npos);
    // Block 0 is dense here (moe_every = 2): the experts are checked at the first MoE block all the same,
    // not after a model of 2^24 experts has been allocated.
    CHECK(header_error("config.experts", "16777216").find("config.experts, config.ffn and config.hidden") !=
          std::string::npos);
    CHECK(header_error("config.seed", "6").empty());  // not a shape: checked against the model on load
  }
  SUBCASE("not a vit checkpoint") {
    const float value = 1;
    moe::io::save_safetensors(temp_file("plain.safetensors"),
                              std::vector{moe::io::tensor_to_write("x", {1}, std::span<const float>(&value, 1))}, {});
    CHECK_THROWS_WITH_AS(vit::read_checkpoint_header(temp_file("plain.safetensors")),
                         doctest::Contains("not a vit_moe checkpoint"), moe::Error);
  }
}

TEST_CASE("confusion matrix: counts, accuracy and row rates of a hand-built case; evaluate() fills one") {
  report::ConfusionMatrix matrix(3);
  // true 0: predicted 0, 0, 1;  true 1: predicted 1;  true 2: predicted 0, 2, 2, 2
  for (auto [t, p] : std::vector<std::pair<int, int>>{{0, 0}, {0, 0}, {0, 1}, {1, 1}, {2, 0}, {2, 2}, {2, 2}, {2, 2}})
    matrix.add(t, p);
  CHECK(matrix.total() == 8);
  CHECK(matrix.correct() == 6);
  CHECK(matrix.accuracy() == 0.75);
  CHECK(matrix.at(2, 0) == 1);
  const std::vector<double> rates = matrix.row_rates();
  CHECK(rates[0] == doctest::Approx(2.0 / 3));
  CHECK(rates[1] == doctest::Approx(1.0 / 3));
  CHECK(rates[4] == 1.0);
  CHECK(rates[8] == 0.75);
  CHECK_THROWS_WITH_AS(matrix.add(3, 0), doctest::Contains("outside [0, 3)"), moe::Error);
  CHECK(std::isnan(report::ConfusionMatrix(2).row_rates()[0]));  // an empty row: n/a
  const std::string svg = report::heatmap_svg(report::confusion_heatmap(matrix, "c", {"T-shirt/top", "Bag", "Coat"}));
  CHECK(svg.find(">T-shirt/top</text>") != std::string::npos);
  CHECK(svg.find(">0.75</text>") != std::string::npos);

  // evaluate(): the same predictions and losses as forward on the whole test split at once.
  const vit::Data data = tiny_data();
  vit::MoEModel<moe::Linear, float> model(kTinyTrain);
  model.set_threads(1);
  const vit::Evaluation in_batches = vit::evaluate(model, data.test, data.normalisation, 6);
  CHECK(in_batches.images == 20);
  CHECK(in_batches.confusion.total() == 20);
  const vit::Evaluation e = vit::evaluate(model, data.test, data.normalisation, 20);  // one batch, as below
  std::vector<Index> all(20);
  for (Index i = 0; i < 20; ++i) all[std::size_t(i)] = i;
  std::vector<float> images;
  std::vector<std::int32_t> labels;
  vit::make_batch(data.test, all, data.normalisation, nullptr, 0, images, labels);
  const double loss = model.forward(images, labels, 20);
  const std::vector<std::int32_t> predicted = model.predictions();
  Index correct = 0;
  for (std::size_t i = 0; i < 20; ++i) correct += predicted[i] == labels[i];
  CHECK(e.images == 20);
  CHECK(e.accuracy == double(correct) / 20);
  CHECK(e.loss == doctest::Approx(loss).epsilon(1e-12));  // times 20, over 20
}
