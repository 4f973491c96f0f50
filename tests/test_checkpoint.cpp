// examples/gpt2_moe/checkpoint.hpp: GPT-2 MoE checkpoints: Hugging Face names and layout,
// bit-exact round trips and training resumption for every variant, every refusal, mutated files.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "../examples/gpt2_moe/checkpoint.hpp"
#include "../examples/gpt2_moe/cpu_model.hpp"

namespace fs = std::filesystem;
using gpt2::Config;

namespace {

struct TemporaryDirectory {
  fs::path path;
  TemporaryDirectory() {
    std::random_device entropy;
    path = fs::temp_directory_path() / ("moe-test-checkpoint-" + std::to_string(entropy()) + std::to_string(entropy()));
    fs::create_directories(path);
  }
  ~TemporaryDirectory() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

Config tiny_config() {
  return {.vocab = 48, .context = 8, .layers = 2, .heads = 2, .hidden = 16, .ffn = 24, .experts = 4, .top_k = 2,
          .seed = 7};
}

constexpr moe::Index kBatch = 2, kSeq = 8;

// Training steps [first, first + count) on deterministic data that depends on the step only.
template <class Model>
void train_steps(Model& model, moe::nn::AdamW<float>& optimizer, int first, int count) {
  const Config& c = model.config();
  model.set_threads(1);  // results are the same on any count; one avoids contention on a busy machine
  for (int step = first; step < first + count; ++step) {
    std::mt19937 rng(1000 + std::uint32_t(step));
    std::vector<std::int32_t> tokens(kBatch * kSeq), targets(kBatch * kSeq);
    for (auto& t : tokens) t = std::int32_t(rng() % std::uint32_t(c.vocab));
    for (auto& t : targets) t = std::int32_t(rng() % std::uint32_t(c.vocab));
    model.zero_grad();
    model.forward(tokens, targets, kBatch, kSeq);
    model.backward();
    auto params = model.parameters();
    moe::nn::clip_grad_norm(params, 1.0);
    optimizer.step(params);
  }
}

// Same values, bit for bit, in every parameter.
template <class Model>
bool same_parameters(Model& a, Model& b) {
  auto pa = a.parameters(), pb = b.parameters();
  if (pa.size() != pb.size()) return false;
  for (std::size_t i = 0; i < pa.size(); ++i)
    if (pa[i].name != pb[i].name || pa[i].value.size() != pb[i].value.size() ||
        std::memcmp(pa[i].value.data(), pb[i].value.data(), pa[i].value.size() * sizeof(float)) != 0)
      return false;
  return true;
}

template <class Model>
void perturb(Model& model, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  for (auto& p : model.parameters())
    for (float& v : p.value) v += normal(rng);
}

std::string load_error(const fs::path& path, auto& model) {
  try {
    gpt2::load_checkpoint(path, model);
  } catch (const moe::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, std::string_view part) { return text.find(part) != std::string::npos; }

// Rewrites a safetensors file with the tensors and metadata edited by `edit`.
template <class Edit>
void rewrite(const fs::path& from, const fs::path& to, Edit&& edit) {
  const moe::io::SafetensorsFile file(from);
  std::vector<moe::io::TensorToWrite> tensors;
  for (const std::string& name : file.names()) {
    const moe::io::TensorInfo& info = file.info(name);
    tensors.push_back({name, info.dtype, info.shape, file.data(name)});
  }
  std::map<std::string, std::string> metadata = file.metadata();
  edit(tensors, metadata);
  moe::io::save_safetensors(to, tensors, metadata);
}

}  // namespace

TEST_CASE("checkpoint: a dense checkpoint has Hugging Face GPT-2's names and Conv1D [in, out] shapes") {
  TemporaryDirectory directory;
  const Config config = tiny_config();
  gpt2::DenseModel<float> model(config);
  const fs::path path = directory.path / "dense.safetensors";
  gpt2::save_checkpoint(path, model, nullptr, {{"step", "12"}});

  const moe::io::SafetensorsFile file(path);
  std::vector<std::string> names = file.names();
  std::vector<std::string> expected{"wte.weight", "wpe.weight"};
  for (int l = 0; l < 2; ++l)
    for (const char* suffix : {"ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                               "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight",
                               "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"})
      expected.push_back("h." + std::to_string(l) + "." + suffix);
  expected.push_back("ln_f.weight");
  expected.push_back("ln_f.bias");
  CHECK(names == expected);

  const auto shape = [&](const std::string& name) { return file.info(name).shape; };
  using Shape = std::vector<std::int64_t>;
  CHECK(shape("wte.weight") == Shape{48, 16});
  CHECK(shape("wpe.weight") == Shape{8, 16});
  CHECK(shape("h.0.attn.c_attn.weight") == Shape{16, 48});  // HF Conv1D: [H, 3H]
  CHECK(shape("h.0.attn.c_proj.weight") == Shape{16, 16});
  CHECK(shape("h.1.mlp.c_fc.weight") == Shape{16, 24});     // [H, F]
  CHECK(shape("h.1.mlp.c_proj.weight") == Shape{24, 16});   // [F, H]
  CHECK(shape("h.1.mlp.c_fc.bias") == Shape{24});
  CHECK(file.info("wte.weight").dtype == moe::io::DType::F32);

  // The stored c_attn is the model's [3H, H] weight transposed; wte is stored as is.
  std::vector<float> stored(16 * 48);
  file.read("h.0.attn.c_attn.weight", stored, {16, 48});
  for (auto& p : model.parameters()) {
    if (p.name == "h.0.attn.c_attn.weight") {
      for (int r = 0; r < 48; ++r)
        for (int c = 0; c < 16; ++c) REQUIRE(stored[std::size_t(c * 48 + r)] == p.value[std::size_t(r * 16 + c)]);
    }
    if (p.name == "wte.weight") {
      std::vector<float> wte(48 * 16);
      file.read("wte.weight", wte, {48, 16});
      CHECK(std::equal(wte.begin(), wte.end(), p.value.begin()));
    }
  }

  const auto& metadata = file.metadata();
  CHECK(metadata.at("format") == "moe-gpt2/1");
  CHECK(metadata.at("variant") == "dense");
  CHECK(metadata.at("config.vocab") == "48");
  CHECK(metadata.at("config.context") == "8");
  CHECK(metadata.at("config.layers") == "2");
  CHECK(metadata.at("config.heads") == "2");
  CHECK(metadata.at("config.hidden") == "16");
  CHECK(metadata.at("config.ffn") == "24");
  CHECK(metadata.at("config.experts") == "4");
  CHECK(metadata.at("config.top_k") == "2");
  CHECK(metadata.at("config.seed") == "7");
  CHECK(metadata.at("config.route_from_residual") == "false");
  CHECK(metadata.at("config.self_slice") == "last");
  CHECK(metadata.at("step") == "12");
  CHECK_FALSE(metadata.contains("optimizer.step"));
}

TEST_CASE("checkpoint: MoE tensors keep the library's names and layout under h.{l}.moe.") {
  TemporaryDirectory directory;
  gpt2::MoEModel<moe::Linear, float> model(tiny_config());
  const fs::path path = directory.path / "linear.safetensors";
  gpt2::save_checkpoint(path, model, nullptr);
  const moe::io::SafetensorsFile file(path);
  using Shape = std::vector<std::int64_t>;
  CHECK(file.info("h.0.moe.router.weight").shape == Shape{4, 16});           // [N, H]
  CHECK(file.info("h.1.moe.experts.fc.weight").shape == Shape{4, 24, 16});   // [N, F, H]
  CHECK(file.info("h.1.moe.experts.fc.bias").shape == Shape{4, 24});
  CHECK(file.info("h.1.moe.experts.proj.weight").shape == Shape{4, 16, 24});  // [N, H, F]
  CHECK(file.info("h.1.moe.experts.proj.bias").shape == Shape{4, 16});
  CHECK(file.info("h.0.attn.c_attn.weight").shape == Shape{16, 48});
  CHECK_FALSE(file.contains("h.0.mlp.c_fc.weight"));
  CHECK(file.metadata().at("variant") == "linear");
}

TEST_CASE("checkpoint: the header alone gives the variant, the config and the caller's metadata") {
  TemporaryDirectory directory;
  Config config = tiny_config();
  config.route_from_residual = true;
  config.self_slice = gpt2::SelfSlice::per_layer;
  config.seed = 0xFFFFFFFFFFFFFFFFull;
  gpt2::MoEModel<moe::SelfRoute, float> model(config);
  moe::nn::AdamW<float> optimizer;
  train_steps(model, optimizer, 0, 1);
  const fs::path path = directory.path / "self.safetensors";
  gpt2::save_checkpoint(path, model, &optimizer, {{"step", "1"}, {"data.shard", "3"}, {"lr.schedule", "cosine"}});

  const gpt2::CheckpointHeader header = gpt2::read_checkpoint_header(path);
  CHECK(header.variant == "self");
  CHECK(header.config.vocab == config.vocab);
  CHECK(header.config.context == config.context);
  CHECK(header.config.layers == config.layers);
  CHECK(header.config.heads == config.heads);
  CHECK(header.config.hidden == config.hidden);
  CHECK(header.config.ffn == config.ffn);
  CHECK(header.config.experts == config.experts);
  CHECK(header.config.top_k == config.top_k);
  CHECK(header.config.seed == config.seed);
  CHECK(header.config.route_from_residual);
  CHECK(header.config.self_slice == gpt2::SelfSlice::per_layer);
  CHECK(header.has_optimizer_state);
  CHECK_FALSE(header.hugging_face);
  CHECK(header.metadata.at("data.shard") == "3");
  CHECK(header.metadata.at("lr.schedule") == "cosine");
  CHECK(header.metadata.at("optimizer.step") == "1");

  // A program builds the model type the header names, then loads.
  gpt2::with_variant<float>(header.variant, [&](auto tag) {
    typename decltype(tag)::type restored(header.config);
    gpt2::load_checkpoint(path, restored);
    if constexpr (std::is_same_v<typename decltype(tag)::type, decltype(model)>) CHECK(same_parameters(model, restored));
  });
}

TEST_CASE("checkpoint: save then load restores every parameter bit for bit, for every variant") {
  TemporaryDirectory directory;
  for (std::string_view variant : gpt2::kVariants) {
    CAPTURE(variant);
    gpt2::with_variant<float>(variant, [&](auto tag) {
      using Model = typename decltype(tag)::type;
      Model original(tiny_config());
      perturb(original, 1);
      const fs::path path = directory.path / (std::string(variant) + ".safetensors");
      gpt2::save_checkpoint(path, original, nullptr);
      Model restored(tiny_config());
      CHECK_FALSE(same_parameters(original, restored));
      const gpt2::CheckpointHeader header = gpt2::load_checkpoint(path, restored);
      CHECK(header.variant == variant);
      CHECK(same_parameters(original, restored));
    });
  }
}

TEST_CASE("checkpoint: training resumes bit-exactly after save and load (parameters, AdamW, Random's step)") {
  TemporaryDirectory directory;
  for (std::string_view variant : {"self", "linear", "random", "fixed-random", "dense"}) {
    CAPTURE(variant);
    gpt2::with_variant<float>(variant, [&](auto tag) {
      using Model = typename decltype(tag)::type;
      const moe::nn::AdamWConfig adamw{.lr = 1e-2, .weight_decay = 0.1};

      Model straight(tiny_config());
      moe::nn::AdamW<float> straight_optimizer(adamw);
      train_steps(straight, straight_optimizer, 0, 4);

      Model first(tiny_config());
      moe::nn::AdamW<float> first_optimizer(adamw);
      train_steps(first, first_optimizer, 0, 2);
      const fs::path path = directory.path / (std::string(variant) + ".safetensors");
      gpt2::save_checkpoint(path, first, &first_optimizer, {{"step", "2"}});

      Model resumed(tiny_config());
      moe::nn::AdamW<float> resumed_optimizer(adamw);
      const gpt2::CheckpointHeader header = gpt2::load_checkpoint(path, resumed, &resumed_optimizer);
      CHECK(header.metadata.at("step") == "2");
      CHECK(resumed_optimizer.step_count() == 2);
      CHECK(same_parameters(first, resumed));
      if constexpr (Model::is_moe) {
        if constexpr (requires { resumed.ffn(0).layer().gate().step(); })
          CHECK(resumed.ffn(1).layer().gate().step() == 2);  // one draw per forward
      }
      train_steps(resumed, resumed_optimizer, 2, 2);
      CHECK(same_parameters(straight, resumed));

      // Without the optimizer state the trajectory differs (the test has teeth).
      Model no_state(tiny_config());
      moe::nn::AdamW<float> fresh_optimizer(adamw);
      gpt2::load_checkpoint(path, no_state);
      train_steps(no_state, fresh_optimizer, 2, 2);
      CHECK_FALSE(same_parameters(straight, no_state));
    });
  }
}

TEST_CASE("checkpoint: a variant or config mismatch names the file, the field and both values") {
  TemporaryDirectory directory;
  const fs::path path = directory.path / "self.safetensors";
  gpt2::MoEModel<moe::SelfRoute, float> model(tiny_config());
  gpt2::save_checkpoint(path, model, nullptr);

  gpt2::MoEModel<moe::Linear, float> linear(tiny_config());
  CHECK(contains(load_error(path, linear), "self.safetensors: checkpoint variant is \"self\", the model's is \"linear\""));
  gpt2::DenseModel<float> dense(tiny_config());
  CHECK(contains(load_error(path, dense), "variant is \"self\", the model's is \"dense\""));

  const auto mismatch = [&](auto change) {
    Config config = tiny_config();
    change(config);
    gpt2::MoEModel<moe::SelfRoute, float> other(config);
    return load_error(path, other);
  };
  CHECK(contains(mismatch([](Config& c) { c.hidden = 32; }),
                 "self.safetensors: config.hidden is 16 in the checkpoint, 32 in the model"));
  CHECK(contains(mismatch([](Config& c) { c.layers = 3; }), "config.layers is 2 in the checkpoint, 3 in the model"));
  CHECK(contains(mismatch([](Config& c) { c.experts = 8; }), "config.experts is 4 in the checkpoint, 8 in the model"));
  CHECK(contains(mismatch([](Config& c) { c.top_k = 1; }), "config.top_k is 2"));
  CHECK(contains(mismatch([](Config& c) { c.heads = 4; }), "config.heads is 2"));
  CHECK(contains(mismatch([](Config& c) { c.vocab = 50; }), "config.vocab is 48"));
  CHECK(contains(mismatch([](Config& c) { c.context = 4; }), "config.context is 8"));
  CHECK(contains(mismatch([](Config& c) { c.ffn = 12; }), "config.ffn is 24"));
  CHECK(contains(mismatch([](Config& c) { c.seed = 8; }), "config.seed is 7 in the checkpoint, 8 in the model"));
  CHECK(contains(mismatch([](Config& c) { c.route_from_residual = true; }),
                 "config.route_from_residual is false in the checkpoint, true in the model"));
  CHECK(contains(mismatch([](Config& c) { c.self_slice = gpt2::SelfSlice::per_layer; }),
                 "config.self_slice is last in the checkpoint, per-layer in the model"));
}

TEST_CASE("checkpoint: a missing, misshapen, mistyped or unexpected tensor is refused and the model is unchanged") {
  TemporaryDirectory directory;
  const fs::path path = directory.path / "good.safetensors", bad = directory.path / "bad.safetensors";
  gpt2::MoEModel<moe::Linear, float> model(tiny_config());
  perturb(model, 3);
  gpt2::save_checkpoint(path, model, nullptr);
  gpt2::MoEModel<moe::Linear, float> target(tiny_config()), untouched(tiny_config());

  rewrite(path, bad, [](auto& tensors, auto&) { std::erase_if(tensors, [](auto& t) { return t.name == "h.1.ln_2.bias"; }); });
  CHECK(contains(load_error(bad, target), "bad.safetensors: checkpoint has no tensor \"h.1.ln_2.bias\""));

  const std::vector<float> wrong(16 * 4, 0.0f);
  rewrite(path, bad, [&](auto& tensors, auto&) {
    for (auto& t : tensors)
      if (t.name == "h.0.moe.router.weight") t = moe::io::tensor_to_write(t.name, {16, 4}, wrong);
  });
  CHECK(contains(load_error(bad, target),
                 "tensor \"h.0.moe.router.weight\" has shape [16, 4], the model's \"h.0.moe.router.weight\" needs [4, 16]"));

  const std::vector<std::int32_t> ints(16, 1);
  rewrite(path, bad, [&](auto& tensors, auto&) {
    for (auto& t : tensors)
      if (t.name == "ln_f.bias") t = moe::io::tensor_to_write(t.name, {16}, ints);
  });
  CHECK(contains(load_error(bad, target), "tensor \"ln_f.bias\" has dtype I32, expected a floating-point type"));

  const std::vector<float> extra(3, 0.0f);
  rewrite(path, bad, [&](auto& tensors, auto&) { tensors.push_back(moe::io::tensor_to_write("h.0.mlp.c_fc.bias", {3}, extra)); });
  CHECK(contains(load_error(bad, target), "checkpoint tensor \"h.0.mlp.c_fc.bias\" has no place in the linear model"));

  CHECK(same_parameters(target, untouched));  // every refusal came before any change

  // Half-precision tensors are converted on load.
  std::vector<std::vector<std::uint16_t>> halves;
  halves.reserve(64);
  rewrite(path, bad, [&](auto& tensors, auto&) {
    for (auto& t : tensors) {
      std::vector<float> values(t.bytes.size() / 4);
      std::memcpy(values.data(), t.bytes.data(), t.bytes.size());
      auto& bits = halves.emplace_back();
      for (float v : values) bits.push_back(moe::io::float_to_bf16(v));
      t = moe::io::tensor_to_write(t.name, moe::io::DType::BF16, t.shape, bits);
    }
  });
  gpt2::load_checkpoint(bad, target);
  auto loaded = target.parameters(), source = model.parameters();
  for (std::size_t i = 0; i < loaded.size(); ++i)
    for (std::size_t j = 0; j < loaded[i].value.size(); ++j)
      REQUIRE(loaded[i].value[j] == moe::io::bf16_to_float(moe::io::float_to_bf16(source[i].value[j])));
}

TEST_CASE("checkpoint: a non-finite value in a parameter or a moment is refused; model and optimizer unchanged") {
  TemporaryDirectory directory;
  const fs::path path = directory.path / "good.safetensors", bad = directory.path / "bad.safetensors";
  const moe::nn::AdamWConfig adamw{.lr = 1e-2};
  gpt2::MoEModel<moe::Linear, float> model(tiny_config());
  moe::nn::AdamW<float> optimizer(adamw);
  train_steps(model, optimizer, 0, 1);
  gpt2::save_checkpoint(path, model, &optimizer);

  gpt2::MoEModel<moe::Linear, float> target(tiny_config()), untouched(tiny_config());
  moe::nn::AdamW<float> target_optimizer(adamw);
  std::vector<float> poisoned;
  // c_attn is stored transposed (the Conv1D layout), ln_f's moment as it is: both read paths.
  for (const std::string tensor : {"h.0.attn.c_attn.weight", "optimizer.v.ln_f.weight", "wte.weight"})
    for (const float value : {NAN, INFINITY}) {
      CAPTURE(tensor);
      CAPTURE(value);
      rewrite(path, bad, [&](auto& tensors, auto&) {
        for (auto& t : tensors)
          if (t.name == tensor) {
            poisoned.assign(t.bytes.size() / 4, 0.0f);
            std::memcpy(poisoned.data(), t.bytes.data(), t.bytes.size());
            poisoned[poisoned.size() / 2] = value;
            t = moe::io::tensor_to_write(t.name, t.shape, std::span<const float>(poisoned));
          }
      });
      CHECK_THROWS_WITH_AS(gpt2::load_checkpoint(bad, target, &target_optimizer),
                           doctest::Contains(("bad.safetensors: tensor \"" + tensor + "\" holds a non-finite value").c_str()),
                           moe::Error);
      CHECK(same_parameters(target, untouched));
      CHECK(target_optimizer.step_count() == 0);
      CHECK(target_optimizer.m().empty());
    }
  gpt2::load_checkpoint(path, target, &target_optimizer);  // the file it came from loads
  CHECK(same_parameters(target, model));
  CHECK(target_optimizer.step_count() == 1);
}

TEST_CASE("checkpoint: bad metadata is refused, naming the key") {
  TemporaryDirectory directory;
  const fs::path path = directory.path / "good.safetensors", bad = directory.path / "bad.safetensors";
  gpt2::MoEModel<moe::Random, float> model(tiny_config());
  gpt2::save_checkpoint(path, model, nullptr);
  CHECK(model.ffn(0).layer().gate().step() == 0);

  const auto with = [&](const std::string& key, std::optional<std::string> value) {
    rewrite(path, bad, [&](auto&, auto& metadata) {
      if (value) metadata[key] = *value;
      else metadata.erase(key);
    });
    return load_error(bad, model);
  };
  CHECK(contains(with("format", "moe-gpt2/2"), "checkpoint format \"moe-gpt2/2\" is not supported (expected moe-gpt2/1)"));
  // This program's metadata with its format damaged or gone: refused, not read as a Hugging Face file
  // (which would infer the head count from the width).
  CHECK(contains(with("format", "moe-gpt3/1"), "checkpoint format \"moe-gpt3/1\" is not supported"));
  CHECK(contains(with("format", std::nullopt), "checkpoint format \"\" is not supported"));
  CHECK(contains(with("variant", std::nullopt), "metadata has no \"variant\""));
  CHECK(contains(with("variant", "mixture"),
                 "bad.safetensors: unknown variant \"mixture\" (valid: dense, linear, self, fixed-random, random)"));
  CHECK(contains(with("config.hidden", "16x"), "metadata \"config.hidden\" = \"16x\" is not a valid integer"));
  CHECK(contains(with("config.hidden", ""), "\"config.hidden\" = \"\" is not a valid integer"));
  CHECK(contains(with("config.layers", std::nullopt), "metadata has no \"config.layers\""));
  CHECK(contains(with("config.route_from_residual", "yes"), "\"config.route_from_residual\" = \"yes\" is not true or false"));
  CHECK(contains(with("config.self_slice", "first"), "\"config.self_slice\" = \"first\" is not last or per-layer"));
  // Files from before self_slice existed: every layer read the last N.
  CHECK(with("config.self_slice", std::nullopt).empty());
  CHECK(gpt2::read_checkpoint_header(bad).config.self_slice == gpt2::SelfSlice::last);
  CHECK(contains(with("routing_step", "-1"), "metadata \"routing_step\" = \"-1\" is not a valid integer"));
  CHECK(with("routing_step", "5").empty());
  CHECK(model.ffn(1).layer().gate().step() == 5);
  // Without any moe-gpt2 metadata the file is taken for Hugging Face's, which needs its tensors' names.
  rewrite(path, bad, [&](auto&, auto& metadata) { metadata.clear(); });
  CHECK(contains(load_error(bad, model), "neither moe-gpt2 metadata"));

  CHECK_THROWS_WITH_AS(gpt2::save_checkpoint(bad, model, nullptr, {{"config.hidden", "3"}}),
                       doctest::Contains("metadata key \"config.hidden\" is reserved"), moe::Error);
  CHECK_THROWS_WITH_AS(gpt2::save_checkpoint(bad, model, nullptr, {{"format", "x"}}),
                       doctest::Contains("metadata key \"format\" is reserved"), moe::Error);
  CHECK_THROWS_WITH_AS(gpt2::read_checkpoint_header(directory.path / "missing.safetensors"),
                       doctest::Contains("cannot open"), moe::Error);
}

TEST_CASE("checkpoint: a config in the metadata that disagrees with the tensors is refused before any allocation") {
  TemporaryDirectory directory;
  const fs::path bad = directory.path / "bad.safetensors";
  const auto header_error = [&](const fs::path& source, const std::string& key, const std::string& value) {
    rewrite(source, bad, [&](auto&, auto& metadata) { metadata[key] = value; });
    try {
      gpt2::read_checkpoint_header(bad);
    } catch (const moe::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const fs::path moe_path = directory.path / "self.safetensors", dense_path = directory.path / "dense.safetensors";
  gpt2::MoEModel<moe::SelfRoute, float> moe_model(tiny_config());
  gpt2::save_checkpoint(moe_path, moe_model, nullptr);
  gpt2::DenseModel<float> dense_model(tiny_config());
  gpt2::save_checkpoint(dense_path, dense_model, nullptr);

  // A corrupt config.layers would otherwise build a model of 10^12 blocks.
  CHECK(contains(header_error(moe_path, "config.layers", "1000000000000"),
                 "bad.safetensors: metadata says config.layers = 1000000000000, the file has 2 blocks"));
  CHECK(contains(header_error(moe_path, "config.layers", "1"), "config.layers = 1, the file has more blocks"));
  CHECK(contains(header_error(moe_path, "config.hidden", "4000000000"),
                 "tensor \"wte.weight\" has shape [48, 16], but the metadata's config.vocab and config.hidden need "
                 "[48, 4000000000]"));
  CHECK(contains(header_error(moe_path, "config.vocab", "49"), "tensor \"wte.weight\" has shape [48, 16]"));
  CHECK(contains(header_error(moe_path, "config.context", "9"), "tensor \"wpe.weight\" has shape [8, 16]"));
  CHECK(contains(header_error(moe_path, "config.experts", "8"),
                 "tensor \"h.0.moe.experts.fc.weight\" has shape [4, 24, 16], but the metadata's config.experts, "
                 "config.ffn and config.hidden need [8, 24, 16]"));
  CHECK(contains(header_error(dense_path, "config.ffn", "25"),
                 "tensor \"h.0.mlp.c_fc.weight\" has shape [16, 24], but the metadata's config.hidden and config.ffn"));
  CHECK(header_error(moe_path, "config.seed", "8").empty());  // not a shape: checked against the model on load
}

TEST_CASE("checkpoint: optimizer moments without a partner or for a frozen tensor are refused") {
  TemporaryDirectory directory;
  const fs::path path = directory.path / "good.safetensors", bad = directory.path / "bad.safetensors";
  gpt2::MoEModel<moe::FixedRandom, float> model(tiny_config());
  moe::nn::AdamW<float> optimizer;
  train_steps(model, optimizer, 0, 1);
  gpt2::save_checkpoint(path, model, &optimizer);
  {
    const moe::io::SafetensorsFile file(path);
    CHECK(file.contains("h.0.moe.router.weight"));               // the frozen projection is saved
    CHECK_FALSE(file.contains("optimizer.m.h.0.moe.router.weight"));  // but has no moments
    CHECK(file.contains("optimizer.m.h.0.attn.c_attn.weight"));
    CHECK(file.info("optimizer.v.h.0.attn.c_attn.weight").shape == std::vector<std::int64_t>{16, 48});
  }
  moe::nn::AdamW<float> target_optimizer;
  const auto load_error_with_optimizer = [&] {
    try {
      gpt2::load_checkpoint(bad, model, &target_optimizer);
    } catch (const moe::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  rewrite(path, bad, [](auto& tensors, auto&) {
    std::erase_if(tensors, [](auto& t) { return t.name == "optimizer.v.wpe.weight"; });
  });
  CHECK(contains(load_error_with_optimizer(), "has only one of \"optimizer.m.wpe.weight\" and \"optimizer.v.wpe.weight\""));
  const std::vector<float> moments(4 * 16, 0.0f);
  rewrite(path, bad, [&](auto& tensors, auto&) {
    tensors.push_back(moe::io::tensor_to_write("optimizer.m.h.0.moe.router.weight", {4, 16}, moments));
    tensors.push_back(moe::io::tensor_to_write("optimizer.v.h.0.moe.router.weight", {4, 16}, moments));
  });
  CHECK(contains(load_error_with_optimizer(), "optimizer moments for \"h.0.moe.router.weight\", which is not trained"));
  rewrite(path, bad, [](auto&, auto& metadata) { metadata["optimizer.step"] = "many"; });
  CHECK(contains(load_error_with_optimizer(), "\"optimizer.step\" = \"many\" is not a valid integer"));
}

TEST_CASE("checkpoint: a Hugging Face GPT-2 file loads into a dense model") {
  TemporaryDirectory directory;
  // GPT-2 sizes have 64-wide heads; the config is inferred from the shapes.
  const Config config{.vocab = 40, .context = 8, .layers = 2, .heads = 1, .hidden = 64, .ffn = 96, .seed = 5};
  gpt2::DenseModel<float> original(config);
  perturb(original, 9);
  const fs::path ours = directory.path / "ours.safetensors";
  gpt2::save_checkpoint(ours, original, nullptr);

  const std::vector<float> mask(8 * 8, 1.0f), masked_bias{-1e4f};
  for (const std::string prefix : {"", "transformer."}) {
    CAPTURE(prefix);
    const fs::path hf = directory.path / "model.safetensors";
    // As Hugging Face's gpt2 model.safetensors: same tensors and layout, "format": "pt", plus buffers.
    rewrite(ours, hf, [&](auto& tensors, auto& metadata) {
      metadata = {{"format", "pt"}};
      for (auto& t : tensors) t.name = prefix + t.name;
      for (int l = 0; l < 2; ++l) {
        tensors.push_back(moe::io::tensor_to_write(prefix + "h." + std::to_string(l) + ".attn.bias", {1, 1, 8, 8}, mask));
        tensors.push_back(moe::io::tensor_to_write(prefix + "h." + std::to_string(l) + ".attn.masked_bias", {}, masked_bias));
      }
      if (!prefix.empty()) tensors.push_back(moe::io::tensor_to_write("lm_head.weight", {}, masked_bias));
    });
    const gpt2::CheckpointHeader header = gpt2::read_checkpoint_header(hf);
    CHECK(header.hugging_face);
    CHECK(header.variant == "dense");
    CHECK(header.config.vocab == 40);
    CHECK(header.config.context == 8);
    CHECK(header.config.layers == 2);
    CHECK(header.config.hidden == 64);
    CHECK(header.config.heads == 1);
    CHECK(header.config.ffn == 96);
    gpt2::DenseModel<float> loaded(header.config);
    gpt2::load_checkpoint(hf, loaded);
    CHECK(same_parameters(original, loaded));

    gpt2::MoEModel<moe::SelfRoute, float> moe_model(header.config);
    CHECK(contains(load_error(hf, moe_model), "checkpoint variant is \"dense\", the model's is \"self\""));
  }
}

TEST_CASE("checkpoint: mutated checkpoint files either load or throw moe::Error") {
  TemporaryDirectory directory;
  Config config{.vocab = 8, .context = 4, .layers = 1, .heads = 1, .hidden = 8, .ffn = 8, .experts = 2, .top_k = 1};
  gpt2::MoEModel<moe::Linear, float> model(config);
  moe::nn::AdamW<float> optimizer;
  const fs::path good = directory.path / "good.safetensors";
  gpt2::save_checkpoint(good, model, &optimizer, {{"step", "0"}});
  const std::vector<std::byte> valid = moe::io::detail::read_whole_file(good);
  std::uint64_t header_length;
  std::memcpy(&header_length, valid.data(), 8);

  std::mt19937 rng(2024);
  int loaded = 0, rejected = 0;
  const int attempts = 400;
  for (int i = 0; i < attempts; ++i) {
    std::vector<std::byte> bytes = valid;
    const int edits = 1 + int(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      // Mostly inside the header, where the metadata and shapes live.
      const std::size_t at = (rng() % 4) ? 8 + rng() % header_length : rng() % bytes.size();
      switch (rng() % 3) {
        case 0: bytes[at] ^= std::byte(1u << (rng() % 8)); break;
        case 1: bytes[at] = std::byte("0{\"-9,a"[rng() % 7]); break;
        default: bytes.resize(std::max<std::size_t>(1, bytes.size() - rng() % 64)); break;
      }
    }
    const fs::path path = directory.path / ("mutant" + std::to_string(i) + ".safetensors");
    {
      std::ofstream out(path, std::ios::binary);
      out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    }
    try {
      gpt2::MoEModel<moe::Linear, float> target(config);
      moe::nn::AdamW<float> target_optimizer;
      gpt2::load_checkpoint(path, target, &target_optimizer);
      ++loaded;
    } catch (const moe::Error&) {
      ++rejected;
    }
    fs::remove(path);
  }
  CHECK(loaded + rejected == attempts);
  CHECK(rejected > 0);
}
