// Transformer building blocks (moe/nn): LayerNorm, Linear, embedding, cross-entropy, AdamW.
// Each piece: finite differences in float64, float32 against float64, 1 vs 2 threads bit for
// bit, and bad inputs.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <moe/nn/adamw.hpp>
#include <moe/nn/cross_entropy.hpp>
#include <moe/nn/embedding.hpp>
#include <moe/nn/layernorm.hpp>
#include <moe/nn/linear.hpp>

#include "reference.hpp"

using moe::Index;

namespace {

template <class S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class S>
using Vec = std::vector<S>;

// Central differences: d loss / d values[i] for every i.
template <class Loss>
Vec<double> numeric_gradient(double* values, Index n, Loss&& loss) {
  constexpr double h = 1e-6;
  Vec<double> g(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) {
    const double saved = values[i];
    values[i] = saved + h;
    const double plus = loss();
    values[i] = saved - h;
    const double minus = loss();
    values[i] = saved;
    g[std::size_t(i)] = (plus - minus) / (2 * h);
  }
  return g;
}
// Analytic minus the prefill (checks that gradients are added, not written).
Vec<double> minus(const double* grad, Index n, double prefill) {
  Vec<double> out(grad, grad + n);
  for (double& g : out) g -= prefill;
  return out;
}
double rel(const Vec<double>& analytic, const Vec<double>& numeric) {
  return ref::rel_error(analytic.data(), numeric.data(), numeric.size());
}
template <class S>
Vec<double> widen(const S* p, Index n) { return Vec<double>(p, p + n); }
template <class S>
Vec<double> widen(const Vec<S>& v) { return Vec<double>(v.begin(), v.end()); }
template <class S>
Vec<S> random_vector(Index n, unsigned seed, double std_dev = 1.0) {
  const auto m = ref::randn<S>(1, n, seed, std_dev);
  return Vec<S>(m.data(), m.data() + n);
}
template <class To, class From>
Vec<To> cast(const Vec<From>& v) { return Vec<To>(v.begin(), v.end()); }
template <class S>
bool same_bits(const Mat<S>& a, const Mat<S>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(S) * std::size_t(a.size())) == 0;
}
template <class S>
bool same_bits(const Vec<S>& a, const Vec<S>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(S) * a.size()) == 0;
}

// Finite differences: loss = sum(out .* dout) is smooth; h = 1e-6 leaves O(h^2) truncation and
// O(1e-16 / h) rounding, far below 1e-6 of the gradient scale.
constexpr double kFiniteDifferenceTolerance = 1e-6;
// fp32 against float64: sums of <= a few hundred terms round to ~1e-6 relative.
constexpr double kFp32Tolerance = 1e-5;

// ---- LayerNorm ----------------------------------------------------------------------------
template <class S>
struct LayerNormRun {
  Mat<S> out, dx;
  Vec<S> mean, rstd, dweight, dbias;
};
template <class S>
LayerNormRun<S> run_layernorm(const Mat<S>& x, const Vec<S>& weight, const Vec<S>& bias, const Mat<S>& dout,
                              int threads, double prefill = 0) {
  const Index T = x.rows(), C = x.cols();
  LayerNormRun<S> r{Mat<S>(T, C), Mat<S>::Constant(T, C, S(prefill)), Vec<S>(T), Vec<S>(T),
                    Vec<S>(C, S(prefill)), Vec<S>(C, S(prefill))};
  moe::nn::layernorm_forward<S>(x, weight.data(), bias.data(), r.out, r.mean.data(), r.rstd.data(), threads);
  moe::nn::layernorm_backward<S>(dout, x, weight.data(), r.mean.data(), r.rstd.data(), r.dx, r.dweight.data(),
                                 r.dbias.data(), threads);
  return r;
}

// ---- Linear -------------------------------------------------------------------------------
template <class S>
struct LinearRun {
  Mat<S> out, din, dweight;
  Vec<S> dbias;
};
template <class S>
LinearRun<S> run_linear(const Mat<S>& in, const Mat<S>& weight, const Vec<S>* bias, const Mat<S>& dout, int threads,
                        double prefill = 0) {
  const Index T = in.rows(), I = in.cols(), O = weight.rows();
  LinearRun<S> r{Mat<S>(T, O), Mat<S>::Constant(T, I, S(prefill)), Mat<S>::Constant(O, I, S(prefill)),
                 Vec<S>(O, S(prefill))};
  moe::nn::linear_forward<S>(in, weight, bias ? bias->data() : nullptr, r.out, threads);
  moe::nn::linear_backward<S>(in, dout, weight, r.din, r.dweight, bias ? r.dbias.data() : nullptr, threads);
  return r;
}

// ---- Embedding ----------------------------------------------------------------------------
template <class S>
struct EmbeddingRun {
  Mat<S> out, dwte, dwpe;
};
template <class S>
EmbeddingRun<S> run_embedding(const Vec<std::int32_t>& tokens, Index B, Index T, const Mat<S>& wte, const Mat<S>& wpe,
                              const Mat<S>& dout, int threads, double prefill = 0) {
  const Index C = wte.cols();
  EmbeddingRun<S> r{Mat<S>(B * T, C), Mat<S>::Constant(wte.rows(), C, S(prefill)),
                    Mat<S>::Constant(wpe.rows(), C, S(prefill))};
  moe::nn::embedding_forward<S>(tokens, B, T, wte, wpe, r.out, threads);
  moe::nn::embedding_backward<S>(dout, tokens, B, T, r.dwte, r.dwpe, threads);
  return r;
}
Vec<std::int32_t> random_tokens(Index n, Index V, unsigned seed, bool with_ignored = false) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(0, int(V) - 1);
  Vec<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& id : t) id = dist(gen);
  if (with_ignored)
    for (std::size_t i = 1; i < t.size(); i += 4) t[i] = -1;
  return t;
}

// ---- Cross-entropy ------------------------------------------------------------------------
template <class S>
struct CrossEntropyRun {
  double loss;
  Vec<S> losses;
  Mat<S> dlogits;
};
template <class S>
CrossEntropyRun<S> run_cross_entropy(const Mat<S>& logits, const Vec<std::int32_t>& targets, double dloss,
                                     int threads) {
  CrossEntropyRun<S> r{0, Vec<S>(std::size_t(logits.rows())), Mat<S>::Constant(logits.rows(), logits.cols(), S(7))};
  r.loss = moe::nn::cross_entropy_forward<S>(logits, targets, r.losses.data(), threads);
  moe::nn::cross_entropy_backward<S>(logits, targets, dloss, r.dlogits, threads);
  return r;
}

}  // namespace

