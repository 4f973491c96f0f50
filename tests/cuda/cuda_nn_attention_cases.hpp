// tests/cuda/cuda_nn_attention_cases.hpp: moe::cuda::nn::attention_forward / attention_backward
// (moe/cuda/nn/attention.hpp) against the CPU functions of moe/nn/attention.hpp, written once over the device. The
// including file defines, in namespace cuda_test, `TestDevice`, `kEmulatedDevice`, `make_device()` and
// `device_available()` (the emulated
// device on the host; CudaDevice under nvcc, where each case returns early without a GPU). Host compiler only: it
// includes the CPU library.
#pragma once

#include <doctest/doctest.h>

#include "cuda/compare.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <moe/bfloat16.hpp>
#include <moe/cuda/buffer.hpp>
#include <moe/cuda/nn/attention.hpp>
#include <moe/nn/attention.hpp>
#include <random>
#include <vector>

namespace cuda_test::nn_attention_cases {

using moe::Index;

struct Shape {
  Index B, T, C, heads;
};

inline std::vector<float> normal_values(std::size_t n, std::uint64_t seed, float std_dev = 1.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, std_dev);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

// Values as S would store them, back in float (the bf16 tests feed both sides the same inputs).
template <class S>
std::vector<float> rounded(std::vector<float> v) {
  for (auto& x : v) x = float(S(x));
  return v;
}

template <class S>
using DeviceMatrix = moe::cuda::DeviceMatrix<S, TestDevice>;

template <class S>
DeviceMatrix<S> to_device(const TestDevice& device, const std::vector<float>& host, Index rows, Index cols) {
  REQUIRE(host.size() == std::size_t(rows * cols));
  DeviceMatrix<S> m(rows, cols);
  std::vector<S> converted(host.begin(), host.end());
  device.upload(m.data(), converted.data(), converted.size() * sizeof(S));
  return m;
}

template <class S>
std::vector<float> to_host(const TestDevice& device, const S* data, Index count) {
  std::vector<S> raw(static_cast<std::size_t>(count));
  device.download(raw.data(), data, raw.size() * sizeof(S));
  return std::vector<float>(raw.begin(), raw.end());
}

template <class S>
moe::MatrixView<S> view(DeviceMatrix<S>& m) {
  return {m.data(), m.rows(), m.cols()};
}

// One forward + backward of each side on the same (S-rounded) inputs; dqkv starts at dqkv0.
struct Results {
  std::vector<float> out, att, dqkv;
};

inline Results cpu_attention(const std::vector<float>& qkv, const std::vector<float>& dout,
                             const std::vector<float>& dqkv0, Shape s, bool causal,
                             moe::nn::GradInto into = moe::nn::GradInto::add) {
  const auto [B, T, C, heads] = s;
  Results r{std::vector<float>(std::size_t(B * T * C)), std::vector<float>(std::size_t(B * heads * T * T)), dqkv0};
  const moe::ConstMatrixView<float> q(qkv.data(), B * T, 3 * C);
  moe::nn::attention_forward<float>(q, B, T, heads, causal, moe::MatrixView<float>(r.out.data(), B * T, C),
                                    r.att.data(), 1);
  moe::nn::attention_backward<float>(moe::ConstMatrixView<float>(dout.data(), B * T, C), q, r.att.data(), B, T, heads,
                                     causal, moe::MatrixView<float>(r.dqkv.data(), B * T, 3 * C), 1, into);
  return r;
}

template <class S>
Results device_attention(const std::vector<float>& qkv, const std::vector<float>& dout, const std::vector<float>& dqkv0,
                         Shape s, bool causal, Index block = 0, moe::nn::GradInto into = moe::nn::GradInto::add) {
  const auto [B, T, C, heads] = s;
  const TestDevice device = make_device();
  auto d_qkv = to_device<S>(device, qkv, B * T, 3 * C);
  auto d_dout = to_device<S>(device, dout, B * T, C);
  auto d_dqkv = to_device<S>(device, dqkv0, B * T, 3 * C);
  DeviceMatrix<S> d_out(B * T, C), d_att(B * heads, T * T);
  moe::cuda::nn::attention_forward<S>(device, moe::ConstMatrixView<S>(view(d_qkv)), B, T, heads, causal, view(d_out),
                                      d_att.data(), block);
  moe::cuda::nn::attention_backward<S>(device, moe::ConstMatrixView<S>(view(d_dout)),
                                       moe::ConstMatrixView<S>(view(d_qkv)), d_att.data(), B, T, heads, causal,
                                       view(d_dqkv), block, into);
  // Operands below 16-byte alignment (T = 17 and such) go as strided batches, never as the pointer batches the GPU
  // would run one product at a time (the emulated device counts those).
  // (A generic lambda: the requirement must depend on a template parameter, or nvcc's CudaDevice fails it eagerly.)
  [](const auto& d) {
    if constexpr (requires { d.slow_pointer_batches(); }) CHECK(d.slow_pointer_batches() == 0);
  }(device);
  return {to_host(device, d_out.data(), d_out.size()), to_host(device, d_att.data(), d_att.size()),
          to_host(device, d_dqkv.data(), d_dqkv.size())};
}

// Awkward shapes: T = 1, T below / across / not a multiple of 32, one head, hs = 1, odd C; and T in whole 16-byte
// packs of both types (40, 64: the softmax rows go in packs, moe/cuda/row_packs.hpp; 100: in fp32 only).
inline const std::vector<Shape>& shapes() {
  static const std::vector<Shape> list = {{1, 1, 8, 2},   {3, 1, 6, 3},   {2, 5, 12, 3},  {1, 31, 10, 5},
                                          {2, 33, 24, 4}, {1, 37, 18, 1}, {3, 70, 21, 7}, {2, 45, 3, 3},
                                          {2, 100, 96, 6}, {2, 40, 16, 2}, {1, 64, 24, 3}};
  return list;
}

// Compare device and CPU on every shape, both masks, with a zero and a random initial dqkv, and with causal blocks of
// the default size (one block at these T), 16 rows and 7 rows (T not a multiple: a short last block).
template <class S>
void check_against_cpu(double tolerance) {
  std::uint64_t seed = 100;
  for (const Shape s : shapes())
    for (const bool causal : {true, false})
      for (const Index block : {Index{0}, Index{16}, Index{7}})
        for (const bool zero_start : {true, false}) {
          const auto [B, T, C, heads] = s;
          CAPTURE(s.B);  // the fields, not the bindings: clang < 16 cannot capture those in CAPTURE's lambda
          CAPTURE(s.T);
          CAPTURE(s.C);
          CAPTURE(s.heads);
          CAPTURE(causal);
          CAPTURE(block);
          CAPTURE(zero_start);
          const auto qkv = rounded<S>(normal_values(std::size_t(B * T * 3 * C), ++seed));
          const auto dout = rounded<S>(normal_values(std::size_t(B * T * C), ++seed));
          const auto dqkv0 = zero_start ? std::vector<float>(std::size_t(B * T * 3 * C), 0.f)
                                        : rounded<S>(normal_values(std::size_t(B * T * 3 * C), ++seed, 0.1f));
          const Results cpu = cpu_attention(qkv, dout, dqkv0, s, causal);
          const Results dev = device_attention<S>(qkv, dout, dqkv0, s, causal, block);
          CHECK(relative_error(dev.out, cpu.out) < tolerance);
          CHECK(relative_error(dev.att, cpu.att) < tolerance);
          CHECK(relative_error(dev.dqkv, cpu.dqkv) < tolerance);
          if (causal) {  // masked probabilities are exactly zero
            bool masked_zero = true;
            for (Index pair = 0; pair < B * heads; ++pair)
              for (Index t = 0; t < T; ++t)
                for (Index j = t + 1; j < T; ++j)
                  masked_zero = masked_zero && dev.att[std::size_t((pair * T + t) * T + j)] == 0.f;
            CHECK(masked_zero);
          }
        }
}

TEST_CASE(
    "cuda nn attention: fp32 forward and backward match the CPU (causal "
    "and bidirectional)") {
  if (!device_available()) return;
  check_against_cpu<float>(1e-5);
}

TEST_CASE(
    "cuda nn attention: bf16 forward and backward match the CPU on "
    "bf16-rounded inputs") {
  if (!device_available()) return;
  check_against_cpu<moe::bfloat16>(2e-2);
}

template <class S>
void check_rerun_bits() {
  for (const Shape s : {Shape{2, 33, 24, 4}, Shape{3, 70, 21, 7}, Shape{2, 40, 16, 2}})
    for (const bool causal : {true, false}) {
      const auto [B, T, C, heads] = s;
      CAPTURE(s.T);
      CAPTURE(causal);
      const auto qkv = normal_values(std::size_t(B * T * 3 * C), 7);
      const auto dout = normal_values(std::size_t(B * T * C), 8);
      const auto dqkv0 = normal_values(std::size_t(B * T * 3 * C), 9, 0.1f);
      const Results a = device_attention<S>(qkv, dout, dqkv0, s, causal, 16);
      const Results b = device_attention<S>(qkv, dout, dqkv0, s, causal, 16);
      CHECK(std::memcmp(a.out.data(), b.out.data(), a.out.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(a.att.data(), b.att.data(), a.att.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(a.dqkv.data(), b.dqkv.data(), a.dqkv.size() * sizeof(float)) == 0);
    }
}

TEST_CASE("cuda nn attention: reruns are bit-identical (fp32 and bf16)") {
  if (!device_available()) return;
  check_rerun_bits<float>();
  check_rerun_bits<moe::bfloat16>();
}

// dqkv written over NaNs (GradInto::overwrite) gives dqkv added into zeros: on the CPU and the emulated device bit for
// bit, on a GPU within a kernel's rounding (cuBLAS may serve beta = 0 with another kernel). Blocks of 7 rows: several
// products write dqkv, each its own rows.
template <class S>
void check_overwrite(double tolerance) {
  for (const Shape s : {Shape{2, 33, 24, 4}, Shape{1, 37, 18, 1}, Shape{2, 40, 16, 2}})
    for (const bool causal : {true, false}) {
      CAPTURE(s.T);
      CAPTURE(causal);
      const auto qkv = rounded<S>(normal_values(std::size_t(s.B * s.T * 3 * s.C), 11));
      const auto dout = rounded<S>(normal_values(std::size_t(s.B * s.T * s.C), 12));
      const std::vector<float> zeros(std::size_t(s.B * s.T * 3 * s.C), 0.f),
          nans(zeros.size(), std::numeric_limits<float>::quiet_NaN());
      const Results cpu_added = cpu_attention(qkv, dout, zeros, s, causal);
      const Results cpu_written = cpu_attention(qkv, dout, nans, s, causal, moe::nn::GradInto::overwrite);
      CHECK(std::memcmp(cpu_written.dqkv.data(), cpu_added.dqkv.data(), cpu_added.dqkv.size() * sizeof(float)) == 0);
      const Results added = device_attention<S>(qkv, dout, zeros, s, causal, 7);
      const Results written = device_attention<S>(qkv, dout, nans, s, causal, 7, moe::nn::GradInto::overwrite);
      if constexpr (kEmulatedDevice)
        CHECK(std::memcmp(written.dqkv.data(), added.dqkv.data(), added.dqkv.size() * sizeof(float)) == 0);
      else
        CHECK(relative_error(written.dqkv, added.dqkv) < tolerance);
      CHECK(relative_error(written.dqkv, cpu_written.dqkv) < (std::is_same_v<S, float> ? 1e-5 : 2e-2));
    }
}

TEST_CASE("cuda nn attention: dqkv written over (GradInto::overwrite) is dqkv added into zeros") {
  if (!device_available()) return;
  check_overwrite<float>(1e-6);
  check_overwrite<moe::bfloat16>(1e-2);
}

TEST_CASE("cuda nn attention: bad shapes throw moe::Error naming them") {
  if (!device_available()) return;
  using moe::cuda::nn::attention_backward;
  using moe::cuda::nn::attention_forward;
  using V = moe::MatrixView<float>;
  using CV = moe::ConstMatrixView<float>;
  const TestDevice device = make_device();
  const Index B = 2, T = 3, C = 6, heads = 2;
  DeviceMatrix<float> qkv(B * T, 3 * C), out(B * T, C), att(B * heads, T * T), dqkv(B * T, 3 * C),
      wide(B * T, 3 * C + 1), odd(B * T, 21);
  const CV q = view(qkv);

  CHECK_THROWS_WITH_AS(attention_forward<float>(device, q, B, T + 1, heads, true, view(out), att.data()),
                       doctest::Contains("qkv has 6 rows, expected B*T"), moe::Error);
  CHECK_THROWS_WITH_AS(attention_forward<float>(device, CV(view(wide)), B, T, heads, true, view(out), att.data()),
                       doctest::Contains("qkv has 19 columns, expected 3*C"), moe::Error);
  CHECK_THROWS_WITH_AS(
      attention_forward<float>(device, CV(view(odd)), B, T, heads, false, V(out.data(), B * T, 7), att.data()),
      doctest::Contains("C = 7 is not divisible by heads = 2"), moe::Error);
  CHECK_THROWS_WITH_AS(attention_forward<float>(device, q, B, T, heads, false, V(out.data(), B * T, C - 1), att.data()),
                       doctest::Contains("out is [6, 5], expected [B*T, C] = [6, 6]"), moe::Error);
  CHECK_THROWS_WITH_AS(attention_forward<float>(device, q, B, T, heads, false, view(out), nullptr),
                       doctest::Contains("att (the [B, heads, T, T] probabilities) is null"), moe::Error);
  CHECK_THROWS_WITH_AS(attention_forward<float>(device, q, B, T, 0, false, view(out), att.data()),
                       doctest::Contains("heads must be positive"), moe::Error);
  CHECK_THROWS_WITH_AS(
      attention_forward<float>(device, CV(qkv.data(), 0, 3 * C), 0, T, heads, false, V(out.data(), 0, C), att.data()),
      doctest::Contains("batch B = 0"), moe::Error);

  CHECK_THROWS_WITH_AS(
      attention_backward<float>(device, CV(out.data(), B * T, C - 1), q, att.data(), B, T, heads, true, view(dqkv)),
      doctest::Contains("attention_backward: dout is [6, 5]"), moe::Error);
  CHECK_THROWS_WITH_AS(attention_backward<float>(device, CV(view(out)), q, att.data(), B, T, heads, true,
                                                 V(dqkv.data(), B * T, 3 * C - 1)),
                       doctest::Contains("dqkv is [6, 17], expected [B*T, 3C] = [6, 18]"), moe::Error);
  CHECK_THROWS_WITH_AS(attention_backward<float>(device, CV(view(out)), q, nullptr, B, T, heads, true, view(dqkv)),
                       doctest::Contains("att (the [B, heads, T, T] probabilities) is null"), moe::Error);
  CHECK_THROWS_WITH_AS(attention_forward<float>(device, q, B, T, heads, true, view(out), att.data(), -1),
                       doctest::Contains("attention_forward: block = -1 rows"), moe::Error);
  CHECK_THROWS_WITH_AS(
      attention_backward<float>(device, CV(view(out)), q, att.data(), B, T, heads, true, view(dqkv), -2),
      doctest::Contains("attention_backward: block = -2 rows"), moe::Error);
}

TEST_CASE("cuda nn attention: causal blocks of about an eighth of T, in multiples of 64 rows; one when bidirectional") {
  using moe::cuda::nn::attention_detail::default_block;
  CHECK(default_block(1024, true) == 128);  // GPT-2: 8 blocks, 9/16 of the full T x T products
  CHECK(default_block(2048, true) == 256);
  CHECK(default_block(1000, true) == 128);
  CHECK(default_block(100, true) == 64);
  CHECK(default_block(1, true) == 64);
  CHECK(default_block(1024, false) == 1024);
  CHECK(default_block(197, false) == 197);  // ViT: nothing masked, nothing to skip
}

}  // namespace cuda_test::nn_attention_cases
