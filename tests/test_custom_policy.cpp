// A user-defined gate is one small struct over the backend: it plugs into MoELayer like the
// built-in ones. This one routes on the *first* N coordinates, scaled (a toy, but a real gate).
#include <doctest/doctest.h>

#include "reference.hpp"

namespace {
template <class B>
struct ScaledFirstCoordinates {
  using Scalar = typename B::Scalar;
  struct Options {
    Scalar scale = 2;
  };
  static constexpr std::string_view name = "scaled-first";

  ScaledFirstCoordinates(B&, const moe::LayerConfig& config, std::uint64_t, Options options)
      : experts_(config.experts), scale_(options.scale) {}

  // x: [T, H] -> logits: [T, N] = scale * x[:, :N]
  moe::ConstMatrixView<Scalar> forward(B& be, moe::ConstMatrixView<Scalar> x) {
    B::resize(logits_, x.rows, experts_);
    be.fill(logits_, Scalar(0));
    be.add(x.col_block(0, experts_), logits_);
    for (moe::Index i = 0; i < logits_.size(); ++i) logits_.data()[i] *= scale_;
    return moe::MatrixView<Scalar>(logits_);
  }
  // dx[:, :N] += scale * dlogits
  void backward(B& be, moe::ConstMatrixView<Scalar>, moe::ConstMatrixView<Scalar> dlogits, moe::MatrixView<Scalar> dx) {
    typename B::Matrix scaled;
    B::resize(scaled, dlogits.rows, dlogits.cols);
    be.copy(dlogits, scaled);
    for (moe::Index i = 0; i < scaled.size(); ++i) scaled.data()[i] *= scale_;
    be.add(scaled, dx.col_block(0, experts_));
  }
  bool wants_logit_gradient() const { return true; }
  std::vector<moe::ParamRef<Scalar>> parameters() { return {}; }
  moe::Index router_parameters() const { return 0; }

 private:
  moe::Index experts_;
  Scalar scale_;
  typename B::Matrix logits_;
};
}  // namespace

static_assert(moe::Gate<ScaledFirstCoordinates<moe::cpu::Backend>, moe::cpu::Backend>);
static_assert(moe::Gate<moe::SelfRoute<moe::cpu::Backend>, moe::cpu::Backend>);
static_assert(moe::Expert<moe::SwiGLU<moe::cpu::Backend64>, moe::cpu::Backend64>);
static_assert(moe::Backend<moe::cpu::Backend>);
static_assert(!moe::Gate<moe::GeluMLP<moe::cpu::Backend>, moe::cpu::Backend>);  // an expert is not a gate

TEST_CASE("a user-defined gate plugs into MoELayer: routing follows its logits, gradients check out") {
  const moe::LayerConfig c{.hidden = 10, .ffn = 12, .experts = 4, .top_k = 2};
  moe::MoELayer<ScaledFirstCoordinates, moe::GeluMLP, moe::cpu::Backend64> layer(c, 3, {.scale = 3.0});
  ref::Matrix x = ref::randn<double>(5, 10, 1);
  const ref::Matrix dy = ref::randn<double>(5, 10, 2);
  layer.forward(x);
  for (moe::Index t = 0; t < 5; ++t) {  // routed on the first 4 coordinates
    std::int32_t expected[2];
    moe::select_top_k(x.row(t).data(), 4, 2, expected);
    CHECK(layer.last_plan().expert[t * 2] == expected[0]);
    CHECK(layer.last_plan().expert[t * 2 + 1] == expected[1]);
  }
  const ref::Matrix dx = layer.backward(dy);
  const double eps = 1e-6;
  for (moe::Index i = 0; i < 4; ++i) {  // the routed coordinates of token 0
    const double saved = x(0, i);
    x(0, i) = saved + eps;
    const double up = (layer.forward(x).array() * dy.array()).sum();
    x(0, i) = saved - eps;
    const double down = (layer.forward(x).array() * dy.array()).sum();
    x(0, i) = saved;
    CHECK(dx(0, i) == doctest::Approx((up - down) / (2 * eps)).epsilon(1e-6));
  }
}
