// Multi-head self-attention (moe/nn/attention.hpp): against a plain float64 reference, finite
// differences, causality, determinism across thread counts, the += convention, bad input.
#include <doctest/doctest.h>

#include <moe/nn/attention.hpp>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "reference.hpp"

using moe::Index;

namespace {

template <class S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct Shape {
  Index B, T, C, heads;
};

// The float64 reference, one (b, h, t) at a time: scores, mask, softmax, weighted sum; and its
// backward for loss = sum(out .* dout).
struct Reference {
  ref::Matrix out;             // [B*T, C]
  std::vector<double> att;     // [B, heads, T, T]
  ref::Matrix dqkv;            // [B*T, 3C]
};

Reference reference_attention(const ref::Matrix& qkv, Shape s, bool causal, const ref::Matrix& dout) {
  const auto [B, T, C, heads] = s;
  const Index hs = C / heads;
  const double scale = 1.0 / std::sqrt(double(hs));
  Reference r{ref::Matrix::Zero(B * T, C), std::vector<double>(B * heads * T * T, 0.0),
              ref::Matrix::Zero(B * T, 3 * C)};
  for (Index b = 0; b < B; ++b)
    for (Index h = 0; h < heads; ++h)
      for (Index t = 0; t < T; ++t) {
        const Index row = b * T + t, q = h * hs, k = C + h * hs, v = 2 * C + h * hs;
        const Index seen = causal ? t + 1 : T;
        double* p = &r.att[((b * heads + h) * T + t) * T];
        double max = -INFINITY;
        for (Index j = 0; j < seen; ++j) {
          double score = 0;
          for (Index d = 0; d < hs; ++d) score += qkv(row, q + d) * qkv(b * T + j, k + d);
          p[j] = score * scale;
          max = std::max(max, p[j]);
        }
        double sum = 0;
        for (Index j = 0; j < seen; ++j) sum += p[j] = std::exp(p[j] - max);
        for (Index j = 0; j < seen; ++j) p[j] /= sum;
        for (Index j = 0; j < seen; ++j)
          for (Index d = 0; d < hs; ++d) r.out(row, h * hs + d) += p[j] * qkv(b * T + j, v + d);

        // Backward: dp = dout . v, softmax backward, then the two sides of the score product.
        std::vector<double> dp(seen);
        double p_dot_dp = 0;
        for (Index j = 0; j < seen; ++j) {
          dp[j] = 0;
          for (Index d = 0; d < hs; ++d) {
            dp[j] += dout(row, h * hs + d) * qkv(b * T + j, v + d);
            r.dqkv(b * T + j, v + d) += p[j] * dout(row, h * hs + d);
          }
          p_dot_dp += p[j] * dp[j];
        }
        for (Index j = 0; j < seen; ++j) {
          const double dscore = p[j] * (dp[j] - p_dot_dp) * scale;
          for (Index d = 0; d < hs; ++d) {
            r.dqkv(row, q + d) += dscore * qkv(b * T + j, k + d);
            r.dqkv(b * T + j, k + d) += dscore * qkv(row, q + d);
          }
        }
      }
  return r;
}

template <class S>
struct Run {
  Mat<S> out;
  std::vector<S> att;
  Mat<S> dqkv;
};

// Forward, then backward into dqkv_start (zeros by default).
template <class S>
Run<S> run_attention(const Mat<S>& qkv, Shape s, bool causal, const Mat<S>& dout, int threads,
                     Mat<S> dqkv_start = {}) {
  Run<S> r{Mat<S>(s.B * s.T, s.C), std::vector<S>(s.B * s.heads * s.T * s.T), std::move(dqkv_start)};
  if (r.dqkv.size() == 0) r.dqkv = Mat<S>::Zero(s.B * s.T, 3 * s.C);
  moe::nn::attention_forward<S>(qkv, s.B, s.T, s.heads, causal, r.out, r.att.data(), threads);
  moe::nn::attention_backward<S>(dout, qkv, r.att.data(), s.B, s.T, s.heads, causal, r.dqkv, threads);
  return r;
}

// Sizes around the 64-row query block, T = 1, one head, one-wide heads, odd T.
const std::vector<Shape> kShapes{{1, 1, 4, 1},  {3, 1, 8, 2},   {2, 7, 12, 3},  {1, 33, 6, 6},
                                 {2, 64, 8, 2}, {1, 65, 16, 1}, {2, 130, 24, 4}};

// fp32 against float64: dot products of <= 130 terms and exp round to ~1e-6 relative.
constexpr double kAttentionFp32Tolerance = 1e-5;

}  // namespace

