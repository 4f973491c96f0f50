// tests/cuda/cuda_nn_fused_attention_cases.hpp: the device's tensor-core tiles (D::for_each_warp) and the fused
// attention built on them (moe/cuda/nn/fused_attention.hpp) against float64 and against the CPU attention, written once
// over the device. The including file defines, in namespace cuda_test, `TestDevice`, `make_device()` and
// `device_available()` (the emulated device on the host; CudaDevice under nvcc, where each case returns early without
// a GPU). Host compiler only: it includes the CPU library.
#pragma once

#include <doctest/doctest.h>

#include "cuda/compare.hpp"
#include "cuda/cuda_nn_attention_cases.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <moe/bfloat16.hpp>
#include <moe/cuda/buffer.hpp>
#include <moe/cuda/nn/fused_attention.hpp>
#include <moe/nn/attention.hpp>
#include <vector>

namespace cuda_test::nn_fused_attention_cases {

using moe::Index;
using moe::bfloat16;
using nn_attention_cases::normal_values;
using nn_attention_cases::rounded;
using nn_attention_cases::Shape;
using nn_attention_cases::to_device;
using nn_attention_cases::to_host;
using nn_attention_cases::view;
template <class S>
using DeviceMatrix = nn_attention_cases::DeviceMatrix<S>;

// One warp computes out[16, 32] = init + A[16, depth] B[depth, 32] with B's first 16 columns loaded from B's rows
// (load_b) and the last 16 from its transpose's rows (load_bt), staged through lanes(): the tiles' index conventions,
// against float64.
TEST_CASE("cuda warp tiles: a tile product through staging, both B layouts and a loaded accumulator, against float64") {
  if (!device_available()) return;
  const TestDevice device = make_device();
  constexpr Index kDepth = 48, kCols = 32, kLd = kDepth + 8;
  const auto a = rounded<bfloat16>(normal_values(16 * kDepth, 1));
  const auto b = rounded<bfloat16>(normal_values(kDepth * kCols, 2));
  const auto init = normal_values(16 * kCols, 3);
  const auto d_a = to_device<bfloat16>(device, a, 16, kDepth);
  const auto d_b = to_device<bfloat16>(device, b, kDepth, kCols);
  DeviceMatrix<float> d_out(16, kCols);
  {
    std::vector<float> raw(init);
    device.upload(d_out.data(), raw.data(), raw.size() * sizeof(float));
  }
  const bfloat16* a_all = d_a.data();
  const bfloat16* b_all = d_b.data();
  float* out = d_out.data();
  // Staging: A [16, ld], B [depth, ld] as rows, B^T [32, ld], the accumulator [16, 36].
  const std::size_t a_bytes = 16 * kLd * sizeof(bfloat16), b_bytes = kDepth * kLd * sizeof(bfloat16);
  const std::size_t bt_bytes = kCols * kLd * sizeof(bfloat16), staging = a_bytes + b_bytes + bt_bytes + 16 * 36 * 4;
  device.for_each_warp(1, staging, [=] MOE_HOST_DEVICE(Index, const typename TestDevice::Warp& warp) {
    unsigned char* base = warp.staging();
    auto* sa = reinterpret_cast<bfloat16*>(base);
    auto* sb = reinterpret_cast<bfloat16*>(base + a_bytes);
    auto* sbt = reinterpret_cast<bfloat16*>(base + a_bytes + b_bytes);
    auto* acc_tile = reinterpret_cast<float*>(base + a_bytes + b_bytes + bt_bytes);
    warp.lanes(16 * kDepth, [&](Index i) { sa[(i / kDepth) * kLd + i % kDepth] = a_all[i]; });
    warp.lanes(kDepth * kCols, [&](Index i) {
      const Index k = i / kCols, c = i % kCols;
      sb[k * kLd + c] = b_all[i];
      sbt[c * kLd + k] = b_all[i];
    });
    warp.lanes(16 * kCols, [&](Index i) { acc_tile[(i / kCols) * 36 + i % kCols] = out[i]; });
    for (Index half = 0; half < 2; ++half) {
      typename TestDevice::Warp::Acc acc;
      warp.load_acc(acc, acc_tile + half * 16, 36);
      for (Index k = 0; k < kDepth; k += 16) {
        typename TestDevice::Warp::ARows at;
        warp.load_a(at, sa + k, kLd);
        if (half == 0) {
          typename TestDevice::Warp::BRows bt;
          warp.load_b(bt, sb + k * kLd, kLd);
          warp.mma(acc, at, bt);
        } else {
          typename TestDevice::Warp::BCols bt;
          warp.load_bt(bt, sbt + 16 * kLd + k, kLd);
          warp.mma(acc, at, bt);
        }
      }
      warp.store_acc(acc_tile + half * 16, 36, acc);
    }
    warp.lanes(16 * kCols, [&](Index i) { out[i] = acc_tile[(i / kCols) * 36 + i % kCols]; });
  });
  std::vector<float> got(16 * kCols);
  device.download(got.data(), d_out.data(), got.size() * sizeof(float));
  std::vector<float> want(16 * kCols);
  for (Index r = 0; r < 16; ++r)
    for (Index c = 0; c < kCols; ++c) {
      double sum = init[std::size_t(r * kCols + c)];
      for (Index k = 0; k < kDepth; ++k) sum += double(a[std::size_t(r * kDepth + k)]) * b[std::size_t(k * kCols + c)];
      want[std::size_t(r * kCols + c)] = float(sum);
    }
  CHECK(relative_error(got, want) < 1e-5);
}

// The element-wise calls in registers (device.hpp), on integer-valued tiles that every step keeps exact: a tile built
// from each element's coordinates, its row sums and maxes, row-wise arithmetic, an accumulator scaled by its rows and
// combined with another, and accumulators rounded into A operands (checked through a product with the identity, B
// given either way). On the GPU this pins each lane's elements to the coordinates the calls report.
TEST_CASE("cuda warp tiles: element-wise calls in registers: coordinates, row folds, row values, accumulators as A operands") {
  if (!device_available()) return;
  const TestDevice device = make_device();
  using Warp = typename TestDevice::Warp;
  constexpr Index kLd = 24, kLdf = 20, kTiles = 5;
  DeviceMatrix<float> d_tiles(kTiles * 16, 16), d_rows(4, 16);
  float* tiles = d_tiles.data();
  float* rows_out = d_rows.data();
  const std::size_t eye_bytes = 16 * kLd * sizeof(bfloat16), staging = eye_bytes + 16 * kLdf * sizeof(float);
  device.for_each_warp(1, staging, [=] MOE_HOST_DEVICE(Index, const Warp& warp) {
    auto* eye = reinterpret_cast<bfloat16*>(warp.staging());
    auto* tile = reinterpret_cast<float*>(warp.staging() + eye_bytes);
    warp.lanes(16 * 16, [&](Index i) { eye[(i / 16) * kLd + i % 16] = bfloat16(i / 16 == i % 16 ? 1.f : 0.f); });
    const auto out = [&](Index t, const typename Warp::Acc& acc) {  // tile t of the output, through the staging
      warp.store_acc(tile, kLdf, acc);
      warp.lanes(16 * 16, [&](Index i) { tiles[t * 256 + i] = tile[(i / 16) * kLdf + i % 16]; });
    };
    typename Warp::Acc x, y, z;
    warp.fill(x, 0.f);
    warp.map(x, [](Index r, Index c, float v) { return v + float(r * 16 + c); });  // x(r, c) = 16 r + c
    out(0, x);
    typename Warp::Rows sum, max;
    warp.for_rows([](Index, float& s, float& m) { s = 0.f, m = -1e30f; }, sum, max);
    warp.fold_rows(sum, x, [](float a, float b) { return a + b; });
    warp.fold_rows(max, x, [](float a, float b) { return a > b ? a : b; });
    warp.each_row([&](Index r, float s, float m) { rows_out[r] = s, rows_out[16 + r] = m; }, sum, max);
    warp.for_rows([](Index r, float& s, float& m) { s += float(r), m -= 1.f; }, sum, max);
    warp.each_row([&](Index r, float s, float m) { rows_out[32 + r] = s, rows_out[48 + r] = m; }, sum, max);
    y = x;
    warp.map_rows(y, max, [](Index, Index, float v, float m) { return v - m; });  // c - 14
    warp.zip(y, x, [](Index, Index c, float a, float b) { return 2.f * a + b + float(c); });
    out(1, y);
    // x + 1/3 rounded to bf16 as an A operand, times the identity (B from its rows, then from its transpose's).
    z = x;
    warp.map(z, [](Index, Index, float v) { return v + 1.f / 3.f; });
    typename Warp::ARows a;
    warp.to_a(a, z);
    typename Warp::BRows b;
    typename Warp::BCols bt;
    warp.load_b(b, eye, kLd);
    warp.load_bt(bt, eye, kLd);
    typename Warp::Acc by_rows, by_cols;
    warp.fill(by_rows, 0.f);
    warp.fill(by_cols, 0.5f);
    warp.mma(by_rows, a, b);
    warp.mma(by_cols, a, bt);
    out(2, by_rows);
    out(3, by_cols);
    // A from the staging (load_a) times the identity: the staged tile again.
    warp.store_acc(tile, kLdf, x);
    warp.lanes(16 * 16, [&](Index i) { eye[(i / 16) * kLd + i % 16] = bfloat16(tile[(i / 16) * kLdf + i % 16]); });
    warp.sync();
    typename Warp::ARows staged;
    warp.load_a(staged, eye, kLd);
    warp.sync();  // every lane has loaded before the identity goes back
    warp.lanes(16 * 16, [&](Index i) { eye[(i / 16) * kLd + i % 16] = bfloat16(i / 16 == i % 16 ? 1.f : 0.f); });
    warp.load_b(b, eye, kLd);
    typename Warp::Acc again;
    warp.fill(again, 0.f);
    warp.mma(again, staged, b);
    out(4, again);
  });
  std::vector<float> got(kTiles * 256), rows(64);
  device.download(got.data(), d_tiles.data(), got.size() * sizeof(float));
  device.download(rows.data(), d_rows.data(), rows.size() * sizeof(float));
  bool coordinates = true, combined = true, as_a_rows = true, as_a_cols = true, loaded = true, row_values = true;
  for (Index r = 0; r < 16; ++r) {
    for (Index c = 0; c < 16; ++c) {
      const auto at = [&](Index t) { return got[std::size_t(t * 256 + r * 16 + c)]; };
      const float x = float(r * 16 + c), rounded_x = float(bfloat16(x + 1.f / 3.f));
      coordinates = coordinates && at(0) == x;
      combined = combined && at(1) == 2.f * float(c - 14) + x + float(c);
      as_a_rows = as_a_rows && at(2) == rounded_x;
      as_a_cols = as_a_cols && at(3) == rounded_x + 0.5f;
      loaded = loaded && at(4) == x;
    }
    const auto row = [&](Index k) { return rows[std::size_t(k * 16 + r)]; };
    row_values = row_values && row(0) == float(256 * r + 120) && row(1) == float(16 * r + 15) &&
                 row(2) == float(257 * r + 120) && row(3) == float(16 * r + 14);
  }
  CHECK(coordinates);
  CHECK(row_values);
  CHECK(combined);
  CHECK(as_a_rows);
  CHECK(as_a_cols);
  CHECK(loaded);
}

// Forward and backward of both paths on the same bf16 inputs: the CPU (float, materialised) as the reference.
struct FusedResults {
  std::vector<float> out, lse, dqkv;
};

// given_out: the backward reads it as the forward's output instead of the fused forward's own.
inline FusedResults fused_attention(const std::vector<float>& qkv, const std::vector<float>& dout,
                                    const std::vector<float>& dqkv0, Shape s, bool causal,
                                    moe::nn::GradInto into = moe::nn::GradInto::add,
                                    const std::vector<float>* given_out = nullptr) {
  const auto [B, T, C, heads] = s;
  const TestDevice device = make_device();
  auto d_qkv = to_device<bfloat16>(device, qkv, B * T, 3 * C);
  auto d_dout = to_device<bfloat16>(device, dout, B * T, C);
  auto d_dqkv = to_device<bfloat16>(device, dqkv0, B * T, 3 * C);
  DeviceMatrix<bfloat16> d_out(B * T, C);
  moe::cuda::DeviceArray<float, TestDevice> d_lse(std::size_t(B * heads * T));
  const moe::ConstMatrixView<bfloat16> q(view(d_qkv));
  moe::cuda::nn::fused_attention_forward<bfloat16>(device, q, B, T, heads, causal, view(d_out), d_lse.data());
  auto d_given = to_device<bfloat16>(device, given_out ? *given_out : std::vector<float>(), given_out ? B * T : 0, C);
  moe::cuda::nn::fused_attention_backward<bfloat16>(device, moe::ConstMatrixView<bfloat16>(view(d_dout)), q,
                                                    moe::ConstMatrixView<bfloat16>(given_out ? view(d_given) : view(d_out)),
                                                    d_lse.data(), B, T, heads, causal, view(d_dqkv), into);
  std::vector<float> lse(std::size_t(B * heads * T));
  device.download(lse.data(), d_lse.data(), lse.size() * sizeof(float));
  return {to_host(device, d_out.data(), d_out.size()), lse, to_host(device, d_dqkv.data(), d_dqkv.size())};
}

// lse in float64 from the inputs: log sum over the keys row t sees of exp(q.k / sqrt(hs)).
inline std::vector<float> lse_reference(const std::vector<float>& qkv, Shape s, bool causal) {
  const auto [B, T, C, heads] = s;
  const Index hs = C / heads;
  std::vector<float> lse(std::size_t(B * heads * T));
  for (Index b = 0; b < B; ++b)
    for (Index h = 0; h < heads; ++h)
      for (Index t = 0; t < T; ++t) {
        std::vector<double> scores;
        for (Index j = 0; j < (causal ? t + 1 : T); ++j) {
          double dot = 0;
          for (Index c = 0; c < hs; ++c)
            dot += double(qkv[std::size_t((b * T + t) * 3 * C + h * hs + c)]) *
                   qkv[std::size_t((b * T + j) * 3 * C + C + h * hs + c)];
          scores.push_back(dot / std::sqrt(double(hs)));
        }
        double max = -INFINITY, sum = 0;
        for (const double x : scores) max = std::max(max, x);
        for (const double x : scores) sum += std::exp(x - max);
        lse[std::size_t((b * heads + h) * T + t)] = float(max + std::log(sum));
      }
  return lse;
}

// Both paths on the same bf16 inputs: the fused attention's out, lse and dqkv within bf16 rounding of the CPU's
// (float, materialised) and of lse in float64.
inline void check_against_cpu(const std::vector<float>& qkv, const std::vector<float>& dout,
                              const std::vector<float>& dqkv0, Shape s, bool causal) {
  const auto cpu = nn_attention_cases::cpu_attention(qkv, dout, dqkv0, s, causal);
  const FusedResults dev = fused_attention(qkv, dout, dqkv0, s, causal);
  CHECK(relative_error(dev.out, cpu.out) < 2e-2);
  CHECK(relative_error(dev.lse, lse_reference(qkv, s, causal)) < 1e-2);
  CHECK(relative_error(dev.dqkv, cpu.dqkv) < 2e-2);
}

// Head sizes 32, 64 (GPT-2's) and 128; T = 1, T below, across and not a multiple of the tiles (32 rows, 16 at head
// size 128) and the key and query blocks (16); one head and several.
inline const std::vector<Shape>& fused_shapes() {
  static const std::vector<Shape> list = {{1, 1, 32, 1},  {2, 5, 64, 2},  {1, 33, 64, 2}, {2, 70, 128, 2},
                                          {1, 47, 96, 3}, {1, 100, 64, 1}, {1, 40, 128, 1}, {1, 37, 256, 2}};
  return list;
}

TEST_CASE("cuda nn fused attention: bf16 forward, log-sum-exp and backward match the CPU (causal and bidirectional)") {
  if (!device_available()) return;
  std::uint64_t seed = 500;
  for (const Shape s : fused_shapes())
    for (const bool causal : {true, false})
      for (const bool zero_start : {true, false}) {
        const auto [B, T, C, heads] = s;
        CAPTURE(s.B);
        CAPTURE(s.T);
        CAPTURE(s.C);
        CAPTURE(s.heads);
        CAPTURE(causal);
        CAPTURE(zero_start);
        const auto qkv = rounded<bfloat16>(normal_values(std::size_t(B * T * 3 * C), ++seed));
        const auto dout = rounded<bfloat16>(normal_values(std::size_t(B * T * C), ++seed));
        const auto dqkv0 = zero_start ? std::vector<float>(std::size_t(B * T * 3 * C), 0.f)
                                      : rounded<bfloat16>(normal_values(std::size_t(B * T * 3 * C), ++seed, 0.1f));
        check_against_cpu(qkv, dout, dqkv0, s, causal);
      }
}

// GPT-2 small's attention on the GPU (T = 1024, 12 heads of 64: 32 query tiles, up to 64 key blocks a tile, most of
// them all visible) against the CPU; a smaller stand-in with the same tiles on the emulated device.
TEST_CASE("cuda nn fused attention: GPT-2 small's shape (T = 1024, 12 heads of 64) against the CPU") {
  if (!device_available()) return;
  const Shape s = kEmulatedDevice ? Shape{1, 256, 128, 2} : Shape{1, 1024, 768, 12};
  const auto [B, T, C, heads] = s;
  const auto qkv = rounded<bfloat16>(normal_values(std::size_t(B * T * 3 * C), 1024));
  const auto dout = rounded<bfloat16>(normal_values(std::size_t(B * T * C), 1025));
  const std::vector<float> dqkv0(std::size_t(B * T * 3 * C), 0.f);
  check_against_cpu(qkv, dout, dqkv0, s, true);
}

// Scores that grow along the keys: every query gets 16 on its head's first coordinate and key j gets a * j there, so a
// query's scores climb by `growth` per block of keys: every block moves each row's max, and the terms so far are
// rescaled by e^-growth or less each time.
TEST_CASE("cuda nn fused attention: scores that climb from key block to key block") {
  if (!device_available()) return;
  std::uint64_t seed = 900;
  for (const Shape s : {Shape{1, 100, 64, 1}, Shape{2, 70, 128, 2}, Shape{1, 47, 96, 3}})
    for (const double growth : {5.0, 12.0})
      for (const bool causal : {true, false}) {
        const auto [B, T, C, heads] = s;
        const Index hs = C / heads, keys_per_block = moe::cuda::nn::fused_attention_detail::kBlockRows;
        const double a = growth * std::sqrt(double(hs)) / (16.0 * double(keys_per_block));
        CAPTURE(s.T);
        CAPTURE(s.C);
        CAPTURE(growth);
        CAPTURE(causal);
        auto qkv = normal_values(std::size_t(B * T * 3 * C), ++seed);
        for (Index row = 0; row < B * T; ++row)
          for (Index h = 0; h < heads; ++h) {
            qkv[std::size_t(row * 3 * C + h * hs)] += 16.f;
            qkv[std::size_t(row * 3 * C + C + h * hs)] += float(a * double(row % T));
          }
        qkv = rounded<bfloat16>(qkv);
        const auto dout = rounded<bfloat16>(normal_values(std::size_t(B * T * C), ++seed));
        const std::vector<float> dqkv0(std::size_t(B * T * 3 * C), 0.f);
        check_against_cpu(qkv, dout, dqkv0, s, causal);
      }
}

TEST_CASE("cuda nn fused attention: reruns are bit-identical; a NaN query stays in its own row") {
  if (!device_available()) return;
  const Shape s{2, 45, 64, 2};
  const auto [B, T, C, heads] = s;
  auto qkv = normal_values(std::size_t(B * T * 3 * C), 31);
  const auto dout = normal_values(std::size_t(B * T * C), 32);
  const auto dqkv0 = normal_values(std::size_t(B * T * 3 * C), 33, 0.1f);
  for (const bool causal : {true, false}) {
    CAPTURE(causal);
    const FusedResults a = fused_attention(qkv, dout, dqkv0, s, causal);
    const FusedResults b = fused_attention(qkv, dout, dqkv0, s, causal);
    CHECK(same_bits(a.out, b.out));
    CHECK(same_bits(a.lse, b.lse));
    CHECK(same_bits(a.dqkv, b.dqkv));
  }
  // Token 7 of sequence 1 gets a NaN query: its rows of out (every head) are NaN, every other row is finite.
  const Index bad = 1 * T + 7;
  qkv[std::size_t(bad * 3 * C + 3)] = std::numeric_limits<float>::quiet_NaN();
  const FusedResults r = fused_attention(qkv, dout, dqkv0, s, true);
  bool own_row_nan = true, others_finite = true;
  for (Index row = 0; row < B * T; ++row)
    for (Index c = 0; c < C; ++c) {
      const float x = r.out[std::size_t(row * C + c)];
      if (row == bad && c < C / heads) own_row_nan = own_row_nan && std::isnan(x);
      if (row != bad) others_finite = others_finite && std::isfinite(x);
    }
  CHECK(own_row_nan);
  CHECK(others_finite);
}

// A non-finite output gradient (row 7) or value (row 20) of one head: the gradients are non-finite exactly where the
// CPU's are. Masked scores' gradients are 0 whatever dP is there, so the keys after row 7 in its tile of keys keep a
// finite dk, and the queries before row 20 in its block of keys a finite dq. For the value, the backward reads the
// output of the inputs before the change: the forward's own (the CPU's too) has those rows NaN (0 x inf in the block's
// product, as the header says), and its D = dout . out with them; the CPU's backward sums D over visible keys only.
TEST_CASE("cuda nn fused attention: a non-finite output gradient or value reaches no masked score's gradient") {
  if (!device_available()) return;
  const Shape s{1, 45, 64, 2};
  const auto [B, T, C, heads] = s;
  const auto qkv0 = rounded<bfloat16>(normal_values(std::size_t(B * T * 3 * C), 51));
  const auto dout0 = rounded<bfloat16>(normal_values(std::size_t(B * T * C), 52));
  const std::vector<float> dqkv0(std::size_t(B * T * 3 * C), 0.f);
  const std::vector<float> finite_out = nn_attention_cases::cpu_attention(qkv0, dout0, dqkv0, s, true).out;
  for (const bool in_dout : {true, false}) {
    CAPTURE(in_dout);
    auto qkv = qkv0, dout = dout0;
    if (in_dout) dout[std::size_t(7 * C + 1)] = INFINITY;
    else qkv[std::size_t(20 * 3 * C + 2 * C + 1)] = INFINITY;  // v of row 20, head 0
    const auto cpu = nn_attention_cases::cpu_attention(qkv, dout, dqkv0, s, true);
    const FusedResults dev =
        fused_attention(qkv, dout, dqkv0, s, true, moe::nn::GradInto::add, in_dout ? nullptr : &finite_out);
    const Index columns = in_dout ? 2 * C : C;  // dq and dk; dq (dk's D differs, above)
    Index differ = 0, finite = 0;
    for (Index row = 0; row < B * T; ++row)
      for (Index c = 0; c < columns; ++c) {
        const std::size_t at = std::size_t(row * 3 * C + c);
        differ += std::isfinite(dev.dqkv[at]) != std::isfinite(cpu.dqkv[at]);
        finite += std::isfinite(cpu.dqkv[at]);
      }
    CHECK(differ == 0);
    CHECK(finite < B * T * columns);  // the non-finite input reached some gradients
    // ... and not these (the case's point): dk of key 8 (after row 7), dq of query 19 (before row 20).
    CHECK(std::isfinite(cpu.dqkv[std::size_t((in_dout ? 8 * 3 * C + C : 19 * 3 * C) + 1)]));
  }
}

TEST_CASE("cuda nn fused attention: dqkv written over (GradInto::overwrite) is dqkv added into zeros, bit for bit") {
  if (!device_available()) return;
  for (const Shape s : {Shape{2, 45, 64, 2}, Shape{1, 40, 128, 1}, Shape{1, 5, 32, 1}}) {
    CAPTURE(s.T);  // (clang 14 cannot capture a structured binding in CAPTURE's lambda)
    CAPTURE(s.C);
    const auto qkv = normal_values(std::size_t(s.B * s.T * 3 * s.C), 41);
    const auto dout = normal_values(std::size_t(s.B * s.T * s.C), 42);
    const std::vector<float> zeros(std::size_t(s.B * s.T * 3 * s.C), 0.f),
        nans(zeros.size(), std::numeric_limits<float>::quiet_NaN());
    for (const bool causal : {true, false}) {
      CAPTURE(causal);
      const FusedResults added = fused_attention(qkv, dout, zeros, s, causal);
      const FusedResults written = fused_attention(qkv, dout, nans, s, causal, moe::nn::GradInto::overwrite);
      CHECK(same_bits(written.dqkv, added.dqkv));
    }
  }
}

TEST_CASE("cuda nn fused attention: which operands it takes, and clear errors for the rest") {
  if (!device_available()) return;
  using moe::cuda::nn::fused_attention_fits;
  const TestDevice device = make_device();
  DeviceMatrix<bfloat16> qkv(8, 3 * 128), out(8, 128), wide(8, 3 * 128 + 1);
  const moe::ConstMatrixView<bfloat16> q(view(qkv));
  CHECK(fused_attention_fits<bfloat16>(128, 2, q, view(out)));         // hs = 64
  CHECK(fused_attention_fits<bfloat16>(128, 1, q, view(out)));         // hs = 128
  CHECK(fused_attention_fits<bfloat16>(128, 4, q, view(out)));         // hs = 32
  CHECK_FALSE(fused_attention_fits<float>(128, 2, q, view(out)));      // fp32: the materialised path (exact)
  CHECK_FALSE(fused_attention_fits<bfloat16>(128, 8, q, view(out)));   // hs = 16
  CHECK_FALSE(fused_attention_fits<bfloat16>(120, 3, q, view(out)));   // hs = 40
  CHECK_FALSE(fused_attention_fits<bfloat16>(384, 2, q, view(out)));   // hs = 192
  CHECK_FALSE(fused_attention_fits<bfloat16>(
      128, 2, moe::ConstMatrixView<bfloat16>(wide.data(), 8, 3 * 128, 3 * 128 + 1), view(out)));  // odd row stride
  moe::cuda::DeviceArray<float, TestDevice> lse(16);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::fused_attention_forward<bfloat16>(device, q, 2, 4, 16, true, view(out), lse.data()),
                       doctest::Contains("fused_attention_forward: bf16, a head size of 32, 64 or 128"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::fused_attention_forward<bfloat16>(device, q, 2, 4, 2, true, view(out), nullptr),
                       doctest::Contains("lse (a float per query row, [B * heads * T]) is null"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::fused_attention_backward<bfloat16>(
                           device, moe::ConstMatrixView<bfloat16>(view(out)), q,
                           moe::ConstMatrixView<bfloat16>(out.data(), 8, 64), lse.data(), 2, 4, 2, true, view(qkv)),
                       doctest::Contains("fused_attention_backward: out is [8, 64], expected [B*T, C] = [8, 128]"),
                       moe::Error);
}

}  // namespace cuda_test::nn_fused_attention_cases
