// The GPT-2 MoE example's model core (examples/gpt2_moe/model.hpp): finite-difference gradients of
// every parameter tensor for every variant, a few AdamW steps that learn, bit-identical results
// across thread counts, parameter names, and bad input at the entry point.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../examples/gpt2_moe/cpu_model.hpp"
#include "../examples/gpt2_moe/router_bias.hpp"

using moe::Index;

namespace {

// Tiny enough that a forward takes microseconds; N <= H for SelfRoute.
const gpt2::Config kTinyModel{.vocab = 11, .context = 8, .layers = 2, .heads = 2, .hidden = 16, .ffn = 24,
                              .experts = 4, .top_k = 2, .seed = 7};

struct Batch {
  std::vector<std::int32_t> tokens, targets;
  Index B, T;
};

// Pseudo-random ids from a fixed seed; targets are the next token (one position ignored, -1).
Batch random_batch(Index B, Index T, Index vocab, std::uint64_t seed) {
  Batch batch{{}, {}, B, T};
  for (Index i = 0; i < B * T + 1; ++i)
    batch.tokens.push_back(std::int32_t(moe::random::bits(seed, 0, std::uint64_t(i)) % std::uint64_t(vocab)));
  batch.targets.assign(batch.tokens.begin() + 1, batch.tokens.end());
  batch.tokens.pop_back();
  batch.targets[1] = moe::nn::kIgnoreTarget;
  return batch;
}

// Central differences (eps 1e-6, float64) of the loss against backward's gradient for about 10
// entries of every parameter tensor. The error is measured against the tensor's gradient scale
// (its largest |g|): truncation (~eps^2) is negligible and rounding (~1e-16 * loss / eps, about
// 2e-10) stays below 2e-7 of the smallest tensors' scale; a wrong term gives errors of order 1.
// scale_floor: the smallest scale an error is measured against, for tensors whose gradients are
// so small that rounding alone would exceed 1e-6 of them.
template <class Model>
void check_gradients(const gpt2::Config& config, double scale_floor = 1e-8) {
  Model model(config);
  model.set_threads(1);  // hundreds of tiny forwards: OpenMP regions would cost more than they save
  const Batch batch = random_batch(2, 5, config.vocab, 11);
  // Random routing redraws every forward: each forward below replays step 0's draw.
  auto loss = [&] {
    model.set_routing_step(0);
    return model.forward(batch.tokens, batch.targets, batch.B, batch.T);
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
    double scale = scale_floor;
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
    CHECK(worst < 1e-6);
  }
}

}  // namespace

TEST_CASE("gpt2 model: finite-difference gradients of every parameter, every variant") {
  SUBCASE("dense") { check_gradients<gpt2::DenseModel<double>>(kTinyModel); }
  SUBCASE("linear") { check_gradients<gpt2::MoEModel<moe::Linear, double>>(kTinyModel); }
  SUBCASE("self") { check_gradients<gpt2::MoEModel<moe::SelfRoute, double>>(kTinyModel); }
  SUBCASE("fixed-random") { check_gradients<gpt2::MoEModel<moe::FixedRandom, double>>(kTinyModel); }
  SUBCASE("random") { check_gradients<gpt2::MoEModel<moe::Random, double>>(kTinyModel); }
}

TEST_CASE("gpt2 model: finite-difference gradients when the gate reads the residual stream") {
  gpt2::Config config = kTinyModel;
  config.route_from_residual = true;
  // The Linear router's gradients are ~5e-5 here, where rounding (~2e-10) is 5e-6 of them: measure
  // against 1e-3 instead (a wrong term would still be ~4e-2 of that).
  SUBCASE("self") { check_gradients<gpt2::MoEModel<moe::SelfRoute, double>>(config); }
  SUBCASE("linear") { check_gradients<gpt2::MoEModel<moe::Linear, double>>(config, 1e-3); }
}

TEST_CASE("gpt2 model: routing from the residual stream changes the routing, not the shapes") {
  const Batch batch = random_batch(2, 6, kTinyModel.vocab, 3);
  gpt2::Config from_residual = kTinyModel;
  from_residual.route_from_residual = true;
  gpt2::MoEModel<moe::SelfRoute, double> own(kTinyModel), residual(from_residual);
  const double loss_own = own.forward(batch.tokens, batch.targets, batch.B, batch.T);
  const double loss_residual = residual.forward(batch.tokens, batch.targets, batch.B, batch.T);
  CHECK(std::isfinite(loss_residual));
  CHECK(loss_own != loss_residual);  // same weights, other logits (before vs after ln_2)
  // The residual stream is not normalised: its last N coordinates are the logits, as read.
  const auto logits = residual.ffn(0).layer().last_logits();
  CHECK(logits.cols == kTinyModel.experts);
}

