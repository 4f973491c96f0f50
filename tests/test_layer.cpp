// The whole layer: against the float64 reference, finite differences, k = N, permutations,
// determinism across thread counts, statistics through the layer.
#include <doctest/doctest.h>

#include <numeric>

#include "reference.hpp"

using moe::Index;

namespace {

template <template <class> class G>
constexpr bool is_self_route = std::is_same_v<G<moe::cpu::Backend>, moe::SelfRoute<moe::cpu::Backend>>;

// The gate's logits and its backward, in double, from the layer's own parameters.
template <template <class> class G, class Layer>
ref::Matrix reference_logits(Layer& layer, const ref::Matrix& x, const ref::Params& p) {
  const Index N = layer.config().experts, H = layer.config().hidden;
  if constexpr (is_self_route<G>) return x.rightCols(N);
  if (p.count("router.weight")) {
    const Eigen::Map<const ref::Matrix> W(p.at("router.weight").data(), N, H);
    return x * W.transpose();
  }
  const auto logits = layer.last_logits();  // Random: the layer's draw
  ref::Matrix z(logits.rows, logits.cols);
  for (Index t = 0; t < z.rows(); ++t)
    for (Index e = 0; e < z.cols(); ++e) z(t, e) = logits(t, e);
  return z;
}

template <template <class> class G, template <class> class E>
void check_against_reference(moe::LayerConfig config, Index T, unsigned seed, double tolerance) {
  using Layer = moe::MoELayer<G, E, moe::cpu::Backend>;
  Layer layer(config, seed, {}, {}, moe::cpu::Backend(2));
  const auto x = ref::randn(T, config.hidden, seed + 1), dy = ref::randn(T, config.hidden, seed + 2);
  const auto y = layer.forward(x);
  const auto dx = layer.backward(dy);

  const ref::Params p = ref::params_of(layer);
  const ref::Matrix xd = x.template cast<double>();
  const ref::Matrix logits = reference_logits<G>(layer, xd, p);
  const auto kind = std::is_same_v<E<moe::cpu::Backend>, moe::GeluMLP<moe::cpu::Backend>> ? ref::ExpertKind::gelu_mlp
                                                                                           : ref::ExpertKind::swiglu;
  ref::Result r = ref::moe_layer(xd, logits, p, config, kind, dy.template cast<double>());
  // Gate backward in double.
  const Index N = config.experts, H = config.hidden;
  if constexpr (is_self_route<G>) {
    r.dx.rightCols(N) += r.dlogits;
  } else if (p.count("router.weight")) {
    const Eigen::Map<const ref::Matrix> W(p.at("router.weight").data(), N, H);
    r.dx += r.dlogits * W;
    r.grads["router.weight"] = std::vector<double>(N * H);
    Eigen::Map<ref::Matrix>(r.grads["router.weight"].data(), N, H) = r.dlogits.transpose() * xd;
  }

  CHECK(ref::rel_error(y, r.y) < tolerance);
  CHECK(ref::rel_error(dx, r.dx) < tolerance);
  for (auto& param : layer.parameters()) {
    CAPTURE(param.name);
    if (!param.trainable) {
      CHECK(param.grad.empty());
      continue;
    }
    const std::vector<float> g(param.grad.begin(), param.grad.end());
    CHECK(ref::rel_error(g, r.grads.at(param.name)) < tolerance);
  }
}

// fp32 against float64: GEMM sums of <= a few hundred products round to ~1e-6 relative.
constexpr double kFp32Tolerance = 1e-5;
const moe::LayerConfig kSmall{.hidden = 24, .ffn = 40, .experts = 6, .top_k = 2};

}  // namespace

