// The ViT MoE example's model core (examples/vit_moe/model.hpp): finite-difference gradients of
// every parameter tensor for every variant, which blocks are MoE, timm's parameter names, a few
// AdamW steps that learn, bit-identical results across thread counts, and bad input at the entry
// point.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../examples/vit_moe/cpu_model.hpp"
#include "../examples/vit_moe/router_bias.hpp"

using moe::Index;

namespace {

// Tiny enough that a forward takes microseconds: 8x8 images of 2 channels in 4 patches of 4x4
// (T = 5 tokens), 4 blocks of which 1 and 3 are MoE; N <= H for SelfRoute.
const vit::Config kTiny{.image_size = 8, .channels = 2, .patch = 4, .classes = 5, .layers = 4, .heads = 2,
                        .hidden = 16, .ffn = 24, .experts = 4, .top_k = 2, .moe_every = 2, .seed = 7};

template <class S>
struct Batch {
  std::vector<S> images;
  std::vector<std::int32_t> labels;
  Index size;
};

// N(0, 1) pixels and uniform labels from a fixed seed.
template <class S>
Batch<S> random_batch(const vit::Config& config, Index size, std::uint64_t seed) {
  Batch<S> batch{{}, {}, size};
  for (Index i = 0; i < size * config.pixels(); ++i) batch.images.push_back(S(moe::random::normal(seed, 1, std::uint64_t(i))));
  for (Index b = 0; b < size; ++b)
    batch.labels.push_back(std::int32_t(moe::random::bits(seed, 2, std::uint64_t(b)) % std::uint64_t(config.classes)));
  return batch;
}

// Central differences (eps 1e-6, float64) of the loss against backward's gradient for about 10
// entries of every parameter tensor. The error is measured against the tensor's gradient scale
// (its largest |g|): truncation (~eps^2) is negligible and rounding (~1e-16 * loss / eps, about
// 2e-10) stays below 2e-7 of the smallest tensors' scale; a wrong term gives errors of order 1.
template <class Model>
void check_gradients(const vit::Config& config) {
  Model model(config);
  model.set_threads(1);  // hundreds of tiny forwards: OpenMP regions would cost more than they save
  const Batch<double> batch = random_batch<double>(config, 3, 11);
  // Random routing redraws every forward: each forward below replays step 0's draw.
  auto loss = [&] {
    model.set_routing_step(0);
    return model.forward(batch.images, batch.labels, batch.size);
  };
  model.zero_grad();
  loss();
  model.backward();

  auto params = model.parameters();
  REQUIRE(!params.empty());
  for (auto& p : params) {
    CAPTURE(p.name);
    if (!p.trainable) {  // FixedRandom's router: frozen, never a gradient
      CHECK(p.grad.empty());
      continue;
    }
    const std::vector<double> grad(p.grad.begin(), p.grad.end());
    double scale = 1e-8;
    for (double g : grad) scale = std::max(scale, std::abs(g));
    const std::size_t n = p.value.size(), samples = std::min<std::size_t>(n, 10);
    double worst = 0;
    for (std::size_t j = 0; j < samples; ++j) {
      const std::size_t i = samples == n ? j : (j * 7919 + 13) % n;
      const double saved = p.value[i], eps = 1e-6;
      p.value[i] = saved + eps;
      const double up = loss();
      p.value[i] = saved - eps;
      const double down = loss();
      p.value[i] = saved;
      worst = std::max(worst, std::abs((up - down) / (2 * eps) - grad[i]) / scale);
    }
    CAPTURE(scale);
    CHECK(scale > 1e-7);  // every tensor takes part in the loss (the class token's path included)
    CHECK(worst < 1e-6);
  }
}

std::vector<std::string> names_of(auto& model) {
  std::vector<std::string> names;
  for (auto& p : model.parameters()) names.push_back(p.name);
  return names;
}

bool has(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

}  // namespace

TEST_CASE("vit model: router_bias_logits are the logits of a token whose norm2 output is norm2's bias") {
  // With norm2's gain at zero every token's router input is norm2's bias (norm1's left as it is).
  const auto check = [](auto model) {
    for (auto& p : model.parameters()) {
      if (!p.name.ends_with("norm2.weight") && !p.name.ends_with("norm2.bias")) continue;
      for (std::size_t i = 0; i < p.value.size(); ++i)
        p.value[i] = p.name.ends_with("weight") ? 0.0 : moe::random::normal(3, std::hash<std::string>{}(p.name), i);
    }
    const Batch<double> batch = random_batch<double>(kTiny, 2, 5);
    model.forward(batch.images, batch.labels, batch.size);
    const std::vector<std::vector<double>> bias = vit::router_bias_logits(model);
    REQUIRE(bias.size() == 2);  // blocks 1 and 3
    for (std::size_t i = 0; i < 2; ++i) {
      const auto logits = model.moe_ffn(Index(2 * i + 1)).layer().last_logits();
      REQUIRE(bias[i].size() == std::size_t(kTiny.experts));
      for (Index t = 0; t < logits.rows; ++t)
        for (Index e = 0; e < logits.cols; ++e) CHECK(logits(t, e) == doctest::Approx(bias[i][std::size_t(e)]).epsilon(1e-12));
    }
    CHECK(bias[0] != bias[1]);
  };
  check(vit::MoEModel<moe::SelfRoute, double>(kTiny));
  check(vit::MoEModel<moe::Linear, double>(kTiny));
  vit::MoEModel<moe::Random, double> random(kTiny);
  CHECK(vit::router_bias_logits(random).empty());
  vit::DenseModel<double> dense(kTiny);
  CHECK(vit::router_bias_logits(dense).empty());
}

TEST_CASE("vit model: finite-difference gradients of every parameter, every variant") {
  SUBCASE("dense") { check_gradients<vit::DenseModel<double>>(kTiny); }
  SUBCASE("linear") { check_gradients<vit::MoEModel<moe::Linear, double>>(kTiny); }
  SUBCASE("self") { check_gradients<vit::MoEModel<moe::SelfRoute, double>>(kTiny); }
  SUBCASE("fixed-random") { check_gradients<vit::MoEModel<moe::FixedRandom, double>>(kTiny); }
  SUBCASE("random") { check_gradients<vit::MoEModel<moe::Random, double>>(kTiny); }
}

TEST_CASE("vit model: with_variant maps each name to its model type") {
  for (std::string_view name : vit::kVariants) {
    CAPTURE(name);
    const std::string_view got = vit::with_variant<double>(name, [](auto tag) { return decltype(tag)::type::variant; });
    CHECK(got == name);
  }
}

TEST_CASE("vit model: MoE replaces the MLP of every second block, from block 1") {
  vit::MoEModel<moe::SelfRoute, float> self(kTiny);
  CHECK(self.moe_blocks() == std::vector<Index>{1, 3});
  const std::vector<std::string> names = names_of(self);
  CHECK(has(names, "blocks.0.mlp.fc1.weight"));
  CHECK(has(names, "blocks.1.moe.experts.fc.weight"));
  CHECK(!has(names, "blocks.1.mlp.fc1.weight"));
  CHECK(has(names, "blocks.2.mlp.fc2.bias"));
  CHECK(has(names, "blocks.3.moe.experts.proj.bias"));

  vit::Config every = kTiny;
  every.moe_every = 1;
  CHECK(vit::MoEModel<moe::Linear, float>(every).moe_blocks() == std::vector<Index>{0, 1, 2, 3});
  every.moe_every = 3;
  CHECK(vit::MoEModel<moe::Linear, float>(every).moe_blocks() == std::vector<Index>{2});
  CHECK(vit::DenseModel<float>(kTiny).moe_blocks().empty());
  CHECK(vit::Config::small().is_moe_block(1));
  CHECK(!vit::Config::small().is_moe_block(4));
}

TEST_CASE("vit model: timm parameter names, shapes and initialisation") {
  vit::DenseModel<float> dense(kTiny);
  auto params = dense.parameters();
  REQUIRE(params.size() == 4 + 4 * 12 + 4);
  CHECK(params[0].name == "cls_token");
  CHECK(params[0].shape == std::vector<Index>{1, 1, 16});
  CHECK(params[1].name == "pos_embed");
  CHECK(params[1].shape == std::vector<Index>{1, 5, 16});
  CHECK(params[2].name == "patch_embed.proj.weight");
  CHECK(params[2].shape == std::vector<Index>{16, 2, 4, 4});  // Conv2d [H, C, P, P]
  CHECK(params[3].name == "patch_embed.proj.bias");
  CHECK(params[4].name == "blocks.0.norm1.weight");
  CHECK(params[6].name == "blocks.0.attn.qkv.weight");
  CHECK(params[6].shape == std::vector<Index>{48, 16});
  CHECK(params[8].name == "blocks.0.attn.proj.weight");
  CHECK(params[10].name == "blocks.0.norm2.weight");
  CHECK(params[12].name == "blocks.0.mlp.fc1.weight");
  CHECK(params[12].shape == std::vector<Index>{24, 16});
  CHECK(params[14].name == "blocks.0.mlp.fc2.weight");
  CHECK(params[14].shape == std::vector<Index>{16, 24});
  CHECK(params[params.size() - 4].name == "norm.weight");
  CHECK(params[params.size() - 2].name == "head.weight");
  CHECK(params[params.size() - 2].shape == std::vector<Index>{5, 16});
  CHECK(params.back().name == "head.bias");
  CHECK(params[4].value[0] == 1.0f);  // LayerNorm weight 1
  CHECK(params[7].value[3] == 0.0f);  // biases 0
  CHECK(params[2].value[0] != 0.0f);

  vit::MoEModel<moe::Linear, float> linear(kTiny);
  const std::vector<std::string> names = names_of(linear);
  CHECK(has(names, "blocks.1.moe.router.weight"));
  CHECK(has(names, "blocks.3.moe.experts.fc.bias"));
  CHECK(linear.router_parameter_count() == 2 * 4 * 16);
  CHECK(vit::MoEModel<moe::SelfRoute, float>(kTiny).router_parameter_count() == 0);
  CHECK(vit::MoEModel<moe::FixedRandom, float>(kTiny).router_parameter_count() == 0);
  CHECK(dense.router_parameter_count() == 0);

  // DeiT-S/16's dense parameter count: 22.05M (timm's deit_small_patch16_224).
  CHECK(vit::DenseModel<float>(vit::Config::deit_s16()).parameter_count() == 22050664);

  // Same seed, same values; another seed, other values.
  vit::DenseModel<float> again(kTiny);
  CHECK(std::equal(params[2].value.begin(), params[2].value.end(), again.parameters()[2].value.begin()));
  vit::Config other = kTiny;
  other.seed = 8;
  vit::DenseModel<float> reseeded(other);
  CHECK(params[2].value[0] != reseeded.parameters()[2].value[0]);
}

TEST_CASE("vit model: a patch is flattened (channel, row, column), the layout of timm's Conv2d weight") {
  // One lit pixel, channel 1, row 5, column 2 of image 0: with P = 4 it is (1, 1, 2) of its patch,
  // so only that column of the patch embedding's weight [H, C, P, P] gets a gradient.
  vit::DenseModel<double> model(kTiny);
  model.set_threads(1);
  std::vector<double> images(std::size_t(2 * kTiny.pixels()), 0.0);
  images[std::size_t((1 * 8 + 5) * 8 + 2)] = 1.0;
  const std::vector<std::int32_t> labels{1, 3};
  model.zero_grad();
  model.forward(images, labels, 2);
  model.backward();
  const auto params = model.parameters();
  const auto& weight = params[2];
  REQUIRE(weight.name == "patch_embed.proj.weight");
  for (Index h = 0; h < 16; ++h)
    for (Index column = 0; column < 32; ++column) {
      const double g = weight.grad[std::size_t(h * 32 + column)];
      if (column == (1 * 4 + 1) * 4 + 2)
        CHECK(g != 0.0);
      else
        CHECK(g == 0.0);
    }
}

TEST_CASE("vit model: logits and predictions stay valid after backward; forward without labels") {
  vit::MoEModel<moe::SelfRoute, float> model(kTiny);
  const Batch<float> batch = random_batch<float>(kTiny, 4, 5);
  const double loss = model.forward(batch.images, batch.labels, batch.size);
  const std::vector<float> logits(model.logits().data, model.logits().data + 4 * 5);
  const std::vector<std::int32_t> predicted = model.predictions();
  model.backward();
  CHECK(std::equal(logits.begin(), logits.end(), model.logits().data));
  REQUIRE(predicted.size() == 4);
  for (Index b = 0; b < 4; ++b) {
    const float* row = logits.data() + b * 5;
    CHECK(predicted[std::size_t(b)] == std::max_element(row, row + 5) - row);
  }
  double mean = 0;
  for (float l : model.losses()) mean += l;
  CHECK(std::abs(mean / 4 - loss) < 1e-6);
  CHECK(loss > 0.5 * std::log(5.0));  // near log(classes) at initialisation

  CHECK(model.forward(batch.images, {}, batch.size) == 0.0);  // inference only
  CHECK(std::equal(logits.begin(), logits.end(), model.logits().data));
  CHECK_THROWS_AS(model.backward(), moe::Error);
}

namespace {

// Class = the brightest quadrant of an otherwise noisy 8x8 one-channel image; a few AdamW steps.
template <class Model>
void check_learns() {
  const vit::Config config{.image_size = 8, .channels = 1, .patch = 4, .classes = 4, .layers = 2, .heads = 2,
                           .hidden = 32, .ffn = 64, .experts = 4, .top_k = 2, .seed = 3};
  Model model(config);
  model.set_threads(1);  // tiny steps: on a shared machine, OpenMP barriers would dominate
  const Index B = 16;
  std::vector<float> images(std::size_t(B * 64));
  std::vector<std::int32_t> labels(static_cast<std::size_t>(B));
  for (Index b = 0; b < B; ++b) {
    labels[std::size_t(b)] = std::int32_t(b % 4);
    for (Index y = 0; y < 8; ++y)
      for (Index x = 0; x < 8; ++x) {
        const bool bright = (y / 4) * 2 + x / 4 == b % 4;
        images[std::size_t(b * 64 + y * 8 + x)] =
            float(0.3 * moe::random::normal(9, 0, std::uint64_t(b * 64 + y * 8 + x)) + (bright ? 1.0 : -0.3));
      }
  }
  moe::nn::AdamW<float> optimizer({.lr = 3e-3, .weight_decay = 0.0});
  auto params = model.parameters();
  double first = 0, last = 0;
  for (int step = 0; step < 60; ++step) {
    model.zero_grad();
    last = model.forward(images, labels, B);
    if (step == 0) first = last;
    model.backward();
    optimizer.step(params);
  }
  CAPTURE(first);
  CAPTURE(last);
  CHECK(first > 1.0);  // about log(4) = 1.39 at initialisation
  CHECK(last < 0.2 * first);
  if constexpr (Model::is_moe) CHECK(model.routing_stats(1).tokens == 60 * B * config.tokens());
}

}  // namespace

TEST_CASE("vit model: AdamW steps on a learnable image task make the loss drop") {
  SUBCASE("self") { check_learns<vit::MoEModel<moe::SelfRoute, float>>(); }
  SUBCASE("linear") { check_learns<vit::MoEModel<moe::Linear, float>>(); }
  SUBCASE("dense") { check_learns<vit::DenseModel<float>>(); }
}

namespace {

template <class Model>
void check_thread_invariance() {
  // Wide and long enough that rows, columns, GEMM tiles and (image, head) pairs split into
  // several tasks: 32 images of 17 tokens, H = 128.
  const vit::Config config{.image_size = 28, .channels = 1, .patch = 7, .classes = 10, .layers = 2, .heads = 4,
                           .hidden = 128, .ffn = 96, .experts = 4, .top_k = 2, .seed = 5};
  const Batch<float> batch = random_batch<float>(config, 32, 21);
  auto run = [&](int threads, std::vector<float>& grads, std::vector<float>& logits) {
    Model model(config);
    model.set_threads(threads);
    const double loss = model.forward(batch.images, batch.labels, batch.size);
    model.backward();
    for (auto& p : model.parameters()) grads.insert(grads.end(), p.grad.begin(), p.grad.end());
    logits.assign(model.logits().data, model.logits().data + batch.size * config.classes);
    return loss;
  };
  std::vector<float> one, two, logits_one, logits_two;
  const double loss_one = run(1, one, logits_one), loss_two = run(2, two, logits_two);
  CHECK(loss_one == loss_two);
  CHECK(logits_one == logits_two);
  REQUIRE(one.size() == two.size());
  CHECK(std::memcmp(one.data(), two.data(), one.size() * sizeof(float)) == 0);
}

}  // namespace

TEST_CASE("vit model: loss and gradients are bit-identical on 1 and 2 threads") {
  SUBCASE("dense") { check_thread_invariance<vit::DenseModel<float>>(); }
  SUBCASE("self") { check_thread_invariance<vit::MoEModel<moe::SelfRoute, float>>(); }
  SUBCASE("linear") { check_thread_invariance<vit::MoEModel<moe::Linear, float>>(); }
  SUBCASE("fixed-random") { check_thread_invariance<vit::MoEModel<moe::FixedRandom, float>>(); }
  SUBCASE("random") { check_thread_invariance<vit::MoEModel<moe::Random, float>>(); }
}

TEST_CASE("vit model: bad input throws at the entry point") {
  auto message_of = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const moe::Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  auto contains = [](const std::string& text, const std::string& part) {
    CAPTURE(text);
    CHECK(text.find(part) != std::string::npos);
  };

  const std::string unknown = message_of([] { vit::with_variant<float>("bogus", [](auto) {}); });
  contains(unknown, "'bogus'");
  contains(unknown, "fixed-random");

  vit::MoEModel<moe::SelfRoute, float> model(kTiny);
  const Batch<float> batch = random_batch<float>(kTiny, 2, 3);
  std::vector<std::int32_t> labels = batch.labels;
  labels[1] = 5;
  contains(message_of([&] { model.forward(batch.images, labels, 2); }), "label 5 of image 1");
  labels[1] = -1;
  contains(message_of([&] { model.forward(batch.images, labels, 2); }), "label -1 of image 1");
  contains(message_of([&] { model.forward(batch.images, batch.labels, 3); }), "images has 256 values");
  contains(message_of([&] { model.forward(batch.images, {batch.labels.data(), 1}, 2); }), "labels has 1 entries");
  contains(message_of([&] { model.forward(batch.images, batch.labels, 0); }), "batch B = 0");
  std::vector<float> images = batch.images;
  images[128 + 7] = std::nanf("");
  contains(message_of([&] { model.forward(images, batch.labels, 2); }), "image 1 has a non-finite pixel");
  images[128 + 7] = INFINITY;
  CHECK_THROWS_AS(model.forward(images, batch.labels, 2), moe::Error);
  CHECK_THROWS_AS(model.backward(), moe::Error);  // nothing forwarded successfully yet
  contains(message_of([&] { model.routing_stats(2); }), "block 2 has no MoE layer");
  contains(message_of([&] { model.routing_stats(4); }), "block 4 has no MoE layer");
  contains(message_of([&] { model.set_threads(0); }), "thread count");

  vit::Config uneven_patch = kTiny;
  uneven_patch.patch = 3;
  contains(message_of([&] { vit::DenseModel<float> bad(uneven_patch); }), "not divisible by patch = 3");
  vit::Config uneven_heads = kTiny;
  uneven_heads.heads = 3;
  contains(message_of([&] { vit::DenseModel<float> bad(uneven_heads); }), "heads = 3");
  vit::Config zero_classes = kTiny;
  zero_classes.classes = 0;
  contains(message_of([&] { vit::DenseModel<float> bad(zero_classes); }), "classes = 0");
  vit::Config narrow = kTiny;
  narrow.hidden = 2, narrow.heads = 1;  // SelfRoute reads N = 4 coordinates of H = 2
  contains(message_of([&] { vit::MoEModel<moe::SelfRoute, float> bad(narrow); }), "SelfRoute");
  vit::Config too_many = kTiny;
  too_many.top_k = 5;
  contains(message_of([&] { vit::MoEModel<moe::Linear, float> bad(too_many); }), "top_k = 5");
}