TEST_CASE("gpt2 model: per-layer self slices give each layer's gate its own N coordinates") {
  gpt2::Config config = kTinyModel;  // H = 16, N = 4: four slices, from the end
  config.layers = 6;
  CHECK(config.self_offset(0) == -1);  // last: every layer the last N
  config.self_slice = gpt2::SelfSlice::per_layer;
  const std::vector<Index> expected = {12, 8, 4, 0, 12, 8};  // past H / N layers, from the end again
  gpt2::MoEModel<moe::SelfRoute, double> model(config);
  for (Index l = 0; l < config.layers; ++l) {
    CAPTURE(l);
    CHECK(config.self_offset(l) == expected[std::size_t(l)]);
    CHECK(model.ffn(l).layer().gate().offset() == expected[std::size_t(l)]);
  }
  gpt2::MoEModel<moe::SelfRoute, double> last(kTinyModel);
  CHECK(last.ffn(1).layer().gate().offset() == 12);

  // The same weights route differently from layer 1 on (layer 0 reads the last N either way).
  gpt2::Config two = kTinyModel;
  two.self_slice = gpt2::SelfSlice::per_layer;
  gpt2::MoEModel<moe::SelfRoute, double> per_layer(two);
  const Batch batch = random_batch(2, 6, kTinyModel.vocab, 3);
  const double loss_last = last.forward(batch.tokens, batch.targets, batch.B, batch.T);
  const double loss_per_layer = per_layer.forward(batch.tokens, batch.targets, batch.B, batch.T);
  const auto same_logits = [&](Index l) {
    const auto a = last.ffn(l).layer().last_logits(), b = per_layer.ffn(l).layer().last_logits();
    for (Index t = 0; t < a.rows; ++t)
      for (Index e = 0; e < a.cols; ++e)
        if (a(t, e) != b(t, e)) return false;
    return true;
  };
  CHECK(same_logits(0));
  CHECK_FALSE(same_logits(1));
  CHECK(loss_last != loss_per_layer);

  CHECK(gpt2::find_self_slice("per-layer") == gpt2::SelfSlice::per_layer);
  CHECK(gpt2::self_slice_name(gpt2::SelfSlice::last) == "last");
  CHECK_FALSE(gpt2::find_self_slice("first").has_value());
}

namespace {

// Sets every block's ln_2 gain to `gain` and its bias to values drawn from `seed`.
template <class Model>
void set_ln2(Model& model, double gain, std::uint64_t seed) {
  for (auto& p : model.parameters()) {
    if (!p.name.ends_with("ln_2.weight") && !p.name.ends_with("ln_2.bias")) continue;
    for (std::size_t i = 0; i < p.value.size(); ++i)
      p.value[i] = p.name.ends_with("weight") ? gain : moe::random::normal(seed, std::hash<std::string>{}(p.name), i);
  }
}

// With ln_2's gain at zero every token's router input is ln_2's bias, so each layer's logits in the
// forward are router_bias_logits, whatever the gate.
template <class Model>
void check_bias_logits_are_the_forwards(const gpt2::Config& config) {
  Model model(config);
  set_ln2(model, 0.0, 5);
  const Batch batch = random_batch(2, 5, config.vocab, 13);
  model.forward(batch.tokens, batch.targets, batch.B, batch.T);
  const std::vector<std::vector<double>> bias = gpt2::router_bias_logits(model);
  REQUIRE(bias.size() == std::size_t(config.layers));
  for (Index l = 0; l < config.layers; ++l) {
    const auto logits = model.ffn(l).layer().last_logits();
    REQUIRE(bias[std::size_t(l)].size() == std::size_t(config.experts));
    for (Index t = 0; t < logits.rows; ++t)
      for (Index e = 0; e < logits.cols; ++e) {
        CAPTURE(l);
        CAPTURE(t);
        CAPTURE(e);
        CHECK(logits(t, e) == doctest::Approx(bias[std::size_t(l)][std::size_t(e)]).epsilon(1e-12));
      }
  }
  // Not a constant by accident: the layers' biases differ, so do their logits.
  CHECK(bias[0] != bias[1]);
}

}  // namespace