TEST_CASE("layer vs float64 reference: every gate, GeluMLP") {
  check_against_reference<moe::SelfRoute, moe::GeluMLP>(kSmall, 37, 1, kFp32Tolerance);
  check_against_reference<moe::Linear, moe::GeluMLP>(kSmall, 37, 2, kFp32Tolerance);
  check_against_reference<moe::FixedRandom, moe::GeluMLP>(kSmall, 37, 3, kFp32Tolerance);
  check_against_reference<moe::Random, moe::GeluMLP>(kSmall, 37, 4, kFp32Tolerance);
}

TEST_CASE("layer vs float64 reference: SwiGLU experts") {
  check_against_reference<moe::SelfRoute, moe::SwiGLU>(kSmall, 29, 5, kFp32Tolerance);
  check_against_reference<moe::Linear, moe::SwiGLU>(kSmall, 29, 6, kFp32Tolerance);
}

TEST_CASE("layer vs float64 reference: softmax_then_top_k, capacity, aux losses, k = 3") {
  auto c = kSmall;
  c.weights = moe::RoutingWeights::softmax_then_top_k;
  check_against_reference<moe::Linear, moe::GeluMLP>(c, 41, 7, kFp32Tolerance);
  c = kSmall;
  c.capacity_factor = 0.75;
  check_against_reference<moe::SelfRoute, moe::GeluMLP>(c, 41, 8, kFp32Tolerance);
  c = kSmall;
  c.aux = {.load_balance = 0.05, .z_loss = 0.01};
  check_against_reference<moe::Linear, moe::GeluMLP>(c, 41, 9, kFp32Tolerance);
  c = kSmall;
  c.top_k = 3;
  check_against_reference<moe::SelfRoute, moe::SwiGLU>(c, 41, 10, kFp32Tolerance);
}

TEST_CASE("layer vs float64 reference: shapes that leave partial GEMM tiles") {
  check_against_reference<moe::Linear, moe::GeluMLP>({.hidden = 40, .ffn = 300, .experts = 3, .top_k = 2}, 400, 12,
                                                     kFp32Tolerance);
}

TEST_CASE("k = N equals the dense softmax mixture of all experts") {
  const moe::LayerConfig c{.hidden = 12, .ffn = 20, .experts = 4, .top_k = 4};
  moe::MoELayer<moe::Linear, moe::GeluMLP, moe::cpu::Backend> layer(c, 3);
  const auto x = ref::randn(16, 12, 4);
  const auto y = layer.forward(x);
  const ref::Params p = ref::params_of(layer);
  const ref::Matrix xd = x.cast<double>();
  const Eigen::Map<const ref::Matrix> W(p.at("router.weight").data(), 4, 12);
  const ref::Matrix z = xd * W.transpose();
  ref::Matrix expected = ref::Matrix::Zero(16, 12);
  for (Index t = 0; t < 16; ++t) {
    const Eigen::ArrayXd e = (z.row(t).array() - z.row(t).maxCoeff()).exp();
    const Eigen::ArrayXd softmax = e / e.sum();
    for (Index i = 0; i < 4; ++i) {
      Eigen::VectorXd act(20);
      for (Index f = 0; f < 20; ++f) {
        double a = p.at("experts.fc.bias")[i * 20 + f];
        for (Index h = 0; h < 12; ++h) a += p.at("experts.fc.weight")[(i * 20 + f) * 12 + h] * xd(t, h);
        act[f] = moe::activation::gelu(a);
      }
      for (Index h = 0; h < 12; ++h) {
        double o = p.at("experts.proj.bias")[i * 12 + h];
        for (Index f = 0; f < 20; ++f) o += p.at("experts.proj.weight")[(i * 12 + h) * 20 + f] * act[f];
        expected(t, h) += softmax[i] * o;
      }
    }
  }
  CHECK(ref::rel_error(y, expected) < kFp32Tolerance);
}