// =============================================================================================
TEST_CASE("nn layernorm: forward matches the definition; finite differences for x, weight, bias") {
  const Index T = 5, C = 7;
  ref::Matrix x = ref::randn<double>(T, C, 1, 2.0);
  x.array() += 3.0;  // a mean far from 0
  Vec<double> weight = random_vector<double>(C, 2), bias = random_vector<double>(C, 3);
  const ref::Matrix dout = ref::randn<double>(T, C, 4);
  const double prefill = 0.25;
  const auto r = run_layernorm<double>(x, weight, bias, dout, 1, prefill);

  for (Index t = 0; t < T; ++t) {  // PyTorch: biased variance, eps inside the square root
    const double mean = x.row(t).mean();
    const double var = (x.row(t).array() - mean).square().mean();
    for (Index c = 0; c < C; ++c)
      CHECK(r.out(t, c) == doctest::Approx((x(t, c) - mean) / std::sqrt(var + 1e-5) * weight[c] + bias[c]).epsilon(1e-12));
    CHECK(r.mean[t] == doctest::Approx(mean).epsilon(1e-12));
    CHECK(r.rstd[t] == doctest::Approx(1 / std::sqrt(var + 1e-5)).epsilon(1e-12));
  }

  auto loss = [&] {
    ref::Matrix out(T, C);
    Vec<double> mean(T), rstd(T);
    moe::nn::layernorm_forward<double>(x, weight.data(), bias.data(), out, mean.data(), rstd.data(), 1);
    return (out.array() * dout.array()).sum();
  };
  CHECK(rel(minus(r.dx.data(), T * C, prefill), numeric_gradient(x.data(), T * C, loss)) < kFiniteDifferenceTolerance);
  CHECK(rel(minus(r.dweight.data(), C, prefill), numeric_gradient(weight.data(), C, loss)) < kFiniteDifferenceTolerance);
  CHECK(rel(minus(r.dbias.data(), C, prefill), numeric_gradient(bias.data(), C, loss)) < kFiniteDifferenceTolerance);
}

TEST_CASE("nn layernorm: float32 matches float64 on the same inputs") {
  const Index T = 33, C = 48;
  const Mat<float> x = ref::randn<float>(T, C, 5), dout = ref::randn<float>(T, C, 6);
  const Vec<float> weight = random_vector<float>(C, 7), bias = random_vector<float>(C, 8);
  const auto f = run_layernorm<float>(x, weight, bias, dout, 2);
  const auto d = run_layernorm<double>(x.cast<double>(), cast<double>(weight), cast<double>(bias), dout.cast<double>(), 2);
  CHECK(ref::rel_error(f.out, d.out) < kFp32Tolerance);
  CHECK(rel(widen(f.mean), d.mean) < kFp32Tolerance);
  CHECK(rel(widen(f.rstd), d.rstd) < kFp32Tolerance);
  CHECK(ref::rel_error(f.dx, d.dx) < kFp32Tolerance);
  CHECK(rel(widen(f.dweight), d.dweight) < kFp32Tolerance);
  CHECK(rel(widen(f.dbias), d.dbias) < kFp32Tolerance);
}

TEST_CASE("nn layernorm: 1 and 2 threads give the same bits") {
  const Index T = 300, C = 100;  // 2 row chunks (163 rows), 2 column chunks (64): both partial
  const Mat<float> x = ref::randn<float>(T, C, 9), dout = ref::randn<float>(T, C, 10);
  const Vec<float> weight = random_vector<float>(C, 11), bias = random_vector<float>(C, 12);
  const auto a = run_layernorm<float>(x, weight, bias, dout, 1), b = run_layernorm<float>(x, weight, bias, dout, 2);
  CHECK(same_bits(a.out, b.out));
  CHECK(same_bits(a.mean, b.mean));
  CHECK(same_bits(a.rstd, b.rstd));
  CHECK(same_bits(a.dx, b.dx));
  CHECK(same_bits(a.dweight, b.dweight));
  CHECK(same_bits(a.dbias, b.dbias));
}

TEST_CASE("nn layernorm: bad shapes throw, naming the argument") {
  Mat<float> x = ref::randn<float>(4, 6, 1), out(4, 5);
  Vec<float> w(6, 1), b(6, 0), mean(4), rstd(4);
  CHECK_THROWS_WITH_AS(moe::nn::layernorm_forward<float>(x, w.data(), b.data(), out, mean.data(), rstd.data(), 1),
                       doctest::Contains("out is [4, 5], x is [4, 6]"), moe::Error);
  out.resize(4, 6);
  CHECK_THROWS_WITH_AS(moe::nn::layernorm_forward<float>(x, nullptr, b.data(), out, mean.data(), rstd.data(), 1),
                       doctest::Contains("weight and bias"), moe::Error);
  Mat<float> dout(3, 6), dx(4, 6);
  CHECK_THROWS_WITH_AS(moe::nn::layernorm_backward<float>(dout, x, w.data(), mean.data(), rstd.data(), dx, w.data(),
                                                          b.data(), 1),
                       doctest::Contains("dout is [3, 6], x is [4, 6]"), moe::Error);
}