TEST_CASE("gpt2 model: router_bias_logits are the logits of a token whose router input is ln_2's bias") {
  gpt2::Config per_layer = kTinyModel;
  per_layer.self_slice = gpt2::SelfSlice::per_layer;
  SUBCASE("self") { check_bias_logits_are_the_forwards<gpt2::MoEModel<moe::SelfRoute, double>>(kTinyModel); }
  SUBCASE("self, per-layer slices") {
    check_bias_logits_are_the_forwards<gpt2::MoEModel<moe::SelfRoute, double>>(per_layer);
  }
  SUBCASE("linear") { check_bias_logits_are_the_forwards<gpt2::MoEModel<moe::Linear, double>>(kTinyModel); }
  SUBCASE("fixed-random") {
    check_bias_logits_are_the_forwards<gpt2::MoEModel<moe::FixedRandom, double>>(kTinyModel);
  }
  SUBCASE("self reads the bias at its coordinates") {
    gpt2::MoEModel<moe::SelfRoute, float> model(kTinyModel);
    set_ln2(model, 1.0, 9);
    const auto bias = gpt2::router_bias_logits(model);
    for (auto& p : model.parameters())
      if (p.name == "h.1.ln_2.bias")
        for (Index e = 0; e < kTinyModel.experts; ++e)
          CHECK(bias[1][std::size_t(e)] == double(p.value[std::size_t(kTinyModel.hidden - kTinyModel.experts + e)]));
  }
  SUBCASE("none for Random, the dense model, and gates reading the residual stream") {
    gpt2::MoEModel<moe::Random, float> random(kTinyModel);
    CHECK(gpt2::router_bias_logits(random).empty());
    gpt2::DenseModel<float> dense(kTinyModel);
    CHECK(gpt2::router_bias_logits(dense).empty());
    gpt2::Config residual = kTinyModel;
    residual.route_from_residual = true;
    gpt2::MoEModel<moe::Linear, float> from_residual(residual);
    CHECK(gpt2::router_bias_logits(from_residual).empty());
  }
}

TEST_CASE("gpt2 model: router_bias_logits between a forward and its backward leaves the backward as it was") {
  const Batch batch = random_batch(2, 5, kTinyModel.vocab, 17);
  gpt2::MoEModel<moe::Linear, float> plain(kTinyModel), asked(kTinyModel);
  for (auto* model : {&plain, &asked}) {
    set_ln2(*model, 1.0, 3);
    model->zero_grad();
    model->forward(batch.tokens, batch.targets, batch.B, batch.T);
    if (model == &asked) CHECK(gpt2::router_bias_logits(*model).size() == std::size_t(kTinyModel.layers));
    model->backward();
  }
  const auto a = plain.parameters(), b = asked.parameters();
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    CAPTURE(a[i].name);
    CHECK(std::equal(a[i].grad.begin(), a[i].grad.end(), b[i].grad.begin()));
  }
}

TEST_CASE("gpt2 variants by name: self-per-layer is the self FFN with per-layer slices, and named back") {
  const gpt2::VariantChoice per_layer = gpt2::parse_variant("self-per-layer");
  CHECK(per_layer.ffn == "self");
  CHECK(per_layer.self_slice == gpt2::SelfSlice::per_layer);
  gpt2::Config config = kTinyModel;
  for (std::string_view name : gpt2::kVariants) {
    CAPTURE(name);
    const gpt2::VariantChoice choice = gpt2::parse_variant(name);
    CHECK(choice.ffn == name);
    CHECK(choice.self_slice == gpt2::SelfSlice::last);
    config.self_slice = choice.self_slice;
    CHECK(gpt2::variant_name(choice.ffn, config) == name);
    // The slice names only the self FFN: the other gates read no coordinates of their own.
    config.self_slice = gpt2::SelfSlice::per_layer;
    CHECK(gpt2::variant_name(choice.ffn, config) == (name == "self" ? "self-per-layer" : name));
  }
  CHECK(gpt2::variant_list() == "dense, linear, self, self-per-layer, fixed-random, random");
  CHECK_THROWS_WITH_AS(gpt2::parse_variant("self-first"),
                       doctest::Contains("unknown variant 'self-first' (valid: dense, linear, self, self-per-layer, "
                                         "fixed-random, random)"),
                       moe::Error);
}

TEST_CASE("gpt2 model: finite-difference gradients with per-layer self slices") {
  gpt2::Config config = kTinyModel;
  config.self_slice = gpt2::SelfSlice::per_layer;
  check_gradients<gpt2::MoEModel<moe::SelfRoute, double>>(config);
}