TEST_CASE("attention: fp32 forward and backward match the float64 reference, causal and bidirectional") {
  unsigned seed = 100;
  for (const Shape s : kShapes)
    for (const bool causal : {true, false}) {
      CAPTURE(s.B);
      CAPTURE(s.T);
      CAPTURE(s.C);
      CAPTURE(s.heads);
      CAPTURE(causal);
      const auto qkv = ref::randn(s.B * s.T, 3 * s.C, ++seed), dout = ref::randn(s.B * s.T, s.C, ++seed);
      const Run<float> r = run_attention<float>(qkv, s, causal, dout, 2);
      const Reference e = reference_attention(qkv.cast<double>(), s, causal, dout.cast<double>());
      CHECK(ref::rel_error(r.out, e.out) < kAttentionFp32Tolerance);
      CHECK(ref::rel_error(r.att, e.att) < kAttentionFp32Tolerance);
      CHECK(ref::rel_error(r.dqkv, e.dqkv) < kAttentionFp32Tolerance);
    }
}

TEST_CASE("attention: double matches the reference to rounding") {
  const Shape s{2, 70, 12, 3};
  for (const bool causal : {true, false}) {
    CAPTURE(causal);
    const auto qkv = ref::randn<double>(s.B * s.T, 3 * s.C, 7), dout = ref::randn<double>(s.B * s.T, s.C, 8);
    const Run<double> r = run_attention<double>(qkv, s, causal, dout, 2);
    const Reference e = reference_attention(qkv, s, causal, dout);
    CHECK(ref::rel_error(r.out, e.out) < 1e-12);
    CHECK(ref::rel_error(r.att, e.att) < 1e-12);
    CHECK(ref::rel_error(r.dqkv, e.dqkv) < 1e-12);
  }
}

TEST_CASE("attention: strided views (qkv, out and dqkv as column blocks of wider matrices)") {
  const Shape s{2, 9, 8, 2};
  const auto wide_qkv = ref::randn(s.B * s.T, 3 * s.C + 5, 11), dout = ref::randn(s.B * s.T, s.C, 12);
  const moe::ConstMatrixView<float> qkv = moe::ConstMatrixView<float>(wide_qkv).col_block(2, 3 * s.C);
  Mat<float> wide_out = Mat<float>::Constant(s.B * s.T, s.C + 3, 7.0f);
  Mat<float> wide_dqkv = Mat<float>::Zero(s.B * s.T, 3 * s.C + 4);
  std::vector<float> att(s.B * s.heads * s.T * s.T);
  const moe::MatrixView<float> out = moe::MatrixView<float>(wide_out).col_block(1, s.C);
  const moe::MatrixView<float> dqkv = moe::MatrixView<float>(wide_dqkv).col_block(3, 3 * s.C);
  moe::nn::attention_forward<float>(qkv, s.B, s.T, s.heads, true, out, att.data(), 2);
  moe::nn::attention_backward<float>(dout, qkv, att.data(), s.B, s.T, s.heads, true, dqkv, 2);

  const Reference e = reference_attention(wide_qkv.middleCols(2, 3 * s.C).cast<double>(), s, true,
                                          dout.cast<double>());
  CHECK(ref::rel_error(Mat<float>(wide_out.middleCols(1, s.C)), e.out) < kAttentionFp32Tolerance);
  CHECK(ref::rel_error(Mat<float>(wide_dqkv.middleCols(3, 3 * s.C)), e.dqkv) < kAttentionFp32Tolerance);
  CHECK((wide_out.col(0).array() == 7.0f).all());  // columns outside the views untouched
  CHECK((wide_out.rightCols(2).array() == 7.0f).all());
  CHECK((wide_dqkv.leftCols(3).array() == 0.0f).all());
  CHECK((wide_dqkv.rightCols(1).array() == 0.0f).all());
}

TEST_CASE("attention: dqkv matches central finite differences in double") {
  // loss = sum(out .* dout); eps 1e-6 leaves truncation ~1e-12 and cancellation ~1e-10.
  for (const bool causal : {true, false}) {
    CAPTURE(causal);
    const Shape s{2, 5, 8, 2};
    ref::Matrix qkv = ref::randn<double>(s.B * s.T, 3 * s.C, 21);
    const ref::Matrix dout = ref::randn<double>(s.B * s.T, s.C, 22);
    const Run<double> r = run_attention<double>(qkv, s, causal, dout, 1);
    const auto loss = [&] {
      ref::Matrix out(s.B * s.T, s.C);
      std::vector<double> att(s.B * s.heads * s.T * s.T);
      moe::nn::attention_forward<double>(qkv, s.B, s.T, s.heads, causal, out, att.data(), 1);
      return (out.array() * dout.array()).sum();
    };
    const double eps = 1e-6;
    ref::Matrix numeric(qkv.rows(), qkv.cols());
    for (Index i = 0; i < qkv.size(); ++i) {
      const double x = qkv.data()[i];
      qkv.data()[i] = x + eps;
      const double plus = loss();
      qkv.data()[i] = x - eps;
      const double minus = loss();
      qkv.data()[i] = x;
      numeric.data()[i] = (plus - minus) / (2 * eps);
    }
    CHECK(ref::rel_error(r.dqkv, numeric) < 1e-7);
  }
}