TEST_CASE("nn layernorm: dx over dout or x, and a thread count below 1, are refused") {
  Mat<float> x = ref::randn<float>(4, 6, 1), out(4, 6), dout = ref::randn<float>(4, 6, 2);
  Vec<float> w(6, 1), b(6, 0), mean(4), rstd(4), dw(6, 0), db(6, 0);
  CHECK_THROWS_WITH_AS(moe::nn::layernorm_forward<float>(x, w.data(), b.data(), out, mean.data(), rstd.data(), -1),
                       doctest::Contains("thread count must be >= 1, got -1"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::layernorm_forward<float>(x, w.data(), b.data(), out, mean.data(), rstd.data(), 0),
                       doctest::Contains("thread count must be >= 1, got 0"), moe::Error);
  moe::nn::layernorm_forward<float>(x, w.data(), b.data(), out, mean.data(), rstd.data(), 1);
  CHECK_THROWS_WITH_AS(moe::nn::layernorm_backward<float>(dout, x, w.data(), mean.data(), rstd.data(), dout,
                                                          dw.data(), db.data(), 1),
                       doctest::Contains("dx overlaps dout"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::layernorm_backward<float>(dout, x, w.data(), mean.data(), rstd.data(), x, dw.data(),
                                                          db.data(), 1),
                       doctest::Contains("dx overlaps x"), moe::Error);
}

// =============================================================================================
TEST_CASE("nn linear: forward is in W^T + b; finite differences for in, weight, bias") {
  const Index T = 6, I = 5, O = 4;
  ref::Matrix in = ref::randn<double>(T, I, 21), weight = ref::randn<double>(O, I, 22);
  Vec<double> bias = random_vector<double>(O, 23);
  const ref::Matrix dout = ref::randn<double>(T, O, 24);
  const double prefill = -0.5;
  const auto r = run_linear<double>(in, weight, &bias, dout, 1, prefill);
  ref::Matrix expected = in * weight.transpose();
  expected.rowwise() += Eigen::Map<const Eigen::RowVectorXd>(bias.data(), O);
  CHECK(ref::rel_error(r.out, expected) < 1e-14);

  auto loss = [&] {
    ref::Matrix out(T, O);
    moe::nn::linear_forward<double>(in, weight, bias.data(), out, 1);
    return (out.array() * dout.array()).sum();
  };
  CHECK(rel(minus(r.din.data(), T * I, prefill), numeric_gradient(in.data(), T * I, loss)) < kFiniteDifferenceTolerance);
  CHECK(rel(minus(r.dweight.data(), O * I, prefill), numeric_gradient(weight.data(), O * I, loss)) <
        kFiniteDifferenceTolerance);
  CHECK(rel(minus(r.dbias.data(), O, prefill), numeric_gradient(bias.data(), O, loss)) < kFiniteDifferenceTolerance);

  SUBCASE("without a bias, and with din skipped") {
    ref::Matrix out(T, O), dweight = ref::Matrix::Zero(O, I);
    moe::nn::linear_forward<double>(in, weight, nullptr, out, 1);
    CHECK(ref::rel_error(out, in * weight.transpose()) < 1e-14);
    moe::nn::linear_backward<double>(in, dout, weight, {}, dweight, nullptr, 1);
    CHECK(ref::rel_error(dweight, r.dweight.array() - prefill) < 1e-14);
  }
}

TEST_CASE("nn linear: float32 matches float64 on the same inputs") {
  const Index T = 37, I = 29, O = 41;
  const Mat<float> in = ref::randn<float>(T, I, 25), weight = ref::randn<float>(O, I, 26), dout = ref::randn<float>(T, O, 27);
  const Vec<float> bias = random_vector<float>(O, 28);
  const Vec<double> bias_d = cast<double>(bias);
  const auto f = run_linear<float>(in, weight, &bias, dout, 2);
  const auto d = run_linear<double>(in.cast<double>(), weight.cast<double>(), &bias_d, dout.cast<double>(), 2);
  CHECK(ref::rel_error(f.out, d.out) < kFp32Tolerance);
  CHECK(ref::rel_error(f.din, d.din) < kFp32Tolerance);
  CHECK(ref::rel_error(f.dweight, d.dweight) < kFp32Tolerance);
  CHECK(rel(widen(f.dbias), d.dbias) < kFp32Tolerance);
}

TEST_CASE("nn linear: 1 and 2 threads give the same bits") {
  const Index T = 300, I = 70, O = 200;  // GEMM tiles of 192 and bias column chunks of 64, partial
  const Mat<float> in = ref::randn<float>(T, I, 29), weight = ref::randn<float>(O, I, 30), dout = ref::randn<float>(T, O, 31);
  const Vec<float> bias = random_vector<float>(O, 32);
  const auto a = run_linear<float>(in, weight, &bias, dout, 1), b = run_linear<float>(in, weight, &bias, dout, 2);
  CHECK(same_bits(a.out, b.out));
  CHECK(same_bits(a.din, b.din));
  CHECK(same_bits(a.dweight, b.dweight));
  CHECK(same_bits(a.dbias, b.dbias));
}

TEST_CASE("nn linear: bad shapes throw, naming the argument") {
  Mat<float> in(4, 6), weight(3, 5), out(4, 3);
  CHECK_THROWS_WITH_AS(moe::nn::linear_forward<float>(in, weight, nullptr, out, 1),
                       doctest::Contains("in is [4, 6], weight is [3, 5]"), moe::Error);
  weight.resize(3, 6);
  out.resize(4, 2);
  CHECK_THROWS_WITH_AS(moe::nn::linear_forward<float>(in, weight, nullptr, out, 1),
                       doctest::Contains("out is [4, 2], expected [T, O] = [4, 3]"), moe::Error);
  Mat<float> dout(4, 3), din(4, 6), dweight(3, 7);
  CHECK_THROWS_WITH_AS(moe::nn::linear_backward<float>(in, dout, weight, din, dweight, nullptr, 1),
                       doctest::Contains("dweight is [3, 7], weight is [3, 6]"), moe::Error);
}

TEST_CASE("nn layernorm, linear, embedding: views with a negative extent, overlapping rows or no data are refused by name") {
  Mat<float> x = ref::randn<float>(4, 6, 1), out(4, 6), weight = ref::randn<float>(3, 6, 2), y(4, 3);
  Vec<float> w(6, 1), b(6, 0), mean(4), rstd(4);
  const moe::MatrixView<float> negative(out.data(), -2, 6), overlapping(out.data(), 4, 6, 3), no_data(nullptr, 4, 6);
  CHECK_THROWS_WITH_AS(moe::nn::layernorm_forward<float>(x, w.data(), b.data(), negative, mean.data(), rstd.data(), 1),
                       doctest::Contains("layernorm_forward: out is [-2, 6]: negative extent"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::layernorm_forward<float>(x, w.data(), b.data(), overlapping, mean.data(), rstd.data(), 1),
                       doctest::Contains("layernorm_forward: out is [4, 6] with row stride 3: rows would overlap"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::layernorm_forward<float>(no_data, w.data(), b.data(), out, mean.data(), rstd.data(), 1),
                       doctest::Contains("layernorm_forward: x is [4, 6] with no data"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::linear_forward<float>(moe::MatrixView<float>(x.data(), -3, 6), weight, nullptr, y, 1),
                       doctest::Contains("linear_forward: in is [-3, 6]: negative extent"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::linear_backward<float>(x, y, weight, overlapping, moe::MatrixView<float>{}, nullptr, 1),
                       doctest::Contains("linear_backward: din is [4, 6] with row stride 3"), moe::Error);
}

TEST_CASE("nn linear: an output over an operand is refused (the products read while they write)") {
  // in [4, 8] and out [4, 4] in one buffer: out over in's first columns would be read after written.
  Mat<float> buffer = ref::randn<float>(4, 8, 3), weight = ref::randn<float>(4, 8, 4), separate(4, 4);
  const moe::MatrixView<float> all(buffer);
  CHECK_THROWS_WITH_AS(moe::nn::linear_forward<float>(all, weight, nullptr, all.col_block(0, 4), 1),
                       doctest::Contains("linear_forward: out overlaps in"), moe::Error);
  Mat<float> square = ref::randn<float>(4, 4, 7);
  CHECK_THROWS_WITH_AS(moe::nn::linear_forward<float>(separate, square, nullptr, square, 1),
                       doctest::Contains("linear_forward: out overlaps weight"), moe::Error);
  // Beside each other in one buffer (the same stride, other columns) is fine.
  Mat<float> side = ref::randn<float>(4, 12, 5);
  const moe::MatrixView<float> sv(side);
  CHECK_NOTHROW(moe::nn::linear_forward<float>(sv.col_block(0, 8), weight, nullptr, sv.col_block(8, 4), 1));
  Mat<float> dout = ref::randn<float>(4, 4, 6), dweight(4, 8);
  CHECK_THROWS_WITH_AS(moe::nn::linear_backward<float>(buffer, dout, weight, buffer, dweight, nullptr, 1),
                       doctest::Contains("linear_backward: din overlaps in"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::linear_backward<float>(buffer, dout, weight, moe::MatrixView<float>{}, weight, nullptr, 1),
                       doctest::Contains("linear_backward: dweight overlaps weight"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::linear_forward<float>(buffer, weight, nullptr, separate, -2),
                       doctest::Contains("thread count must be >= 1, got -2"), moe::Error);
}

// =============================================================================================
TEST_CASE("nn embedding: forward is wte[token] + wpe[t]; finite differences for wte and wpe") {
  const Index B = 2, T = 3, V = 5, max_T = 4, C = 6;
  const Vec<std::int32_t> tokens{1, 4, 1, 0, 1, 4};  // repeated ids: their gradients add up
  ref::Matrix wte = ref::randn<double>(V, C, 41), wpe = ref::randn<double>(max_T, C, 42);
  const ref::Matrix dout = ref::randn<double>(B * T, C, 43);
  const double prefill = 0.125;
  const auto r = run_embedding<double>(tokens, B, T, wte, wpe, dout, 1, prefill);
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < T; ++t)
      CHECK(r.out.row(b * T + t) == wte.row(tokens[std::size_t(b * T + t)]) + wpe.row(t));

  auto loss = [&] {
    ref::Matrix out(B * T, C);
    moe::nn::embedding_forward<double>(tokens, B, T, wte, wpe, out, 1);
    return (out.array() * dout.array()).sum();
  };
  CHECK(rel(minus(r.dwte.data(), V * C, prefill), numeric_gradient(wte.data(), V * C, loss)) < kFiniteDifferenceTolerance);
  CHECK(rel(minus(r.dwpe.data(), max_T * C, prefill), numeric_gradient(wpe.data(), max_T * C, loss)) <
        kFiniteDifferenceTolerance);
  CHECK((r.dwpe.row(3).array() == prefill).all());  // positions >= T untouched
}

TEST_CASE("nn embedding: float32 matches float64 on the same inputs") {
  const Index B = 3, T = 17, V = 11, max_T = 20, C = 24;
  const auto tokens = random_tokens(B * T, V, 44);
  const Mat<float> wte = ref::randn<float>(V, C, 45), wpe = ref::randn<float>(max_T, C, 46), dout = ref::randn<float>(B * T, C, 47);
  const auto f = run_embedding<float>(tokens, B, T, wte, wpe, dout, 2);
  const auto d = run_embedding<double>(tokens, B, T, wte.cast<double>(), wpe.cast<double>(), dout.cast<double>(), 2);
  CHECK(ref::rel_error(f.out, d.out) < kFp32Tolerance);
  CHECK(ref::rel_error(f.dwte, d.dwte) < kFp32Tolerance);
  CHECK(ref::rel_error(f.dwpe, d.dwpe) < kFp32Tolerance);
}

TEST_CASE("nn embedding: 1 and 2 threads give the same bits") {
  const Index B = 3, T = 100, V = 50, max_T = 128, C = 130;  // row chunks of 126, column chunks of 64: partial
  const auto tokens = random_tokens(B * T, V, 48);
  const Mat<float> wte = ref::randn<float>(V, C, 49), wpe = ref::randn<float>(max_T, C, 50), dout = ref::randn<float>(B * T, C, 51);
  const auto a = run_embedding<float>(tokens, B, T, wte, wpe, dout, 1), b = run_embedding<float>(tokens, B, T, wte, wpe, dout, 2);
  CHECK(same_bits(a.out, b.out));
  CHECK(same_bits(a.dwte, b.dwte));
  CHECK(same_bits(a.dwpe, b.dwpe));
}

TEST_CASE("nn embedding: bad token ids and lengths throw, naming the id and position") {
  const Mat<float> wte(5, 4), wpe(3, 4);
  Mat<float> out(4, 4);
  const Vec<std::int32_t> bad{0, 1, 7, 2};
  CHECK_THROWS_WITH_AS(moe::nn::embedding_forward<float>(bad, 2, 2, wte, wpe, out, 1),
                       doctest::Contains("token id 7 at position 2 (b = 1, t = 0)"), moe::Error);
  const Vec<std::int32_t> negative{0, -1, 1, 2};
  CHECK_THROWS_WITH_AS(moe::nn::embedding_forward<float>(negative, 2, 2, wte, wpe, out, 1),
                       doctest::Contains("token id -1 at position 1"), moe::Error);
  const Vec<std::int32_t> ok{0, 1, 2, 3};
  CHECK_THROWS_WITH_AS(moe::nn::embedding_forward<float>(ok, 1, 4, wte, wpe, out, 1),
                       doctest::Contains("T = 4 exceeds the 3 positions of wpe"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::embedding_forward<float>(ok, 1, 3, wte, wpe, out, 1),
                       doctest::Contains("tokens has 4 ids, expected B * T"), moe::Error);
  Mat<float> dwte(5, 4), dwpe(3, 4);
  CHECK_THROWS_WITH_AS(moe::nn::embedding_backward<float>(out, bad, 2, 2, dwte, dwpe, 1),
                       doctest::Contains("token id 7"), moe::Error);
}

TEST_CASE("nn embedding: B * T past Index's range is refused before it is computed") {
  const Mat<float> wte(5, 4), wpe(3, 4);
  Mat<float> out(4, 4);
  const Vec<std::int32_t> ok{0, 1, 2, 3};
  CHECK_THROWS_WITH_AS(moe::nn::embedding_forward<float>(ok, moe::Index{1} << 62, 2, wte, wpe, out, 1),
                       doctest::Contains("B * T overflows (B = 4611686018427387904, T = 2)"), moe::Error);
}

// =============================================================================================
TEST_CASE("nn cross_entropy: losses are -log softmax at the target; the mean skips ignored rows") {
  const Index N = 9, V = 7;
  ref::Matrix logits = ref::randn<double>(N, V, 61, 3.0);
  const auto targets = random_tokens(N, V, 62, /*with_ignored=*/true);
  const auto r = run_cross_entropy<double>(logits, targets, 1.0, 1);
  double total = 0;
  Index valid = 0;
  for (Index n = 0; n < N; ++n) {
    const auto t = targets[std::size_t(n)];
    if (t < 0) {
      CHECK(r.losses[n] == 0);
      CHECK((r.dlogits.row(n).array() == 0).all());
      continue;
    }
    double sum = 0;  // std::exp: Eigen's packet exp on doubles trips GCC 12's -Wuninitialized in its AVX-512 headers
    for (Index j = 0; j < logits.cols(); ++j) sum += std::exp(logits(n, j));
    const double expected = -std::log(std::exp(logits(n, t)) / sum);
    CHECK(r.losses[n] == doctest::Approx(expected).epsilon(1e-12));
    total += expected, ++valid;
  }
  CHECK(valid < N);
  CHECK(r.loss == doctest::Approx(total / double(valid)).epsilon(1e-12));

  SUBCASE("stable for large logits") {
    ref::Matrix shifted = logits.array() + 1000.0;
    const auto s = run_cross_entropy<double>(shifted, targets, 1.0, 1);
    CHECK(s.loss == doctest::Approx(r.loss).epsilon(1e-10));
    CHECK(ref::rel_error(s.dlogits, r.dlogits) < 1e-10);
  }
  SUBCASE("every row ignored: zero loss, zero gradient") {
    const Vec<std::int32_t> none(std::size_t(N), -1);
    const auto z = run_cross_entropy<double>(logits, none, 1.0, 1);
    CHECK(z.loss == 0);
    CHECK(z.dlogits.isZero(0));
  }
}

TEST_CASE("nn cross_entropy: finite differences of the mean loss; dlogits may alias logits") {
  const Index N = 6, V = 5;
  ref::Matrix logits = ref::randn<double>(N, V, 63, 2.0);
  const auto targets = random_tokens(N, V, 64, /*with_ignored=*/true);
  const double dloss = 1.7;
  const auto r = run_cross_entropy<double>(logits, targets, dloss, 1);
  Vec<double> losses(static_cast<std::size_t>(N));
  auto loss = [&] { return dloss * moe::nn::cross_entropy_forward<double>(logits, targets, losses.data(), 1); };
  CHECK(rel(widen(r.dlogits.data(), N * V), numeric_gradient(logits.data(), N * V, loss)) < kFiniteDifferenceTolerance);

  ref::Matrix in_place = logits;
  moe::nn::cross_entropy_backward<double>(in_place, targets, dloss, in_place, 1);
  CHECK(in_place == r.dlogits);
}

TEST_CASE("nn cross_entropy: float32 matches float64 on the same inputs") {
  const Index N = 31, V = 57;
  const Mat<float> logits = ref::randn<float>(N, V, 65, 2.0);
  const auto targets = random_tokens(N, V, 66, true);
  const auto f = run_cross_entropy<float>(logits, targets, 1.0, 2);
  const auto d = run_cross_entropy<double>(logits.cast<double>(), targets, 1.0, 2);
  CHECK(f.loss == doctest::Approx(d.loss).epsilon(kFp32Tolerance));
  CHECK(rel(widen(f.losses), d.losses) < kFp32Tolerance);
  CHECK(ref::rel_error(f.dlogits, d.dlogits) < kFp32Tolerance);
}

TEST_CASE("nn cross_entropy: 1 and 2 threads give the same bits") {
  const Index N = 300, V = 100;  // row chunks of 163: partial
  const Mat<float> logits = ref::randn<float>(N, V, 67, 2.0);
  const auto targets = random_tokens(N, V, 68, true);
  const auto a = run_cross_entropy<float>(logits, targets, 1.0, 1), b = run_cross_entropy<float>(logits, targets, 1.0, 2);
  CHECK(a.loss == b.loss);
  CHECK(same_bits(a.losses, b.losses));
  CHECK(same_bits(a.dlogits, b.dlogits));
}

TEST_CASE("nn cross_entropy: targets outside [-1, V) and bad shapes throw") {
  const Mat<float> logits = ref::randn<float>(3, 4, 69);
  Vec<float> losses(3);
  Mat<float> dlogits(3, 4);
  const Vec<std::int32_t> high{0, 4, 1}, low{0, 1, -2}, short_targets{0, 1};
  CHECK_THROWS_WITH_AS(moe::nn::cross_entropy_forward<float>(logits, high, losses.data(), 1),
                       doctest::Contains("target 4 of row 1 is outside [0, 4)"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::cross_entropy_backward<float>(logits, low, 1.0, dlogits, 1),
                       doctest::Contains("target -2 of row 2"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::cross_entropy_forward<float>(logits, short_targets, losses.data(), 1),
                       doctest::Contains("targets has 2 entries, logits has 3 rows"), moe::Error);
  Mat<float> wrong(3, 5);
  const Vec<std::int32_t> ok{0, 1, 2};
  CHECK_THROWS_WITH_AS(moe::nn::cross_entropy_backward<float>(logits, ok, 1.0, wrong, 1),
                       doctest::Contains("dlogits is [3, 5], logits is [3, 4]"), moe::Error);
}

// =============================================================================================
namespace {

// A model's parameters for the optimizer tests: a decayed matrix, an undecayed bias, a frozen
// buffer (with a gradient that must be ignored) and one without a gradient.
template <class S>
struct Model {
  Vec<S> w{0.5, -1.0, 2.0, 0.25, -0.75, 1.5}, w_grad{0.1, -0.2, 0.3, 0.0, 0.05, -0.4};
  Vec<S> b{0.3, -0.1, 0.2}, b_grad{0.01, 0.02, -0.03};
  Vec<S> frozen{1.0, 2.0, 3.0, 4.0}, frozen_grad{1.0, 1.0, 1.0, 1.0};
  Vec<S> no_grad{5.0, 6.0};
  std::vector<moe::ParamRef<S>> params() {
    return {{"w", {2, 3}, w, w_grad, true},
            {"b", {3}, b, b_grad, true},
            {"frozen", {2, 2}, frozen, frozen_grad, false},
            {"no_grad", {2}, no_grad, {}, true}};
  }
};

// torch.optim.AdamW's single-tensor update for one element, in double.
void adamw_reference(double& p, double g, double& m, double& v, int step, double lr, const moe::nn::AdamWConfig& c,
                     bool decay) {
  if (decay) p *= 1 - lr * c.weight_decay;
  m = c.beta1 * m + (1 - c.beta1) * g;
  v = c.beta2 * v + (1 - c.beta2) * g * g;
  const double m_hat = m / (1 - std::pow(c.beta1, step)), v_hat = v / (1 - std::pow(c.beta2, step));
  p -= lr * m_hat / (std::sqrt(v_hat) + c.eps);
}

template <class S>
void check_adamw_against_reference(double tolerance) {
  const moe::nn::AdamWConfig config{.lr = 1e-2, .weight_decay = 0.1};
  Model<S> model;
  moe::nn::AdamW<S> optimizer(config);
  Vec<double> w(model.w.begin(), model.w.end()), b(model.b.begin(), model.b.end());
  Vec<double> mw(6, 0), vw(6, 0), mb(3, 0), vb(3, 0);
  const double lrs[2] = {1e-2, 5e-3};  // a scheduled rate
  for (int step = 1; step <= 2; ++step) {
    auto params = model.params();
    optimizer.step(params, lrs[step - 1]);
    for (int i = 0; i < 6; ++i) adamw_reference(w[i], double(model.w_grad[i]), mw[i], vw[i], step, lrs[step - 1], config, true);
    for (int i = 0; i < 3; ++i) adamw_reference(b[i], double(model.b_grad[i]), mb[i], vb[i], step, lrs[step - 1], config, false);
    // The gradients change between steps, as in training.
    for (S& g : model.w_grad) g *= S(-0.5);
    for (S& g : model.b_grad) g += S(0.01);
  }
  CHECK(optimizer.step_count() == 2);
  CHECK(rel(widen(model.w), w) < tolerance);
  CHECK(rel(widen(model.b), b) < tolerance);
  CHECK(rel(widen(optimizer.m()[0]), mw) < tolerance);
  CHECK(rel(widen(optimizer.v()[1]), vb) < tolerance);
  CHECK(model.frozen == Vec<S>{1.0, 2.0, 3.0, 4.0});  // frozen: untouched despite its gradient
  CHECK(model.no_grad == Vec<S>{5.0, 6.0});           // no gradient: untouched
  CHECK(optimizer.m()[2].empty());
  CHECK(optimizer.m()[3].empty());
}

}  // namespace

TEST_CASE("nn adamw: two steps match torch.optim.AdamW's formulas; frozen parameters untouched") {
  check_adamw_against_reference<double>(1e-14);  // same formulas, rounding apart
  check_adamw_against_reference<float>(1e-6);    // a few float32 roundings
}

// Parameters long enough for the update's SIMD packets, with every tail length near a packet's
// and one that spans two of the optimizer's pieces: three steps against the double reference,
// per element, and the same bits on 1 and 2 threads. Values and steps are of one size (lr 1e-2,
// values ~1e-2), so an error in the update shows at the values' precision.
template <class S>
void check_adamw_long_parameters(double tolerance) {
  const moe::nn::AdamWConfig config{.lr = 1e-2, .weight_decay = 0.1};
  const Index sizes[] = {1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 70, moe::nn::detail::kOptimizerPiece + 37};
  struct Param {
    Vec<S> value, grad;
    Vec<double> reference, m, v;
  };
  std::vector<Param> one_thread, two_threads;
  for (std::size_t i = 0; i < std::size(sizes); ++i) {
    const Vec<S> value = random_vector<S>(sizes[i], unsigned(100 + i), 1e-2);
    one_thread.push_back({value, Vec<S>(value.size()), widen(value), Vec<double>(value.size(), 0),
                          Vec<double>(value.size(), 0)});
  }
  two_threads = one_thread;
  auto params = [&](std::vector<Param>& ps) {
    std::vector<moe::ParamRef<S>> refs;
    for (std::size_t i = 0; i < ps.size(); ++i) {
      const bool matrix = i % 2 == 0;  // matrices decay, vectors do not
      const std::vector<Index> shape = matrix ? std::vector<Index>{1, sizes[i]} : std::vector<Index>{sizes[i]};
      std::string name = "p";  // appended: GCC 12 warns (-Wrestrict, a false positive) on "p" + std::string
      name += std::to_string(i);
      refs.push_back({name, shape, ps[i].value, ps[i].grad, true});
    }
    return refs;
  };
  moe::nn::AdamW<S> serial(config), parallel(config);
  serial.set_threads(1);
  parallel.set_threads(2);
  for (int step = 1; step <= 3; ++step) {
    for (std::size_t i = 0; i < one_thread.size(); ++i) {
      // Gradients of mixed sizes, some zero: the second moment then spans many magnitudes.
      Vec<S> grad = random_vector<S>(sizes[i], unsigned(1000 * step + i), 1e-3);
      for (std::size_t j = 0; j < grad.size(); j += 5) grad[j] = S(0);
      one_thread[i].grad = two_threads[i].grad = grad;
      for (std::size_t j = 0; j < grad.size(); ++j)
        adamw_reference(one_thread[i].reference[j], double(grad[j]), one_thread[i].m[j], one_thread[i].v[j], step,
                        config.lr, config, i % 2 == 0);
    }
    auto serial_params = params(one_thread);
    serial.step(serial_params);
    auto parallel_params = params(two_threads);
    parallel.step(parallel_params);
  }
  for (std::size_t i = 0; i < one_thread.size(); ++i) {
    CAPTURE(sizes[i]);
    double worst = 0;
    for (std::size_t j = 0; j < one_thread[i].value.size(); ++j)
      worst = std::max(worst, std::fabs(double(one_thread[i].value[j]) - one_thread[i].reference[j]) /
                                  std::max(std::fabs(one_thread[i].reference[j]), 1e-3));
    CHECK(worst < tolerance);
    CHECK(rel(widen(serial.m()[i]), one_thread[i].m) < tolerance);
    CHECK(rel(widen(serial.v()[i]), one_thread[i].v) < tolerance);
    CHECK(same_bits(one_thread[i].value, two_threads[i].value));
    CHECK(same_bits(serial.v()[i], parallel.v()[i]));
  }
}

TEST_CASE("nn adamw: long parameters (SIMD packets, every tail, two pieces) match the reference per element") {
  check_adamw_long_parameters<double>(1e-12);
  check_adamw_long_parameters<float>(2e-5);
}

// The update in SIMD packets gives the bits of the same update one element at a time (explicit
// multiply-adds on both paths), at every length around a packet's.
template <class S>
void check_adamw_packets_equal_elements() {
  const auto k = moe::nn::adamw_step<S>({.lr = 6e-4, .weight_decay = 0.1}, 6e-4, 2);
  for (Index n = 1; n <= 70; ++n) {
    CAPTURE(n);
    const Vec<S> value = random_vector<S>(n, unsigned(n)), grad = random_vector<S>(n, unsigned(n + 100), 1e-3);
    Vec<S> m = random_vector<S>(n, unsigned(n + 200), 1e-3), v = random_vector<S>(n, unsigned(n + 300), 1e-6);
    for (S& x : v) x = std::abs(x);
    Vec<S> packed = value, packed_m = m, packed_v = v, single = value, single_m = m, single_v = v;
    for (int step = 0; step < 3; ++step) {
      moe::nn::detail::adamw_update(packed.data(), grad.data(), packed_m.data(), packed_v.data(), n, k.decay, k);
      for (Index j = 0; j < n; ++j)
        moe::nn::detail::adamw_update_at<S>(j, single.data(), grad.data(), single_m.data(), single_v.data(), k.decay,
                                            k);
    }
    CHECK(same_bits(packed, single));
    CHECK(same_bits(packed_m, single_m));
    CHECK(same_bits(packed_v, single_v));
  }
}

TEST_CASE("nn adamw: the SIMD update gives the bits of the same update element by element") {
  check_adamw_packets_equal_elements<float>();
  check_adamw_packets_equal_elements<double>();
}

TEST_CASE("nn adamw: weight decay applies to matrices only, not to 1-D parameters") {
  Model<double> model;
  std::fill(model.w_grad.begin(), model.w_grad.end(), 0.0);  // zero gradient: only decay can move p
  std::fill(model.b_grad.begin(), model.b_grad.end(), 0.0);
  const Vec<double> w0 = model.w, b0 = model.b;
  moe::nn::AdamW<double> optimizer({.lr = 0.1, .weight_decay = 0.5});
  auto params = model.params();
  optimizer.step(params);  // the config's lr
  for (std::size_t i = 0; i < w0.size(); ++i) CHECK(model.w[i] == doctest::Approx(w0[i] * (1 - 0.1 * 0.5)).epsilon(1e-15));
  CHECK(model.b == b0);
}

TEST_CASE("nn adamw: options and a step's rate that are not finite, or eps = 0, are refused before anything changes") {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH_AS(moe::nn::AdamW<float>({.lr = inf}), doctest::Contains("lr must be finite and >= 0, got inf"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::AdamW<float>({.eps = 0}), doctest::Contains("eps must be finite and > 0 (in float), got 0"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::AdamW<double>({.eps = 1e-50}), doctest::Contains("eps must be finite and > 0 (in float)"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::AdamW<float>({.weight_decay = nan}), doctest::Contains("weight_decay must be finite"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(moe::nn::AdamW<float>({.beta2 = 1}), doctest::Contains("betas must lie in [0, 1)"), moe::Error);
  Model<float> model;
  const Vec<float> w0 = model.w;
  moe::nn::AdamW<float> optimizer;
  auto params = model.params();
  for (const double lr : {nan, -1e-3, inf})
    CHECK_THROWS_WITH_AS(optimizer.step(params, lr), doctest::Contains("the step's learning rate must be finite and >= 0"),
                         moe::Error);
  CHECK(optimizer.step_count() == 0);
  CHECK(same_bits(model.w, w0));
  CHECK_NOTHROW(optimizer.step(params, 0.0));  // a zero rate (a schedule's end) is a step
}

TEST_CASE("nn adamw: a parameter listed twice (shared values) and a step count at int's limit are refused") {
  Model<float> model;
  const Vec<float> w0 = model.w;
  auto params = model.params();
  auto tied = params;
  tied.push_back(tied[0]);
  tied.back().name = "w again";
  moe::nn::AdamW<float> optimizer;
  CHECK_THROWS_WITH_AS(optimizer.step(tied), doctest::Contains("parameters 0 'w' and 4 'w again' share values"),
                       moe::Error);
  auto overlapping = params;  // a view into the middle of w
  overlapping.push_back({"part of w", {2}, std::span<float>(model.w).subspan(1, 2), std::span<float>(model.b_grad).first(2), true});
  CHECK_THROWS_WITH_AS(optimizer.step(overlapping), doctest::Contains("share values"), moe::Error);
  CHECK(optimizer.step_count() == 0);
  CHECK(same_bits(model.w, w0));
  // Clipping would count the tied gradient twice and scale it twice.
  const Vec<float> w_grad0 = model.w_grad;
  CHECK_THROWS_WITH_AS(moe::nn::clip_grad_norm(tied, 1e-3),
                       doctest::Contains("clip_grad_norm: parameters 0 'w' and 4 'w again' share gradients"), moe::Error);
  CHECK(same_bits(model.w_grad, w_grad0));
  auto frozen = tied;  // a frozen duplicate is not updated: taken
  frozen.back().trainable = false;
  CHECK_NOTHROW(optimizer.step(frozen));
  moe::nn::AdamW<float> at_limit;
  at_limit.set_state(std::numeric_limits<int>::max(), {}, {});
  CHECK_THROWS_WITH_AS(at_limit.step(params), doctest::Contains("the step count 2147483647 is at int's limit"),
                       moe::Error);
  CHECK(at_limit.step_count() == std::numeric_limits<int>::max());
}

TEST_CASE("nn adamw: a changed parameter list throws; saved state resumes the same bits") {
  Model<float> model;
  moe::nn::AdamW<float> optimizer;
  auto params = model.params();
  optimizer.step(params);
  auto longer = model.params();
  Vec<float> extra(2), extra_grad(2);
  longer.push_back({"extra", {2}, extra, extra_grad, true});
  CHECK_THROWS_WITH_AS(optimizer.step(longer), doctest::Contains("the parameter list has 5 entries, the first step had 4"),
                       moe::Error);
  auto resized = model.params();
  resized[1].value = resized[1].value.first(2);
  resized[1].grad = resized[1].grad.first(2);
  CHECK_THROWS_WITH_AS(optimizer.step(resized), doctest::Contains("parameter 1 'b' has 2 values, it had 3"), moe::Error);

  // Three steps straight, or two, a save, a fresh optimizer restored, and the third.
  Model<float> straight, resumed;
  moe::nn::AdamW<float> a;
  {
    moe::nn::AdamW<float> before;
    for (int i = 0; i < 2; ++i) {
      auto ps = straight.params();
      a.step(ps);
      auto pr = resumed.params();
      before.step(pr);
    }
    moe::nn::AdamW<float> after;
    after.set_state(before.step_count(), before.m(), before.v());
    auto pr = resumed.params();
    after.step(pr);
  }
  auto ps = straight.params();
  a.step(ps);
  CHECK(same_bits(straight.w, resumed.w));
  CHECK(same_bits(straight.b, resumed.b));
}

TEST_CASE("nn adamw: restored state and gradients that do not fit the list throw before anything changes") {
  Model<float> model;
  const Vec<float> w0 = model.w;
  auto params = model.params();
  auto short_grad = model.params();
  short_grad[0].grad = short_grad[0].grad.first(4);
  moe::nn::AdamW<float> fresh;
  CHECK_THROWS_WITH_AS(fresh.step(short_grad), doctest::Contains("parameter 0 'w' has 6 values but 4 gradients"),
                       moe::Error);
  CHECK(fresh.step_count() == 0);
  CHECK(fresh.m().empty());  // nothing sized yet
  CHECK_THROWS_WITH_AS(fresh.set_state(-1, {}, {}), doctest::Contains("step count must be >= 0, got -1"), moe::Error);
  CHECK_THROWS_WITH_AS(fresh.set_state(1, {{1.f}}, {}), doctest::Contains("1 first moments but 0 second moments"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(fresh.set_state(1, {{1.f}}, {{1.f, 2.f}}),
                       doctest::Contains("moments of parameter 0 have sizes 1 and 2"), moe::Error);
  CHECK(fresh.step_count() == 0);

  moe::nn::AdamW<float> too_few;
  too_few.set_state(3, {{}, {}}, {{}, {}});
  CHECK_THROWS_WITH_AS(too_few.step(params), doctest::Contains("the restored moments hold 2 parameters, the list has 4"),
                       moe::Error);
  CHECK(too_few.step_count() == 3);
  CHECK(too_few.m().size() == 2);

  moe::nn::AdamW<float> wrong_size;
  wrong_size.set_state(1, {{}, {1.f, 2.f}, {}, {}}, {{}, {1.f, 2.f}, {}, {}});
  CHECK_THROWS_WITH_AS(wrong_size.step(params),
                       doctest::Contains("restored moments of parameter 1 'b' have 2 entries, the parameter has 3"),
                       moe::Error);
  CHECK(wrong_size.m()[0].empty());  // not sized for the rejected list
  CHECK(model.w == w0);  // no step was taken

  // Empty entries are parameters not updated yet: their first step starts from zero moments, as a
  // fresh optimizer's does.
  Model<float> other;
  moe::nn::AdamW<float> restored, straight;
  restored.set_state(0, {{}, {}, {}, {}}, {{}, {}, {}, {}});
  restored.step(params);
  auto other_params = other.params();
  straight.step(other_params);
  CHECK(same_bits(model.w, other.w));
  CHECK(same_bits(model.b, other.b));
  CHECK(restored.m()[2].empty());  // frozen: never sized
}

TEST_CASE("nn clip_grad_norm: the global norm over trainable gradients; scaled only above max_norm") {
  Model<double> model;
  model.w_grad = {3, 0, 0, 0, 0, 0};
  model.b_grad = {0, 4, 12};  // norm 13; the frozen parameter's gradient is not counted
  auto params = model.params();
  CHECK(moe::nn::clip_grad_norm(params, 20.0) == 13.0);
  CHECK(model.w_grad[0] == 3.0);  // below max_norm: unchanged
  CHECK(moe::nn::clip_grad_norm(params, 6.5) == 13.0);
  const double scale = 6.5 / (13.0 + 1e-6);  // torch's clip coefficient
  CHECK(model.w_grad[0] == doctest::Approx(3 * scale).epsilon(1e-15));
  CHECK(model.b_grad[2] == doctest::Approx(12 * scale).epsilon(1e-15));
  CHECK(model.frozen_grad[0] == 1.0);
  CHECK_THROWS_AS(moe::nn::clip_grad_norm(params, 0.0), moe::Error);
}
