// tests/cuda/backend_cases.hpp: the CUDA backend's test cases, written once over the device.
// The including file defines, in namespace cuda_test, `TestDevice`, `make_device()`,
// `device_available()` and `kEmulatedDevice`, and CUDA_TEST_NAME(text) (a test-name prefix):
//   * tests/test_cuda_emulated.cpp: EmulatedDevice, host compiler, every CI run (and under ASan);
//   * tests/cuda/test_cuda_backend.cu: CudaDevice, nvcc; skips each case without a GPU.
// Reference: the CPU backend's layer on the same parameters (cpu_reference.hpp), fp32.
#pragma once

#include <doctest/doctest.h>

#include "cuda/compare.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <type_traits>
#include <vector>

#include "cuda/cpu_reference.hpp"
#include "moe/bfloat16.hpp"
#include "moe/cuda/backend.hpp"
#include "moe/experts.hpp"
#include "moe/gate.hpp"
#include "moe/layer.hpp"
#include "moe/routing.hpp"
#include "primitive_checks.hpp"

namespace cuda_test {

// ---- host <-> device helpers ----------------------------------------------------------------
template <class S, class B>
typename B::Matrix to_device(const B& backend, const std::vector<float>& host, Index rows, Index cols) {
  typename B::Matrix m(rows, cols);
  std::vector<S> converted(host.size());
  for (std::size_t i = 0; i < host.size(); ++i) converted[i] = S(host[i]);
  backend.upload(converted, m);
  return m;
}
template <class S, class B>
std::vector<float> to_host(const B& backend, const S* data, Index count) {
  std::vector<S> raw(static_cast<std::size_t>(count));
  backend.download(moe::ConstMatrixView<S>(data, 1, count), raw);
  std::vector<float> out(raw.size());
  for (std::size_t i = 0; i < raw.size(); ++i) out[i] = float(raw[i]);
  return out;
}

inline std::vector<float> normal_values(std::size_t n, std::uint64_t seed, float std_dev = 1.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, std_dev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// Fresh inputs for a case: x, dy (and router input) N(0, 1); parameters left to the layer's init.
inline Inputs fresh_inputs(const Case& c, std::uint64_t seed) {
  Inputs in;
  const std::size_t n = std::size_t(c.tokens * c.config.hidden);
  in.x = normal_values(n, seed);
  in.dy = normal_values(n, seed + 1);
  if (c.separate_router_input) in.router_input = normal_values(n, seed + 2);
  return in;
}

// One forward + backward on the device. in.params empty: the layer's own initial values are
// used and written back into in.params (so the CPU reference gets the same ones).
template <class S, template <class> class G, template <class> class E>
Outcome device_run(const Case& c, Inputs& in) {
  using B = moe::cuda::BasicBackend<S, TestDevice>;
  moe::MoELayer<G, E, B> layer(c.config, c.seed, {}, {}, B(make_device()));
  const B& be = layer.backend();
  if (c.gemm_lanes > 0) set_gemm_lanes(be.device(), c.gemm_lanes);
  if (c.dgelu_transposed) be.device().set_dgelu_weights(moe::cuda::DgeluWeights::transposed);
  auto params = layer.parameters();
  if (in.params.empty()) {
    for (auto& p : params) in.params.push_back(to_host<S>(be, p.value.data(), Index(p.value.size())));
    if constexpr (!std::is_same_v<S, float>)  // the reference sees the values the device holds
      for (auto& v : in.params)
        for (float& x : v) x = float(S(x));
  } else {
    REQUIRE(in.params.size() == params.size());
    for (std::size_t i = 0; i < params.size(); ++i) {
      std::vector<S> values(in.params[i].size());
      for (std::size_t j = 0; j < values.size(); ++j) values[j] = S(in.params[i][j]);
      be.upload(values, moe::MatrixView<S>(params[i].value.data(), 1, Index(values.size())));
    }
  }
  const Index T = c.tokens, H = c.config.hidden;
  const auto x = to_device<S>(be, in.x, T, H), dy = to_device<S>(be, in.dy, T, H);
  typename B::Matrix y(T, H), dx(T, H);
  const moe::ForwardOptions options{in.mask};
  Outcome out;
  if (c.separate_router_input) {
    const auto router_input = to_device<S>(be, in.router_input, T, H);
    typename B::Matrix d_router_input(T, H);
    be.fill(d_router_input, S(0));
    layer.forward_into(x, router_input, y, options);
    layer.backward_into(dy, dx, d_router_input);
    out.d_router_input = to_host<S>(be, d_router_input.data(), T * H);
  } else {
    layer.forward_into(x, y, options);
    layer.backward_into(dy, dx);
  }
  out.y = to_host<S>(be, y.data(), T * H);
  out.dx = to_host<S>(be, dx.data(), T * H);
  for (auto& p : layer.parameters())
    out.grads.push_back(p.grad.empty() ? std::vector<float>{} : to_host<S>(be, p.grad.data(), Index(p.grad.size())));
  const moe::RoutingPlan plan = moe::cuda::detail::to_host(layer.last_plan());
  out.expert = plan.expert, out.row = plan.row, out.offsets = plan.expert_offsets;
  out.weights = to_host<S>(be, layer.last_weights().data(), T * c.config.top_k);
  out.assignments = layer.stats().assignments;
  out.dropped_slots = layer.stats().dropped_slots;
  out.rows_with_nonfinite = layer.stats().rows_with_nonfinite;
  out.aux = layer.aux_losses();
  return out;
}

template <class S, template <class> class G>
Outcome device_run_gate(const Case& c, Inputs& in) {
  return c.expert == ExpertKind::gelu ? device_run<S, G, moe::GeluMLP>(c, in) : device_run<S, G, moe::SwiGLU>(c, in);
}
template <class S = float>
Outcome device_layer(const Case& c, Inputs& in) {
  switch (c.gate) {
    case GateKind::self: return device_run_gate<S, moe::SelfRoute>(c, in);
    case GateKind::linear: return device_run_gate<S, moe::Linear>(c, in);
    case GateKind::fixed_random: return device_run_gate<S, moe::FixedRandom>(c, in);
    case GateKind::random: return device_run_gate<S, moe::Random>(c, in);
  }
  moe::fail("device_layer: unknown gate");
}

// The device layer against the CPU layer on the same parameters and inputs.
inline void check_parity(const Case& c, Inputs in, double tolerance = 1e-5) {
  const Outcome gpu = device_layer(c, in);
  const Outcome cpu = cpu_layer(c, in);
  CAPTURE(c.tokens);
  CAPTURE(int(c.gate));
  CAPTURE(int(c.expert));
  CHECK(gpu.expert == cpu.expert);
  CHECK(gpu.row == cpu.row);
  CHECK(gpu.offsets == cpu.offsets);
  CHECK(gpu.assignments == cpu.assignments);
  CHECK(gpu.dropped_slots == cpu.dropped_slots);
  CHECK(gpu.rows_with_nonfinite == cpu.rows_with_nonfinite);
  CHECK(relative_error(gpu.weights, cpu.weights) < tolerance);
  CHECK(relative_error(gpu.y, cpu.y) < tolerance);
  CHECK(relative_error(gpu.dx, cpu.dx) < tolerance);
  CHECK(relative_error(gpu.d_router_input, cpu.d_router_input) < tolerance);
  REQUIRE(gpu.grads.size() == cpu.grads.size());
  for (std::size_t i = 0; i < gpu.grads.size(); ++i) {
    CAPTURE(i);
    CHECK(relative_error(gpu.grads[i], cpu.grads[i]) < tolerance);
  }
  CHECK(gpu.aux.load_balance == doctest::Approx(cpu.aux.load_balance).epsilon(1e-5));
  CHECK(gpu.aux.z_loss == doctest::Approx(cpu.aux.z_loss).epsilon(1e-5));
}

inline moe::LayerConfig small_config(Index N = 6, Index k = 2) { return moe::LayerConfig{32, 48, N, k}; }

#define CUDA_TEST_SKIP_WITHOUT_DEVICE()                            \
  if (!device_available()) {                                       \
    MESSAGE("skipped: no CUDA device on this machine");            \
    return;                                                        \
  }
// The same for the cases of the Hopper grouped GEMM (bf16, device code for sm_90a).
#define CUDA_TEST_SKIP_WITHOUT_GROUPED_GEMM()                                            \
  if (!TestDevice::template grouped_gemm_supports<moe::bfloat16>()) {                     \
    MESSAGE("skipped: this device has no grouped GEMM (device code not built for sm_90a)"); \
    return;                                                                              \
  }

TEST_CASE(CUDA_TEST_NAME("parity with the CPU backend: every gate and expert bank, fp32")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  for (GateKind gate : {GateKind::self, GateKind::linear, GateKind::fixed_random, GateKind::random})
    for (ExpertKind expert : {ExpertKind::gelu, ExpertKind::swiglu}) {
      const Case c{small_config(), gate, expert, 37, 11};
      check_parity(c, fresh_inputs(c, 100 + int(gate) * 10 + int(expert)));
    }
  // H = 30: rows that are no whole number of 16-byte packs (dispatch and combine move single elements).
  for (GateKind gate : {GateKind::self, GateKind::linear}) {
    const Case c{moe::LayerConfig{30, 48, 6, 2}, gate, ExpertKind::gelu, 29, 13};
    check_parity(c, fresh_inputs(c, 300 + int(gate)));
  }
}

TEST_CASE(CUDA_TEST_NAME("parity: softmax_then_top_k, capacity drops, auxiliary losses and a token mask")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  moe::LayerConfig config = small_config(5, 3);
  config.weights = moe::RoutingWeights::softmax_then_top_k;
  config.capacity_factor = 0.7;
  config.aux.load_balance = 0.01;
  config.aux.z_loss = 0.001;
  for (GateKind gate : {GateKind::self, GateKind::linear}) {
    const Case c{config, gate, ExpertKind::gelu, 41, 5};
    Inputs in = fresh_inputs(c, 7);
    in.mask.resize(c.tokens);
    for (Index t = 0; t < c.tokens; ++t) in.mask[t] = t % 3 != 0;
    (void)device_layer(c, in);                 // takes the layer's initial parameters
    CHECK(cpu_layer(c, in).dropped_slots > 0);  // the case does exercise the capacity
    check_parity(c, in);
  }
}

TEST_CASE(CUDA_TEST_NAME("statistics on the device: every field over two forwards, a mask and NaN rows")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  using B = moe::cuda::BasicBackend<float, TestDevice>;
  moe::LayerConfig config = small_config(6, 2);
  config.capacity_factor = 0.6;  // capacity 5 of 46 slots per expert: counted tokens lose slots
  config.aux.load_balance = 0.01;
  config.aux.z_loss = 0.001;
  moe::MoELayer<moe::SelfRoute, moe::GeluMLP, B> layer(config, 3, {}, {}, B(make_device()));
  const B& be = layer.backend();
  const Index T = 23, H = config.hidden, N = config.experts, first = H - N;
  const float nan = std::nanf(""), inf = INFINITY;
  moe::RoutingStats expected(N);
  for (int pass = 0; pass < 2; ++pass) {
    CAPTURE(pass);
    std::vector<float> x = normal_values(std::size_t(T * H), 200 + pass);
    x[1 * H + first + 2] = nan;                                    // counted, one NaN
    for (Index e = 0; e < N; ++e) x[2 * H + first + e] = nan;      // counted, no finite logit
    for (Index e = 0; e < N; ++e) x[4 * H + first + e] = nan;      // masked out: not counted
    x[5 * H + first + 0] = inf;                                    // counted, +inf
    for (Index e = 0; e < N; ++e) x[6 * H + first + e] = -inf;     // counted, no finite logit
    std::vector<std::uint8_t> mask(static_cast<std::size_t>(T));
    for (Index t = 0; t < T; ++t) mask[t] = (t + pass) % 4 != 0;
    mask[1] = mask[2] = mask[5] = mask[6] = 1, mask[4] = 0;
    const auto xd = to_device<float>(be, x, T, H);
    typename B::Matrix y(T, H);
    layer.forward_into(xd, y, moe::ForwardOptions{mask});

    // The reference: RoutingStats::accumulate and aux_loss_forward on host copies.
    const moe::RoutingPlan plan = moe::cuda::detail::to_host(layer.last_plan());
    expected.accumulate(plan, mask);
    const moe::RoutingStats& got = layer.stats();
    CHECK(got.assignments == expected.assignments);
    CHECK(got.tokens == expected.tokens);
    CHECK(got.slots == expected.slots);
    CHECK(got.dropped_slots == expected.dropped_slots);
    CHECK(got.rows_with_nonfinite == expected.rows_with_nonfinite);
    CHECK(got.rows_without_finite == expected.rows_without_finite);
    CHECK(got.rows_with_nonfinite == 4 * (pass + 1));  // rows 1, 2, 5, 6 of each pass
    CHECK(got.rows_without_finite == 2 * (pass + 1));  // rows 2 and 6
    std::vector<float> z(std::size_t(T * N));
    for (Index t = 0; t < T; ++t)
      for (Index e = 0; e < N; ++e) z[t * N + e] = x[t * H + first + e];  // SelfRoute's logits
    expected.accumulate_logits(moe::ConstMatrixView<float>(z.data(), T, N), mask);
    for (Index e = 0; e < N; ++e) {  // the same sums in the same order: the same bits
      CAPTURE(e);
      CHECK(got.logits[std::size_t(e)].sum == expected.logits[std::size_t(e)].sum);
      CHECK(got.logits[std::size_t(e)].sum_squares == expected.logits[std::size_t(e)].sum_squares);
      CHECK(got.logits[std::size_t(e)].count == expected.logits[std::size_t(e)].count);
    }
    const moe::AuxLosses ref =
        moe::aux_loss_forward<float>(moe::ConstMatrixView<float>(z.data(), T, N), plan, config.aux, mask);
    CHECK(std::isfinite(layer.aux_losses().total()));
    CHECK(layer.aux_losses().load_balance == doctest::Approx(ref.load_balance).epsilon(1e-6));
    CHECK(layer.aux_losses().z_loss == doctest::Approx(ref.z_loss).epsilon(1e-6));
  }
  CHECK(expected.dropped_slots > 0);
  CHECK(expected.tokens > 0);
  CHECK(expected.tokens < 2 * T);
}

TEST_CASE(CUDA_TEST_NAME("statistics on the device: bf16 logit moments over several chunks, the host's bits")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  using B = moe::cuda::BasicBackend<moe::bfloat16, TestDevice>;
  const moe::LayerConfig config = small_config(8, 2);
  moe::MoELayer<moe::SelfRoute, moe::GeluMLP, B> layer(config, 5, {}, {}, B(make_device()));
  const Index T = 2 * moe::kLogitMomentChunk + 89, H = config.hidden, N = config.experts;
  std::vector<float> x = normal_values(std::size_t(T * H), 41);
  for (Index t = 0; t < T; ++t) x[std::size_t(t * H + H - N + 3)] += 2.5f;  // expert 3's offset
  x[std::size_t(300 * H + H - 1)] = std::nanf("");
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(T), 1);
  for (Index t = 0; t < T; t += 7) mask[std::size_t(t)] = 0;
  typename B::Matrix y(T, H);
  layer.forward_into(to_device<moe::bfloat16>(layer.backend(), x, T, H), y, moe::ForwardOptions{mask});
  std::vector<moe::bfloat16> z(std::size_t(T * N));
  for (Index t = 0; t < T; ++t)
    for (Index e = 0; e < N; ++e) z[std::size_t(t * N + e)] = moe::bfloat16(x[std::size_t(t * H + H - N + e)]);
  moe::RoutingStats expected(N);
  expected.accumulate_logits(moe::ConstMatrixView<moe::bfloat16>(z.data(), T, N), mask);
  const moe::RoutingStats& got = layer.stats();
  for (Index e = 0; e < N; ++e) {
    CAPTURE(e);
    CHECK(got.logits[std::size_t(e)].sum == expected.logits[std::size_t(e)].sum);
    CHECK(got.logits[std::size_t(e)].sum_squares == expected.logits[std::size_t(e)].sum_squares);
    CHECK(got.logits[std::size_t(e)].count == expected.logits[std::size_t(e)].count);
  }
  CHECK(got.logits[7].count == got.logits[0].count - 1);  // the NaN left out
  CHECK(got.logit_means()[3] > 2.0);
  CHECK(std::abs(got.logit_means()[0]) < 0.3);
}

TEST_CASE(CUDA_TEST_NAME("auxiliary losses with every token masked out: zeros, finite gradients")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  moe::LayerConfig config = small_config(5, 2);
  config.aux.load_balance = 0.01;
  config.aux.z_loss = 0.001;
  for (GateKind gate : {GateKind::self, GateKind::linear}) {
    const Case c{config, gate, ExpertKind::gelu, 17, 4};
    Inputs in = fresh_inputs(c, 90);
    in.mask.assign(std::size_t(c.tokens), 0);
    const Outcome gpu = device_layer(c, in);
    CHECK(gpu.aux.load_balance == 0.0);
    CHECK(gpu.aux.z_loss == 0.0);
    CHECK(std::all_of(gpu.assignments.begin(), gpu.assignments.end(), [](std::int64_t a) { return a == 0; }));
    CHECK(gpu.dropped_slots == 0);
    for (const auto& g : gpu.grads)
      CHECK(std::all_of(g.begin(), g.end(), [](float v) { return std::isfinite(v); }));
    check_parity(c, in);
  }
}

TEST_CASE(CUDA_TEST_NAME("auxiliary losses and their gradient match moe/aux_loss.hpp on fuzzed logits and masks")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  using B = moe::cuda::BasicBackend<float, TestDevice>;
  const B backend(make_device());
  std::mt19937_64 rng(81);
  std::normal_distribution<float> normal(0.f, 2.f);
  for (int round = 0; round < 24; ++round) {
    const Index N = 1 + Index(rng() % 16), k = 1 + Index(rng() % std::min<Index>(N, 4)), T = Index(rng() % 150);
    moe::LayerConfig config{8, 8, N, k};
    config.capacity_factor = (rng() % 2) ? 0.0 : 0.8;
    config.weights = (rng() % 2) ? moe::RoutingWeights::softmax_over_top_k : moe::RoutingWeights::softmax_then_top_k;
    config.aux.load_balance = round % 3 != 1 ? 0.01 : 0.0;  // both, z-loss only, load balance only
    config.aux.z_loss = round % 3 != 2 ? 0.001 : 0.0;
    std::vector<float> z(std::size_t(T * N));
    for (float& v : z) {
      const auto r = rng() % 40;
      v = r == 0 ? std::nanf("") : r == 1 ? INFINITY : r == 2 ? -INFINITY : normal(rng);
    }
    std::vector<std::uint8_t> mask;  // round % 4 == 0: empty (every token counts)
    if (round % 4 == 3) mask.assign(std::size_t(T), 0);
    if (round % 4 == 1 || round % 4 == 2) {
      mask.resize(std::size_t(T));
      for (auto& m : mask) m = std::uint8_t(rng() % 3 != 0);
    }
    CAPTURE(round);
    const auto logits = to_device<float>(backend, z, T, N);
    typename B::Plan plan;
    typename B::template Vector<float> weights, dweights;
    backend.route(logits, config, plan, weights);
    const moe::RoutingPlan host_plan = moe::cuda::detail::to_host(plan);
    const moe::ConstMatrixView<float> zv(z.data(), T, N);

    const moe::AuxLosses got = backend.aux_loss(logits, plan, config, mask);
    const moe::AuxLosses ref = moe::aux_loss_forward<float>(zv, host_plan, config.aux, mask);
    CHECK(std::isfinite(got.total()));
    CHECK(got.load_balance == doctest::Approx(ref.load_balance).epsilon(1e-6));
    CHECK(got.z_loss == doctest::Approx(ref.z_loss).epsilon(1e-6));

    // Zero weight gradients: route_backward's output is the auxiliary gradient alone.
    dweights.resize(T * k);
    backend.fill(moe::MatrixView<float>(dweights.data(), 1, T * k), 0.f);
    typename B::Matrix dlogits(T, N);
    backend.route_backward(logits, plan, config, dweights, mask, dlogits);
    // The float64 reference. The load-balance gradient p_e (g_e - p . g) cancels to nothing when
    // the choice fractions are near equal (N = 2, k = 1 with a split of 44 / 44): float32 on the
    // GPU (FMA, its own exp) then differs from float32 on the host by more than 1e-6 of the
    // result. So the error is measured against the size of the terms that cancel (g's largest
    // entry) as well as the result's.
    std::vector<double> z64(z.begin(), z.end()), expected(std::size_t(T * N), 0.0);
    moe::aux_loss_backward<double>(moe::ConstMatrixView<double>(z64.data(), T, N), host_plan, config.aux, mask,
                                   moe::MatrixView<double>(expected.data(), T, N));
    const Index counted = moe::detail::counted_tokens(mask, T);
    double terms = 0;
    if (counted > 0 && config.aux.load_balance > 0)
      for (const double f : moe::detail::choice_fractions(host_plan, mask, counted))
        terms = std::max(terms, config.aux.load_balance * double(N) / double(counted) * f);
    const std::vector<float> dz = to_host<float>(backend, dlogits.data(), T * N);
    CHECK(std::all_of(dz.begin(), dz.end(), [](float v) { return std::isfinite(v); }));
    double diff = 0, largest = terms;
    for (std::size_t i = 0; i < dz.size(); ++i) {
      diff = std::max(diff, std::abs(double(dz[i]) - expected[i]));
      largest = std::max(largest, std::abs(expected[i]));
    }
    CHECK(diff <= 1e-5 * largest);
    if (round % 4 == 3) {
      CHECK(got.total() == 0.0);
      CHECK(std::all_of(dz.begin(), dz.end(), [](float v) { return v == 0.f; }));
    }
  }
}

// Dispatch, combine, copy, add, fill and the activations on rows that are whole 16-byte packs, and on the same values
// behind views that are not (one element past a row's aligned start): the same results either way (moe/cuda/pack.hpp).
template <class S>
void check_packs_change_no_bits() {
  using B = moe::cuda::BasicBackend<S, TestDevice>;
  const B backend(make_device());
  const Index T = 29, N = 5, k = 2, H = 32;
  moe::LayerConfig config{H, 8, N, k};
  config.capacity_factor = 0.8;  // some slots dropped: combine skips them
  const auto logits = to_device<S>(backend, normal_values(std::size_t(T * N), 5), T, N);
  typename B::Plan plan;
  typename B::template Vector<S> weights;
  backend.route(logits, config, plan, weights);
  CHECK(plan.dropped_slots() > 0);
  const Index R = plan.rows();
  const auto x_host = normal_values(std::size_t(T * H), 6), rows_host = normal_values(std::size_t(R * H), 7),
             dy_host = normal_values(std::size_t(T * H), 8);
  // The values of a [rows, cols] matrix one column into rows of cols + 1, and back.
  const auto shifted = [](const std::vector<float>& v, Index rows, Index cols) {
    std::vector<float> out(std::size_t(rows * (cols + 1)), 0.f);
    for (Index r = 0; r < rows; ++r)
      for (Index c = 0; c < cols; ++c) out[std::size_t(r * (cols + 1) + c + 1)] = v[std::size_t(r * cols + c)];
    return out;
  };
  const auto unshifted = [](const std::vector<float>& v, Index rows, Index cols) {
    std::vector<float> out(std::size_t(rows * cols));
    for (Index r = 0; r < rows; ++r)
      for (Index c = 0; c < cols; ++c) out[std::size_t(r * cols + c)] = v[std::size_t(r * (cols + 1) + c + 1)];
    return out;
  };
  struct Results {
    std::vector<float> gathered, combined, d_rows, dweights, sum, filled, gelu, dgelu, glu, dglu, column_sums;
  };
  const Index tall = 150;  // rows of the column sums: three chunks of moe::cuda::detail::kColumnSumChunk, one short
  const auto tall_host = normal_values(std::size_t(tall * H), 9);
  const auto run = [&](bool shift) {
    const Index pad = shift ? 1 : 0;
    const auto upload = [&](const std::vector<float>& v, Index rows) {
      return shift ? to_device<S>(backend, shifted(v, rows, H), rows, H + 1) : to_device<S>(backend, v, rows, H);
    };
    const auto view = [&](typename B::Matrix& m) { return moe::MatrixView<S>(m.data() + pad, m.rows(), H, H + pad); };
    const auto host = [&](const typename B::Matrix& m) {
      const auto all = to_host<S>(backend, m.data(), m.rows() * m.cols());
      return shift ? unshifted(all, m.rows(), m.cols() - 1) : all;
    };
    // [rows, H / 2] views (SwiGLU's F columns), shifted alike.
    const auto half = [&](typename B::Matrix& m) {
      return moe::MatrixView<S>(m.data() + pad, m.rows(), H / 2, H / 2 + pad);
    };
    auto x = upload(x_host, T), rows = upload(rows_host, R), dy = upload(dy_host, T);
    typename B::Matrix gathered(R, H + pad), combined(T, H + pad), d_rows(R, H + pad);
    typename B::template Vector<S> dweights;
    backend.gather_rows(view(x), plan, view(gathered));
    backend.combine(view(rows), plan, weights, view(combined));
    backend.combine_backward(view(dy), view(rows), plan, weights, view(d_rows), dweights);
    typename B::Matrix sum(T, H + pad), filled(R, H + pad);
    backend.copy(view(x), view(sum));
    backend.add(view(dy), view(sum));  // x + dy
    backend.fill(view(filled), S(0.375f));
    // The activations: x as GELU's input, and as SwiGLU's gate | up (F = H / 2).
    typename B::Matrix gelu(T, H + pad), dgelu(T, H + pad), glu(T, H / 2 + pad), dglu(T, H + pad);
    backend.gelu_forward(view(x), view(gelu));
    backend.gelu_backward(view(x), view(dy), view(dgelu));
    backend.swiglu_forward(view(x), half(glu));
    backend.swiglu_backward(view(x), half(glu), view(dglu));  // glu's values as the incoming gradient
    // A bias gradient: db (0.25 each) += the column sums of a [tall, H] matrix.
    auto m = upload(tall_host, tall);
    auto db = to_device<S>(backend, std::vector<float>(std::size_t(H), 0.25f), 1, H);
    typename B::template Vector<moe::Compute<S>> partial;
    B::resize(partial, moe::cuda::detail::column_sum_partials(tall, H));
    moe::cuda::detail::add_column_sums(backend.device(), moe::ConstMatrixView<S>(view(m)), db.data(), partial.data());
    return Results{host(gathered), host(combined), host(d_rows), to_host<S>(backend, dweights.data(), T * k),
                   host(sum),      host(filled),   host(gelu),   host(dgelu),
                   host(glu),      host(dglu),     to_host<S>(backend, db.data(), H)};
  };
  const Results packed = run(false), single = run(true);
  // Copies and single operations: the same bits.
  CHECK(packed.gathered == single.gathered);
  CHECK(packed.d_rows == single.d_rows);
  CHECK(packed.dweights == single.dweights);
  CHECK(packed.sum == single.sum);
  CHECK(packed.filled == single.filled);
  CHECK(packed.column_sums == single.column_sums);
  {  // and the right sums, against float64
    std::vector<float> want(static_cast<std::size_t>(H));
    for (Index c = 0; c < H; ++c) {
      double total = 0;
      for (Index r = 0; r < tall; ++r) total += double(S(tall_host[std::size_t(r * H + c)]));
      want[std::size_t(c)] = float(0.25 + total);
    }
    CHECK(relative_error(packed.column_sums, want) < (std::is_same_v<S, float> ? 1e-5 : 1e-2));
  }
  // Formulas: the same operations, but the compiler may fuse multiply-adds differently in the two loops (one rounding
  // apart in float, hence up to two bf16 steps).
  const double near = std::is_same_v<S, float> ? 1e-6 : 8e-3;
  CHECK(relative_error(packed.combined, single.combined) < near);
  CHECK(relative_error(packed.gelu, single.gelu) < near);
  CHECK(relative_error(packed.dgelu, single.dgelu) < near);
  CHECK(relative_error(packed.glu, single.glu) < near);
  CHECK(relative_error(packed.dglu, single.dglu) < near);
  CHECK(packed.glu[3] == float(S(moe::activation::silu(float(S(x_host[3]))) * float(S(x_host[3 + H / 2])))));
  CHECK(packed.sum[7] == float(S(float(S(x_host[7])) + float(S(dy_host[7])))));
  CHECK(std::all_of(packed.filled.begin(), packed.filled.end(), [](float v) { return v == 0.375f; }));
  CHECK(std::all_of(packed.combined.begin(), packed.combined.end(), [](float v) { return std::isfinite(v); }));
}

TEST_CASE(CUDA_TEST_NAME("dispatch, combine, copy, add, fill, GELU, SwiGLU, column sums: 16-byte packs give the results of single elements")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  check_packs_change_no_bits<float>();
  check_packs_change_no_bits<moe::bfloat16>();
}

TEST_CASE(CUDA_TEST_NAME("parity: a separate router input (SelfRoute and Linear)")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  for (GateKind gate : {GateKind::self, GateKind::linear}) {
    Case c{small_config(), gate, ExpertKind::swiglu, 19, 3};
    c.separate_router_input = true;
    check_parity(c, fresh_inputs(c, 21));
  }
}

// An inference forward (ForwardOptions::for_backward = false: no input copy, GeluMLP writes no
// pre-activation, GELU_BIAS instead of GELU_AUX_BIAS on the GPU) against a training forward of the
// same layer: the same output (the same bits on the emulated device, where the GEMM is one
// definition; cuBLASLt may pick another kernel for the other epilogue), and backward refused.
template <class S, template <class> class G, template <class> class E>
void check_inference_forward(bool separate_router_input, double tolerance) {
  using B = moe::cuda::BasicBackend<S, TestDevice>;
  const moe::LayerConfig config = small_config(6, 2);
  moe::MoELayer<G, E, B> layer(config, 17, {}, {}, B(make_device()));
  const B& be = layer.backend();
  const Index T = 45, H = config.hidden;
  const auto x = to_device<S>(be, normal_values(std::size_t(T * H), 71), T, H);
  const auto router_input = to_device<S>(be, normal_values(std::size_t(T * H), 72), T, H);
  typename B::Matrix y_train(T, H), y_infer(T, H), dx(T, H), d_router(T, H);
  const auto forward = [&](typename B::Matrix& y, bool for_backward) {
    moe::ForwardOptions options;
    options.for_backward = for_backward;
    if (separate_router_input)
      layer.forward_into(x, router_input, y, options);
    else
      layer.forward_into(x, y, options);
  };
  forward(y_train, true);
  forward(y_infer, false);
  const auto train = to_host<S>(be, y_train.data(), T * H), infer = to_host<S>(be, y_infer.data(), T * H);
  if constexpr (kEmulatedDevice)
    CHECK(std::memcmp(train.data(), infer.data(), train.size() * sizeof(float)) == 0);
  else
    CHECK(relative_error(infer, train) < tolerance);
  const auto backward = [&] {
    if (separate_router_input)
      layer.backward_into(y_train, dx, d_router);
    else
      layer.backward_into(y_train, dx);
  };
  CHECK_THROWS_WITH_AS(backward(), doctest::Contains("for_backward"), moe::Error);
  forward(y_train, true);  // a training forward makes backward possible again
  CHECK_NOTHROW(backward());
}

TEST_CASE(CUDA_TEST_NAME("inference forward: the training forward's output, nothing kept, backward refused")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  for (bool separate : {false, true}) {
    CAPTURE(separate);
    check_inference_forward<float, moe::SelfRoute, moe::GeluMLP>(separate, 1e-5);
    check_inference_forward<float, moe::Linear, moe::GeluMLP>(separate, 1e-5);
    check_inference_forward<float, moe::FixedRandom, moe::SwiGLU>(separate, 1e-5);
    check_inference_forward<moe::bfloat16, moe::SelfRoute, moe::GeluMLP>(separate, 2e-2);
  }
}

TEST_CASE(CUDA_TEST_NAME("edge shapes: T = 0, T = 1, odd T, N = 1, k = N, every token to one expert")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  for (Index T : {0, 1, 2, 65}) {
    const Case c{small_config(), GateKind::linear, ExpertKind::gelu, T, 2};
    check_parity(c, fresh_inputs(c, 30 + T));
  }
  {
    const Case c{small_config(1, 1), GateKind::self, ExpertKind::gelu, 9, 2};
    check_parity(c, fresh_inputs(c, 40));
  }
  {
    const Case c{small_config(4, 4), GateKind::linear, ExpertKind::swiglu, 13, 2};
    check_parity(c, fresh_inputs(c, 41));
  }
  {
    const Case c{small_config(), GateKind::self, ExpertKind::gelu, 33, 2};
    Inputs in = fresh_inputs(c, 42);
    const Index H = c.config.hidden, N = c.config.experts;
    for (Index t = 0; t < c.tokens; ++t) in.x[t * H + H - N + 3] = 50.f;  // expert 3 ranks first everywhere
    const Outcome out = device_layer(c, in);
    CHECK(out.assignments[3] == c.tokens);
    check_parity(c, in);
  }
}

TEST_CASE(CUDA_TEST_NAME("NaN and inf logits: the documented contract, as on the CPU")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  const Case c{small_config(), GateKind::self, ExpertKind::gelu, 12, 4};
  Inputs in = fresh_inputs(c, 50);
  const Index H = c.config.hidden, N = c.config.experts, first = H - N;
  const float nan = std::nanf(""), inf = INFINITY;
  in.x[0 * H + first + 1] = nan;                                                 // one NaN
  in.x[1 * H + first + 2] = inf;                                                 // one +inf
  in.x[2 * H + first + 0] = inf, in.x[2 * H + first + 4] = inf;                  // two +inf share
  for (Index e = 0; e < N; ++e) in.x[3 * H + first + e] = nan;                   // no finite logit
  for (Index e = 0; e < N; ++e) in.x[4 * H + first + e] = -inf;                  // all -inf
  in.x[5 * H + first + 0] = -inf;
  const Outcome gpu = device_layer(c, in);
  for (Index s = 0; s < Index(gpu.expert.size()); ++s) CHECK((gpu.expert[s] >= 0 && gpu.expert[s] < N));
  for (float w : gpu.weights) CHECK(std::isfinite(w));
  CHECK(gpu.rows_with_nonfinite == 6);
  // x itself holds NaN, so outputs of those rows are NaN on both backends: compare the rest.
  const Outcome cpu = cpu_layer(c, in);
  CHECK(gpu.expert == cpu.expert);
  CHECK(gpu.row == cpu.row);
  CHECK(relative_error(gpu.weights, cpu.weights) < 1e-6);
  const auto finite_part = [&](const std::vector<float>& v) {
    std::vector<float> out;
    for (float x : v)
      if (std::isfinite(x)) out.push_back(x);
    return out;
  };
  CHECK(finite_part(gpu.y).size() == finite_part(cpu.y).size());
  CHECK(relative_error(finite_part(gpu.y), finite_part(cpu.y)) < 1e-5);
}

// Two runs of one case, the second with the experts' products spread over `lanes` side streams
// on a GPU (the first in order on the stream) and, on the emulated device, in another launch order.
template <class S>
void check_same_bits(const Case& c, int lanes) {
  Case in_order = c, spread = c;
  in_order.gemm_lanes = 1, spread.gemm_lanes = lanes;
  Inputs a = fresh_inputs(c, 60), b = a;
  const Outcome first = device_layer<S>(in_order, a), second = device_layer<S>(spread, b);
  CAPTURE(int(c.gate));
  CAPTURE(int(c.expert));
  CAPTURE(lanes);
  CHECK(same_bits(first.y, second.y));
  CHECK(same_bits(first.dx, second.dx));
  REQUIRE(first.grads.size() == second.grads.size());
  for (std::size_t i = 0; i < first.grads.size(); ++i) CHECK(same_bits(first.grads[i], second.grads[i]));
  CHECK(first.row == second.row);
}

TEST_CASE(CUDA_TEST_NAME("deterministic: two runs give the same bits, the experts' products in order or concurrent")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  for (GateKind gate : {GateKind::self, GateKind::linear}) {
    moe::LayerConfig config = small_config(8, 2);
    config.capacity_factor = 1.0;
    check_same_bits<float>({config, gate, ExpertKind::gelu, 300, 9}, 4);
  }
  // 8 experts over 3 lanes (uneven), and every expert product of both banks in bf16: the fused
  // epilogues (bias, bias + GELU, GELU's derivative) on side streams too.
  moe::LayerConfig config = small_config(8, 2);
  for (ExpertKind expert : {ExpertKind::gelu, ExpertKind::swiglu}) {
    check_same_bits<float>({config, GateKind::self, expert, 517, 10}, 3);
    check_same_bits<moe::bfloat16>({config, GateKind::self, expert, 517, 11}, 4);
  }
}

TEST_CASE(CUDA_TEST_NAME("the backward through the GELU from the experts' transposed weights: the stored layout's results")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  // Hidden 32 and 34 (whole 16-byte packs or not: the packed and the element transposes), FFN 48
  // and 20, 8 experts, some of them empty at T = 3 (top-2 over 8).
  struct Shape {
    Index hidden, ffn, tokens;
  };
  for (const Shape shape : {Shape{32, 48, 300}, Shape{34, 20, 300}, Shape{32, 48, 3}}) {
    CAPTURE(shape.hidden);
    CAPTURE(shape.tokens);
    moe::LayerConfig config{shape.hidden, shape.ffn, 8, 2};
    Case c{config, GateKind::self, ExpertKind::gelu, shape.tokens, 31};
    const Inputs in = fresh_inputs(c, 90);
    Inputs stored_in = in, transposed_in = in;
    const Outcome stored = device_layer(c, stored_in);
    c.dgelu_transposed = true;
    const Outcome transposed = device_layer(c, transposed_in);
    check_parity(c, in);  // against the CPU layer, within fp32's 1e-5
    REQUIRE(stored.grads.size() == transposed.grads.size());
    if constexpr (kEmulatedDevice) {  // one GEMM definition: the same sums in the same order
      CHECK(transposed.dx == stored.dx);
      for (std::size_t i = 0; i < stored.grads.size(); ++i) CHECK(transposed.grads[i] == stored.grads[i]);
    }
    for (std::size_t i = 0; i < stored.grads.size(); ++i) CHECK(relative_error(transposed.grads[i], stored.grads[i]) < 1e-5);
    CHECK(relative_error(transposed.dx, stored.dx) < 1e-5);
  }
  // bf16 (the packed transpose at hidden 32): within bf16's rounding of the stored layout.
  Case c{small_config(8, 2), GateKind::self, ExpertKind::gelu, 200, 33};
  const Inputs in = fresh_inputs(c, 91);
  Inputs a = in, b = in;
  const Outcome stored = device_layer<moe::bfloat16>(c, a);
  c.dgelu_transposed = true;
  const Outcome transposed = device_layer<moe::bfloat16>(c, b);
  if constexpr (kEmulatedDevice) CHECK(transposed.dx == stored.dx);
  CHECK(relative_error(transposed.dx, stored.dx) < 2e-2);
}

// One bf16 layer's inference forward, per expert and then from the routing plan (ExpertGemm::
// grouped: moe/cuda/grouped_gemm.hpp), on the same device: the emulated device's products add in
// the same order both ways (the same bits), the GPU's tensor cores in their own (bf16's rounding).
// The routed forward must not wait for the host: no copy of the offsets is read.
template <template <class> class Experts>
void check_routed_inference(const moe::LayerConfig& config, Index T, std::uint64_t seed) {
  using B = moe::cuda::BasicBackend<moe::bfloat16, TestDevice>;
  moe::MoELayer<moe::SelfRoute, Experts, B> layer(config, seed, {}, {}, B(make_device()));
  layer.collect_stats(false);  // statistics would read the plan on the host
  const auto x = to_device<moe::bfloat16>(layer.backend(), normal_values(std::size_t(T * config.hidden), seed + 1), T,
                                          config.hidden);
  typename B::Matrix y(T, config.hidden);
  const auto& device = layer.backend().device();
  device.set_expert_gemm(moe::cuda::ExpertGemm::per_expert);
  layer.forward_into(x, y, {.for_backward = false});
  const std::vector<float> per_expert = to_host<moe::bfloat16>(layer.backend(), y.data(), y.size());
  const std::span<const Index> per_expert_offsets = B::expert_offsets(layer.last_plan());
  const std::vector<Index> offsets(per_expert_offsets.begin(), per_expert_offsets.end());
  device.set_expert_gemm(moe::cuda::ExpertGemm::grouped);
  REQUIRE(layer.experts().can_infer_routed(layer.backend(), x));
  // A view whose rows do not start on 16 bytes cannot be gathered by the kernel's copies: the
  // per-expert path serves it.
  typename B::Matrix wide(T, config.hidden + 8);
  if (T > 0)
    CHECK_FALSE(layer.experts().can_infer_routed(layer.backend(), moe::ConstMatrixView<moe::bfloat16>(wide).col_block(1, config.hidden)));
  std::uint64_t syncs = 0;
  if constexpr (kEmulatedDevice) syncs = device.sync_count();
  layer.forward_into(x, y, {.for_backward = false});
  if constexpr (kEmulatedDevice) CHECK(device.sync_count() == syncs);
  // Its route() did not copy the offsets to the host (the products read them on the device); a
  // host read afterwards copies them then.
  CHECK_FALSE(layer.last_plan().offsets_copy_in_flight());
  CHECK_FALSE(layer.last_plan().offsets_on_host());
  const std::span<const Index> routed_offsets = B::expert_offsets(layer.last_plan());
  CHECK(std::vector<Index>(routed_offsets.begin(), routed_offsets.end()) == offsets);
  const std::vector<float> routed = to_host<moe::bfloat16>(layer.backend(), y.data(), y.size());
  device.set_expert_gemm(moe::cuda::ExpertGemm::per_expert);
  if constexpr (kEmulatedDevice) CHECK(routed == per_expert);
  CHECK(relative_error(routed, per_expert) < 2e-2);
  CHECK(std::all_of(routed.begin(), routed.end(), [](float v) { return std::isfinite(v); }));
}

TEST_CASE(CUDA_TEST_NAME("inference forward from the routing plan (ExpertGemm::grouped): the per-expert output, no host wait")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  CUDA_TEST_SKIP_WITHOUT_GROUPED_GEMM();
  // H = 128 and F = 256 (SwiGLU's gate and up: 512): whole tiles of the grouped GEMM. T = 300
  // over 8 experts, top-2: blocks of rows that end inside a tile; a capacity drops slots.
  moe::LayerConfig config{128, 256, 8, 2};
  check_routed_inference<moe::GeluMLP>(config, 300, 5);
  check_routed_inference<moe::SwiGLU>(config, 300, 6);
  config.capacity_factor = 1.0;
  check_routed_inference<moe::GeluMLP>(config, 300, 7);
  config = {128, 256, 4, 4};  // k = N: every expert gets every token
  check_routed_inference<moe::GeluMLP>(config, 33, 8);
  check_routed_inference<moe::GeluMLP>(config, 0, 9);  // no tokens: nothing to launch, nothing to refuse
  check_routed_inference<moe::GeluMLP>(config, 1, 10);
  // Shapes the tiles do not take fall back to the per-expert products (H = 32).
  moe::MoELayer<moe::SelfRoute, moe::GeluMLP, moe::cuda::BasicBackend<moe::bfloat16, TestDevice>> small(
      small_config(8, 2), 1, {}, {}, moe::cuda::BasicBackend<moe::bfloat16, TestDevice>(make_device()));
  small.backend().device().set_expert_gemm(moe::cuda::ExpertGemm::grouped);
  const typename moe::cuda::BasicBackend<moe::bfloat16, TestDevice>::Matrix small_x(4, 32);
  CHECK_FALSE(small.experts().can_infer_routed(small.backend(), small_x));
}

// The same for a training forward and its backward: the forward's experts from the routing plan
// (pre-activations or gate|up kept, a row per slot), the backward making the expert-sorted copy of
// x it needs; y, dx and every gradient as the per-expert path's. The forward waits for nothing (its
// offsets' copy is in flight when it returns); the backward reads them.
template <template <class> class Experts>
void check_routed_training(const moe::LayerConfig& config, Index T, std::uint64_t seed) {
  using B = moe::cuda::BasicBackend<moe::bfloat16, TestDevice>;
  moe::MoELayer<moe::SelfRoute, Experts, B> layer(config, seed, {}, {}, B(make_device()));
  layer.collect_stats(false);
  const auto x = to_device<moe::bfloat16>(layer.backend(), normal_values(std::size_t(T * config.hidden), seed + 1), T,
                                          config.hidden);
  const auto dy = to_device<moe::bfloat16>(layer.backend(), normal_values(std::size_t(T * config.hidden), seed + 2), T,
                                           config.hidden);
  const auto& device = layer.backend().device();
  CAPTURE(T);
  CAPTURE(Experts<B>::name);
  struct Run {
    std::vector<float> y, dx;
    std::vector<std::vector<float>> grads;
  };
  const auto run = [&](moe::cuda::ExpertGemm way) {
    device.set_expert_gemm(way);
    CHECK(layer.experts().can_infer_routed(layer.backend(), x) == (way == moe::cuda::ExpertGemm::grouped));
    layer.zero_grad();
    typename B::Matrix y(T, config.hidden), dx(T, config.hidden);
    std::uint64_t syncs = 0;
    if constexpr (kEmulatedDevice) syncs = device.sync_count();
    layer.forward_into(x, y);
    if (way == moe::cuda::ExpertGemm::grouped) {
      if constexpr (kEmulatedDevice) CHECK(device.sync_count() == syncs);
      CHECK_FALSE(layer.last_plan().offsets_on_host());
    }
    layer.backward_into(dy, dx);
    Run r{to_host<moe::bfloat16>(layer.backend(), y.data(), y.size()),
          to_host<moe::bfloat16>(layer.backend(), dx.data(), dx.size()), {}};
    for (auto& p : layer.parameters())
      r.grads.push_back(to_host<moe::bfloat16>(layer.backend(), p.grad.data(), Index(p.grad.size())));
    return r;
  };
  // Routed first: nothing of a per-expert forward (its sorted copy of x) is left for it to read.
  const Run routed = run(moe::cuda::ExpertGemm::grouped);
  const Run per_expert = run(moe::cuda::ExpertGemm::per_expert);
  device.set_expert_gemm(moe::cuda::ExpertGemm::per_expert);
  if constexpr (kEmulatedDevice) {
    CHECK(routed.y == per_expert.y);
    CHECK(routed.dx == per_expert.dx);
    CHECK(routed.grads == per_expert.grads);
  }
  CHECK(relative_error(routed.y, per_expert.y) < 2e-2);
  CHECK(relative_error(routed.dx, per_expert.dx) < 2e-2);
  for (std::size_t i = 0; i < routed.grads.size(); ++i) CHECK(relative_error(routed.grads[i], per_expert.grads[i]) < 2e-2);
  CHECK(std::all_of(routed.dx.begin(), routed.dx.end(), [](float v) { return std::isfinite(v); }));
}

TEST_CASE(CUDA_TEST_NAME("training forward from the routing plan (ExpertGemm::grouped): the per-expert output and gradients")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  CUDA_TEST_SKIP_WITHOUT_GROUPED_GEMM();
  moe::LayerConfig config{128, 256, 8, 2};
  check_routed_training<moe::GeluMLP>(config, 300, 11);
  check_routed_training<moe::SwiGLU>(config, 300, 12);
  config.capacity_factor = 1.0;  // dropped slots: rows past R, the combine apart from the product
  check_routed_training<moe::GeluMLP>(config, 300, 13);
  check_routed_training<moe::SwiGLU>(config, 300, 14);
  config = {128, 256, 4, 4};
  check_routed_training<moe::GeluMLP>(config, 33, 15);
  check_routed_training<moe::GeluMLP>(config, 1, 16);
  check_routed_training<moe::GeluMLP>(config, 0, 17);
}

// A layer moved between its forward and its backward (a vector of layers growing): its routing plan
// reaches the device through a handle of its own, not the old layer's address (ASan's heap-use-after-
// free before); the same bits as a layer left in place, on both expert paths.
TEST_CASE(CUDA_TEST_NAME("a layer moved between forward and backward: the results of a layer left in place")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  using B = moe::cuda::BasicBackend<moe::bfloat16, TestDevice>;
  using Layer = moe::MoELayer<moe::Linear, moe::GeluMLP, B>;
  const moe::LayerConfig config{128, 256, 8, 2};
  const Index T = 77, H = config.hidden;
  const TestDevice device = make_device();
  for (const auto way : {moe::cuda::ExpertGemm::per_expert, moe::cuda::ExpertGemm::grouped}) {
    if (way == moe::cuda::ExpertGemm::grouped && !TestDevice::template grouped_gemm_supports<moe::bfloat16>()) continue;
    CAPTURE(int(way));
    device.set_expert_gemm(way);
    Layer kept(config, 21, {}, {}, B(device));
    const auto x = to_device<moe::bfloat16>(kept.backend(), normal_values(std::size_t(T * H), 22), T, H);
    const auto dy = to_device<moe::bfloat16>(kept.backend(), normal_values(std::size_t(T * H), 23), T, H);
    typename B::Matrix y_kept(T, H), dx_kept(T, H), y(T, H), dx(T, H);
    kept.forward_into(x, y_kept);
    kept.backward_into(dy, dx_kept);

    std::vector<Layer> layers;
    layers.reserve(1);
    layers.emplace_back(config, 21, Layer::GateType::Options{}, Layer::ExpertsType::Options{}, B(device));
    layers[0].forward_into(x, y);
    layers.emplace_back(config, 24, Layer::GateType::Options{}, Layer::ExpertsType::Options{}, B(device));  // moves [0]
    CHECK(B::expert_offsets(layers[0].last_plan()).back() == T * config.top_k);  // the host's copy, through the device
    layers[0].backward_into(dy, dx);
    CHECK(to_host<moe::bfloat16>(kept.backend(), y.data(), y.size()) ==
          to_host<moe::bfloat16>(kept.backend(), y_kept.data(), y_kept.size()));
    CHECK(to_host<moe::bfloat16>(kept.backend(), dx.data(), dx.size()) ==
          to_host<moe::bfloat16>(kept.backend(), dx_kept.data(), dx_kept.size()));
  }
  device.set_expert_gemm(moe::cuda::ExpertGemm::per_expert);
  // A moved-from backend keeps its device (a handle: the move copies it), so it still runs.
  B source(device);
  const B taker(std::move(source));
  typename B::Matrix m(2, 8);
  source.fill(moe::MatrixView<moe::bfloat16>(m), moe::bfloat16(3.f));  // NOLINT(bugprone-use-after-move): the point
  CHECK(to_host<moe::bfloat16>(taker, m.data(), m.size()) == std::vector<float>(16, 3.f));
}

TEST_CASE(CUDA_TEST_NAME("bf16: SelfRoute layers within 2e-2 of the fp32 CPU layer on the same values")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  for (ExpertKind expert : {ExpertKind::gelu, ExpertKind::swiglu}) {
    const Case c{small_config(), GateKind::self, expert, 29, 13};
    Inputs in = fresh_inputs(c, 70);
    for (auto* v : {&in.x, &in.dy})
      for (float& x : *v) x = float(moe::bfloat16(x));  // both sides see bf16-representable inputs
    const Outcome gpu = device_layer<moe::bfloat16>(c, in);
    const Outcome cpu = cpu_layer(c, in);
    CHECK(gpu.expert == cpu.expert);  // SelfRoute's logits are the same bf16 values on both sides
    CHECK(relative_error(gpu.y, cpu.y) < 2e-2);
    CHECK(relative_error(gpu.dx, cpu.dx) < 2e-2);
    for (std::size_t i = 0; i < gpu.grads.size(); ++i) CHECK(relative_error(gpu.grads[i], cpu.grads[i]) < 2e-2);
  }
}

// Logits z [T, N] routed by the backend (its plan and weights brought to the host) and by the
// contract's reference (moe::route), for a case to compare.
struct RoutedBothWays {
  moe::RoutingPlan got, expected;
  std::vector<float> weights, expected_weights;
};
template <class B>
RoutedBothWays route_both_ways(const B& backend, const std::vector<float>& z, Index T, const moe::LayerConfig& config) {
  const Index N = config.experts, k = config.top_k;
  const auto logits = to_device<float>(backend, z, T, N);
  typename B::Plan plan;
  typename B::template Vector<float> weights;
  backend.route(logits, config, plan, weights);
  RoutedBothWays r;
  r.expected_weights.resize(std::size_t(T * k));
  moe::route<float>(moe::ConstMatrixView<float>(z.data(), T, N), k, config.weights, config.capacity_factor, r.expected,
                    r.expected_weights);
  r.got = moe::cuda::detail::to_host(plan);
  r.weights = to_host<float>(backend, weights.data(), T * k);
  return r;
}

TEST_CASE(CUDA_TEST_NAME("routing alone matches the contract on fuzzed logits with ties and NaN")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  using B = moe::cuda::BasicBackend<float, TestDevice>;
  const B backend(make_device());
  std::mt19937_64 rng(80);
  for (int round = 0; round < 30; ++round) {
    const Index N = 1 + Index(rng() % 64), k = 1 + Index(rng() % std::min<Index>(N, 8)), T = Index(rng() % 200);
    moe::LayerConfig config{8, 8, N, k};
    config.capacity_factor = (rng() % 2) ? 0.0 : 0.5 + double(rng() % 10) / 10;
    config.weights = (rng() % 2) ? moe::RoutingWeights::softmax_over_top_k : moe::RoutingWeights::softmax_then_top_k;
    std::vector<float> z(std::size_t(T * N));
    for (float& v : z) {
      const auto r = rng() % 20;
      v = r == 0 ? std::nanf("") : r == 1 ? INFINITY : r == 2 ? -INFINITY : float(int(rng() % 7) - 3);  // many ties
    }
    CAPTURE(round);
    const RoutedBothWays routed = route_both_ways(backend, z, T, config);
    const moe::RoutingPlan &got = routed.got, &expected = routed.expected;
    CHECK(got.expert == expected.expert);
    CHECK(got.row == expected.row);
    CHECK(got.slot_of_row == expected.slot_of_row);
    CHECK(got.expert_offsets == expected.expert_offsets);
    CHECK(got.chosen_count == expected.chosen_count);
    CHECK(got.row_status == expected.row_status);
    CHECK(got.dropped_slots == expected.dropped_slots);
    CHECK(relative_error(routed.weights, routed.expected_weights) < 1e-6);
  }
}

TEST_CASE(CUDA_TEST_NAME("dispatch by counts keeps the contract's order within and across tiles, at every tile size")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  using B = moe::cuda::BasicBackend<float, TestDevice>;
  const B backend(make_device());
  std::mt19937_64 rng(82);
  struct Case {
    Index T, N, k;
    double capacity_factor;
  };
  // Slots at a tile's edges (127, 128, 129, 256), every slot to one expert (N = 1), the byte's
  // largest expert (N = 256), and past 1024 tiles of 128 slots (T * k > 131072: tiles of 256).
  for (const Case c : {Case{127, 3, 1, 0.0}, Case{128, 3, 1, 0.0}, Case{129, 5, 1, 0.7}, Case{64, 4, 4, 0.0},
                       Case{3000, 1, 1, 0.0}, Case{3000, 256, 8, 1.5}, Case{70001, 8, 2, 0.0},
                       Case{66000, 256, 2, 1.0}}) {
    CAPTURE(c.T);
    CAPTURE(c.N);
    CAPTURE(c.k);
    CAPTURE(c.capacity_factor);
    moe::LayerConfig config{8, 8, c.N, c.k};
    config.capacity_factor = c.capacity_factor;
    std::vector<float> z(std::size_t(c.T * c.N));
    std::normal_distribution<float> normal(0.f, 1.f);
    for (float& v : z) v = rng() % 4 == 0 ? float(int(rng() % 3)) : normal(rng);  // ties among the normals
    const RoutedBothWays routed = route_both_ways(backend, z, c.T, config);
    const moe::RoutingPlan &got = routed.got, &expected = routed.expected;
    CHECK(got.row == expected.row);
    CHECK(got.slot_of_row == expected.slot_of_row);
    CHECK(got.expert_offsets == expected.expert_offsets);
    CHECK(got.chosen_count == expected.chosen_count);
    if (c.capacity_factor > 0 && c.N > 1) CHECK(got.dropped_slots > 0);
  }
}

// route_tokens counts into the plan's tile counts, and the scatter puts them back to zero: a plan
// routed again (the layer's, every forward) must start from zeros whatever routed before it: more
// tiles (a new allocation), fewer (inside the old one), more again inside it, other experts.
TEST_CASE(CUDA_TEST_NAME("dispatch on one plan over and over: each route counts from zero, whatever the sizes before")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  using B = moe::cuda::BasicBackend<float, TestDevice>;
  const B backend(make_device());
  typename B::Plan plan;
  typename B::template Vector<float> weights;
  std::mt19937_64 rng(84);
  struct Case {
    Index T, N, k;
  };
  for (const Case c : {Case{300, 4, 2}, Case{300, 4, 2}, Case{1000, 8, 2}, Case{129, 8, 1}, Case{900, 8, 2},
                       Case{0, 8, 2}, Case{500, 16, 3}, Case{1, 3, 1}, Case{1000, 8, 2}}) {
    CAPTURE(c.T);
    CAPTURE(c.N);
    CAPTURE(c.k);
    moe::LayerConfig config{8, 8, c.N, c.k};
    config.capacity_factor = rng() % 2 ? 0.0 : 1.0;
    std::vector<float> z(std::size_t(c.T * c.N));
    std::normal_distribution<float> normal(0.f, 1.f);
    for (float& v : z) v = normal(rng);
    const auto logits = to_device<float>(backend, z, c.T, c.N);
    backend.route(logits, config, plan, weights);
    moe::RoutingPlan expected;
    std::vector<float> expected_weights(std::size_t(c.T * c.k));
    moe::route<float>(moe::ConstMatrixView<float>(z.data(), c.T, c.N), c.k, config.weights, config.capacity_factor,
                      expected, expected_weights);
    const moe::RoutingPlan got = moe::cuda::detail::to_host(plan);
    CHECK(got.row == expected.row);
    CHECK(got.slot_of_row == expected.slot_of_row);
    CHECK(got.expert_offsets == expected.expert_offsets);
    CHECK(got.chosen_count == expected.chosen_count);
    std::vector<std::int32_t> counts(std::size_t(plan.tile_count.capacity()), -1);
    backend.device().download(counts.data(), plan.tile_count.data(), counts.size() * sizeof(std::int32_t));
    CHECK(std::count(counts.begin(), counts.end(), 0) == std::ptrdiff_t(counts.size()));
  }
}

TEST_CASE(CUDA_TEST_NAME("gather before the host has the expert offsets: every slot's room, the R kept rows filled")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  using B = moe::cuda::BasicBackend<float, TestDevice>;
  const B backend(make_device());
  const Index T = 23, N = 4, k = 2, H = 8;  // H = 8: whole 16-byte packs, the GPU's warp-per-row path
  for (const double capacity_factor : {0.0, 0.6}) {
    CAPTURE(capacity_factor);
    moe::LayerConfig config{H, 8, N, k};
    config.capacity_factor = capacity_factor;
    const auto logits = to_device<float>(backend, normal_values(std::size_t(T * N), 31), T, N);
    const auto x_host = normal_values(std::size_t(T * H), 32);
    const auto x = to_device<float>(backend, x_host, T, H);
    typename B::Plan plan;
    typename B::template Vector<float> weights;
    backend.route(logits, config, plan, weights);
    CHECK_FALSE(plan.offsets_on_host());
    // Fewer than T*k rows while the offsets are on their way: refused, saying why.
    typename B::Matrix short_rows(T * k - 1, H);
    CHECK_THROWS_WITH_AS(backend.gather_rows(x, plan, short_rows), doctest::Contains("until the host has the offsets"),
                         moe::Error);
    typename B::Matrix rows(T * k, H);
    backend.fill(moe::MatrixView<float>(rows), -7.f);
    backend.gather_rows(x, plan, rows);
    CHECK_FALSE(plan.offsets_on_host());  // queued: the gather did not wait
    const Index R = plan.rows();          // waits
    CHECK(plan.offsets_on_host());
    if (capacity_factor > 0) CHECK(R < T * k);
    const moe::RoutingPlan host_plan = moe::cuda::detail::to_host(plan);
    const auto got = to_host<float>(backend, rows.data(), T * k * H);
    for (Index r = 0; r < T * k; ++r)
      for (Index c = 0; c < H; ++c) {
        const float want = r < R ? x_host[std::size_t(host_plan.slot_of_row[std::size_t(r)] / k * H + c)] : -7.f;
        CHECK(got[std::size_t(r * H + c)] == want);  // rows past R untouched
      }
    // Once the host has them, R rows suffice.
    typename B::Matrix exact(R, H);
    backend.gather_rows(x, plan, exact);
  }
}

TEST_CASE(CUDA_TEST_NAME("bad input: the element-wise and routing primitives refuse operands of the wrong shape")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  check_primitive_shapes(moe::cuda::BasicBackend<float, TestDevice>(make_device()));
  check_primitive_shapes(moe::cuda::BasicBackend<moe::bfloat16, TestDevice>(make_device()));
}

// The caller's matrices in host memory: named by the layer, not read by a kernel (on a GPU, an illegal
// address the next sync reports). A GPU that reads pageable memory (HMM, ATS) takes them instead.
TEST_CASE(CUDA_TEST_NAME("bad input: a host matrix given to the layer is named, not read")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  using B = moe::cuda::BasicBackend<float, TestDevice>;
  moe::MoELayer<moe::SelfRoute, moe::GeluMLP, B> layer(small_config(), 1, {}, {}, B(make_device()));
  const Index T = 5, H = 32;
  std::vector<float> host_x(std::size_t(T * H), 0.5f), host_out(std::size_t(T * H));
  const auto x = to_device<float>(layer.backend(), host_x, T, H);
  typename B::Matrix y(T, H), dx(T, H);
  const auto error_of = [](auto&& call) {
    try {
      call();
    } catch (const moe::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const auto named = [&](const std::string& error, const char* operand) {
    if constexpr (kEmulatedDevice)
      CHECK_MESSAGE(error.find(std::string(operand) + " (") != std::string::npos, error);
    else
      CHECK_MESSAGE((error.empty() || error.find(std::string(operand) + " is pageable host memory") != std::string::npos),
                    error);
  };
  named(error_of([&] { layer.forward_into(moe::ConstMatrixView<float>(host_x.data(), T, H), y); }),
        "MoELayer forward: input");
  named(error_of([&] { layer.forward_into(x, moe::MatrixView<float>(host_out.data(), T, H)); }),
        "MoELayer forward: output");
  layer.forward_into(x, y);
  named(error_of([&] { layer.backward_into(moe::ConstMatrixView<float>(host_x.data(), T, H), dx); }),
        "MoELayer backward: output gradient");
}

TEST_CASE(CUDA_TEST_NAME("bad input: limits of the per-token selection and host copies are named")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  using B = moe::cuda::BasicBackend<float, TestDevice>;
  const B backend(make_device());
  typename B::Plan plan;
  typename B::template Vector<float> weights;
  const auto wide = to_device<float>(backend, std::vector<float>(2 * 300, 0.f), 2, 300);
  CHECK_THROWS_WITH_AS(backend.route(wide, moe::LayerConfig{300, 8, 300, 2}, plan, weights),
                       doctest::Contains("at most 256 experts"), moe::Error);
  const auto logits = to_device<float>(backend, std::vector<float>(2 * 16, 0.f), 2, 16);
  CHECK_THROWS_WITH_AS(backend.route(logits, moe::LayerConfig{16, 8, 16, 9}, plan, weights),
                       doctest::Contains("at most 8 experts per token"), moe::Error);
  // A layer past the limits is refused when it is made, before its weights are allocated.
  const std::size_t held = kEmulatedDevice ? TestDevice::memory_use().in_use : 0;
  CHECK_THROWS_WITH_AS((moe::MoELayer<moe::Linear, moe::GeluMLP, B>({300, 8, 300, 2}, 1, {}, {}, B(make_device()))),
                       doctest::Contains("at most 256 experts"), moe::Error);
  CHECK_THROWS_WITH_AS((moe::MoELayer<moe::SelfRoute, moe::GeluMLP, B>({16, 8, 16, 9}, 1, {}, {}, B(make_device()))),
                       doctest::Contains("at most 8 experts per token"), moe::Error);
  if constexpr (kEmulatedDevice) CHECK(TestDevice::memory_use().in_use == held);
  typename B::Matrix m(2, 3);
  CHECK_THROWS_WITH_AS(backend.upload(std::vector<float>(5, 0.f), m), doctest::Contains("5 values for a [2, 3]"),
                       moe::Error);
  CHECK_THROWS_AS(moe::cuda::column_major_gemm(moe::MatrixView<float>(m), moe::ConstMatrixView<float>(m),
                                               moe::cuda::BlasOp::none, moe::ConstMatrixView<float>(m),
                                               moe::cuda::BlasOp::none, false),
                  moe::Error);
}

TEST_CASE(CUDA_TEST_NAME("GEMM mapping: row-major products through the column-major call, every op pair")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  using B = moe::cuda::BasicBackend<float, TestDevice>;
  const B backend(make_device());
  const Index M = 7, K = 5, Nn = 9;
  for (auto op_a : {moe::cuda::BlasOp::none, moe::cuda::BlasOp::transpose})
    for (auto op_b : {moe::cuda::BlasOp::none, moe::cuda::BlasOp::transpose})
      for (bool accumulate : {false, true}) {
        const bool ta = op_a == moe::cuda::BlasOp::transpose, tb = op_b == moe::cuda::BlasOp::transpose;
        const Index ar = ta ? K : M, ac = ta ? M : K, br = tb ? Nn : K, bc = tb ? K : Nn;
        // Strided operands: each lives in the left part of a wider matrix.
        const auto a_host = normal_values(std::size_t(ar * (ac + 3)), 90);
        const auto b_host = normal_values(std::size_t(br * (bc + 2)), 91);
        const auto c_host = normal_values(std::size_t(M * Nn), 92);
        const auto a = to_device<float>(backend, a_host, ar, ac + 3), b = to_device<float>(backend, b_host, br, bc + 2);
        auto c = to_device<float>(backend, c_host, M, Nn);
        const moe::ConstMatrixView<float> av = moe::ConstMatrixView<float>(a).col_block(0, ac);
        const moe::ConstMatrixView<float> bv = moe::ConstMatrixView<float>(b).col_block(0, bc);
        moe::cuda::detail::gemm(backend.device(), moe::MatrixView<float>(c), av, op_a, bv, op_b, accumulate);
        const auto got = to_host<float>(backend, c.data(), M * Nn);
        std::vector<float> expected(std::size_t(M * Nn));
        for (Index i = 0; i < M; ++i)
          for (Index j = 0; j < Nn; ++j) {
            double sum = accumulate ? c_host[i * Nn + j] : 0.0;
            for (Index p = 0; p < K; ++p) {
              const double x = ta ? a_host[p * (ac + 3) + i] : a_host[i * (ac + 3) + p];
              const double y = tb ? b_host[j * (bc + 2) + p] : b_host[p * (bc + 2) + j];
              sum += x * y;
            }
            expected[i * Nn + j] = float(sum);
          }
        CAPTURE(ta);
        CAPTURE(tb);
        CAPTURE(accumulate);
        CHECK(relative_error(got, expected) < 1e-6);
      }
}

// Products a GPU device meant for cuBLASLt that went to cuBLAS instead (CudaDevice::lt_fallbacks);
// 0 on a device without cuBLASLt.
template <class D>
std::uint64_t lt_fallbacks_of(const D& device) {
  if constexpr (requires { device.lt_fallbacks(); })
    return device.lt_fallbacks();
  else
    return 0;
}

// out = epilogue(a b^T) with a bias per output column, for bias_gelu pre = a b^T + bias, out =
// gelu(pre), and for dgelu out = (a b^T) * gelu'(pre) with pre given: against float64 on the
// values the device holds. Shapes with 16-byte-aligned rows go to cuBLASLt's fused epilogues on
// the GPU (and must not fall back: CudaDevice::lt_fallbacks), the odd ones to cuBLAS and a
// separate pass. M = 37, 50, 64, 33 share cuBLASLt's plan of 64 rows (CudaDevice::lt_gemm: the
// products are marked Shape::varies, as an expert's are).
template <class S>
void check_gemm_epilogues(double tolerance) {
  using B = moe::cuda::BasicBackend<S, TestDevice>;
  const B backend(make_device());
  const auto fallbacks = [&] { return lt_fallbacks_of(backend.device()); };
  struct Shape {
    Index M, K, O;
  };
  for (const Shape shape : {Shape{37, 64, 96}, Shape{50, 64, 96}, Shape{64, 64, 96}, Shape{33, 64, 96}, Shape{7, 5, 9}})
    for (int variant = 0; variant < 4; ++variant) {  // bias, bias_gelu, bias_gelu without aux (inference), dgelu
      const moe::cuda::Epilogue epilogue = variant == 0   ? moe::cuda::Epilogue::bias
                                           : variant == 3 ? moe::cuda::Epilogue::dgelu
                                                          : moe::cuda::Epilogue::bias_gelu;
      const bool keep_aux = variant != 2;
      const auto [M, K, O] = shape;
      const std::uint64_t fallbacks_before = fallbacks();
      const bool dgelu = epilogue == moe::cuda::Epilogue::dgelu;
      auto a_host = normal_values(std::size_t(M * K), 93), w_host = normal_values(std::size_t(O * K), 94, 0.3f);
      auto bias_host = normal_values(std::size_t(O), 95), given_pre = normal_values(std::size_t(M * O), 96);
      for (auto* v : {&a_host, &w_host, &bias_host, &given_pre})  // the reference sees the values the device holds
        for (float& x : *v) x = float(S(x));
      const auto a = to_device<S>(backend, a_host, M, K), w = to_device<S>(backend, w_host, O, K);
      const auto bias = to_device<S>(backend, bias_host, 1, O);
      auto pre = to_device<S>(backend, given_pre, M, O);  // read by dgelu, overwritten by bias_gelu
      typename B::Matrix out(M, O);
      moe::cuda::detail::gemm_epilogue(backend.device(), moe::MatrixView<S>(out), moe::ConstMatrixView<S>(a),
                                       moe::ConstMatrixView<S>(w), moe::cuda::BlasOp::transpose, epilogue,
                                       dgelu ? nullptr : bias.data(),
                                       keep_aux ? moe::MatrixView<S>(pre) : moe::MatrixView<S>{},
                                       moe::cuda::detail::Shape::varies);
      std::vector<float> expected_pre(std::size_t(M * O)), expected_out(expected_pre.size());
      for (Index i = 0; i < M; ++i)
        for (Index o = 0; o < O; ++o) {
          double sum = dgelu ? 0.0 : bias_host[std::size_t(o)];
          for (Index p = 0; p < K; ++p) sum += double(a_host[std::size_t(i * K + p)]) * w_host[std::size_t(o * K + p)];
          const std::size_t at = std::size_t(i * O + o);
          expected_pre[at] = dgelu ? given_pre[at] : float(sum);
          expected_out[at] = float(epilogue == moe::cuda::Epilogue::bias_gelu ? moe::activation::gelu(sum)
                                   : dgelu ? sum * moe::activation::gelu_grad(double(given_pre[at]))
                                           : sum);
        }
      CAPTURE(shape.M);  // the binding itself: clang < 16 cannot capture it in CAPTURE's lambda
      CAPTURE(variant);
      CHECK(relative_error(to_host<S>(backend, out.data(), M * O), expected_out) < tolerance);
      if (epilogue != moe::cuda::Epilogue::bias)  // dgelu leaves it as given; without aux it is untouched
        CHECK(relative_error(to_host<S>(backend, pre.data(), M * O), keep_aux ? expected_pre : given_pre) < tolerance);
      if (K == 64) CHECK_MESSAGE(fallbacks() == fallbacks_before, "cuBLASLt declined an aligned fused product");
    }
}

TEST_CASE(CUDA_TEST_NAME("GEMM epilogues: bias, bias + GELU (with or without the pre-activation), GELU's derivative; fp32, bf16")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  check_gemm_epilogues<float>(1e-5);
  check_gemm_epilogues<moe::bfloat16>(2e-2);
}

// An expert's plain products (Shape::varies: cuBLASLt with a plan per power-of-two bucket of the
// row count on the GPU), against float64: the forward and input-gradient shape (rows = n of the
// column-major call) and the weight gradient's (rows = its depth k, accumulated into the gradient).
// Row counts 37, 50, 64 and 33 share one bucket, so later ones run on a plan chosen for 64 rows;
// with 16-byte-aligned operands none may fall back to cuBLAS.
template <class S>
void check_varying_gemms(double tolerance) {
  using B = moe::cuda::BasicBackend<S, TestDevice>;
  using moe::cuda::BlasOp;
  const B backend(make_device());
  const auto fallbacks = [&] { return lt_fallbacks_of(backend.device()); };
  constexpr Index I = 64, O = 96;
  const auto w_host = normal_values(std::size_t(O * I), 71, 0.3f);
  const auto w = to_device<S>(backend, w_host, O, I);
  const auto round = [](std::vector<float> v) {
    for (float& x : v) x = float(S(x));
    return v;
  };
  for (const Index rows : {Index(37), Index(50), Index(64), Index(33), Index(7)}) {
    CAPTURE(rows);
    const std::uint64_t before = fallbacks();
    const auto x_host = round(normal_values(std::size_t(rows * I), 72 + std::uint64_t(rows)));
    const auto dy_host = round(normal_values(std::size_t(rows * O), 73 + std::uint64_t(rows)));
    const auto x = to_device<S>(backend, x_host, rows, I), dy = to_device<S>(backend, dy_host, rows, O);
    // y = x W^T [rows, O]; dx = dy W [rows, I]; dW (+)= dy^T x [O, I], starting from W itself.
    typename B::Matrix y(rows, O), dx(rows, I);
    auto dw = to_device<S>(backend, round(w_host), O, I);
    const auto varies = moe::cuda::detail::Shape::varies;
    moe::cuda::detail::gemm(backend.device(), moe::MatrixView<S>(y), moe::ConstMatrixView<S>(x), BlasOp::none,
                            moe::ConstMatrixView<S>(w), BlasOp::transpose, false, varies);
    moe::cuda::detail::gemm(backend.device(), moe::MatrixView<S>(dx), moe::ConstMatrixView<S>(dy), BlasOp::none,
                            moe::ConstMatrixView<S>(w), BlasOp::none, false, varies);
    moe::cuda::detail::gemm(backend.device(), moe::MatrixView<S>(dw), moe::ConstMatrixView<S>(dy), BlasOp::transpose,
                            moe::ConstMatrixView<S>(x), BlasOp::none, true, varies);
    std::vector<float> y_ref(std::size_t(rows * O)), dx_ref(std::size_t(rows * I)), dw_ref(std::size_t(O * I));
    for (Index r = 0; r < rows; ++r)
      for (Index o = 0; o < O; ++o) {
        double sum = 0;
        for (Index i = 0; i < I; ++i) sum += double(x_host[std::size_t(r * I + i)]) * w_host[std::size_t(o * I + i)];
        y_ref[std::size_t(r * O + o)] = float(sum);
      }
    for (Index r = 0; r < rows; ++r)
      for (Index i = 0; i < I; ++i) {
        double sum = 0;
        for (Index o = 0; o < O; ++o) sum += double(dy_host[std::size_t(r * O + o)]) * w_host[std::size_t(o * I + i)];
        dx_ref[std::size_t(r * I + i)] = float(sum);
      }
    for (Index o = 0; o < O; ++o)
      for (Index i = 0; i < I; ++i) {
        double sum = double(float(S(w_host[std::size_t(o * I + i)])));
        for (Index r = 0; r < rows; ++r) sum += double(dy_host[std::size_t(r * O + o)]) * x_host[std::size_t(r * I + i)];
        dw_ref[std::size_t(o * I + i)] = float(sum);
      }
    CHECK(relative_error(to_host<S>(backend, y.data(), rows * O), y_ref) < tolerance);
    CHECK(relative_error(to_host<S>(backend, dx.data(), rows * I), dx_ref) < tolerance);
    CHECK(relative_error(to_host<S>(backend, dw.data(), O * I), dw_ref) < tolerance);
    CHECK_MESSAGE(fallbacks() == before, "cuBLASLt declined an aligned product of a varying shape");
  }
}

TEST_CASE(CUDA_TEST_NAME("GEMMs of varying shape (an expert's): forward, input and accumulated weight gradients; fp32, bf16")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  check_varying_gemms<float>(1e-5);
  check_varying_gemms<moe::bfloat16>(2e-2);
}

TEST_CASE(CUDA_TEST_NAME("GEMM epilogues: bad arguments are named before any product runs")) {
  CUDA_TEST_SKIP_WITHOUT_DEVICE();
  using B = moe::cuda::BasicBackend<float, TestDevice>;
  const B backend(make_device());
  typename B::Matrix a(4, 8), w(6, 8), out(4, 6), pre(4, 5), bias(1, 6);
  CHECK_THROWS_WITH_AS(moe::cuda::detail::gemm_epilogue(backend.device(), moe::MatrixView<float>(out),
                                                        moe::ConstMatrixView<float>(a), moe::ConstMatrixView<float>(w),
                                                        moe::cuda::BlasOp::transpose, moe::cuda::Epilogue::bias_gelu,
                                                        bias.data(), moe::MatrixView<float>(pre)),
                       doctest::Contains("aux is [4, 5], the output is [4, 6]"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::detail::gemm_epilogue(backend.device(), moe::MatrixView<float>(out),
                                                        moe::ConstMatrixView<float>(a), moe::ConstMatrixView<float>(w),
                                                        moe::cuda::BlasOp::transpose, moe::cuda::Epilogue::bias,
                                                        static_cast<const float*>(nullptr)),
                       doctest::Contains("bias [6] is null"), moe::Error);
  const float* no_bias = nullptr;
  CHECK_THROWS_WITH_AS(backend.grouped_linear_gelu_forward(a, std::vector<Index>{0, 4}, w, no_bias, out, out),
                       doctest::Contains("bias must not be null"), moe::Error);
}

}  // namespace cuda_test