TEST_CASE("gpt2 model: with_variant maps each name to its model type") {
  for (std::string_view name : gpt2::kVariants) {
    CAPTURE(name);
    const std::string_view got =
        gpt2::with_variant<double>(name, [](auto tag) { return decltype(tag)::type::variant; });
    CHECK(got == name);
  }
}

TEST_CASE("gpt2 model: Hugging Face parameter names, shapes and GPT-2 initialisation") {
  gpt2::DenseModel<float> dense(kTinyModel);
  auto params = dense.parameters();
  REQUIRE(params.size() == 2 + 12 * 2 + 2);
  CHECK(params[0].name == "wte.weight");
  CHECK(params[0].shape == std::vector<Index>{11, 16});
  CHECK(params[1].name == "wpe.weight");
  CHECK(params[2].name == "h.0.ln_1.weight");
  CHECK(params[4].name == "h.0.attn.c_attn.weight");
  CHECK(params[4].shape == std::vector<Index>{48, 16});
  CHECK(params[10].name == "h.0.mlp.c_fc.weight");
  CHECK(params[10].shape == std::vector<Index>{24, 16});
  CHECK(params[12].name == "h.0.mlp.c_proj.weight");
  CHECK(params.back().name == "ln_f.bias");
  CHECK(params[2].value[0] == 1.0f);  // LayerNorm weight 1
  CHECK(params[5].value[3] == 0.0f);  // biases 0

  gpt2::MoEModel<moe::Linear, float> linear(kTinyModel);
  std::vector<std::string> names;
  for (auto& p : linear.parameters()) names.push_back(p.name);
  CHECK(std::count(names.begin(), names.end(), "h.1.moe.router.weight") == 1);
  CHECK(std::count(names.begin(), names.end(), "h.1.moe.experts.fc.weight") == 1);
  CHECK(std::count(names.begin(), names.end(), "h.1.moe.experts.proj.bias") == 1);
  CHECK(linear.router_parameter_count() == 2 * 4 * 16);
  gpt2::MoEModel<moe::SelfRoute, float> self(kTinyModel);
  CHECK(self.router_parameter_count() == 0);

  // Same seed, same values; another seed, other values.
  gpt2::DenseModel<float> again(kTinyModel);
  CHECK(std::equal(params[0].value.begin(), params[0].value.end(), again.parameters()[0].value.begin()));
  gpt2::Config other = kTinyModel;
  other.seed = 8;
  gpt2::DenseModel<float> reseeded(other);
  CHECK(params[0].value[0] != reseeded.parameters()[0].value[0]);
}

namespace {

// A fixed repeating sequence (period 7, next-token targets), float, a few AdamW steps.
template <class Model>
void check_learns() {
  const gpt2::Config config{.vocab = 16, .context = 16, .layers = 2, .heads = 2, .hidden = 32, .ffn = 64,
                            .experts = 4, .top_k = 2, .seed = 3};
  Model model(config);
  model.set_threads(1);  // tiny steps: on a shared machine, OpenMP barriers would dominate
  const Index B = 2, T = 16;
  std::vector<std::int32_t> tokens, targets;
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < T; ++t) {
      tokens.push_back(std::int32_t((b * 3 + t) % 7));
      targets.push_back(std::int32_t((b * 3 + t + 1) % 7));
    }
  moe::nn::AdamW<float> optimizer({.lr = 1e-2, .weight_decay = 0.0});
  auto params = model.parameters();
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    model.zero_grad();
    last = model.forward(tokens, targets, B, T);
    if (step == 0) first = last;
    model.backward();
    optimizer.step(params);
  }
  CAPTURE(first);
  CAPTURE(last);
  CHECK(first > 2.0);       // about log(16) = 2.77 at initialisation
  CHECK(last < 0.3 * first);
  if constexpr (Model::is_moe) {
    const moe::RoutingStats& stats = model.routing_stats(0);
    CHECK(stats.tokens == 30 * B * T);
  }
}

}  // namespace

TEST_CASE("gpt2 model: AdamW steps on a repeating sequence make the loss drop") {
  SUBCASE("self") { check_learns<gpt2::MoEModel<moe::SelfRoute, float>>(); }
  SUBCASE("linear") { check_learns<gpt2::MoEModel<moe::Linear, float>>(); }
  SUBCASE("dense") { check_learns<gpt2::DenseModel<float>>(); }
}