TEST_CASE("attention: causal outputs ignore later positions; masked probabilities are exactly 0") {
  const Shape s{2, 80, 12, 3};
  const auto qkv = ref::randn(s.B * s.T, 3 * s.C, 31);
  Mat<float> out(s.B * s.T, s.C);
  std::vector<float> att(s.B * s.heads * s.T * s.T);
  moe::nn::attention_forward<float>(qkv, s.B, s.T, s.heads, true, out, att.data(), 2);

  for (Index bh = 0; bh < s.B * s.heads; ++bh)
    for (Index t = 0; t < s.T; ++t) {
      const float* p = &att[(bh * s.T + t) * s.T];
      double sum = 0;
      bool masked_zero = true, in_range = true;
      for (Index j = 0; j < s.T; ++j) {
        if (j > t) masked_zero = masked_zero && p[j] == 0.0f && !std::signbit(p[j]);
        in_range = in_range && p[j] >= 0.0f && p[j] <= 1.0f;
        sum += p[j];
      }
      CHECK(masked_zero);
      CHECK(in_range);
      CHECK(std::abs(sum - 1.0) < 1e-5);  // fp32 rounding of <= 80 terms
    }

  // Perturb every q, k, v value of position t of sequence 1: nothing before t changes, and
  // sequence 0 not at all. Bidirectional attention, as a control, does change earlier rows.
  for (const Index t : {Index(0), Index(37), Index(64), s.T - 1}) {
    CAPTURE(t);
    Mat<float> bumped = qkv;
    bumped.row(s.T + t).array() += 0.5f;
    Mat<float> out2(s.B * s.T, s.C);
    std::vector<float> att2(att.size());
    moe::nn::attention_forward<float>(bumped, s.B, s.T, s.heads, true, out2, att2.data(), 2);
    CHECK(out2.topRows(s.T + t) == out.topRows(s.T + t));
    CHECK(out2.row(s.T + t) != out.row(s.T + t));
    if (t > 0) {
      Mat<float> both(s.B * s.T, s.C), both2(s.B * s.T, s.C);
      moe::nn::attention_forward<float>(qkv, s.B, s.T, s.heads, false, both, att2.data(), 2);
      moe::nn::attention_forward<float>(bumped, s.B, s.T, s.heads, false, both2, att2.data(), 2);
      CHECK(both2.row(s.T) != both.row(s.T));
    }
  }
}

TEST_CASE("attention: bidirectional probability rows sum to 1 over all T positions") {
  const Shape s{1, 50, 8, 2};
  const auto qkv = ref::randn(s.B * s.T, 3 * s.C, 41);
  Mat<float> out(s.B * s.T, s.C);
  std::vector<float> att(s.B * s.heads * s.T * s.T);
  moe::nn::attention_forward<float>(qkv, s.B, s.T, s.heads, false, out, att.data(), 2);
  for (Index row = 0; row < s.B * s.heads * s.T; ++row) {
    double sum = 0;
    bool positive = true;
    for (Index j = 0; j < s.T; ++j) sum += att[row * s.T + j], positive = positive && att[row * s.T + j] > 0;
    CHECK(positive);
    CHECK(std::abs(sum - 1.0) < 1e-5);
  }
}

TEST_CASE("attention: the same bits on 1 and 2 threads") {
  const auto same_bits = [](const auto& a, const auto& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(*a.data()) * std::size_t(a.size())) == 0;
  };
  for (const Shape s : {Shape{3, 150, 24, 4}, Shape{2, 7, 12, 3}})
    for (const bool causal : {true, false}) {
      CAPTURE(s.T);
      CAPTURE(causal);
      const auto qkv = ref::randn(s.B * s.T, 3 * s.C, 51), dout = ref::randn(s.B * s.T, s.C, 52);
      const Run<float> one = run_attention<float>(qkv, s, causal, dout, 1);
      const Run<float> two = run_attention<float>(qkv, s, causal, dout, 2);
      CHECK(same_bits(one.out, two.out));
      CHECK(same_bits(one.att, two.att));
      CHECK(same_bits(one.dqkv, two.dqkv));
      const auto qkv_d = ref::randn<double>(s.B * s.T, 3 * s.C, 53), dout_d = ref::randn<double>(s.B * s.T, s.C, 54);
      const Run<double> one_d = run_attention<double>(qkv_d, s, causal, dout_d, 1);
      const Run<double> two_d = run_attention<double>(qkv_d, s, causal, dout_d, 2);
      CHECK(same_bits(one_d.out, two_d.out));
      CHECK(same_bits(one_d.att, two_d.att));
      CHECK(same_bits(one_d.dqkv, two_d.dqkv));
    }
}

