// tests/cuda/cuda_nn_loss_cases.hpp: moe/cuda/nn/cross_entropy.hpp and moe/cuda/nn/adamw.hpp on a
// device, against the CPU functions of moe/nn (fp32) on the same inputs. The including file
// defines, in namespace cuda_test, `TestDevice` and `make_device()` (see test_cuda_emulated.cpp).
// Host compiler only (includes the CPU world).
#pragma once

#include <doctest/doctest.h>

#include "cuda/compare.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "moe/bfloat16.hpp"
#include "moe/cuda/buffer.hpp"
#include "moe/cuda/nn/adamw.hpp"
#include "moe/cuda/nn/cross_entropy.hpp"
#include "moe/moe.hpp"
#include "moe/nn.hpp"

namespace cuda_nn_loss_test {

using cuda_test::relative_error;
using cuda_test::same_bits;
using cuda_test::TestDevice;
using moe::Index;
template <class S>
using DArray = moe::cuda::DeviceArray<S, TestDevice>;

static_assert(moe::cuda::nn::kIgnoreTarget == moe::nn::kIgnoreTarget);

inline std::vector<float> normal_values(std::size_t n, std::uint64_t seed, float std_dev = 1.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, std_dev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// The values as S holds them, back in float (what both sides get as input).
template <class S>
std::vector<float> rounded(std::vector<float> v) {
  for (float& x : v) x = float(S(x));
  return v;
}

template <class S>
DArray<S> to_device(const TestDevice& device, const std::vector<float>& host) {
  std::vector<S> converted(host.size());
  for (std::size_t i = 0; i < host.size(); ++i) converted[i] = S(host[i]);
  DArray<S> a(Index(host.size()));
  device.upload(a.data(), converted.data(), converted.size() * sizeof(S));
  return a;
}

template <class S>
std::vector<float> to_host(const TestDevice& device, const S* data, Index n) {
  std::vector<S> raw(static_cast<std::size_t>(n));
  device.download(raw.data(), data, raw.size() * sizeof(S));
  std::vector<float> out(raw.size());
  for (std::size_t i = 0; i < raw.size(); ++i) out[i] = float(raw[i]);
  return out;
}

template <class S>
std::vector<S> raw_host(const TestDevice& device, const S* data, Index n) {
  std::vector<S> raw(static_cast<std::size_t>(n));
  device.download(raw.data(), data, raw.size() * sizeof(S));
  return raw;
}

template <class S>
constexpr double tolerance() {
  return std::is_same_v<S, moe::bfloat16> ? 2e-2 : 1e-5;
}

// ---- cross-entropy ---------------------------------------------------------------------------

// Random targets in [0, V), a fraction of them -1.
inline std::vector<std::int32_t> random_targets(Index N, Index V, double ignored, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int32_t> id(0, std::int32_t(V - 1));
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<std::int32_t> t(static_cast<std::size_t>(N));
  for (auto& x : t) x = u(rng) < ignored ? moe::nn::kIgnoreTarget : id(rng);
  return t;
}

// Forward and backward on the device vs the CPU fp32 functions; reruns give the same bits; the
// backward in place (dlogits = logits) gives the same bits as into a separate buffer. Rows lie
// `stride` elements apart (0: V, contiguous), the columns past V holding NaN: a kernel that read
// them would turn a loss or gradient into NaN, one that wrote them would change them.
template <class S>
void check_cross_entropy(Index N, Index V, double ignored, std::uint64_t seed, Index stride = 0) {
  if (stride == 0) stride = V;
  CAPTURE(N);
  CAPTURE(V);
  CAPTURE(stride);
  const TestDevice device = cuda_test::make_device();
  const std::vector<float> logits = rounded<S>(normal_values(std::size_t(N * V), seed, 3.f));
  const std::vector<std::int32_t> targets = random_targets(N, V, ignored, seed + 1);
  const double dloss = 0.7;

  std::vector<float> cpu_losses(static_cast<std::size_t>(N)), cpu_dlogits(static_cast<std::size_t>(N * V));
  const moe::ConstMatrixView<float> cpu_logits(logits.data(), N, V);
  const double cpu_mean = moe::nn::cross_entropy_forward<float>(cpu_logits, targets, cpu_losses.data(), 2);
  moe::nn::cross_entropy_backward<float>(cpu_logits, targets, dloss, {cpu_dlogits.data(), N, V}, 2);

  // The logits in rows of `stride`, and the same layout back as V columns per row.
  std::vector<float> padded(static_cast<std::size_t>(N * stride), std::numeric_limits<float>::quiet_NaN());
  for (Index r = 0; r < N; ++r)
    for (Index c = 0; c < V; ++c) padded[std::size_t(r * stride + c)] = logits[std::size_t(r * V + c)];
  const auto columns = [&](const std::vector<float>& rows) {
    std::vector<float> out(static_cast<std::size_t>(N * V));
    for (Index r = 0; r < N; ++r)
      for (Index c = 0; c < V; ++c) out[std::size_t(r * V + c)] = rows[std::size_t(r * stride + c)];
    return out;
  };
  const auto padding_kept = [&](const std::vector<float>& rows) {
    for (Index r = 0; r < N; ++r)
      for (Index c = V; c < stride; ++c)
        if (!std::isnan(rows[std::size_t(r * stride + c)])) return false;
    return true;
  };

  DArray<S> d_logits = to_device<S>(device, padded), d_dlogits = to_device<S>(device, padded),
            d_dlogits2 = to_device<S>(device, padded);
  DArray<S> d_losses(N), d_losses2(N);
  const moe::ConstMatrixView<S> view(d_logits.data(), N, V, stride);
  const double mean = moe::cuda::nn::cross_entropy_forward<S>(device, view, targets, d_losses.data());
  moe::cuda::nn::cross_entropy_backward<S>(device, view, targets, dloss, {d_dlogits.data(), N, V, stride});

  const std::vector<float> dlogits_rows = to_host(device, d_dlogits.data(), N * stride);
  CHECK(relative_error(to_host(device, d_losses.data(), N), cpu_losses) < tolerance<S>());
  CHECK(std::abs(mean - cpu_mean) <= tolerance<S>() * std::max(1.0, std::abs(cpu_mean)));
  CHECK(relative_error(columns(dlogits_rows), cpu_dlogits) < tolerance<S>());
  CHECK(padding_kept(dlogits_rows));
  // Ignored rows: zero loss, zero gradient row, exactly.
  const std::vector<float> losses = to_host(device, d_losses.data(), N), dl = columns(dlogits_rows);
  for (Index r = 0; r < N; ++r)
    if (targets[std::size_t(r)] == moe::nn::kIgnoreTarget) {
      CHECK(losses[std::size_t(r)] == 0.f);
      for (Index c = 0; c < V; ++c) CHECK(dl[std::size_t(r * V + c)] == 0.f);
    }

  // Same bits on a rerun, which hands the forward's row statistics to the backward (left unwritten,
  // hence poisoned on the emulated device, for ignored rows: the backward must not read them there).
  DArray<moe::Compute<S>> d_stats(2 * N);
  const double mean2 = moe::cuda::nn::cross_entropy_forward<S>(device, view, targets, d_losses2.data(), d_stats.data());
  moe::cuda::nn::cross_entropy_backward<S>(device, view, targets, dloss, {d_dlogits2.data(), N, V, stride},
                                           d_stats.data());
  CHECK(std::memcmp(&mean, &mean2, sizeof(double)) == 0);
  CHECK(same_bits(raw_host(device, d_losses.data(), N), raw_host(device, d_losses2.data(), N)));
  CHECK(same_bits(raw_host(device, d_dlogits.data(), N * stride), raw_host(device, d_dlogits2.data(), N * stride)));

  // In place: dlogits aliases logits.
  moe::cuda::nn::cross_entropy_backward<S>(device, view, targets, dloss, {d_logits.data(), N, V, stride});
  CHECK(same_bits(raw_host(device, d_logits.data(), N * stride), raw_host(device, d_dlogits.data(), N * stride)));
}

TEST_CASE("cuda nn loss: cross-entropy forward/backward match the CPU (fp32, awkward shapes)") {
  check_cross_entropy<float>(37, 101, 0.2, 11);
  check_cross_entropy<float>(1, 7, 0.0, 12);
  check_cross_entropy<float>(1, 1, 0.0, 13);      // one class: loss 0, gradient 0
  check_cross_entropy<float>(130, 50, 0.3, 14);   // several loss chunks, the last one partial
  check_cross_entropy<float>(200, 3, 0.5, 15);
  check_cross_entropy<float>(65, 257, 0.0, 16);
  check_cross_entropy<float>(0, 5, 0.0, 17);      // no rows
  check_cross_entropy<float>(33, 64, 0.2, 18);    // rows starting 16-byte aligned: the packed row work
  check_cross_entropy<float>(9, 520, 0.1, 19);
  // Rows padded to 64 columns as the GPT-2 model's logits: packed, with a partial last pack.
  check_cross_entropy<float>(37, 101, 0.2, 41, 128);
  check_cross_entropy<float>(5, 1, 0.0, 42, 64);
  check_cross_entropy<float>(65, 257, 0.1, 43, 320);
}

TEST_CASE("cuda nn loss: cross-entropy forward/backward match the CPU (bf16 vs fp32)") {
  check_cross_entropy<moe::bfloat16>(37, 101, 0.2, 21);
  check_cross_entropy<moe::bfloat16>(1, 7, 0.0, 22);
  check_cross_entropy<moe::bfloat16>(130, 50, 0.3, 24);
  check_cross_entropy<moe::bfloat16>(65, 257, 0.0, 26);
  check_cross_entropy<moe::bfloat16>(33, 64, 0.2, 27);  // packed
  check_cross_entropy<moe::bfloat16>(9, 520, 0.1, 28);
  check_cross_entropy<moe::bfloat16>(37, 101, 0.2, 44, 128);  // padded rows, a partial last pack
  check_cross_entropy<moe::bfloat16>(65, 257, 0.1, 45, 320);
  check_cross_entropy<moe::bfloat16>(3, 7, 0.0, 46, 64);     // one partial pack per row
}

TEST_CASE("cuda nn loss: cross-entropy rows with a +inf, -inf or NaN logit give what the CPU gives") {
  // Row 0: one +inf (not the target); row 1: +inf at the target; row 2: two +infs; row 3: a NaN; row 4: -inf
  // at a non-target (probability 0); row 5: -inf at the target (loss +inf); row 6: finite. V = 40: whole packs of
  // bf16 and of float, so the packed row work runs, the specials in different packs and lanes.
  const Index N = 7, V = 40;
  constexpr float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> logits = normal_values(std::size_t(N * V), 5, 2.f);
  const std::vector<std::int32_t> targets = {3, 9, 0, 1, 2, 6, 4};
  logits[0 * V + 17] = inf;
  logits[1 * V + 9] = inf;
  logits[2 * V + 5] = inf, logits[2 * V + 33] = inf;
  logits[3 * V + 21] = nan;
  logits[4 * V + 30] = -inf;
  logits[5 * V + 6] = -inf;
  std::vector<float> cpu_losses(static_cast<std::size_t>(N)), cpu_dlogits(static_cast<std::size_t>(N * V));
  const moe::ConstMatrixView<float> cpu_logits(logits.data(), N, V);
  moe::nn::cross_entropy_forward<float>(cpu_logits, targets, cpu_losses.data(), 1);
  moe::nn::cross_entropy_backward<float>(cpu_logits, targets, 1.0, {cpu_dlogits.data(), N, V}, 1);
  // The same class of value: NaN, +inf, -inf, or finite within the precision's tolerance.
  const auto agree = [](float gpu, float cpu, double tol) {
    if (std::isnan(cpu) || std::isnan(gpu)) return std::isnan(cpu) && std::isnan(gpu);
    if (std::isinf(cpu) || std::isinf(gpu)) return gpu == cpu;
    return std::abs(double(gpu) - double(cpu)) <= tol * std::max(1.0, std::abs(double(cpu)));
  };
  const auto check = [&](auto scalar) {
    using S = decltype(scalar);
    const TestDevice device = cuda_test::make_device();
    DArray<S> d_logits = to_device<S>(device, logits), d_dlogits = to_device<S>(device, logits);
    DArray<S> d_losses(N);
    const moe::ConstMatrixView<S> view(d_logits.data(), N, V);
    moe::cuda::nn::cross_entropy_forward<S>(device, view, targets, d_losses.data());
    moe::cuda::nn::cross_entropy_backward<S>(device, view, targets, 1.0, {d_dlogits.data(), N, V});
    const std::vector<float> losses = to_host(device, d_losses.data(), N), dlogits = to_host(device, d_dlogits.data(), N * V);
    for (Index r = 0; r < N; ++r) {
      CAPTURE(r);
      CHECK(agree(losses[std::size_t(r)], cpu_losses[std::size_t(r)], 0.05));
      for (Index c = 0; c < V; ++c) {
        CAPTURE(c);
        CHECK(agree(dlogits[std::size_t(r * V + c)], cpu_dlogits[std::size_t(r * V + c)], 0.05));
      }
    }
  };
  check(float{});
  check(moe::bfloat16{});
  // What the CPU gives, for the record: NaN for any +inf or NaN in the row, +inf for a -inf target.
  CHECK(std::isnan(cpu_losses[0]));
  CHECK(std::isnan(cpu_losses[1]));
  CHECK(std::isnan(cpu_losses[2]));
  CHECK(std::isnan(cpu_losses[3]));
  CHECK(std::isfinite(cpu_losses[4]));
  CHECK(cpu_losses[5] == inf);
  CHECK(std::isfinite(cpu_losses[6]));
}

TEST_CASE("cuda nn loss: cross-entropy with every row ignored gives 0 and zero gradients") {
  const TestDevice device = cuda_test::make_device();
  const Index N = 9, V = 13;
  const std::vector<std::int32_t> targets(std::size_t(N), moe::nn::kIgnoreTarget);
  DArray<float> logits = to_device<float>(device, normal_values(std::size_t(N * V), 3));
  DArray<float> losses = to_device<float>(device, std::vector<float>(std::size_t(N), 5.f));
  DArray<float> dlogits = to_device<float>(device, std::vector<float>(std::size_t(N * V), 5.f));
  const moe::ConstMatrixView<float> view(logits.data(), N, V);
  CHECK(moe::cuda::nn::cross_entropy_forward<float>(device, view, targets, losses.data()) == 0.0);
  moe::cuda::nn::cross_entropy_backward<float>(device, view, targets, 1.0, {dlogits.data(), N, V});
  for (float x : to_host(device, losses.data(), N)) CHECK(x == 0.f);
  for (float x : to_host(device, dlogits.data(), N * V)) CHECK(x == 0.f);
}

TEST_CASE("cuda nn loss: cross-entropy rejects bad targets and shapes, naming them") {
  const TestDevice device = cuda_test::make_device();
  const Index N = 4, V = 7;
  DArray<float> logits = to_device<float>(device, normal_values(std::size_t(N * V), 4));
  DArray<float> losses(N), dlogits(N * V);
  const moe::ConstMatrixView<float> view(logits.data(), N, V);
  const std::vector<std::int32_t> too_big = {0, 1, 7, 2}, too_small = {0, -2, 1, 2}, short_list = {0, 1, 2};
  using moe::cuda::nn::cross_entropy_backward;
  using moe::cuda::nn::cross_entropy_forward;
  CHECK_THROWS_WITH_AS(cross_entropy_forward<float>(device, view, too_big, losses.data()),
                       doctest::Contains("target 7 of row 2 is outside [0, 7)"), moe::Error);
  CHECK_THROWS_WITH_AS(cross_entropy_forward<float>(device, view, too_small, losses.data()),
                       doctest::Contains("target -2 of row 1 is outside [0, 7)"), moe::Error);
  CHECK_THROWS_WITH_AS(cross_entropy_forward<float>(device, view, short_list, losses.data()),
                       doctest::Contains("targets has 3 entries, logits has 4 rows"), moe::Error);
  CHECK_THROWS_WITH_AS(cross_entropy_backward<float>(device, view, too_big, 1.0, {dlogits.data(), N, V}),
                       doctest::Contains("cross_entropy_backward: target 7 of row 2"), moe::Error);
  const std::vector<std::int32_t> good = {0, 1, 6, -1};
  CHECK_THROWS_WITH_AS(cross_entropy_forward<float>(device, view, good, nullptr),
                       doctest::Contains("losses [4] must not be null"), moe::Error);
  CHECK_THROWS_WITH_AS(cross_entropy_backward<float>(device, view, good, 1.0, {dlogits.data(), N, V - 1}),
                       doctest::Contains("dlogits is [4, 6], logits is [4, 7]"), moe::Error);
  CHECK_THROWS_WITH_AS(cross_entropy_forward<float>(device, moe::ConstMatrixView<float>(logits.data(), N, 0), good,
                                                    losses.data()),
                       doctest::Contains("logits has no columns (logits is [4, 0])"), moe::Error);
}

// ---- AdamW and clip_grad_norm ------------------------------------------------------------------

// One parameter on both sides: host fp32 (CPU reference) and device S.
template <class S>
struct TwinParam {
  std::string name;
  std::vector<Index> shape;
  bool trainable = true, has_grad = true;
  std::vector<float> value, grad;  // CPU side
  DArray<S> d_value, d_grad;       // device side
  Index size() const { return Index(value.size()); }
};

struct ParamSpec {
  std::string name;
  std::vector<Index> shape;
  bool trainable, has_grad;
};

template <class S>
std::vector<TwinParam<S>> make_params(const TestDevice& device, std::uint64_t seed, const std::vector<ParamSpec>& specs) {
  std::vector<TwinParam<S>> params;
  for (const ParamSpec& s : specs) {
    TwinParam<S> p;
    p.name = s.name, p.shape = s.shape, p.trainable = s.trainable, p.has_grad = s.has_grad;
    Index n = 1;
    for (Index d : s.shape) n *= d;
    p.value = rounded<S>(normal_values(std::size_t(n), seed++));
    p.d_value = to_device<S>(device, p.value);
    if (s.has_grad) {
      p.grad.assign(std::size_t(n), 0.f);
      p.d_grad = DArray<S>(n);
    }
    params.push_back(std::move(p));
  }
  return params;
}

// A small model's worth: matrices and vectors, a scalar, a frozen buffer, one without a gradient,
// an empty one.
template <class S>
std::vector<TwinParam<S>> make_params(const TestDevice& device, std::uint64_t seed) {
  return make_params<S>(device, seed,
                        {{"w", {37, 23}, true, true},
                         {"b", {23}, true, true},
                         {"s", {1}, true, true},
                         {"big", {71, 97}, true, true},
                         {"t3", {5, 3, 7}, true, true},
                         {"frozen", {4, 4}, false, true},
                         {"nograd", {6}, true, false},
                         {"empty", {0, 5}, true, true}});
}

// `count` parameters (more than one launch of moe/cuda/multi_tensor.hpp takes when count is large),
// sized around its chunks (the update's 512 and the norm's 2048 elements): 1-D and 2-D (decayed or
// not), every 7th frozen, every 11th without a gradient, every 13th empty.
inline std::vector<ParamSpec> many_param_specs(int count) {
  const Index sizes[] = {1, 511, 512, 513, 2047, 2048, 2049, 3, 4100, 17};
  std::vector<ParamSpec> specs;
  for (int i = 0; i < count; ++i) {
    const Index n = i % 13 == 12 ? 0 : sizes[i % 10];
    ParamSpec s{std::string("p").append(std::to_string(i)), i % 2 ? std::vector<Index>{n} : std::vector<Index>{1, n}, i % 7 != 6,
                i % 11 != 10};
    specs.push_back(std::move(s));
  }
  return specs;
}

template <class S>
std::vector<moe::ParamRef<float>> cpu_refs(std::vector<TwinParam<S>>& params) {
  std::vector<moe::ParamRef<float>> refs;
  for (auto& p : params) refs.push_back({p.name, p.shape, std::span<float>(p.value), std::span<float>(p.grad), p.trainable});
  return refs;
}

template <class S>
std::vector<moe::ParamRef<S>> device_refs(std::vector<TwinParam<S>>& params) {
  std::vector<moe::ParamRef<S>> refs;
  for (auto& p : params)
    refs.push_back({p.name, p.shape, std::span<S>(p.d_value.data(), std::size_t(p.size())),
                    p.has_grad ? std::span<S>(p.d_grad.data(), std::size_t(p.size())) : std::span<S>(), p.trainable});
  return refs;
}

// Fresh gradients, the same (rounded to S) on both sides; `scale` makes the norm large or small.
template <class S>
void set_gradients(const TestDevice& device, std::vector<TwinParam<S>>& params, std::uint64_t seed, float scale) {
  for (auto& p : params)
    if (p.has_grad) {
      p.grad = rounded<S>(normal_values(std::size_t(p.size()), seed++, scale));
      p.d_grad = to_device<S>(device, p.grad);
    }
}

// What one trajectory leaves on the device, for bit comparisons.
template <class S>
struct Trajectory {
  std::vector<std::vector<S>> values;
  std::vector<std::vector<float>> m, v;
  std::vector<double> norms;
};

// `steps` AdamW steps on both sides (gradient clipping at max_norm first when max_norm > 0),
// checked against the CPU after every step. in_update: the device clips through the update
// (grad_norm, then step(params, lr, clip_factor)), its gradients left unscaled.
template <class S>
Trajectory<S> run_adamw(int steps, double max_norm, std::uint64_t seed, bool in_update = false) {
  CAPTURE(max_norm);
  CAPTURE(in_update);
  const TestDevice device = cuda_test::make_device();
  std::vector<TwinParam<S>> params = make_params<S>(device, seed);
  const std::vector<TwinParam<S>>& cparams = params;
  std::vector<std::vector<float>> initial;
  for (const auto& p : cparams) initial.push_back(p.value);

  moe::nn::AdamWConfig cpu_config;
  cpu_config.lr = 0.05, cpu_config.weight_decay = 0.1, cpu_config.beta2 = 0.95;
  moe::nn::AdamW<float> cpu(cpu_config);
  cpu.set_threads(2);
  moe::cuda::nn::AdamWConfig config;
  config.lr = cpu_config.lr, config.weight_decay = cpu_config.weight_decay, config.beta1 = cpu_config.beta1;
  config.beta2 = cpu_config.beta2, config.eps = cpu_config.eps;
  moe::cuda::nn::AdamW<S, TestDevice> adamw(device, config);

  Trajectory<S> out;
  for (int t = 1; t <= steps; ++t) {
    CAPTURE(t);
    set_gradients(device, params, seed + 100 * std::uint64_t(t), t % 2 ? 1.f : 0.001f);
    auto cpu_list = cpu_refs(params);
    auto list = device_refs(params);
    using C = moe::Compute<S>;
    C factor = 1;
    if (max_norm > 0) {
      const std::vector<float> unclipped = cparams[0].grad;
      const double cpu_norm = moe::nn::clip_grad_norm(cpu_list, max_norm, 2);
      double norm = 0;
      if (in_update) {
        norm = moe::cuda::nn::grad_norm(device, list);
        factor = moe::cuda::nn::clip_factor<C>(norm, max_norm);
        // The gradients stay as they were (the update scales what it reads).
        CHECK(same_bits(to_host(device, cparams[0].d_grad.data(), cparams[0].size()), unclipped));
      } else {
        norm = moe::cuda::nn::clip_grad_norm(device, list, max_norm);
        for (const auto& p : cparams)
          if (p.has_grad) CHECK(relative_error(to_host(device, p.d_grad.data(), p.size()), p.grad) < tolerance<S>());
      }
      CHECK(std::abs(norm - cpu_norm) <= 1e-6 * cpu_norm);  // the same inputs, summed in double
      out.norms.push_back(norm);
    }
    if (t == 2) {  // a scheduled rate
      cpu.step(cpu_list, 0.03);
      adamw.step(list, 0.03, factor);
    } else {
      cpu.step(cpu_list);
      if (in_update)
        adamw.step(list, config.lr, factor);
      else
        adamw.step(list);
    }
    CHECK(adamw.step_count() == t);
    const auto m = adamw.m(), v = adamw.v();
    REQUIRE(m.size() == params.size());
    for (std::size_t i = 0; i < params.size(); ++i) {
      const auto& p = cparams[i];
      CAPTURE(p.name);
      const std::vector<float> value = to_host(device, p.d_value.data(), p.size());
      CHECK(relative_error(value, p.value) < tolerance<S>());
      const bool updated = p.trainable && p.has_grad && p.size() > 0;
      if (!updated) CHECK(same_bits(value, initial[i]));  // untouched
      REQUIRE(m[i].size() == cpu.m()[i].size());
      CHECK(relative_error(m[i], cpu.m()[i]) < tolerance<S>());
      CHECK(relative_error(v[i], cpu.v()[i]) < tolerance<S>());
    }
  }
  for (const auto& p : cparams) out.values.push_back(raw_host(device, p.d_value.data(), p.size()));
  out.m = adamw.m(), out.v = adamw.v();
  return out;
}

template <class S>
void check_adamw() {
  for (double max_norm : {0.0, 1.0, 1e6}) {  // no clipping, clipping that scales, clipping that does not
    const Trajectory<S> a = run_adamw<S>(4, max_norm, 7);
    const Trajectory<S> b = run_adamw<S>(4, max_norm, 7);
    for (std::size_t i = 0; i < a.values.size(); ++i) {
      CHECK(same_bits(a.values[i], b.values[i]));
      CHECK(same_bits(a.m[i], b.m[i]));
      CHECK(same_bits(a.v[i], b.v[i]));
    }
    CHECK(same_bits(a.norms, b.norms));
    // Clipping through the update: within tolerance of the CPU (run_adamw checks); for fp32
    // gradients, the bits of clipping in place (C(g) * factor is the in-place product).
    const Trajectory<S> c = run_adamw<S>(4, max_norm, 7, true);
    CHECK(same_bits(a.norms, c.norms));
    if constexpr (std::is_same_v<S, float>)
      for (std::size_t i = 0; i < a.values.size(); ++i) {
        CHECK(same_bits(a.values[i], c.values[i]));
        CHECK(same_bits(a.m[i], c.m[i]));
        CHECK(same_bits(a.v[i], c.v[i]));
      }
  }
}

TEST_CASE("cuda nn loss: AdamW steps and gradient clipping match the CPU (fp32)") { check_adamw<float>(); }

TEST_CASE("cuda nn loss: AdamW steps and gradient clipping match the CPU (bf16 params, fp32 moments)") {
  check_adamw<moe::bfloat16>();
}

TEST_CASE("cuda nn loss: AdamW state restored with set_state resumes the same trajectory") {
  const TestDevice device = cuda_test::make_device();
  std::vector<TwinParam<float>> a = make_params<float>(device, 31), b = make_params<float>(device, 31);
  moe::cuda::nn::AdamW<float, TestDevice> first(device), second(device);
  for (int t = 1; t <= 2; ++t) {
    set_gradients(device, a, 500 + std::uint64_t(t), 1.f);
    auto list = device_refs(a);
    first.step(list);
  }
  // b: a's values and state after two steps.
  for (std::size_t i = 0; i < a.size(); ++i) b[i].d_value = to_device<float>(device, to_host(device, a[i].d_value.data(), a[i].size()));
  second.set_state(first.step_count(), first.m(), first.v());
  set_gradients(device, a, 503, 1.f);
  set_gradients(device, b, 503, 1.f);
  auto list_a = device_refs(a), list_b = device_refs(b);
  first.step(list_a);
  second.step(list_b);
  CHECK(second.step_count() == 3);
  for (std::size_t i = 0; i < a.size(); ++i)
    CHECK(same_bits(raw_host(device, a[i].d_value.data(), a[i].size()), raw_host(device, b[i].d_value.data(), b[i].size())));
}

TEST_CASE("cuda nn loss: AdamW over more tensors than one launch takes gives each the bits of its own optimizer") {
  // The multi-tensor launches (moe/cuda/multi_tensor.hpp) must hand each element to the update of
  // its own tensor: one optimizer over the whole list and one optimizer per tensor agree bit for bit.
  const TestDevice device = cuda_test::make_device();
  const int count = 3 * moe::cuda::kTensorsPerLaunch<moe::cuda::nn::adamw_detail::UpdatedTensor<moe::bfloat16>> + 5;
  const std::vector<ParamSpec> specs = many_param_specs(count);
  using B16 = moe::bfloat16;
  std::vector<TwinParam<B16>> together = make_params<B16>(device, 81, specs), apart = make_params<B16>(device, 81, specs);
  moe::cuda::nn::AdamWConfig config;
  config.lr = 0.01;
  moe::cuda::nn::AdamW<B16, TestDevice> all(device, config);
  std::vector<moe::cuda::nn::AdamW<B16, TestDevice>> each;
  for (int i = 0; i < count; ++i) each.emplace_back(device, config);
  for (int t = 1; t <= 3; ++t) {
    set_gradients(device, together, 900 + std::uint64_t(t), 1.f);
    set_gradients(device, apart, 900 + std::uint64_t(t), 1.f);
    auto list = device_refs(together);
    all.step(list);
    auto singles = device_refs(apart);
    for (int i = 0; i < count; ++i) {
      std::vector<moe::ParamRef<B16>> one = {singles[std::size_t(i)]};
      each[std::size_t(i)].step(one);
    }
  }
  const auto master = all.master_weights(), m = all.m();
  for (int i = 0; i < count; ++i) {
    CAPTURE(i);
    const auto& a = together[std::size_t(i)];
    CHECK(same_bits(raw_host(device, a.d_value.data(), a.size()),
                    raw_host(device, apart[std::size_t(i)].d_value.data(), a.size())));
    CHECK(same_bits(master[std::size_t(i)], each[std::size_t(i)].master_weights()[0]));
    CHECK(same_bits(m[std::size_t(i)], each[std::size_t(i)].m()[0]));
  }
}

TEST_CASE("cuda nn loss: clip_grad_norm over more tensors than one launch takes matches the CPU") {
  const TestDevice device = cuda_test::make_device();
  const int count = 3 * moe::cuda::kTensorsPerLaunch<moe::cuda::nn::adamw_detail::GradTensor<float>> + 5;
  std::vector<TwinParam<float>> params = make_params<float>(device, 91, many_param_specs(count));
  set_gradients(device, params, 92, 1.f);
  auto cpu_list = cpu_refs(params);
  auto list = device_refs(params);
  const double cpu_norm = moe::nn::clip_grad_norm(cpu_list, 1.0, 2);
  REQUIRE(cpu_norm > 10.0);  // so the gradients are scaled
  const double norm = moe::cuda::nn::clip_grad_norm(device, list, 1.0);
  CHECK(std::abs(norm - cpu_norm) <= 1e-12 * cpu_norm);  // the same squares, summed in double in another order
  for (const auto& p : params) {
    CAPTURE(p.name);
    if (p.has_grad) CHECK(relative_error(to_host(device, p.d_grad.data(), p.size()), p.grad) < 1e-6);
  }
}

// zero_grads and scale_grads: every gradient of the list (frozen ones too), packed where aligned and
// element by element where not (a gradient one element into its buffer), nothing outside touched.
template <class S>
void check_gradient_passes() {
  const TestDevice device = cuda_test::make_device();
  const int count = 2 * moe::cuda::kTensorsPerLaunch<moe::cuda::nn::adamw_detail::GradTensor<S>> + 3;
  std::vector<TwinParam<S>> params = make_params<S>(device, 61, many_param_specs(count));
  set_gradients(device, params, 62, 1.f);
  auto list = device_refs(params);
  // The last parameter with a gradient of 2+ elements: its view starts one element in (not 16-byte aligned).
  std::size_t shifted = params.size();
  for (std::size_t i = 0; i < params.size(); ++i)
    if (params[i].has_grad && params[i].size() >= 2) shifted = i;
  REQUIRE(shifted < params.size());
  list[shifted].grad = list[shifted].grad.subspan(1);
  list[shifted].value = list[shifted].value.subspan(1);

  moe::cuda::nn::scale_grads(device, list, 0.5f);
  for (std::size_t i = 0; i < params.size(); ++i) {
    CAPTURE(params[i].name);
    if (!params[i].has_grad) continue;
    std::vector<float> expected = params[i].grad;
    for (std::size_t j = i == shifted ? 1 : 0; j < expected.size(); ++j) expected[j] = float(S(expected[j] * 0.5f));
    CHECK(same_bits(to_host(device, params[i].d_grad.data(), params[i].size()), expected));
  }
  moe::cuda::nn::zero_grads(device, list);
  for (std::size_t i = 0; i < params.size(); ++i) {
    CAPTURE(params[i].name);
    if (!params[i].has_grad) continue;
    std::vector<float> expected(params[i].grad.size(), 0.f);
    if (i == shifted) expected[0] = float(S(params[i].grad[0]));  // before the view: untouched
    CHECK(same_bits(to_host(device, params[i].d_grad.data(), params[i].size()), expected));
  }
}

TEST_CASE("cuda nn loss: zero_grads and scale_grads reach every gradient of a long list, aligned or not") {
  check_gradient_passes<float>();
  check_gradient_passes<moe::bfloat16>();
}

TEST_CASE("cuda nn loss: clip_grad_norm leaves gradients alone when the norm is not finite") {
  const TestDevice device = cuda_test::make_device();
  std::vector<TwinParam<float>> params = make_params<float>(device, 41);
  set_gradients(device, params, 42, 1.f);
  std::vector<float> grad = params[0].grad;
  grad[5] = std::numeric_limits<float>::infinity();
  params[0].d_grad = to_device<float>(device, grad);
  auto list = device_refs(params);
  CHECK(std::isinf(moe::cuda::nn::clip_grad_norm(device, list, 1.0)));
  CHECK(same_bits(to_host(device, params[0].d_grad.data(), params[0].size()), grad));
  CHECK(same_bits(to_host(device, params[1].d_grad.data(), params[1].size()), params[1].grad));
  std::vector<moe::ParamRef<float>> none;
  CHECK(moe::cuda::nn::clip_grad_norm(device, none, 1.0) == 0.0);
}

TEST_CASE("cuda nn loss: AdamW and clip_grad_norm reject bad arguments, naming them") {
  const TestDevice device = cuda_test::make_device();
  using moe::cuda::nn::AdamW;
  using moe::cuda::nn::AdamWConfig;
  AdamWConfig bad_beta;
  bad_beta.beta2 = 1.0;
  CHECK_THROWS_WITH_AS((AdamW<float, TestDevice>(device, bad_beta)), doctest::Contains("betas must lie in [0, 1)"),
                       moe::Error);
  AdamWConfig bad_lr;
  bad_lr.lr = -1;
  CHECK_THROWS_WITH_AS((AdamW<float, TestDevice>(device, bad_lr)), doctest::Contains("lr must be finite and >= 0"),
                       moe::Error);
  AdamWConfig no_eps;
  no_eps.eps = 0;
  CHECK_THROWS_WITH_AS((AdamW<float, TestDevice>(device, no_eps)), doctest::Contains("eps must be finite and > 0"),
                       moe::Error);

  std::vector<TwinParam<float>> params = make_params<float>(device, 51);
  set_gradients(device, params, 52, 1.f);
  auto list = device_refs(params);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::clip_grad_norm(device, list, 0.0), doctest::Contains("max_norm must be > 0"),
                       moe::Error);
  AdamW<float, TestDevice> adamw(device);
  adamw.step(list);
  auto shorter = list;
  shorter.pop_back();
  CHECK_THROWS_WITH_AS(adamw.step(shorter), doctest::Contains("the parameter list has 7 entries, the first step had 8"),
                       moe::Error);
  auto mismatched = list;
  mismatched[1].grad = mismatched[1].grad.first(5);
  CHECK_THROWS_WITH_AS(adamw.step(mismatched), doctest::Contains("parameter 1 'b' has 23 values but 5 gradients"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(adamw.set_state(-1, {}, {}), doctest::Contains("step count must be >= 0"), moe::Error);
  CHECK_THROWS_WITH_AS(adamw.step(list, std::nan("")), doctest::Contains("the step's learning rate must be finite"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(adamw.step(list, 1e-3, -1.f), doctest::Contains("grad_scale must be finite and >= 0"),
                       moe::Error);
  auto tied = list;
  tied.push_back(tied[0]);
  AdamW<float, TestDevice> fresh(device);
  CHECK_THROWS_WITH_AS(fresh.step(tied), doctest::Contains("share values"), moe::Error);
  // Clipping (and scaling) would count the tied gradient twice and scale it twice.
  const std::vector<float> grad0 = to_host(device, list[0].grad.data(), Index(list[0].grad.size()));
  CHECK_THROWS_WITH_AS(moe::cuda::nn::grad_norm(device, tied), doctest::Contains("grad_norm: parameters 0 'w' and 8 'w' share gradients"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::clip_grad_norm(device, tied, 1e-3), doctest::Contains("clip_grad_norm: parameters 0 'w' and 8 'w' share gradients"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::scale_grads(device, tied, 0.5f), doctest::Contains("scale_grads: parameters 0 'w' and 8 'w' share gradients"),
                       moe::Error);
  CHECK(same_bits(to_host(device, list[0].grad.data(), Index(list[0].grad.size())), grad0));
  CHECK(fresh.step_count() == 0);
  CHECK(adamw.step_count() == 1);  // the refused steps took nothing
  AdamW<float, TestDevice> restored(device);
  restored.set_state(1, {{1.f}}, {{1.f}});
  CHECK_THROWS_WITH_AS(restored.step(list), doctest::Contains("the restored moments hold 1 parameters, the list has 8"),
                       moe::Error);
}

TEST_CASE("cuda nn loss: bf16 parameters keep fp32 master weights that follow the CPU's fp32 trajectory") {
  // Gradients rounded to bf16 on both sides: the master weights see what the CPU sees, so they
  // follow its fp32 values to float rounding, while the bf16 parameters are their rounding.
  using B16 = moe::bfloat16;
  const TestDevice device = cuda_test::make_device();
  std::vector<TwinParam<B16>> params = make_params<B16>(device, 61);
  moe::nn::AdamWConfig config;
  config.lr = 1e-4;  // steps far below half a bf16 ulp of the O(1) weights: lost without master weights
  moe::nn::AdamW<float> cpu(config);
  moe::cuda::nn::AdamW<B16, TestDevice> adamw(device, config);
  static_assert(moe::cuda::nn::AdamW<B16, TestDevice>::kMasterWeights && !moe::cuda::nn::AdamW<float, TestDevice>::kMasterWeights);
  std::vector<std::vector<float>> initial;
  for (const auto& p : params) initial.push_back(p.value);
  for (int t = 1; t <= 5; ++t) {
    set_gradients(device, params, 700 + std::uint64_t(t), 1.f);
    auto cpu_list = cpu_refs(params);
    auto list = device_refs(params);
    cpu.step(cpu_list);
    adamw.step(list);
  }
  const auto master = adamw.master_weights();
  REQUIRE(master.size() == params.size());
  bool any_moved = false;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    CAPTURE(p.name);
    const bool updated = p.trainable && p.has_grad && p.size() > 0;
    if (!updated) {
      CHECK(master[i].empty());
      continue;
    }
    CHECK(relative_error(master[i], p.value) < 1e-6);
    const std::vector<float> value = to_host(device, p.d_value.data(), p.size());
    CHECK(same_bits(value, rounded<B16>(master[i])));  // the parameter is the master's rounding
    any_moved = any_moved || relative_error(master[i], initial[i]) > 0;
  }
  CHECK(any_moved);
}

TEST_CASE("cuda nn loss: master weights restored with set_master_weights resume the same trajectory") {
  using B16 = moe::bfloat16;
  const TestDevice device = cuda_test::make_device();
  std::vector<TwinParam<B16>> a = make_params<B16>(device, 81), b = make_params<B16>(device, 81);
  moe::cuda::nn::AdamW<B16, TestDevice> first(device), second(device);
  for (int t = 1; t <= 2; ++t) {
    set_gradients(device, a, 800 + std::uint64_t(t), 1.f);
    auto list = device_refs(a);
    first.step(list);
  }
  for (std::size_t i = 0; i < a.size(); ++i) b[i].d_value = to_device<B16>(device, to_host(device, a[i].d_value.data(), a[i].size()));
  second.set_state(first.step_count(), first.m(), first.v());
  second.set_master_weights(first.master_weights());
  set_gradients(device, a, 803, 1.f);
  set_gradients(device, b, 803, 1.f);
  auto list_a = device_refs(a), list_b = device_refs(b);
  first.step(list_a);
  second.step(list_b);
  for (std::size_t i = 0; i < a.size(); ++i)
    CHECK(same_bits(raw_host(device, a[i].d_value.data(), a[i].size()), raw_host(device, b[i].d_value.data(), b[i].size())));
  const auto ma = first.master_weights(), mb = second.master_weights();
  for (std::size_t i = 0; i < ma.size(); ++i) CHECK(same_bits(ma[i], mb[i]));
  moe::cuda::nn::AdamW<B16, TestDevice> wrong(device);
  wrong.set_master_weights({{1.f, 2.f}});
  auto list = device_refs(a);
  CHECK_THROWS_WITH_AS(wrong.step(list), doctest::Contains("the master weights hold 1 parameters, the list has 8"),
                       moe::Error);
}

}  // namespace cuda_nn_loss_test
