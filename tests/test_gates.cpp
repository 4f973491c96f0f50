// Each gate's logits, gradients into the input, parameters and counts.
#include <doctest/doctest.h>

#include "reference.hpp"

using moe::Index;
using Backend = moe::cpu::Backend;
using Matrix = Backend::Matrix;

namespace {
const moe::LayerConfig kConfig{.hidden = 16, .ffn = 24, .experts = 4, .top_k = 2};
}

TEST_CASE("SelfRoute: logits are the last N coordinates of the input (paper eq. 5), a view, no copy") {
  Backend be(1);
  moe::SelfRoute<Backend> gate(be, kConfig, 0, {});
  const Matrix x = ref::randn(5, 16, 1);
  const auto logits = gate.forward(be, x);
  CHECK(logits.rows == 5);
  CHECK(logits.cols == 4);
  CHECK(logits.data == x.data() + 12);  // points into x
  for (Index t = 0; t < 5; ++t)
    for (Index e = 0; e < 4; ++e) CHECK(logits(t, e) == x(t, 12 + e));
  CHECK(gate.router_parameters() == 0);
  CHECK(gate.parameters().empty());
}

TEST_CASE("SelfRoute: an offset selects another coordinate slice") {
  Backend be(1);
  moe::SelfRoute<Backend> gate(be, kConfig, 0, {.offset = 3});
  const Matrix x = ref::randn(2, 16, 2);
  const auto logits = gate.forward(be, x);
  for (Index e = 0; e < 4; ++e) CHECK(logits(1, e) == x(1, 3 + e));
}

TEST_CASE("SelfRoute: full gradient adds dlogits into the slice; stop-gradient adds nothing") {
  Backend be(1);
  const Matrix x = ref::randn(3, 16, 3), dlogits = ref::randn(3, 4, 4);
  moe::SelfRoute<Backend> full(be, kConfig, 0, {});
  moe::SelfRoute<Backend> stop(be, kConfig, 0, {.gradient = moe::SelfRoute<Backend>::Gradient::stop});
  Matrix dx = Matrix::Ones(3, 16);
  full.backward(be, x, dlogits, dx);
  CHECK(dx.leftCols(12).isApproxToConstant(1.f));
  CHECK(dx.rightCols(4).isApprox((dlogits.array() + 1.f).matrix()));
  Matrix dx_stop = Matrix::Ones(3, 16);
  stop.backward(be, x, dlogits, dx_stop);
  CHECK(dx_stop.isApproxToConstant(1.f));
  CHECK(full.wants_logit_gradient());
  CHECK_FALSE(stop.wants_logit_gradient());
}

TEST_CASE("Linear: logits = x W^T in fp32 with H*N trained parameters (paper eq. 3)") {
  Backend be(2);
  moe::Linear<Backend> gate(be, kConfig, 9, {});
  const Matrix x = ref::randn(7, 16, 5);
  const auto logits = gate.forward(be, x);
  auto params = gate.parameters();
  REQUIRE(params.size() == 1);
  CHECK(params[0].name == "router.weight");
  CHECK(params[0].shape == std::vector<Index>{4, 16});
  CHECK(params[0].trainable);
  CHECK(params[0].grad.size() == 64);
  const Eigen::Map<const Matrix> W(params[0].value.data(), 4, 16);
  const ref::Matrix expected = x.cast<double>() * W.cast<double>().transpose();
  for (Index t = 0; t < 7; ++t)
    for (Index e = 0; e < 4; ++e) CHECK(logits(t, e) == doctest::Approx(expected(t, e)).epsilon(1e-5));
  CHECK(gate.router_parameters() == 16 * 4);
}

TEST_CASE("FixedRandom: the projection is drawn from the seed, frozen, and has no gradient") {
  Backend be(1);
  moe::FixedRandom<Backend> a(be, kConfig, 3, {}), b(be, kConfig, 3, {}), c(be, kConfig, 4, {});
  auto pa = a.parameters(), pb = b.parameters(), pc = c.parameters();
  CHECK_FALSE(pa[0].trainable);
  CHECK(pa[0].grad.empty());
  CHECK(std::equal(pa[0].value.begin(), pa[0].value.end(), pb[0].value.begin()));
  CHECK_FALSE(std::equal(pa[0].value.begin(), pa[0].value.end(), pc[0].value.begin()));
  CHECK(a.router_parameters() == 0);
  // The input gradient still flows through it: dx += dlogits W.
  const Matrix x = ref::randn(2, 16, 6), dlogits = ref::randn(2, 4, 7);
  Matrix dx = Matrix::Zero(2, 16);
  a.backward(be, x, dlogits, dx);
  const Eigen::Map<const Matrix> W(pa[0].value.data(), 4, 16);
  CHECK(dx.isApprox(dlogits * W, 1e-5f));
}

TEST_CASE("FixedRandom: the projection never changes under an optimizer step") {
  moe::MoELayer<moe::FixedRandom, moe::GeluMLP, Backend> layer(kConfig, 11);
  auto params = layer.parameters();
  const std::vector<float> before(params[0].value.begin(), params[0].value.end());
  const std::vector<float> expert_before(params[1].value.begin(), params[1].value.end());
  for (int step = 0; step < 3; ++step) {
    const Matrix x = ref::randn(20, 16, 100 + step);
    const Matrix y = layer.forward(x);
    layer.zero_grad();
    layer.backward(y);
    moe::sgd_step(params, 0.5);
  }
  CHECK(std::equal(before.begin(), before.end(), params[0].value.begin()));
  CHECK_FALSE(std::equal(expert_before.begin(), expert_before.end(), params[1].value.begin()));  // experts train
  CHECK(layer.router_parameter_count() == 0);
}

TEST_CASE("Random: reproducible per (seed, step), different across steps and seeds, no gradient") {
  Backend be(2);
  moe::Random<Backend> a(be, kConfig, 5, {}), b(be, kConfig, 5, {}), other_seed(be, kConfig, 6, {});
  const Matrix x = ref::randn(50, 16, 8);
  const Matrix a0 = Matrix(Eigen::Map<const Matrix>(a.forward(be, x).data, 50, 4));
  const Matrix a1 = Matrix(Eigen::Map<const Matrix>(a.forward(be, x).data, 50, 4));
  const Matrix b0 = Matrix(Eigen::Map<const Matrix>(b.forward(be, x).data, 50, 4));
  const Matrix c0 = Matrix(Eigen::Map<const Matrix>(other_seed.forward(be, x).data, 50, 4));
  CHECK(a0 == b0);
  CHECK(a0 != a1);
  CHECK(a0 != c0);
  CHECK(a.step() == 2);
  a.set_step(1);
  const Matrix again = Matrix(Eigen::Map<const Matrix>(a.forward(be, x).data, 50, 4));
  CHECK(again == a1);
  // Roughly N(0, 1): mean ~ 0, variance ~ 1 over 200 draws.
  CHECK(std::abs(a0.mean()) < 0.25);
  CHECK(std::abs((a0.array() - a0.mean()).square().mean() - 1.0) < 0.35);
  CHECK_FALSE(a.wants_logit_gradient());
  CHECK(a.router_parameters() == 0);
}

TEST_CASE("Random routing does not depend on the input, only on (seed, step)") {
  moe::MoELayer<moe::Random, moe::GeluMLP, Backend> layer(kConfig, 1);
  layer.forward(ref::randn(30, 16, 1));
  const auto first = layer.last_plan().expert;
  layer.gate().set_step(0);
  layer.forward(ref::randn(30, 16, 2));
  CHECK(layer.last_plan().expert == first);
}