TEST_CASE("token permutation permutes outputs and input gradients") {
  moe::MoELayer<moe::Linear, moe::GeluMLP, moe::cpu::Backend> layer(kSmall, 21);
  const Index T = 50;
  const auto x = ref::randn(T, 24, 22), dy = ref::randn(T, 24, 23);
  std::vector<Index> perm(T);
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937 gen(3);
  std::shuffle(perm.begin(), perm.end(), gen);
  moe::cpu::Backend::Matrix xp(T, 24), dyp(T, 24);
  for (Index t = 0; t < T; ++t) xp.row(t) = x.row(perm[t]), dyp.row(t) = dy.row(perm[t]);
  const auto y = layer.forward(x);
  const auto dx = layer.backward(dy);
  const auto yp = layer.forward(xp);
  const auto dxp = layer.backward(dyp);
  for (Index t = 0; t < T; ++t) {
    CHECK(ref::rel_error(yp.row(t), y.row(perm[t]).cast<double>()) < 1e-6);
    CHECK(ref::rel_error(dxp.row(t), dx.row(perm[t]).cast<double>()) < 1e-6);
  }
}

TEST_CASE("deterministic: same seed and inputs give the same bits on 1 and 2 threads") {
  const moe::LayerConfig c{.hidden = 96, .ffn = 320, .experts = 8, .top_k = 2,
                           .aux = {.load_balance = 0.01, .z_loss = 0.001}};
  const auto x = ref::randn(777, 96, 31), dy = ref::randn(777, 96, 32);
  auto run = [&](int threads) {
    moe::MoELayer<moe::Linear, moe::GeluMLP, moe::cpu::Backend> layer(c, 5, {}, {}, moe::cpu::Backend(threads));
    auto y = layer.forward(x);
    auto dx = layer.backward(dy);
    std::vector<float> all(y.data(), y.data() + y.size());
    all.insert(all.end(), dx.data(), dx.data() + dx.size());
    for (auto& p : layer.parameters()) all.insert(all.end(), p.grad.begin(), p.grad.end());
    return all;
  };
  const auto one = run(1), two = run(2), again = run(2);
  CHECK(std::memcmp(one.data(), two.data(), one.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(two.data(), again.data(), two.size() * sizeof(float)) == 0);
}

namespace {
// Finite differences on the float64 instantiation: loss = sum(y .* dy) + aux losses.
template <template <class> class G, template <class> class E>
void check_gradients(moe::LayerConfig c, typename G<moe::cpu::Backend64>::Options gate_options = {}) {
  using Layer = moe::MoELayer<G, E, moe::cpu::Backend64>;
  Layer layer(c, 17, gate_options);
  const Index T = 6;
  ref::Matrix x = ref::randn<double>(T, c.hidden, 18), dy = ref::randn<double>(T, c.hidden, 19);
  auto loss = [&]() {
    const ref::Matrix y = layer.forward(x);
    return (y.array() * dy.array()).sum() + layer.aux_loss();
  };
  loss();
  layer.zero_grad();
  const ref::Matrix dx = layer.backward(dy);
  const double eps = 1e-6;
  // Central differences are exact to O(eps^2); routing is piecewise smooth and random logits sit
  // far from ties, so 1e-6 relative (against the gradient's scale) is a tight, fair bound.
  auto close = [](double analytic, double numeric, double scale) {
    return std::abs(analytic - numeric) <= 1e-6 * std::max(scale, 1e-3);
  };
  const double dx_scale = dx.cwiseAbs().maxCoeff();
  for (Index i = 0; i < x.size(); ++i) {
    const double saved = x.data()[i];
    x.data()[i] = saved + eps;
    const double up = loss();
    x.data()[i] = saved - eps;
    const double down = loss();
    x.data()[i] = saved;
    CAPTURE(i);
    CHECK(close(dx.data()[i], (up - down) / (2 * eps), dx_scale));
  }
  for (auto& p : layer.parameters()) {
    if (!p.trainable) continue;
    CAPTURE(p.name);
    double scale = 0;
    for (double g : p.grad) scale = std::max(scale, std::abs(g));
    const std::vector<double> analytic(p.grad.begin(), p.grad.end());
    for (std::size_t i = 0; i < p.value.size(); i += 1 + p.value.size() / 40) {  // ~40 entries each
      const double saved = p.value[i];
      p.value[i] = saved + eps;
      const double up = loss();
      p.value[i] = saved - eps;
      const double down = loss();
      p.value[i] = saved;
      CAPTURE(i);
      CHECK(close(analytic[i], (up - down) / (2 * eps), scale));
    }
  }
}
const moe::LayerConfig kTiny{.hidden = 10, .ffn = 14, .experts = 4, .top_k = 2};
}  // namespace

TEST_CASE("finite differences (float64): input and expert weights, SelfRoute and GeluMLP") {
  check_gradients<moe::SelfRoute, moe::GeluMLP>(kTiny);
}
TEST_CASE("finite differences (float64): Linear router, input and experts") {
  check_gradients<moe::Linear, moe::GeluMLP>(kTiny);
  check_gradients<moe::Linear, moe::SwiGLU>(kTiny);
}
TEST_CASE("finite differences (float64): FixedRandom input path, SwiGLU") {
  check_gradients<moe::FixedRandom, moe::SwiGLU>(kTiny);
}
TEST_CASE("finite differences (float64): SelfRoute with an offset and stop-gradient") {
  check_gradients<moe::SelfRoute, moe::GeluMLP>(kTiny, {.offset = 2});
  // Stop-gradient: the analytic dx omits the router path, so finite differences disagree on the
  // slice; check instead that the slice's gradient equals the one without routing through it.
  using Layer = moe::MoELayer<moe::SelfRoute, moe::GeluMLP, moe::cpu::Backend64>;
  Layer full(kTiny, 1), stop(kTiny, 1, {.gradient = moe::SelfRoute<moe::cpu::Backend64>::Gradient::stop});
  const ref::Matrix x = ref::randn<double>(5, 10, 2), dy = ref::randn<double>(5, 10, 3);
  full.forward(x);
  stop.forward(x);
  const ref::Matrix dfull = full.backward(dy), dstop = stop.backward(dy);
  CHECK(dfull.leftCols(6).isApprox(dstop.leftCols(6)));
  CHECK_FALSE(dfull.rightCols(4).isApprox(dstop.rightCols(4)));
}
TEST_CASE("finite differences (float64): softmax_then_top_k, capacity and aux losses") {
  auto c = kTiny;
  c.weights = moe::RoutingWeights::softmax_then_top_k;
  check_gradients<moe::Linear, moe::GeluMLP>(c);
  c = kTiny;
  c.capacity_factor = 0.7;
  check_gradients<moe::SelfRoute, moe::GeluMLP>(c);
  c = kTiny;
  c.aux = {.load_balance = 0.1, .z_loss = 0.01};
  check_gradients<moe::Linear, moe::GeluMLP>(c);
}

TEST_CASE("stats through the layer: accumulate over batches, pause, reset, router parameter count") {
  moe::MoELayer<moe::SelfRoute, moe::GeluMLP, moe::cpu::Backend> layer(kSmall, 1);
  CHECK(layer.stats().router_parameters == 0);
  layer.forward(ref::randn(30, 24, 1));
  layer.forward(ref::randn(20, 24, 2));
  CHECK(layer.stats().tokens == 50);
  CHECK(layer.stats().slots == 100);
  CHECK(std::accumulate(layer.stats().assignments.begin(), layer.stats().assignments.end(), std::int64_t{0}) == 100);
  layer.collect_stats(false);
  layer.forward(ref::randn(10, 24, 3));
  CHECK(layer.stats().tokens == 50);
  layer.collect_stats(true);
  const std::vector<std::uint8_t> mask(10, 0);
  layer.forward(ref::randn(10, 24, 4), {.token_mask = mask});
  CHECK(layer.stats().tokens == 50);
  layer.reset_stats();
  CHECK(layer.stats().tokens == 0);

  moe::MoELayer<moe::Linear, moe::GeluMLP, moe::cpu::Backend> linear(kSmall, 1);
  CHECK(linear.stats().router_parameters == 24 * 6);
  CHECK(linear.router_parameter_count() == 24 * 6);
  CHECK(linear.trainable_parameter_count() == 24 * 6 + 6 * (40 * 24 + 40 + 24 * 40 + 24));
}

TEST_CASE("capacity drops are counted and dropped tokens contribute zero") {
  auto c = kSmall;
  c.capacity_factor = 0.25;
  moe::MoELayer<moe::SelfRoute, moe::GeluMLP, moe::cpu::Backend> layer(c, 1);
  const auto x = ref::randn(40, 24, 9);
  const auto y = layer.forward(x);
  const auto& plan = layer.last_plan();
  CHECK(plan.dropped_slots > 0);
  CHECK(layer.stats().dropped_slots == plan.dropped_slots);
  for (Index t = 0; t < 40; ++t)
    if (plan.row[t * 2] < 0 && plan.row[t * 2 + 1] < 0) CHECK(y.row(t).isZero());
}

TEST_CASE("saved activation bytes per token follow the documented formula") {
  using Linear = moe::MoELayer<moe::Linear, moe::GeluMLP, moe::cpu::Backend>;
  using Self = moe::MoELayer<moe::SelfRoute, moe::GeluMLP, moe::cpu::Backend>;
  using SelfSwiGLU = moe::MoELayer<moe::SelfRoute, moe::SwiGLU, moe::cpu::Backend>;
  const moe::LayerConfig gpt2{.hidden = 768, .ffn = 3072, .experts = 8, .top_k = 2};
  // (H + 2kH + k·2F (pre- and post-GELU) + N (logits) + k) floats + 3k int32 + 1 status byte
  CHECK(Linear::saved_bytes_per_token(gpt2) == (768 + 2 * 2 * 768 + 2 * 2 * 3072 + 8 + 2) * 4 + 2 * 12 + 1);
  // SelfRoute's logits are a view of the input: no N of their own.
  CHECK(Self::saved_bytes_per_token(gpt2) == Linear::saved_bytes_per_token(gpt2) - 8 * 4);
  CHECK(moe::gate_logits_are_input_view<moe::SelfRoute<moe::cpu::Backend>>);
  CHECK(!moe::gate_logits_are_input_view<moe::Random<moe::cpu::Backend>>);
  // SwiGLU keeps its gate and up values, 2F a row as GeluMLP.
  CHECK(SelfSwiGLU::saved_bytes_per_token(gpt2) == Self::saved_bytes_per_token(gpt2));
}

namespace {

// Routing from a separate input r: routing and the gate's gradient follow r, the experts x. With
// r = x it is the ordinary layer, and dx + d_router equals the ordinary dx.
template <template <class> class G>
void check_separate_router_input() {
  using Layer = moe::MoELayer<G, moe::GeluMLP, moe::cpu::Backend>;
  const Index T = 37, H = kSmall.hidden;
  Layer plain(kSmall, 31), routed(kSmall, 31);
  const auto x = ref::randn(T, H, 32), dy = ref::randn(T, H, 33), r = ref::randn(T, H, 34);

  const auto y = plain.forward(x);
  const auto dx = plain.backward(dy);
  moe::cpu::Backend::Matrix y_same(T, H), dx_same(T, H), drouter(T, H);
  drouter.setZero();
  routed.forward_into(x, x, y_same);
  routed.backward_into(dy, dx_same, drouter);
  CHECK(y_same == y);
  CHECK(ref::rel_error(moe::cpu::Backend::Matrix(dx_same + drouter), dx.template cast<double>()) < 1e-6);

  // Another router input: the plan is the one the plain layer computes for r.
  moe::cpu::Backend::Matrix y_other(T, H);
  routed.forward_into(x, r, y_other);
  plain.forward(r);
  CHECK(routed.last_plan().expert == plain.last_plan().expert);
  CHECK_THROWS_WITH_AS(routed.backward(dy), doctest::Contains("separate router input"), moe::Error);
}

}  // namespace

TEST_CASE("a separate router input: routing reads it, gradients split between it and x") {
  SUBCASE("SelfRoute") { check_separate_router_input<moe::SelfRoute>(); }
  SUBCASE("Linear") { check_separate_router_input<moe::Linear>(); }
}

namespace {

// ForwardOptions::for_backward = false (inference): the training forward's bits, with a separate
// router input too; nothing kept, so backward is refused until a training forward.
template <template <class> class G, template <class> class E>
void check_inference_forward() {
  using Layer = moe::MoELayer<G, E, moe::cpu::Backend>;
  using Matrix = moe::cpu::Backend::Matrix;
  const Index T = 29, H = kSmall.hidden;
  Layer layer(kSmall, 41, {}, {}, moe::cpu::Backend(2));
  const auto x = ref::randn(T, H, 42), r = ref::randn(T, H, 43);
  const moe::ForwardOptions inference{.for_backward = false};  // as the README writes it
  for (bool separate : {false, true}) {
    CAPTURE(separate);
    Matrix y_train(T, H), y_infer(T, H);
    if (separate) {
      layer.forward_into(x, r, y_train);
      layer.forward_into(x, r, y_infer, inference);
    } else {
      layer.forward_into(x, y_train);
      layer.forward_into(x, y_infer, inference);
    }
    CHECK(y_infer == y_train);
    Matrix dx(T, H), d_router = Matrix::Zero(T, H);
    const auto backward = [&] {
      if (separate)
        layer.backward_into(y_train, dx, d_router);
      else
        layer.backward_into(y_train, dx);
    };
    CHECK_THROWS_WITH_AS(backward(), doctest::Contains("for_backward"), moe::Error);
  }
  layer.forward(x);
  CHECK_NOTHROW(layer.backward(x));
}

}  // namespace

TEST_CASE("inference forward (for_backward = false): the training forward's bits, backward refused") {
  check_inference_forward<moe::SelfRoute, moe::GeluMLP>();
  check_inference_forward<moe::Linear, moe::GeluMLP>();
  check_inference_forward<moe::FixedRandom, moe::SwiGLU>();
}

namespace {

// ForwardOptions::input_kept: the layer reads the caller's x (and router input) in backward instead
// of copies. The same bits while the caller keeps them; without the copy, a change the caller makes
// before the backward shows in it (SelfRoute's logits are a view of its input).
template <template <class> class G>
void check_input_kept() {
  using Layer = moe::MoELayer<G, moe::GeluMLP, moe::cpu::Backend>;
  using Matrix = moe::cpu::Backend::Matrix;
  const Index T = 29, H = kSmall.hidden;
  const auto dy = ref::randn(T, H, 44);
  for (bool separate : {false, true}) {
    CAPTURE(separate);
    // dx and d_router after a forward (input kept or copied) and a backward, x's values changed in between or not.
    const auto run = [&](bool kept, bool change_between) {
      Layer layer(kSmall, 41, {}, {}, moe::cpu::Backend(2));
      Matrix x = ref::randn(T, H, 42), r = ref::randn(T, H, 43), y(T, H), dx(T, H), d_router = Matrix::Zero(T, H);
      const moe::ForwardOptions options{.input_kept = kept};
      if (separate)
        layer.forward_into(x, r, y, options);
      else
        layer.forward_into(x, y, options);
      if (change_between) x *= 2.f, r *= 2.f;
      if (separate)
        layer.backward_into(dy, dx, d_router);
      else
        layer.backward_into(dy, dx);
      return std::pair{Matrix(dx), Matrix(d_router)};
    };
    const auto copied = run(false, false), kept = run(true, false);
    CHECK(kept.first == copied.first);
    CHECK(kept.second == copied.second);
    // The gate's gradient (into dx, or into d_router with a separate router input) reads its input:
    const auto gate_gradient = [&](const auto& result) { return separate ? result.second : result.first; };
    CHECK(gate_gradient(run(false, true)) == gate_gradient(copied));  // the copy: later values do not reach the backward
    CHECK(gate_gradient(run(true, true)) != gate_gradient(copied));   // no copy: they do (keeping x is the caller's promise)
  }
}

}  // namespace

TEST_CASE("input_kept: no copy of the input, the same bits while the caller keeps it") {
  check_input_kept<moe::SelfRoute>();
}

namespace {

// The CPU layer's experts read their rows through the routing plan (the backend's routed products:
// Gemm::a_rows, no expert-sorted copy of x). Their output must be the per-expert path's, bit for
// bit: gather_rows, then the expert bank's forward on the sorted rows, then the combine. With
// capacity drops (rows past the kept ones), and for inference (SwiGLU's routed_swiglu_forward).
template <template <class> class E>
void check_routed_products(moe::LayerConfig config, bool inference) {
  using B = moe::cpu::Backend;
  const Index T = 37, H = config.hidden;
  moe::MoELayer<moe::SelfRoute, E, B> layer(config, 51, {}, {}, B(2));
  const B::Matrix x = ref::randn(T, H, 52);
  B::Matrix y(T, H);
  layer.forward_into(x, y, {.for_backward = !inference});

  B& be = layer.backend();
  const moe::RoutingPlan& plan = layer.last_plan();
  const Index R = plan.rows();
  if (config.capacity_factor > 0) CHECK(R < T * config.top_k);  // some slots dropped
  B::Matrix rows(R, H), out(R, H), y_per_expert(T, H);
  be.gather_rows(x, plan, rows);
  layer.experts().forward(be, rows, plan.expert_offsets, out);  // the layer's own weights
  be.combine(out, plan, layer.last_weights(), y_per_expert);
  CHECK(y == y_per_expert);
}

}  // namespace

TEST_CASE("CPU routed products: the experts read x through the plan, with the per-expert path's bits") {
  moe::LayerConfig config = kSmall;
  for (bool inference : {false, true}) {
    CAPTURE(inference);
    check_routed_products<moe::GeluMLP>(config, inference);
    check_routed_products<moe::SwiGLU>(config, inference);
    config.capacity_factor = 0.6;
    check_routed_products<moe::GeluMLP>(config, inference);
    check_routed_products<moe::SwiGLU>(config, inference);
    config.capacity_factor = 0;
  }
  // The plan's products refuse shapes that do not match it, naming them.
  using B = moe::cpu::Backend;
  moe::MoELayer<moe::SelfRoute, moe::GeluMLP, B> layer(kSmall, 51, {}, {}, B(1));
  const B::Matrix x = ref::randn(9, kSmall.hidden, 52);
  B::Matrix y(9, kSmall.hidden);
  layer.forward_into(x, y);
  const B::Matrix weight(kSmall.experts * kSmall.ffn, kSmall.hidden);
  B::Matrix out(9 * kSmall.top_k, kSmall.ffn), small(3, kSmall.ffn);
  const B::Matrix x_short = x.topRows(8);
  CHECK_THROWS_WITH_AS(layer.backend().routed_linear_forward(x_short, layer.last_plan(), true, weight, nullptr, out),
                       doctest::Contains("in has 8 rows, expected 9 (the tokens)"), moe::Error);
  CHECK_THROWS_WITH_AS(layer.backend().routed_linear_forward(x, layer.last_plan(), true, weight, nullptr, small),
                       doctest::Contains("out has 3 rows"), moe::Error);
  const B::Matrix weight_short = weight.topRows(5);
  CHECK_THROWS_WITH_AS(layer.backend().routed_linear_forward(x, layer.last_plan(), true, weight_short, nullptr, out),
                       doctest::Contains("routed products: weight is [5, "), moe::Error);
}
