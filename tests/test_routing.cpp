// The routing contract (moe/routing.hpp): selection order, ties, weights, non-finite logits,
// dispatch order and capacity, and the statistics' math.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>

#include "moe/bfloat16.hpp"
#include "reference.hpp"

using moe::Index;
using moe::RoutingWeights;

namespace {
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct Routed {
  moe::RoutingPlan plan;
  std::vector<float> weights;
};

Routed route_rows(std::vector<std::vector<float>> rows, Index k, RoutingWeights mode = RoutingWeights::softmax_over_top_k,
                  double capacity = 0) {
  const Index T = Index(rows.size()), N = Index(rows[0].size());
  std::vector<float> flat;
  for (auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  Routed out;
  out.weights.resize(T * k);
  moe::route<float>(moe::ConstMatrixView<float>(flat.data(), T, N), k, mode, capacity, out.plan, out.weights);
  return out;
}

std::vector<int> chosen(const Routed& r, Index t) {
  const Index k = r.plan.top_k;
  return {r.plan.expert.begin() + t * k, r.plan.expert.begin() + (t + 1) * k};
}
}  // namespace

TEST_CASE("top-k: larger logits first, ties to the lower expert index") {
  auto r = route_rows({{0.1f, 3.f, -1.f, 2.f}, {1.f, 1.f, 1.f, 1.f}, {0.f, 5.f, 5.f, 1.f}}, 2);
  CHECK(chosen(r, 0) == std::vector<int>{1, 3});
  CHECK(chosen(r, 1) == std::vector<int>{0, 1});  // all equal: lowest indices
  CHECK(chosen(r, 2) == std::vector<int>{1, 2});  // tie at the top: 1 before 2
}

TEST_CASE("weights: softmax over the selected logits (paper eq. 2)") {
  auto r = route_rows({{0.5f, 2.f, -1.f, 1.f}}, 2);
  const double a = std::exp(2.0), b = std::exp(1.0);
  CHECK(r.weights[0] == doctest::Approx(a / (a + b)).epsilon(1e-6));
  CHECK(r.weights[1] == doctest::Approx(b / (a + b)).epsilon(1e-6));
}

TEST_CASE("weights: softmax_then_top_k keeps full-softmax probabilities, not renormalised") {
  const std::vector<float> z = {0.5f, 2.f, -1.f, 1.f};
  auto r = route_rows({z}, 2, RoutingWeights::softmax_then_top_k);
  double total = 0;
  for (float v : z) total += std::exp(double(v));
  CHECK(chosen(r, 0) == std::vector<int>{1, 3});
  CHECK(r.weights[0] == doctest::Approx(std::exp(2.0) / total).epsilon(1e-6));
  CHECK(r.weights[1] == doctest::Approx(std::exp(1.0) / total).epsilon(1e-6));
  CHECK(r.weights[0] + r.weights[1] < 1.f);
}

TEST_CASE("orderings: softmax_over_top_k equals softmax over all N, top-k, renormalised") {
  const auto z = ref::randn(64, 8, 11);
  std::vector<std::vector<float>> rows;
  for (Index t = 0; t < z.rows(); ++t) rows.emplace_back(z.row(t).data(), z.row(t).data() + 8);
  auto a = route_rows(rows, 3, RoutingWeights::softmax_over_top_k);
  auto b = route_rows(rows, 3, RoutingWeights::softmax_then_top_k);
  CHECK(a.plan.expert == b.plan.expert);  // same selection: softmax is monotonic
  for (Index t = 0; t < 64; ++t) {
    const float mass = b.weights[t * 3] + b.weights[t * 3 + 1] + b.weights[t * 3 + 2];
    for (Index j = 0; j < 3; ++j) CHECK(a.weights[t * 3 + j] == doctest::Approx(b.weights[t * 3 + j] / mass).epsilon(1e-5));
  }
}

TEST_CASE("non-finite logits: NaN never beats a number, weights finite and summing to 1") {
  auto r = route_rows({{kNaN, -kInf, 1.f, kNaN},     // NaN ranks below -inf
                       {kNaN, kNaN, kNaN, kNaN},      // no finite logit: lowest indices, equal weights
                       {kInf, 2.f, kInf, 0.f},      // +inf entries share the mass
                       {-kInf, -kInf, -kInf, -kInf},  // all -inf: equal weights
                       {kNaN, 3.f, kNaN, kNaN}},     // one number: it takes all the mass
                      2);
  CHECK(chosen(r, 0) == std::vector<int>{2, 1});
  CHECK(r.weights[0] == 1.f);
  CHECK(r.weights[1] == 0.f);
  CHECK(chosen(r, 1) == std::vector<int>{0, 1});
  CHECK(r.weights[2] == 0.5f);
  CHECK(r.weights[3] == 0.5f);
  CHECK(chosen(r, 2) == std::vector<int>{0, 2});
  CHECK(r.weights[4] == 0.5f);
  CHECK(r.weights[5] == 0.5f);
  CHECK(r.weights[6] == 0.5f);
  CHECK(chosen(r, 4) == std::vector<int>{1, 0});
  CHECK(r.weights[8] == 1.f);
  CHECK(r.weights[9] == 0.f);
  for (Index t = 0; t < 5; ++t) CHECK(r.weights[2 * t] + r.weights[2 * t + 1] == doctest::Approx(1.0));
  CHECK(r.plan.row_status[0] == moe::kRowHasNonFinite);
  CHECK(r.plan.row_status[1] == (moe::kRowHasNonFinite | moe::kRowNoFiniteLogit));
  CHECK(r.plan.row_status[2] == moe::kRowHasNonFinite);
  CHECK(r.plan.row_status[3] == (moe::kRowHasNonFinite | moe::kRowNoFiniteLogit));

  moe::RoutingStats stats(4);
  stats.accumulate(r.plan);
  CHECK(stats.rows_with_nonfinite == 5);
  CHECK(stats.rows_without_finite == 2);
}

TEST_CASE("non-finite logits: huge finite values do not overflow the softmax") {
  auto r = route_rows({{3e38f, -3e38f, 3e38f, 0.f}}, 3);
  CHECK(r.weights[0] == 0.5f);
  CHECK(r.weights[1] == 0.5f);
  CHECK(r.weights[2] == 0.f);
}

TEST_CASE("routing backward: softmax Jacobian over the selected logits, zero for non-finite rows") {
  const std::vector<float> z = {0.3f, 1.2f, -0.4f, 0.9f, kInf, 0.f, 1.f, 2.f};
  moe::RoutingPlan plan;
  std::vector<float> w(4);
  moe::route<float>(moe::ConstMatrixView<float>(z.data(), 2, 4), 2, RoutingWeights::softmax_over_top_k, 0, plan, w);
  const std::vector<float> dw = {0.7f, -0.2f, 1.f, 1.f};
  std::vector<float> dz(8, 0.f);
  for (Index t = 0; t < 2; ++t)
    moe::route_token_backward<float>(moe::ConstMatrixView<float>(z.data(), 2, 4), t, 2, RoutingWeights::softmax_over_top_k,
                                     plan, dw.data(), moe::MatrixView<float>(dz.data(), 2, 4));
  // Row 0 selects experts 1 and 3: dz_i = w_i (g_i - sum_j w_j g_j).
  const double mean = w[0] * 0.7 + w[1] * -0.2;
  CHECK(dz[1] == doctest::Approx(w[0] * (0.7 - mean)).epsilon(1e-6));
  CHECK(dz[3] == doctest::Approx(w[1] * (-0.2 - mean)).epsilon(1e-6));
  CHECK(dz[0] == 0.f);
  CHECK(dz[2] == 0.f);
  for (Index e = 4; e < 8; ++e) CHECK(dz[e] == 0.f);  // +inf row: zero gradient
}

TEST_CASE("dispatch: stable counting sort, first choices before second choices") {
  auto r = route_rows({{1.f, 0.f, 2.f}, {2.f, 1.f, 0.f}, {0.f, 2.f, 1.f}}, 2);
  // token 0 -> (2, 0), token 1 -> (0, 1), token 2 -> (1, 2)
  CHECK(r.plan.expert_offsets == std::vector<Index>{0, 2, 4, 6});
  // expert 0 rows: first choice of token 1 (slot 2), then second choice of token 0 (slot 1)
  CHECK(r.plan.slot_of_row == std::vector<int>{2, 1, 4, 3, 0, 5});
  for (Index s = 0; s < 6; ++s) CHECK(r.plan.slot_of_row[r.plan.row[s]] == s);
  CHECK(r.plan.dropped_slots == 0);
}

TEST_CASE("capacity: each expert keeps ceil(cf * T * k / N) slots, first choices first") {
  // 4 tokens all preferring expert 0 then 1; N = 4, k = 2, cf = 1 -> capacity 2.
  auto r = route_rows({{3.f, 2.f, 0.f, 0.f}, {3.f, 2.f, 0.f, 0.f}, {3.f, 2.f, 0.f, 0.f}, {3.f, 2.f, 0.f, 0.f}}, 2,
                      RoutingWeights::softmax_over_top_k, 1.0);
  CHECK(r.plan.capacity == 2);
  CHECK(r.plan.expert_offsets == std::vector<Index>{0, 2, 4, 4, 4});
  CHECK(r.plan.dropped_slots == 4);
  CHECK(r.plan.row[0] == 0);   // token 0 first choice kept
  CHECK(r.plan.row[2] == 1);   // token 1 first choice kept
  CHECK(r.plan.row[4] == -1);  // token 2 first choice dropped
  CHECK(r.plan.row[1] == 2);   // token 0 second choice kept
  CHECK(r.plan.row[7] == -1);
  CHECK(moe::expert_capacity(10, 2, 8, 1.25) == 4);  // ceil(3.125)
  CHECK(moe::expert_capacity(10, 2, 8, 0) == 20);     // dropless
}

TEST_CASE("stats: fractions, normalized entropy (eq. 6), max fraction and dead experts on hand-made counts") {
  const std::vector<std::int64_t> uniform = {5, 5, 5, 5};
  CHECK(moe::normalized_entropy(uniform) == doctest::Approx(1.0));
  CHECK(moe::max_fraction(uniform) == doctest::Approx(0.25));
  const std::vector<std::int64_t> two = {10, 10, 0, 0, 0, 0, 0, 0};  // the paper's "two-expert regime"
  CHECK(moe::normalized_entropy(two) == doctest::Approx(std::log(2.0) / std::log(8.0)));
  const std::vector<std::int64_t> skew = {6, 3, 1, 0};
  const double h = -(0.6 * std::log(0.6) + 0.3 * std::log(0.3) + 0.1 * std::log(0.1));
  CHECK(moe::normalized_entropy(skew) == doctest::Approx(h / std::log(4.0)));
  CHECK(moe::max_fraction(skew) == doctest::Approx(0.6));
  CHECK(moe::normalized_entropy(std::vector<std::int64_t>{7}) == 1.0);  // N = 1
  CHECK(moe::normalized_entropy(std::vector<std::int64_t>{0, 0}) == 0.0);

  // Accumulation over batches and reset.
  auto a = route_rows({{3.f, 2.f, 0.f, 0.f}, {0.f, 3.f, 2.f, 0.f}}, 2);
  auto b = route_rows({{0.f, 0.f, 3.f, 2.f}}, 1);
  moe::RoutingStats stats(4, 0);
  stats.accumulate(a.plan);
  stats.accumulate(b.plan);
  CHECK(stats.assignments == std::vector<std::int64_t>{1, 2, 2, 0});
  CHECK(stats.tokens == 3);
  CHECK(stats.slots == 5);
  CHECK(stats.dead_experts() == 1);
  CHECK(stats.max_fraction() == doctest::Approx(0.4));
  const std::vector<std::uint8_t> mask = {0, 1};
  moe::RoutingStats masked(4);
  masked.accumulate(a.plan, mask);
  CHECK(masked.assignments == std::vector<std::int64_t>{0, 1, 1, 0});
  stats.reset();
  CHECK(stats.tokens == 0);
  CHECK(stats.dead_experts() == 4);
}

TEST_CASE("stats: each expert's logit mean and standard deviation, over passes, a mask and non-finite logits") {
  // Two passes over more tokens than a chunk of the moments, against plain two-pass formulas in
  // long double over the finite logits of the counted tokens.
  const Index N = 3, T0 = 2 * moe::kLogitMomentChunk + 37, T1 = 5;
  std::vector<std::vector<float>> passes;
  std::vector<std::vector<std::uint8_t>> masks;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (const Index T : {T0, T1}) {
    std::vector<float> z(static_cast<std::size_t>(T * N));
    for (Index t = 0; t < T; ++t)
      for (Index e = 0; e < N; ++e) z[std::size_t(t * N + e)] = float(e) * 4.f - 3.f + (0.5f + float(e)) * normal(rng);
    std::vector<std::uint8_t> mask(static_cast<std::size_t>(T));
    for (Index t = 0; t < T; ++t) mask[std::size_t(t)] = t % 5 != 2;
    passes.push_back(z), masks.push_back(mask);
  }
  passes[0][3 * N + 1] = std::nanf(""), passes[0][4 * N + 2] = kInf, passes[0][5 * N + 0] = -kInf;  // left out
  passes[1][0] = kInf, passes[1][1] = kInf, passes[1][2] = kInf;                                      // token 0
  masks[1][0] = 1;
  moe::RoutingStats stats(N);
  for (std::size_t p = 0; p < passes.size(); ++p)
    stats.accumulate_logits(moe::ConstMatrixView<float>(passes[p].data(), Index(masks[p].size()), N), masks[p]);
  const std::vector<double> mean = stats.logit_means(), sd = stats.logit_stds();
  for (Index e = 0; e < N; ++e) {
    long double sum = 0, count = 0;
    std::vector<long double> values;
    for (std::size_t p = 0; p < passes.size(); ++p)
      for (std::size_t t = 0; t < masks[p].size(); ++t) {
        const float v = passes[p][t * std::size_t(N) + std::size_t(e)];
        if (masks[p][t] && std::isfinite(v)) values.push_back(v), sum += v, count += 1;
      }
    const long double m = sum / count;
    long double squares = 0;
    for (long double v : values) squares += (v - m) * (v - m);
    CAPTURE(e);
    CHECK(stats.logits[std::size_t(e)].count == double(values.size()));
    CHECK(mean[std::size_t(e)] == doctest::Approx(double(m)).epsilon(1e-12));
    CHECK(sd[std::size_t(e)] == doctest::Approx(double(std::sqrt(squares / count))).epsilon(1e-10));
  }
  CHECK(mean[2] > mean[0] + 6);  // the offsets made above are what the means show
  CHECK(sd[2] > sd[0] * 3);

  // bfloat16 logits read as their float values; an expert without a finite logit is NaN.
  const std::vector<moe::bfloat16> b = {moe::bfloat16(1.5f), moe::bfloat16(std::nanf("")), moe::bfloat16(-0.5f),
                                        moe::bfloat16(kInf)};
  moe::RoutingStats half(2);
  half.accumulate_logits(moe::ConstMatrixView<moe::bfloat16>(b.data(), 2, 2));
  CHECK(half.logit_means()[0] == 0.5);
  CHECK(half.logit_stds()[0] == 1.0);
  CHECK(std::isnan(half.logit_means()[1]));
  CHECK(std::isnan(half.logit_stds()[1]));

  // The chunks' order is the documented one: the same bits as summing the chunks by hand.
  moe::RoutingStats one(N);
  one.accumulate_logits(moe::ConstMatrixView<float>(passes[0].data(), T0, N), masks[0]);
  const moe::ConstMatrixView<float> z0(passes[0].data(), T0, N);
  for (Index e = 0; e < N; ++e) {
    moe::LogitMoment by_hand;
    for (Index begin = 0; begin < T0; begin += moe::kLogitMomentChunk)
      by_hand.add(moe::logit_moment(z0, masks[0].data(), e, begin, std::min(T0, begin + moe::kLogitMomentChunk)));
    CHECK(one.logits[std::size_t(e)].sum == by_hand.sum);
    CHECK(one.logits[std::size_t(e)].sum_squares == by_hand.sum_squares);
  }

  stats.reset();
  CHECK(stats.logits[0].count == 0);
  CHECK(std::isnan(stats.logit_means()[0]));
  CHECK_THROWS_WITH_AS(stats.accumulate_logits(moe::ConstMatrixView<float>(passes[1].data(), 3, 5)),
                       doctest::Contains("routing statistics hold 3 experts, the logits have 5 columns"), moe::Error);
  CHECK_THROWS_WITH_AS(stats.accumulate_logits(moe::ConstMatrixView<float>(passes[1].data(), 5, 3), masks[0]),
                       doctest::Contains("token mask has"), moe::Error);
}

TEST_CASE("aux losses: load balance (eq. 4) and z-loss values, gradients by finite differences") {
  const Index T = 6, N = 4, k = 2;
  auto z = ref::randn<double>(T, N, 5);
  const moe::AuxLossConfig aux{.load_balance = 0.3, .z_loss = 0.02};
  const std::vector<std::uint8_t> mask = {1, 1, 0, 1, 1, 1};
  auto losses = [&](const ref::Matrix& logits, moe::RoutingPlan* plan_out = nullptr) {
    moe::RoutingPlan plan;
    std::vector<double> w(T * k);
    moe::route<double>(moe::ConstMatrixView<double>(logits.data(), T, N), k, RoutingWeights::softmax_over_top_k, 0, plan, w);
    if (plan_out) *plan_out = plan;
    return moe::aux_loss_forward<double>(moe::ConstMatrixView<double>(logits.data(), T, N), plan, aux, mask);
  };
  moe::RoutingPlan plan;
  const moe::AuxLosses value = losses(z, &plan);

  // Hand computation over the 5 counted tokens.
  std::vector<double> f(N, 0.0), P(N, 0.0);
  double zsum = 0;
  for (Index t = 0; t < T; ++t) {
    if (!mask[t]) continue;
    for (Index j = 0; j < k; ++j) f[plan.expert[t * k + j]] += 1.0 / (5 * k);
    double m = z.row(t).maxCoeff(), s = 0;
    for (Index e = 0; e < N; ++e) s += std::exp(z(t, e) - m);
    for (Index e = 0; e < N; ++e) P[e] += std::exp(z(t, e) - m) / s / 5;
    zsum += std::pow(m + std::log(s), 2);
  }
  double lb = 0;
  for (Index e = 0; e < N; ++e) lb += f[e] * P[e];
  CHECK(value.load_balance == doctest::Approx(0.3 * N * lb).epsilon(1e-12));
  CHECK(value.z_loss == doctest::Approx(0.02 * zsum / 5).epsilon(1e-12));

  ref::Matrix grad = ref::Matrix::Zero(T, N);
  moe::aux_loss_backward<double>(moe::ConstMatrixView<double>(z.data(), T, N), plan, aux, mask,
                                 moe::MatrixView<double>(grad.data(), T, N));
  const double eps = 1e-6;
  for (Index t = 0; t < T; ++t)
    for (Index e = 0; e < N; ++e) {
      ref::Matrix zp = z, zm = z;
      zp(t, e) += eps, zm(t, e) -= eps;
      const double fd = (losses(zp).total() - losses(zm).total()) / (2 * eps);  // f is constant nearby
      CHECK(grad(t, e) == doctest::Approx(fd).epsilon(1e-6).scale(1e-3));
    }
  for (Index e = 0; e < N; ++e) CHECK(grad(2, e) == 0.0);  // masked token
}

// route_one_token<kK> (select_top_k_fixed: k a compile-time constant, the selection in registers; the
// CUDA backend's routing kernel) against the runtime-k contract: the same experts, weights and status,
// bit for bit, on rows full of ties, NaN, +-inf and huge values, for every k in [1, 8] and N from k to 40.
template <Index kK>
void check_fixed_k_routing(std::mt19937_64& rng) {
  const float pool[] = {0.f, 1.f, -1.f, 1.f, 2.5f, kNaN, kInf, -kInf, 3e38f, -3e38f, 0.25f};
  std::uniform_int_distribution<int> pick(0, int(std::size(pool)) - 1);
  std::normal_distribution<float> normal;
  for (Index N = kK; N <= 40; ++N)
    for (int row = 0; row < 20; ++row) {
      std::vector<float> z(std::size_t(N), 0.f);
      for (float& v : z) v = row % 3 == 0 ? normal(rng) : pool[pick(rng)];
      for (const RoutingWeights mode : {RoutingWeights::softmax_over_top_k, RoutingWeights::softmax_then_top_k}) {
        std::int32_t chosen[kK], chosen_fixed[kK], chosen_dispatched[kK];
        float w[kK], w_fixed[kK], w_dispatched[kK];
        const auto status = moe::route_one_token(z.data(), N, kK, mode, chosen, w);
        const auto status_fixed = moe::route_one_token<kK>(z.data(), N, kK, mode, chosen_fixed, w_fixed);
        // The CPU's path: k known at run time, dispatched to the unrolled selection.
        const auto status_dispatched =
            moe::route_one_token_unrolled(z.data(), N, kK, mode, chosen_dispatched, w_dispatched);
        CAPTURE(N);
        CAPTURE(row);
        REQUIRE(status == status_fixed);
        REQUIRE(std::equal(chosen, chosen + kK, chosen_fixed));
        REQUIRE(std::memcmp(w, w_fixed, sizeof(w)) == 0);
        REQUIRE(status == status_dispatched);
        REQUIRE(std::equal(chosen, chosen + kK, chosen_dispatched));
        REQUIRE(std::memcmp(w, w_dispatched, sizeof(w)) == 0);
      }
    }
}

TEST_CASE("top-k with k fixed at compile time: the runtime selection's experts, weights and status, bit for bit") {
  std::mt19937_64 rng(2026);
  check_fixed_k_routing<1>(rng);
  check_fixed_k_routing<2>(rng);
  check_fixed_k_routing<3>(rng);
  check_fixed_k_routing<4>(rng);
  check_fixed_k_routing<5>(rng);
  check_fixed_k_routing<6>(rng);
  check_fixed_k_routing<7>(rng);
  check_fixed_k_routing<8>(rng);
}