TEST_CASE("attention: backward adds into dqkv (+=)") {
  const Shape s{2, 70, 8, 2};
  for (const bool causal : {true, false}) {
    CAPTURE(causal);
    const auto qkv = ref::randn<double>(s.B * s.T, 3 * s.C, 61), dout = ref::randn<double>(s.B * s.T, s.C, 62);
    const Run<double> fresh = run_attention<double>(qkv, s, causal, dout, 2);
    const Run<double> onto_ones =
        run_attention<double>(qkv, s, causal, dout, 2, ref::Matrix::Ones(s.B * s.T, 3 * s.C));
    const ref::Matrix expected = (fresh.dqkv.array() + 1.0).matrix();
    CHECK(ref::rel_error(onto_ones.dqkv, expected) < 1e-13);  // only the order of additions differs
  }
}

TEST_CASE("attention: bad input throws moe::Error naming the problem") {
  const Shape s{2, 4, 6, 2};
  const auto qkv = ref::randn(s.B * s.T, 3 * s.C, 71), dout = ref::randn(s.B * s.T, s.C, 72);
  Mat<float> out(s.B * s.T, s.C), dqkv = Mat<float>::Zero(s.B * s.T, 3 * s.C);
  std::vector<float> att(s.B * s.heads * s.T * s.T);
  const auto forward = [&](moe::ConstMatrixView<float> x, Index B, Index T, Index heads, moe::MatrixView<float> y,
                           float* a, int threads) {
    moe::nn::attention_forward<float>(x, B, T, heads, true, y, a, threads);
  };
  using doctest::Contains;
  CHECK_THROWS_WITH_AS(forward(qkv, s.B, s.T, 4, out, att.data(), 1), Contains("C = 6 is not divisible by heads = 4"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(forward(qkv, s.B, 5, s.heads, out, att.data(), 1), Contains("qkv has 8 rows, expected B*T"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(forward(Mat<float>(8, 17), s.B, s.T, s.heads, out, att.data(), 1),
                       Contains("qkv has 17 columns"), moe::Error);
  Mat<float> narrow_out(8, 5), wide_dqkv(8, 17);
  CHECK_THROWS_WITH_AS(forward(qkv, s.B, s.T, s.heads, narrow_out, att.data(), 1),
                       Contains("out is [8, 5], expected [B*T, C] = [8, 6]"), moe::Error);
  CHECK_THROWS_WITH_AS(forward(qkv, s.B, s.T, s.heads, out, nullptr, 1), Contains("att"), moe::Error);
  CHECK_THROWS_WITH_AS(forward(qkv, s.B, s.T, 0, out, att.data(), 1), Contains("heads must be positive"), moe::Error);
  CHECK_THROWS_WITH_AS(forward(qkv, 0, s.T, s.heads, out, att.data(), 1), Contains("must be positive"), moe::Error);
  CHECK_THROWS_WITH_AS(forward(qkv, s.B, s.T, s.heads, out, att.data(), 0), Contains("thread count"), moe::Error);
  const Index big = Index(1) << 40;  // B * T = 2^80: refused before it is computed
  CHECK_THROWS_WITH_AS(forward(qkv, big, big, s.heads, out, att.data(), 1), Contains("B * T overflows"), moe::Error);

  forward(qkv, s.B, s.T, s.heads, out, att.data(), 1);
  CHECK_THROWS_WITH_AS(
      moe::nn::attention_backward<float>(dout, qkv, att.data(), s.B, s.T, s.heads, true, wide_dqkv, 1),
      Contains("dqkv is [8, 17], expected [B*T, 3C] = [8, 18]"), moe::Error);
  CHECK_THROWS_WITH_AS(
      moe::nn::attention_backward<float>(Mat<float>(8, 4), qkv, att.data(), s.B, s.T, s.heads, true, dqkv, 1),
      Contains("dout is [8, 4]"), moe::Error);
  CHECK_THROWS_WITH_AS(
      moe::nn::attention_backward<float>(dout, qkv, nullptr, s.B, s.T, s.heads, true, dqkv, 1),
      Contains("att"), moe::Error);
  CHECK((dqkv.array() == 0.0f).all());  // nothing written by a rejected call
}
