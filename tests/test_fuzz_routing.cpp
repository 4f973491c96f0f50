// Fuzzing the routing contract (moe/routing.hpp) with a fixed-seed generator: thousands of random
// shapes, both weight modes, with and without a capacity, on logits full of ties, NaN, infinities,
// huge values and denormals, in float and double. Every case checks the reference route and the
// CPU backend's route against invariants and against an independent re-derivation written here:
// selection by fully sorting (value, index) pairs, weights and their gradient by a long double
// softmax with the contract's non-finite rules, dispatch by replaying the choice-major order.
// A whole fp32 layer then runs forward and backward on inputs with NaN/inf rows.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "reference.hpp"

using moe::Index;
using moe::RoutingWeights;

namespace {

// ---- a small platform-independent generator (std:: distributions differ across libraries) ----
struct Rng {
  std::uint64_t state;
  explicit Rng(std::uint64_t seed) : state(seed) {}
  std::uint64_t next() {  // SplitMix64
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  Index range(Index lo, Index hi) { return lo + Index(next() % std::uint64_t(hi - lo + 1)); }  // [lo, hi]
  bool chance(double p) { return uniform() < p; }
  double normal() {
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

// ---- logits generator ---------------------------------------------------------------------------
enum Kind { kNormal, kTie, kNan, kPosInf, kNegInf, kHuge, kDenormal, kZero, kKinds };

// Probabilities of each kind of value for one case.
struct Profile {
  const char* name;
  double weight[kKinds];
};
constexpr Profile kProfiles[] = {
    {"normal", {1, 0, 0, 0, 0, 0, 0, 0}},
    {"ties", {0.1, 0.8, 0, 0, 0, 0, 0, 0.1}},
    {"mixed", {0.45, 0.2, 0.08, 0.05, 0.07, 0.06, 0.05, 0.04}},
    {"mostly non-finite", {0.1, 0.2, 0.3, 0.15, 0.25, 0, 0, 0}},
    {"extremes", {0.1, 0.05, 0.05, 0.05, 0.05, 0.4, 0.25, 0.05}},
    {"nan heavy", {0.3, 0.1, 0.6, 0, 0, 0, 0, 0}},
};

template <class S>
S draw_value(Rng& rng, const Profile& profile, double scale) {
  using L = std::numeric_limits<S>;
  double u = rng.uniform();
  int kind = 0;
  while (kind + 1 < kKinds && u >= profile.weight[kind]) u -= profile.weight[kind], ++kind;
  switch (kind) {
    case kNormal: return S(scale * rng.normal());
    case kTie: return S(rng.range(-2, 2));  // a small integer set: many exact ties
    case kNan: {
      const int which = int(rng.range(0, 2));
      return which == 0 ? L::quiet_NaN() : which == 1 ? -L::quiet_NaN() : L::signaling_NaN();
    }
    case kPosInf: return L::infinity();
    case kNegInf: return -L::infinity();
    case kHuge: {
      const S sign = rng.chance(0.5) ? S(1) : S(-1);
      switch (rng.range(0, 3)) {
        case 0: return sign * S(1e30);
        case 1: return sign * L::max();
        case 2: return sign * std::nextafter(L::max(), S(0));
        default: return sign * (L::max() / S(2));
      }
    }
    case kDenormal: {
      const S sign = rng.chance(0.5) ? S(1) : S(-1);
      return rng.chance(0.7) ? sign * L::denorm_min() * S(rng.range(1, 3)) : sign * (L::min() / S(2));
    }
    default: return rng.chance(0.5) ? S(0) : -S(0);
  }
}

// One row of N logits; sometimes a whole row of one special kind.
template <class S>
void draw_row(Rng& rng, const Profile& profile, double scale, S* z, Index N) {
  using L = std::numeric_limits<S>;
  if (rng.chance(0.12)) {
    const Index which = rng.range(0, 6);
    const S finite = S(rng.normal());
    for (Index e = 0; e < N; ++e) {
      switch (which) {
        case 0: z[e] = L::quiet_NaN(); break;
        case 1: z[e] = -L::infinity(); break;
        case 2: z[e] = L::infinity(); break;
        case 3: z[e] = finite; break;  // all tied
        case 4: z[e] = rng.chance(0.5) ? L::quiet_NaN() : -L::infinity(); break;  // nothing finite
        case 5: z[e] = L::quiet_NaN(); break;  // one finite value among NaN, below
        default: z[e] = rng.chance(0.5) ? L::infinity() : L::quiet_NaN(); break;
      }
    }
    if (which == 5) z[rng.range(0, N - 1)] = finite;
    return;
  }
  for (Index e = 0; e < N; ++e) z[e] = draw_value<S>(rng, profile, scale);
}

// ---- the contract, re-derived independently ----------------------------------------------------
// Sort key: numbers first, larger first; NaN last; equal keys keep index order (stable sort).
// -0 and +0 compare equal, as do any two NaNs.
template <class S>
std::vector<std::int32_t> sorted_order(const S* z, Index N) {
  std::vector<std::int32_t> order(N);
  std::iota(order.begin(), order.end(), 0);
  auto rank = [&](std::int32_t e) { return std::isnan(z[e]) ? 0 : 1; };
  std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
    if (rank(a) != rank(b)) return rank(a) > rank(b);
    if (rank(a) == 0) return false;  // NaN vs NaN: equal
    return (long double)z[a] > (long double)z[b];
  });
  return order;
}

// "a at index ia goes before b at index ib" in that order.
template <class S>
bool goes_before(S a, Index ia, S b, Index ib) {
  const int ra = std::isnan(a) ? 0 : 1, rb = std::isnan(b) ? 0 : 1;
  if (ra != rb) return ra > rb;
  if (ra == 1 && (long double)a != (long double)b) return (long double)a > (long double)b;
  return ia < ib;
}

// The contract's robust softmax in long double: NaN counts as -inf; a +inf maximum shares the mass
// among the +inf entries; no value above -inf shares it among all. Returns whether the max is finite.
bool independent_softmax(const std::vector<long double>& v, std::vector<long double>& p) {
  const long double inf = std::numeric_limits<long double>::infinity();
  p.assign(v.size(), 0.0L);
  long double m = -inf;
  for (long double x : v)
    if (!std::isnan(x)) m = std::max(m, x);
  if (std::isfinite(m)) {
    long double sum = 0;
    for (std::size_t i = 0; i < v.size(); ++i) sum += p[i] = std::isnan(v[i]) ? 0.0L : std::exp(v[i] - m);
    for (long double& x : p) x /= sum;
    return true;
  }
  std::size_t sharing = 0;
  for (long double x : v) sharing += (m == inf) ? (x == inf) : 1;
  for (std::size_t i = 0; i < v.size(); ++i)
    p[i] = ((m == inf) ? (v[i] == inf) : true) ? 1.0L / (long double)sharing : 0.0L;
  return false;
}

template <class S>
double weight_tolerance(Index count) {
  return std::is_same_v<S, float> ? 2e-7 * double(count + 16) : 2e-15 * double(count + 16);
}

// ---- failure collection: checks in the hot loop stay cheap, the first few failures are reported ----
struct Failures {
  int count = 0;
  std::ostringstream text;
  template <class... A>
  void add(const A&... parts) {
    if (++count <= 12) {
      text << "  - ";
      (text << ... << parts);
      text << "\n";
    }
  }
};
#define EXPECT(cond, ...)                        \
  do {                                           \
    if (!(cond)) fails.add(#cond, ": ", __VA_ARGS__); \
  } while (0)

std::string describe(const char* what, Index T, Index N, Index k, RoutingWeights mode, double cf) {
  std::ostringstream s;
  s << what << " T=" << T << " N=" << N << " k=" << k
    << " mode=" << (mode == RoutingWeights::softmax_over_top_k ? "softmax_over_top_k" : "softmax_then_top_k")
    << " capacity_factor=" << cf;
  return s.str();
}

// ---- dispatch invariants, shared by the routing fuzz and the layer runs -------------------------
void check_dispatch(const moe::RoutingPlan& plan, Index T, Index N, Index k, double cf, Failures& fails) {
  const Index slots = T * k;
  EXPECT(plan.tokens == T && plan.experts == N && plan.top_k == k, "plan shape ", plan.tokens, "x", plan.experts,
         " k=", plan.top_k);
  if (Index(plan.expert.size()) != slots || Index(plan.row.size()) != slots ||
      Index(plan.expert_offsets.size()) != N + 1 || Index(plan.chosen_count.size()) != N ||
      Index(plan.row_status.size()) != T) {
    fails.add("plan array sizes: expert ", plan.expert.size(), " row ", plan.row.size(), " offsets ",
              plan.expert_offsets.size(), " chosen_count ", plan.chosen_count.size(), " row_status ",
              plan.row_status.size());
    return;
  }
  for (Index s = 0; s < slots; ++s)
    if (plan.expert[s] < 0 || plan.expert[s] >= N) {
      fails.add("slot ", s, " selects expert ", plan.expert[s], " outside [0, ", N, ")");
      return;
    }

  const Index capacity = cf <= 0 ? slots : std::min<Index>(slots, Index(std::ceil(cf * double(slots) / double(N))));
  EXPECT(plan.capacity == capacity, "capacity ", plan.capacity, " expected ", capacity);

  std::vector<std::int64_t> count(N, 0);
  for (Index s = 0; s < slots; ++s) ++count[plan.expert[s]];
  EXPECT(plan.chosen_count == count, "chosen_count differs from the slots' choices");

  const auto& off = plan.expert_offsets;
  EXPECT(off[0] == 0, "offsets[0] = ", off[0]);
  Index expected_dropped = 0;
  for (Index e = 0; e < N; ++e) {
    EXPECT(off[e + 1] >= off[e], "offsets decrease at expert ", e);
    EXPECT(off[e + 1] - off[e] <= plan.capacity, "expert ", e, " holds ", off[e + 1] - off[e], " rows > capacity ",
           plan.capacity);
    EXPECT(off[e + 1] - off[e] == std::min<Index>(count[e], capacity), "expert ", e, " holds ", off[e + 1] - off[e],
           " rows, chosen ", count[e], " times, capacity ", capacity);
    expected_dropped += std::max<Index>(0, count[e] - capacity);
  }
  EXPECT(plan.dropped_slots == expected_dropped, "dropped ", plan.dropped_slots, " expected ", expected_dropped);
  EXPECT(plan.rows() == off.back(), "rows() ", plan.rows());
  EXPECT(off.back() == slots - plan.dropped_slots, "offsets.back() ", off.back(), " != T*k - dropped = ",
         slots - plan.dropped_slots);
  if (Index(plan.slot_of_row.size()) != off.back()) {
    fails.add("slot_of_row has ", plan.slot_of_row.size(), " entries, rows() = ", off.back());
    return;
  }

  // row / slot_of_row are inverse on kept slots, and each kept slot sits in its expert's block.
  Index kept = 0;
  for (Index s = 0; s < slots; ++s) {
    const Index r = plan.row[s];
    if (r == -1) continue;
    ++kept;
    if (r < 0 || r >= off.back()) {
      fails.add("slot ", s, " has row ", r, " outside [0, ", off.back(), ")");
      continue;
    }
    EXPECT(plan.slot_of_row[r] == s, "slot_of_row[row[", s, "]] = ", plan.slot_of_row[r]);
    const Index e = plan.expert[s];
    EXPECT(r >= off[e] && r < off[e + 1], "slot ", s, " of expert ", e, " in row ", r, " outside its block");
  }
  EXPECT(kept == off.back(), "kept slots ", kept, " != rows ", off.back());
  for (Index r = 0; r < off.back(); ++r) {
    const Index s = plan.slot_of_row[r];
    if (s < 0 || s >= slots) {
      fails.add("row ", r, " filled by slot ", s, " outside [0, ", slots, ")");
      continue;
    }
    EXPECT(plan.row[s] == r, "row[slot_of_row[", r, "]] = ", plan.row[s]);
  }
  // Within a block: (choice j, then token t) ascending.
  for (Index e = 0; e < N; ++e)
    for (Index r = off[e] + 1; r < off[e + 1]; ++r) {
      const Index a = plan.slot_of_row[r - 1], b = plan.slot_of_row[r];
      if (a < 0 || b < 0 || a >= slots || b >= slots) continue;
      const auto key = [&](Index s) { return (s % k) * T + s / k; };
      EXPECT(key(a) < key(b), "expert ", e, " rows ", r - 1, ", ", r, " hold slots ", a, ", ", b, " out of order");
    }
  // The kept slots are exactly each expert's first `capacity` slots in that order.
  std::vector<Index> filled(N, 0);
  for (Index j = 0; j < k; ++j)
    for (Index t = 0; t < T; ++t) {
      const Index s = t * k + j, e = plan.expert[s];
      const Index expected = filled[e] < capacity ? off[e] + filled[e]++ : -1;
      EXPECT(plan.row[s] == expected, "slot ", s, " (t=", t, ", j=", j, ") row ", plan.row[s], " expected ", expected);
    }
}

// Selection, status and weights of one routed row against the contract.
template <class S>
void check_row(const S* z, Index N, Index k, RoutingWeights mode, const std::int32_t* chosen, const S* w,
               std::uint8_t status, Index t, Failures& fails, bool brute_force) {
  // Indices in range, distinct.
  std::vector<char> selected(N, 0);
  for (Index j = 0; j < k; ++j) {
    if (chosen[j] < 0 || chosen[j] >= N) {
      fails.add("row ", t, " choice ", j, " = ", chosen[j], " outside [0, ", N, ")");
      return;
    }
    EXPECT(!selected[chosen[j]], "row ", t, " selects expert ", chosen[j], " twice");
    selected[chosen[j]] = 1;
  }
  // Order: each choice before the next; the last choice before every expert left out.
  for (Index j = 0; j + 1 < k; ++j)
    EXPECT(goes_before(z[chosen[j]], chosen[j], z[chosen[j + 1]], chosen[j + 1]), "row ", t, " choices ", j, " (",
           chosen[j], ": ", z[chosen[j]], ") and ", j + 1, " (", chosen[j + 1], ": ", z[chosen[j + 1]], ") out of order");
  Index numbers = 0, numbers_selected = 0;
  for (Index e = 0; e < N; ++e) {
    numbers += !std::isnan(z[e]);
    if (selected[e]) {
      numbers_selected += !std::isnan(z[e]);
      continue;
    }
    const Index last = chosen[k - 1];
    EXPECT(goes_before(z[last], last, z[e], e), "row ", t, " leaves out expert ", e, " (", z[e],
           ") which ranks above the selected ", last, " (", z[last], ")");
    if (!std::isnan(z[e])) EXPECT(!std::isnan(z[last]), "row ", t, ": NaN selected over ", z[e], " at ", e);
    if (z[e] == z[last] || (std::isnan(z[e]) && std::isnan(z[last])))
      EXPECT(e > last, "row ", t, ": tie between ", last, " and ", e, " went to the higher index");
  }
  EXPECT(numbers_selected == std::min(k, numbers), "row ", t, " selects ", numbers_selected, " numbers of ", numbers);
  if (brute_force) {
    const std::vector<std::int32_t> order = sorted_order(z, N);
    for (Index j = 0; j < k; ++j)
      EXPECT(chosen[j] == order[j], "row ", t, " choice ", j, " = ", chosen[j], ", full sort says ", order[j]);
  }

  // Row status.
  bool any_finite = false, any_nonfinite = false;
  for (Index e = 0; e < N; ++e) (std::isfinite(z[e]) ? any_finite : any_nonfinite) = true;
  const std::uint8_t expected_status =
      std::uint8_t((any_nonfinite ? moe::kRowHasNonFinite : 0) | (any_finite ? 0 : moe::kRowNoFiniteLogit));
  EXPECT(status == expected_status, "row ", t, " status ", int(status), " expected ", int(expected_status));

  // Weights: finite, in [0, 1], non-increasing, summing as documented, equal to the long double softmax.
  const Index count = mode == RoutingWeights::softmax_over_top_k ? k : N;
  const double tol = weight_tolerance<S>(count);
  double sum = 0;
  for (Index j = 0; j < k; ++j) {
    EXPECT(std::isfinite(w[j]) && w[j] >= 0 && w[j] <= 1 + tol, "row ", t, " weight ", j, " = ", w[j]);
    if (j > 0) EXPECT(w[j] <= w[j - 1] + tol, "row ", t, " weights increase at ", j, ": ", w[j - 1], ", ", w[j]);
    sum += double(w[j]);
  }
  if (mode == RoutingWeights::softmax_over_top_k || k == N)
    EXPECT(std::abs(sum - 1) <= tol, "row ", t, " weights sum to ", sum);
  else
    EXPECT(sum <= 1 + tol, "row ", t, " weights sum to ", sum, " > 1");
  std::vector<long double> values, p;
  if (mode == RoutingWeights::softmax_over_top_k)
    for (Index j = 0; j < k; ++j) values.push_back((long double)z[chosen[j]]);
  else
    values.assign(z, z + N);
  independent_softmax(values, p);
  for (Index j = 0; j < k; ++j) {
    const long double expected = mode == RoutingWeights::softmax_over_top_k ? p[j] : p[chosen[j]];
    EXPECT(std::abs((long double)w[j] - expected) <= tol, "row ", t, " weight ", j, " = ", w[j], ", expected ",
           double(expected));
  }
}

// Logit gradient of one row (route_token_backward) against dz_i = p_i (g_i - sum p g) in long double.
template <class S>
void check_row_gradient(const S* z, Index N, Index k, RoutingWeights mode, const std::int32_t* chosen, const S* dw,
                        const S* dz, Index t, Failures& fails) {
  std::vector<long double> values, p, g;
  std::vector<Index> expert_of;  // softmax entry -> expert
  if (mode == RoutingWeights::softmax_over_top_k) {
    for (Index j = 0; j < k; ++j) values.push_back((long double)z[chosen[j]]), g.push_back(dw[j]), expert_of.push_back(chosen[j]);
  } else {
    values.assign(z, z + N);
    g.assign(N, 0.0L);
    for (Index j = 0; j < k; ++j) g[chosen[j]] = dw[j];
    for (Index e = 0; e < N; ++e) expert_of.push_back(e);
  }
  const bool finite_max = independent_softmax(values, p);
  std::vector<long double> expected(N, 0.0L);
  long double dot = 0, scale = 1;
  for (std::size_t i = 0; i < p.size(); ++i) dot += p[i] * g[i], scale = std::max(scale, std::abs(g[i]));
  if (finite_max)
    for (std::size_t i = 0; i < p.size(); ++i)
      if (std::isfinite(values[i])) expected[expert_of[i]] += p[i] * (g[i] - dot);
  const double tol = (std::is_same_v<S, float> ? 1e-6 : 1e-14) * double(scale) * double(p.size() + 4);
  for (Index e = 0; e < N; ++e) {
    EXPECT(std::isfinite(dz[e]), "row ", t, " dlogit ", e, " = ", dz[e]);
    if (!std::isfinite(z[e])) EXPECT(dz[e] == 0, "row ", t, " dlogit of non-finite logit ", e, " = ", dz[e]);
    if (!finite_max) EXPECT(dz[e] == 0, "row ", t, " (non-finite max) dlogit ", e, " = ", dz[e]);
    EXPECT(std::abs((long double)dz[e] - expected[e]) <= tol, "row ", t, " dlogit ", e, " = ", dz[e], ", expected ",
           double(expected[e]));
  }
  if (mode == RoutingWeights::softmax_over_top_k) {
    std::vector<char> selected(N, 0);
    for (Index j = 0; j < k; ++j) selected[chosen[j]] = 1;
    for (Index e = 0; e < N; ++e)
      if (!selected[e]) EXPECT(dz[e] == 0, "row ", t, " dlogit of unselected expert ", e, " = ", dz[e]);
  }
}

template <class S>
using BackendOf = moe::cpu::BasicBackend<S>;

// One fuzz case: reference route, backend route, every check. Plans and buffers are reused across
// cases (passed in) so that stale state from a previous shape would show.
template <class S>
struct Workspace {
  moe::RoutingPlan plan, backend_plan;
  std::vector<S> weights, backend_weights, dweights;
  typename BackendOf<S>::Matrix dlogits, backend_dlogits;
};

template <class S>
void run_case(const std::vector<S>& logits, Index T, Index N, Index k, RoutingWeights mode, double cf,
              const std::vector<std::uint8_t>& mask, Rng& rng, Workspace<S>& ws, const BackendOf<S>& backend,
              Failures& fails) {
  const moe::ConstMatrixView<S> z(logits.data(), T, N);
  ws.weights.assign(T * k, S(-7));  // poison: every entry must be written
  moe::route<S>(z, k, mode, cf, ws.plan, ws.weights);
  check_dispatch(ws.plan, T, N, k, cf, fails);
  if (fails.count) return;  // the plan is not safe to index

  const bool brute_force = N <= 32;
  for (Index t = 0; t < T; ++t)
    check_row(z.row(t), N, k, mode, ws.plan.expert.data() + t * k, ws.weights.data() + t * k, ws.plan.row_status[t],
              t, fails, brute_force);

  // Statistics count what the plan says, over the tokens the mask keeps.
  moe::RoutingStats stats(N);
  stats.accumulate(ws.plan, mask);
  std::int64_t tokens = 0, nonfinite = 0, no_finite = 0, dropped = 0;
  std::vector<std::int64_t> assignments(N, 0);
  for (Index t = 0; t < T; ++t) {
    if (!mask.empty() && !mask[t]) continue;
    ++tokens;
    bool any_finite = false, any_nonfinite = false;
    for (Index e = 0; e < N; ++e) (std::isfinite(z(t, e)) ? any_finite : any_nonfinite) = true;
    nonfinite += any_nonfinite, no_finite += !any_finite;
    for (Index j = 0; j < k; ++j) ++assignments[ws.plan.expert[t * k + j]], dropped += ws.plan.row[t * k + j] < 0;
  }
  EXPECT(stats.tokens == tokens, "stats.tokens ", stats.tokens, " expected ", tokens);
  EXPECT(stats.slots == tokens * k, "stats.slots ", stats.slots);
  EXPECT(stats.dropped_slots == dropped, "stats.dropped_slots ", stats.dropped_slots, " expected ", dropped);
  EXPECT(stats.rows_with_nonfinite == nonfinite, "rows_with_nonfinite ", stats.rows_with_nonfinite, " expected ",
         nonfinite);
  EXPECT(stats.rows_without_finite == no_finite, "rows_without_finite ", stats.rows_without_finite, " expected ",
         no_finite);
  EXPECT(stats.assignments == assignments, "stats.assignments differ");
  if (mask.empty()) EXPECT(stats.assignments == ws.plan.chosen_count, "stats.assignments != chosen_count");

  // The backend's route: the same plan and the same weights, bit for bit.
  const moe::LayerConfig config{.hidden = 1, .ffn = 1, .experts = N, .top_k = k, .weights = mode, .capacity_factor = cf};
  backend.route(z, config, ws.backend_plan, ws.backend_weights);
  const moe::RoutingPlan &a = ws.plan, &b = ws.backend_plan;
  EXPECT(b.tokens == a.tokens && b.experts == a.experts && b.top_k == a.top_k, "backend plan shape");
  EXPECT(b.expert == a.expert, "backend selections differ");
  EXPECT(b.row == a.row, "backend rows differ");
  EXPECT(b.slot_of_row == a.slot_of_row, "backend slot_of_row differs");
  EXPECT(b.expert_offsets == a.expert_offsets, "backend offsets differ");
  EXPECT(b.chosen_count == a.chosen_count, "backend chosen_count differs");
  EXPECT(b.row_status == a.row_status, "backend row status differs");
  EXPECT(b.capacity == a.capacity && b.dropped_slots == a.dropped_slots, "backend capacity/drops differ");
  EXPECT(ws.backend_weights == ws.weights, "backend weights differ");

  // Routing backward from random finite weight gradients.
  ws.dweights.resize(T * k);
  for (S& g : ws.dweights) g = rng.chance(0.1) ? S(0) : S(rng.normal());
  BackendOf<S>::resize(ws.dlogits, T, N);
  ws.dlogits.setZero();
  const moe::MatrixView<S> dz(ws.dlogits);
  for (Index t = 0; t < T; ++t)
    moe::route_token_backward<S>(z, t, k, mode, ws.plan, ws.dweights.data(), dz);
  for (Index t = 0; t < T; ++t)
    check_row_gradient(z.row(t), N, k, mode, ws.plan.expert.data() + t * k, ws.dweights.data() + t * k, dz.row(t), t,
                       fails);
  // The backend's route_backward (no auxiliary losses) gives the same bits.
  BackendOf<S>::resize(ws.backend_dlogits, T, N);
  ws.backend_dlogits.setConstant(S(3));  // it must overwrite, not accumulate
  backend.route_backward(z, ws.backend_plan, config, ws.dweights, mask, ws.backend_dlogits);
  bool same = true;
  for (Index i = 0; i < T * N; ++i) same = same && ws.backend_dlogits.data()[i] == ws.dlogits.data()[i];
  EXPECT(same, "backend route_backward differs from route_token_backward");
}

template <class S>
void fuzz_routing(std::uint64_t seed, int cases) {
  Rng rng(seed);
  Workspace<S> ws;
  const BackendOf<S> backend(2);
  int failed_cases = 0;
  Index total_rows = 0, nonfinite_rows = 0, dropped_slots = 0;
  for (int c = 0; c < cases; ++c) {
    // Shapes: N mostly 1..64, sometimes up to 256; T mostly 0..64, rarely several token chunks.
    Index N = rng.chance(0.1) ? rng.range(65, 256) : rng.chance(0.25) ? rng.range(1, 8) : rng.range(1, 64);
    Index T = rng.chance(0.05) ? 0 : rng.range(1, 64);
    if (N <= 16 && rng.chance(0.03)) T = rng.range(257, 700);
    const Index k = rng.chance(0.3) ? 1 : rng.chance(0.1) ? N : rng.range(1, N);
    const RoutingWeights mode = rng.chance(0.5) ? RoutingWeights::softmax_over_top_k : RoutingWeights::softmax_then_top_k;
    double cf = 0;
    if (rng.chance(0.5)) cf = rng.chance(0.1) ? 1e-3 + rng.uniform() * 0.05 : 2.0 * (1.0 - rng.uniform());  // (0, 2]
    const Profile& profile = kProfiles[rng.range(0, std::size(kProfiles) - 1)];
    const double scale = std::pow(10.0, double(rng.range(-3, 4)));
    std::vector<S> logits(T * N);
    for (Index t = 0; t < T; ++t) draw_row<S>(rng, profile, scale, logits.data() + t * N, N);
    std::vector<std::uint8_t> mask;
    if (rng.chance(0.3))
      for (Index t = 0; t < T; ++t) mask.push_back(std::uint8_t(rng.chance(0.7)));

    Failures fails;
    run_case<S>(logits, T, N, k, mode, cf, mask, rng, ws, backend, fails);
    total_rows += T;
    for (std::uint8_t s : ws.plan.row_status) nonfinite_rows += (s & moe::kRowHasNonFinite) != 0;
    dropped_slots += ws.plan.dropped_slots;
    if (fails.count) {
      ++failed_cases;
      if (failed_cases <= 5)
        FAIL_CHECK(describe(std::is_same_v<S, float> ? "float fuzz case" : "double fuzz case", T, N, k, mode, cf),
                   " case=", c, " seed=", seed, " profile=", std::string(profile.name),
                   " (", fails.count, " failures)\n", fails.text.str());
    }
  }
  CHECK(failed_cases == 0);
  // The generator did reach the interesting regimes.
  CHECK(nonfinite_rows > total_rows / 10);
  CHECK(dropped_slots > 0);
}

}  // namespace

TEST_CASE("fuzz routing: random shapes and non-finite logits, float") { fuzz_routing<float>(0x5eed0001, 2500); }

TEST_CASE("fuzz routing: random shapes and non-finite logits, double") { fuzz_routing<double>(0x5eed0002, 1500); }

// Every row over a small value set, for N up to 4 (7^N rows), and random rows over it for N up to
// 12: the selection must equal the first k of a full stable sort, in float and double.
namespace {
template <class S>
void brute_force_selection() {
  using L = std::numeric_limits<S>;
  const S values[] = {L::quiet_NaN(), -L::infinity(), S(-1), -S(0), S(0), S(1), L::infinity()};
  const Index V = Index(std::size(values));
  Rng rng(0xb007e);
  Workspace<S> ws;
  const BackendOf<S> backend(1);
  int failed = 0;
  for (Index N = 1; N <= 12; ++N) {
    // Exhaustive for small N, random beyond.
    Index T = 1;
    for (Index i = 0; i < N && T <= 2401; ++i) T *= V;
    const bool exhaustive = N <= 4;
    if (!exhaustive) T = 1500;
    std::vector<S> logits(T * N);
    for (Index t = 0; t < T; ++t) {
      Index code = t;
      for (Index e = 0; e < N; ++e) {
        logits[t * N + e] = exhaustive ? values[code % V] : values[rng.range(0, V - 1)];
        code /= V;
      }
    }
    for (Index k = 1; k <= N; ++k)
      for (RoutingWeights mode : {RoutingWeights::softmax_over_top_k, RoutingWeights::softmax_then_top_k}) {
        Failures fails;
        const moe::ConstMatrixView<S> z(logits.data(), T, N);
        ws.weights.assign(T * k, S(-7));
        moe::route<S>(z, k, mode, 0.0, ws.plan, ws.weights);
        const moe::LayerConfig config{.hidden = 1, .ffn = 1, .experts = N, .top_k = k, .weights = mode};
        backend.route(z, config, ws.backend_plan, ws.backend_weights);
        for (Index t = 0; t < T; ++t) {
          const std::vector<std::int32_t> order = sorted_order(z.row(t), N);
          for (Index j = 0; j < k; ++j) {
            EXPECT(ws.plan.expert[t * k + j] == order[j], "row ", t, " choice ", j);
            EXPECT(ws.backend_plan.expert[t * k + j] == order[j], "backend row ", t, " choice ", j);
          }
          check_row(z.row(t), N, k, mode, ws.plan.expert.data() + t * k, ws.weights.data() + t * k,
                    ws.plan.row_status[t], t, fails, false);
        }
        EXPECT(ws.backend_weights == ws.weights, "backend weights differ");
        if (fails.count && ++failed <= 5)
          FAIL_CHECK(describe(std::is_same_v<S, float> ? "float brute force" : "double brute force", T, N, k, mode, 0),
                     "\n", fails.text.str());
      }
  }
  CHECK(failed == 0);
}
}  // namespace

TEST_CASE("fuzz routing: selection equals a full sort with the contract's order (brute force)") {
  brute_force_selection<float>();
  brute_force_selection<double>();
}

// A whole fp32 layer on inputs with NaN/inf rows, forward and backward a few times: no crash, the
// routing invariants hold, the logits are routed by the contract, and clean rows stay finite.
namespace {
using Backend = moe::cpu::Backend;
using Matrix = Backend::Matrix;

enum Corruption { kClean, kOneNan, kOnePosInf, kOneNegInf, kRowNan, kRowInf, kHugeRow, kLogitNan, kCorruptions };

template <template <class> class Gate>
void fuzz_layer(std::uint64_t seed, Index H, Index N, bool self_route) {
  Rng rng(seed);
  int failed = 0;
  for (int config_index = 0; config_index < 8; ++config_index) {
    const Index k = std::min<Index>(N, 1 + config_index % 3);
    const RoutingWeights mode = config_index % 2 ? RoutingWeights::softmax_then_top_k : RoutingWeights::softmax_over_top_k;
    const double cf = config_index % 4 < 2 ? 0.0 : 0.75;
    const moe::LayerConfig config{.hidden = H, .ffn = 8, .experts = N, .top_k = k, .weights = mode,
                                  .capacity_factor = cf, .aux = {.load_balance = 0.01, .z_loss = 1e-3}};
    // One thread: results do not depend on it, and OpenMP on a busy shared machine can stall.
    moe::MoELayer<Gate, moe::GeluMLP, Backend> layer(config, seed + config_index, {}, {}, Backend(1));
    const Index logit_begin = self_route ? H - N : 0, logit_end = self_route ? H : H;
    std::int64_t expected_nonfinite = 0, expected_no_finite = 0, expected_tokens = 0;
    for (int step = 0; step < 10; ++step) {
      Failures fails;
      const Index T = rng.chance(0.1) ? 0 : rng.range(1, 40);
      Matrix x(T, H);
      std::vector<int> corruption(T, kClean);
      for (Index t = 0; t < T; ++t) {
        for (Index h = 0; h < H; ++h) x(t, h) = float(rng.normal());
        if (!rng.chance(0.4)) continue;
        corruption[t] = int(rng.range(1, kCorruptions - 1));
        const Index h = rng.range(0, H - 1);
        switch (corruption[t]) {
          case kOneNan: x(t, h) = std::numeric_limits<float>::quiet_NaN(); break;
          case kOnePosInf: x(t, h) = std::numeric_limits<float>::infinity(); break;
          case kOneNegInf: x(t, h) = -std::numeric_limits<float>::infinity(); break;
          case kRowNan: x.row(t).setConstant(std::numeric_limits<float>::quiet_NaN()); break;
          case kRowInf: x.row(t).setConstant(std::numeric_limits<float>::infinity()); break;
          case kHugeRow: x.row(t) *= 1e30f; break;
          default: x(t, rng.range(logit_begin, logit_end - 1)) = std::numeric_limits<float>::quiet_NaN(); break;
        }
      }
      std::vector<std::uint8_t> mask;
      if (rng.chance(0.3))
        for (Index t = 0; t < T; ++t) mask.push_back(std::uint8_t(rng.chance(0.6)));

      Matrix y;
      try {
        y = layer.forward(x, {.token_mask = mask});
      } catch (const std::exception& e) {
        fails.add("forward threw: ", e.what());
      }
      if (fails.count == 0) {
        EXPECT(y.rows() == T && y.cols() == H, "output is ", y.rows(), "x", y.cols());
        const moe::RoutingPlan& plan = layer.last_plan();
        check_dispatch(plan, T, N, k, cf, fails);
        if (fails.count == 0) {
          // The layer's routing is the contract's routing of its logits.
          const moe::ConstMatrixView<float> logits = layer.last_logits();
          moe::RoutingPlan ref_plan;
          std::vector<float> ref_weights(T * k);
          moe::route<float>(logits, k, mode, cf, ref_plan, ref_weights);
          EXPECT(ref_plan.expert == plan.expert && ref_plan.row == plan.row, "layer routing differs from moe::route");
          EXPECT(ref_weights == layer.last_weights(), "layer weights differ from moe::route");
          for (Index t = 0; t < T; ++t) {
            check_row(logits.row(t), N, k, mode, plan.expert.data() + t * k, layer.last_weights().data() + t * k,
                      plan.row_status[t], t, fails, true);
            bool x_finite = true;
            for (Index h = 0; h < H; ++h) x_finite = x_finite && std::isfinite(x(t, h));
            bool logits_finite = true;
            for (Index e = 0; e < N; ++e) logits_finite = logits_finite && std::isfinite(logits(t, e));
            if (!self_route) {  // x W^T: a non-finite input makes every logit non-finite
              const std::uint8_t expected = x_finite ? 0 : moe::kRowHasNonFinite | moe::kRowNoFiniteLogit;
              EXPECT(plan.row_status[t] == expected, "row ", t, " (corruption ", corruption[t], ") status ",
                     int(plan.row_status[t]));
            }
            if (!mask.empty() && !mask[t]) continue;
            ++expected_tokens;
            expected_nonfinite += !logits_finite;
            bool none = true;
            for (Index e = 0; e < N; ++e) none = none && !std::isfinite(logits(t, e));
            expected_no_finite += none;
          }
          for (Index t = 0; t < T; ++t)
            if (corruption[t] == kClean)
              EXPECT(y.row(t).allFinite(), "clean row ", t, " has a non-finite output");
          EXPECT(std::isfinite(layer.aux_loss()), "aux loss ", layer.aux_loss());
          EXPECT(layer.stats().tokens == expected_tokens, "stats.tokens ", layer.stats().tokens);
          EXPECT(layer.stats().rows_with_nonfinite == expected_nonfinite, "stats.rows_with_nonfinite ",
                 layer.stats().rows_with_nonfinite, " expected ", expected_nonfinite);
          EXPECT(layer.stats().rows_without_finite == expected_no_finite, "stats.rows_without_finite ",
                 layer.stats().rows_without_finite, " expected ", expected_no_finite);
        }
        Matrix dy(T, H);
        for (Index i = 0; i < dy.size(); ++i) dy.data()[i] = float(rng.normal());
        layer.zero_grad();
        Matrix dx;
        try {
          dx = layer.backward(dy);
        } catch (const std::exception& e) {
          fails.add("backward threw: ", e.what());
        }
        if (dx.rows() == T && dx.cols() == H) {
          for (Index t = 0; t < T; ++t)
            if (corruption[t] == kClean) EXPECT(dx.row(t).allFinite(), "clean row ", t, " has a non-finite dx");
        } else {
          fails.add("dx is ", dx.rows(), "x", dx.cols());
        }
      }
      if (fails.count && ++failed <= 5)
        FAIL_CHECK(describe(self_route ? "self-route layer" : "linear layer", T, N, k, mode, cf), " step=", step,
                   "\n", fails.text.str());
    }
  }
  CHECK(failed == 0);
}
}  // namespace

TEST_CASE("fuzz routing: fp32 layer forward/backward on NaN/inf inputs") {
  fuzz_layer<moe::Linear>(0x1a7e1, 16, 8, false);
  fuzz_layer<moe::SelfRoute>(0x1a7e2, 12, 8, true);
  fuzz_layer<moe::Linear>(0x1a7e3, 8, 1, false);  // N = 1: every token to the one expert
}