namespace {

template <class Model>
void check_thread_invariance() {
  // Wide enough that rows, columns and (batch, head) pairs split into several tasks.
  const gpt2::Config config{.vocab = 256, .context = 64, .layers = 2, .heads = 4, .hidden = 64, .ffn = 96,
                            .experts = 8, .top_k = 2, .seed = 5};
  const Batch batch = random_batch(4, 64, config.vocab, 21);
  auto run = [&](int threads, std::vector<float>& grads) {
    Model model(config);
    model.set_threads(threads);
    const double loss = model.forward(batch.tokens, batch.targets, batch.B, batch.T);
    model.backward();
    for (auto& p : model.parameters()) grads.insert(grads.end(), p.grad.begin(), p.grad.end());
    return loss;
  };
  std::vector<float> one, two;
  const double loss_one = run(1, one), loss_two = run(2, two);
  CHECK(loss_one == loss_two);
  REQUIRE(one.size() == two.size());
  CHECK(std::memcmp(one.data(), two.data(), one.size() * sizeof(float)) == 0);
}

}  // namespace

TEST_CASE("gpt2 model: loss and gradients are bit-identical on 1 and 2 threads") {
  SUBCASE("dense") { check_thread_invariance<gpt2::DenseModel<float>>(); }
  SUBCASE("self") { check_thread_invariance<gpt2::MoEModel<moe::SelfRoute, float>>(); }
  SUBCASE("linear") { check_thread_invariance<gpt2::MoEModel<moe::Linear, float>>(); }
  SUBCASE("random") { check_thread_invariance<gpt2::MoEModel<moe::Random, float>>(); }
}

TEST_CASE("gpt2 model: bad input throws at the entry point") {
  auto message_of = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const moe::Error& e) {
      return e.what();
    }
    return "(no error)";
  };

  const std::string unknown = message_of([] { gpt2::with_variant<float>("bogus", [](auto) {}); });
  CHECK(unknown.find("'bogus'") != std::string::npos);
  CHECK(unknown.find("fixed-random") != std::string::npos);

  gpt2::MoEModel<moe::SelfRoute, float> model(kTinyModel);
  const Batch batch = random_batch(2, 5, kTinyModel.vocab, 3);
  std::vector<std::int32_t> bad = batch.tokens;
  bad[3] = std::int32_t(kTinyModel.vocab);
  CHECK(message_of([&] { model.forward(bad, batch.targets, 2, 5); }).find("token id 11") != std::string::npos);
  bad[3] = -1;
  CHECK(message_of([&] { model.forward(bad, batch.targets, 2, 5); }).find("token id -1") != std::string::npos);
  std::vector<std::int32_t> bad_targets = batch.targets;
  bad_targets[0] = 42;
  CHECK(message_of([&] { model.forward(batch.tokens, bad_targets, 2, 5); }).find("target id 42") !=
        std::string::npos);

  const Batch long_batch = random_batch(1, 9, kTinyModel.vocab, 4);
  CHECK(message_of([&] { model.forward(long_batch.tokens, long_batch.targets, 1, 9); }).find("exceeds the context 8") !=
        std::string::npos);
  CHECK_THROWS_AS(model.forward(batch.tokens, batch.targets, 3, 5), moe::Error);  // 10 ids for B*T = 15
  CHECK_THROWS_AS(model.backward(), moe::Error);  // nothing forwarded successfully yet

  gpt2::Config narrow = kTinyModel;
  narrow.hidden = 2, narrow.heads = 1;  // SelfRoute reads N = 4 coordinates of H = 2
  CHECK(message_of([&] { gpt2::MoEModel<moe::SelfRoute, float> too_narrow(narrow); }).find("SelfRoute") !=
        std::string::npos);
  gpt2::Config uneven = kTinyModel;
  uneven.heads = 3;
  CHECK(message_of([&] { gpt2::DenseModel<float> bad_heads(uneven); }).find("heads = 3") != std::string::npos);
}

TEST_CASE("nn ops (CPU): scale_gradients refuses a gradient listed twice, as the CUDA scale_grads does") {
  std::vector<float> w(4, 1.f), g(4, 2.f);
  std::vector<moe::ParamRef<float>> tied{{"w", {4}, std::span<float>(w), std::span<float>(g), true},
                                         {"w again", {4}, std::span<float>(w), std::span<float>(g), false}};
  const examples::NnOps<moe::cpu::Backend> ops(1);
  CHECK_THROWS_WITH_AS(ops.scale_gradients(tied, 0.5f),
                       doctest::Contains("scale_gradients: parameters 0 'w' and 1 'w again' share gradients"),
                       moe::Error);
  CHECK(g == std::vector<float>(4, 2.f));  // refused before any is scaled
  tied.pop_back();
  ops.scale_gradients(tied, 0.5f);
  CHECK(g == std::vector<float>(4, 1.f));
}
