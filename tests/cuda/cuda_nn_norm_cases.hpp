// tests/cuda/cuda_nn_norm_cases.hpp: test cases of moe/cuda/nn/layernorm.hpp,
// moe/cuda/nn/embedding.hpp and moe/cuda/nn/linear.hpp, written once over the device. The including file defines, in
// namespace cuda_test, `TestDevice`, `kEmulatedDevice`, `make_device()` and `device_available()` (and optionally
// CUDA_TEST_NAME(text), a test-name prefix). Reference: the CPU functions of moe/nn/*.hpp in fp32
// on the same inputs (rounded to bf16 for both sides in the bf16 cases).
#pragma once

#include <doctest/doctest.h>

#include "cuda/compare.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/bfloat16.hpp"
#include "moe/cuda/backend.hpp"
#include "moe/cuda/buffer.hpp"
#include "moe/cuda/nn/embedding.hpp"
#include "moe/cuda/nn/layernorm.hpp"
#include "moe/cuda/nn/linear.hpp"
#include "moe/moe.hpp"
#include "moe/nn.hpp"

#ifndef CUDA_TEST_NAME
#define CUDA_TEST_NAME(text) "cuda nn: " text
#endif

namespace cuda_test::nn_norm {

using moe::ConstMatrixView;
using moe::Index;
using moe::MatrixView;

#define CUDA_NN_NORM_SKIP_WITHOUT_DEVICE()                 \
  if (!device_available()) {                               \
    MESSAGE("skipped: no CUDA device on this machine");    \
    return;                                                \
  }

inline std::vector<float> normal_values(std::size_t n, std::uint64_t seed, float std_dev = 1.f, float mean = 0.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(mean, std_dev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// The values as S would store them (identity for float).
template <class S>
std::vector<float> rounded(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = float(S(v[i]));
  return out;
}

template <class T>
using Array = moe::cuda::DeviceArray<T, TestDevice>;

// A device array of S holding the host values (converted).
template <class S>
Array<S> to_device(const TestDevice& device, const std::vector<float>& host) {
  Array<S> a(Index(host.size()));
  std::vector<S> converted(host.size());
  for (std::size_t i = 0; i < host.size(); ++i) converted[i] = S(host[i]);
  device.upload(a.data(), converted.data(), converted.size() * sizeof(S));
  return a;
}
template <class T>
std::vector<T> raw_host(const TestDevice& device, const T* data, Index count) {
  std::vector<T> out(static_cast<std::size_t>(count));
  device.download(out.data(), data, out.size() * sizeof(T));
  return out;
}
template <class T>
std::vector<float> to_host(const TestDevice& device, const T* data, Index count) {
  const std::vector<T> raw = raw_host(device, data, count);
  std::vector<float> out(raw.size());
  for (std::size_t i = 0; i < raw.size(); ++i) out[i] = float(raw[i]);
  return out;
}
// ---- layernorm ------------------------------------------------------------------------------

struct LayerNormInputs {
  Index T, C;
  std::vector<float> x, weight, bias, dout, dx, dweight, dbias;  // dx, dweight, dbias: initial (+=)
};

inline LayerNormInputs layernorm_inputs(Index T, Index C, std::uint64_t seed) {
  LayerNormInputs in{T, C, {}, {}, {}, {}, {}, {}, {}};
  const auto n = std::size_t(T * C), c = std::size_t(C);
  in.x = normal_values(n, seed, 2.f, 3.f);  // |mean| > std: the two-pass variance matters
  in.weight = normal_values(c, seed + 1, 0.2f, 1.f);
  in.bias = normal_values(c, seed + 2, 0.5f);
  in.dout = normal_values(n, seed + 3);
  in.dx = normal_values(n, seed + 4, 0.5f);
  in.dweight = normal_values(c, seed + 5, 0.5f);
  in.dbias = normal_values(c, seed + 6, 0.5f);
  return in;
}

template <class S>
LayerNormInputs rounded(const LayerNormInputs& in) {
  LayerNormInputs r = in;
  for (std::vector<float>* v : {&r.x, &r.weight, &r.bias, &r.dout, &r.dx, &r.dweight, &r.dbias}) *v = rounded<S>(*v);
  return r;
}

// Forward + backward results, as floats, plus the raw bits of every output.
struct LayerNormResult {
  std::vector<float> out, mean, rstd, dx, dweight, dbias;
};

inline LayerNormResult layernorm_cpu(const LayerNormInputs& in) {
  const Index T = in.T, C = in.C;
  LayerNormResult r;
  r.out.assign(std::size_t(T * C), 0.f), r.mean.assign(std::size_t(T), 0.f), r.rstd.assign(std::size_t(T), 0.f);
  moe::nn::layernorm_forward<float>(ConstMatrixView<float>(in.x.data(), T, C), in.weight.data(), in.bias.data(),
                                    MatrixView<float>(r.out.data(), T, C), r.mean.data(), r.rstd.data(), 3);
  r.dx = in.dx, r.dweight = in.dweight, r.dbias = in.dbias;
  moe::nn::layernorm_backward<float>(ConstMatrixView<float>(in.dout.data(), T, C),
                                     ConstMatrixView<float>(in.x.data(), T, C), in.weight.data(), r.mean.data(),
                                     r.rstd.data(), MatrixView<float>(r.dx.data(), T, C), r.dweight.data(),
                                     r.dbias.data(), 3);
  return r;
}

template <class S>
struct LayerNormRaw {
  std::vector<S> out, dx, dweight, dbias;
  std::vector<moe::Compute<S>> mean, rstd;
};

// Forward then backward on the device; `in_place` runs the forward with out aliasing x (on a
// copy of x, so backward still reads the original x).
template <class S>
LayerNormRaw<S> layernorm_device_raw(const LayerNormInputs& in, bool in_place = false) {
  using Cm = moe::Compute<S>;
  const TestDevice device = make_device();
  const Index T = in.T, C = in.C;
  Array<S> x = to_device<S>(device, in.x), weight = to_device<S>(device, in.weight);
  Array<S> bias = to_device<S>(device, in.bias), dout = to_device<S>(device, in.dout);
  Array<S> dx = to_device<S>(device, in.dx), dweight = to_device<S>(device, in.dweight);
  Array<S> dbias = to_device<S>(device, in.dbias);
  Array<S> out = in_place ? to_device<S>(device, in.x) : Array<S>(T * C);
  Array<Cm> mean(T), rstd(T);
  const ConstMatrixView<S> in_view =
      in_place ? ConstMatrixView<S>(out.data(), T, C) : ConstMatrixView<S>(x.data(), T, C);
  moe::cuda::nn::layernorm_forward<S>(device, in_view, weight.data(), bias.data(), MatrixView<S>(out.data(), T, C),
                                      mean.data(), rstd.data());
  moe::cuda::nn::layernorm_backward<S>(device, ConstMatrixView<S>(dout.data(), T, C),
                                       ConstMatrixView<S>(x.data(), T, C), weight.data(), mean.data(), rstd.data(),
                                       MatrixView<S>(dx.data(), T, C), dweight.data(), dbias.data());
  LayerNormRaw<S> r;
  r.out = raw_host(device, out.data(), T * C);
  r.mean = raw_host(device, mean.data(), T);
  r.rstd = raw_host(device, rstd.data(), T);
  r.dx = raw_host(device, dx.data(), T * C);
  r.dweight = raw_host(device, dweight.data(), C);
  r.dbias = raw_host(device, dbias.data(), C);
  return r;
}

template <class T>
std::vector<float> floats(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = float(v[i]);
  return out;
}

template <class S>
void check_layernorm_parity(Index T, Index C, std::uint64_t seed, double tolerance) {
  CAPTURE(T);
  CAPTURE(C);
  const LayerNormInputs in = rounded<S>(layernorm_inputs(T, C, seed));
  const LayerNormResult cpu = layernorm_cpu(in);
  const LayerNormRaw<S> gpu = layernorm_device_raw<S>(in);
  CHECK(relative_error(floats(gpu.out), cpu.out) < tolerance);
  CHECK(relative_error(floats(gpu.mean), cpu.mean) < tolerance);
  CHECK(relative_error(floats(gpu.rstd), cpu.rstd) < tolerance);
  CHECK(relative_error(floats(gpu.dx), cpu.dx) < tolerance);
  CHECK(relative_error(floats(gpu.dweight), cpu.dweight) < tolerance);
  CHECK(relative_error(floats(gpu.dbias), cpu.dbias) < tolerance);
  // Same bits on a second run, and with out aliasing x.
  for (bool in_place : {false, true}) {
    CAPTURE(in_place);
    const LayerNormRaw<S> again = layernorm_device_raw<S>(in, in_place);
    CHECK(same_bits(again.out, gpu.out));
    CHECK(same_bits(again.mean, gpu.mean));
    CHECK(same_bits(again.rstd, gpu.rstd));
    CHECK(same_bits(again.dx, gpu.dx));
    CHECK(same_bits(again.dweight, gpu.dweight));
    CHECK(same_bits(again.dbias, gpu.dbias));
  }
}

inline const std::vector<std::pair<Index, Index>>& layernorm_shapes() {
  // T = 1, C = 1, sizes around the 64-row chunk, primes; C in whole 16-byte packs (48, and GPT-2's 768): packed rows
  static const std::vector<std::pair<Index, Index>> shapes = {{1, 1},   {1, 7},   {5, 1},    {37, 48},  {64, 33},
                                                              {65, 29}, {130, 77}, {203, 129}, {9, 768}};
  return shapes;
}

TEST_CASE(CUDA_TEST_NAME("layernorm: forward and backward match the CPU version in fp32, same bits twice")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  std::uint64_t seed = 10;
  for (const auto& [T, C] : layernorm_shapes()) check_layernorm_parity<float>(T, C, seed += 10, 1e-5);
}

TEST_CASE(CUDA_TEST_NAME("layernorm: bf16 storage with fp32 statistics match the CPU version within 2e-2")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  std::uint64_t seed = 500;
  for (const auto& [T, C] : layernorm_shapes()) check_layernorm_parity<moe::bfloat16>(T, C, seed += 10, 2e-2);
}

// The parameter gradients in 16-byte packs of columns (rows aligned) and column by column (the same rows one element
// into their buffers): the same sums in the same order, so the same bits.
template <class S>
void check_layernorm_packed_parameter_gradients() {
  using Cm = moe::Compute<S>;
  const TestDevice device = make_device();
  const Index T = 130, C = 48;
  const LayerNormInputs in = rounded<S>(layernorm_inputs(T, C, 91));
  std::vector<float> x1(1, 0.f), dout1(1, 0.f);  // the same values one element further
  x1.insert(x1.end(), in.x.begin(), in.x.end());
  dout1.insert(dout1.end(), in.dout.begin(), in.dout.end());
  const Array<S> x = to_device<S>(device, in.x), dout = to_device<S>(device, in.dout);
  const Array<S> x_shifted = to_device<S>(device, x1), dout_shifted = to_device<S>(device, dout1);
  const Array<S> weight = to_device<S>(device, in.weight), bias = to_device<S>(device, in.bias);
  Array<S> out(T * C);
  Array<Cm> mean(T), rstd(T);
  moe::cuda::nn::layernorm_forward<S>(device, ConstMatrixView<S>(x.data(), T, C), weight.data(), bias.data(),
                                      MatrixView<S>(out.data(), T, C), mean.data(), rstd.data());
  std::vector<std::vector<S>> dweights, dbiases;
  for (const bool shifted : {false, true}) {
    Array<S> dweight = to_device<S>(device, in.dweight), dbias = to_device<S>(device, in.dbias);
    REQUIRE(moe::cuda::row_packs_fit(shifted ? x_shifted.data() + 1 : x.data(), C) == !shifted);
    moe::cuda::nn::layernorm_backward<S>(
        device, ConstMatrixView<S>(shifted ? dout_shifted.data() + 1 : dout.data(), T, C),
        ConstMatrixView<S>(shifted ? x_shifted.data() + 1 : x.data(), T, C), weight.data(), mean.data(), rstd.data(),
        MatrixView<S>(), dweight.data(), dbias.data());
    dweights.push_back(raw_host(device, dweight.data(), C));
    dbiases.push_back(raw_host(device, dbias.data(), C));
  }
  CHECK(same_bits(dweights[0], dweights[1]));
  CHECK(same_bits(dbiases[0], dbiases[1]));
  CHECK(relative_error(floats(dweights[0]), layernorm_cpu(in).dweight) < (std::is_same_v<S, float> ? 1e-5 : 2e-2));
}

TEST_CASE(CUDA_TEST_NAME("layernorm: parameter gradients in packs of columns and column by column give the same bits")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  check_layernorm_packed_parameter_gradients<float>();
  check_layernorm_packed_parameter_gradients<moe::bfloat16>();
}

TEST_CASE(CUDA_TEST_NAME("layernorm: null gradients are skipped and the others still match")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  const TestDevice device = make_device();
  const Index T = 70, C = 23;
  const LayerNormInputs in = layernorm_inputs(T, C, 77);
  const LayerNormResult cpu = layernorm_cpu(in);
  Array<float> x = to_device<float>(device, in.x), weight = to_device<float>(device, in.weight);
  Array<float> bias = to_device<float>(device, in.bias), dout = to_device<float>(device, in.dout);
  Array<float> out(T * C), mean(T), rstd(T);
  moe::cuda::nn::layernorm_forward<float>(device, ConstMatrixView<float>(x.data(), T, C), weight.data(), bias.data(),
                                          MatrixView<float>(out.data(), T, C), mean.data(), rstd.data());
  const ConstMatrixView<float> dout_view(dout.data(), T, C), x_view(x.data(), T, C);
  {  // dx only
    Array<float> dx = to_device<float>(device, in.dx);
    moe::cuda::nn::layernorm_backward<float>(device, dout_view, x_view, weight.data(), mean.data(), rstd.data(),
                                             MatrixView<float>(dx.data(), T, C), nullptr, nullptr);
    CHECK(relative_error(to_host(device, dx.data(), T * C), cpu.dx) < 1e-5);
  }
  {  // dweight only, then dbias only (dx skipped)
    Array<float> dweight = to_device<float>(device, in.dweight), dbias = to_device<float>(device, in.dbias);
    moe::cuda::nn::layernorm_backward<float>(device, dout_view, x_view, weight.data(), mean.data(), rstd.data(),
                                             MatrixView<float>(), dweight.data(), nullptr);
    CHECK(relative_error(to_host(device, dweight.data(), C), cpu.dweight) < 1e-5);
    CHECK(to_host(device, dbias.data(), C) == in.dbias);
    moe::cuda::nn::layernorm_backward<float>(device, dout_view, x_view, weight.data(), mean.data(), rstd.data(),
                                             MatrixView<float>(), nullptr, dbias.data());
    CHECK(relative_error(to_host(device, dbias.data(), C), cpu.dbias) < 1e-5);
  }
  {  // T = 0: nothing to do, nothing touched
    Array<float> dweight = to_device<float>(device, in.dweight);
    moe::cuda::nn::layernorm_forward<float>(device, ConstMatrixView<float>(x.data(), 0, C), weight.data(),
                                            bias.data(), MatrixView<float>(out.data(), 0, C), mean.data(),
                                            rstd.data());
    moe::cuda::nn::layernorm_backward<float>(device, ConstMatrixView<float>(dout.data(), 0, C),
                                             ConstMatrixView<float>(x.data(), 0, C), weight.data(), mean.data(),
                                             rstd.data(), MatrixView<float>(out.data(), 0, C), dweight.data(),
                                             nullptr);
    CHECK(to_host(device, dweight.data(), C) == in.dweight);
  }
}

TEST_CASE(CUDA_TEST_NAME("layernorm: bad shapes and null pointers throw, naming them")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  const TestDevice device = make_device();
  Array<float> buffer(64);
  float* p = buffer.data();
  const ConstMatrixView<float> x(p, 4, 6);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::layernorm_forward<float>(device, ConstMatrixView<float>(p, 4, 0), p, p,
                                                               MatrixView<float>(p, 4, 0), p, p),
                       doctest::Contains("x has no columns (x is [4, 0])"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::layernorm_forward<float>(device, x, p, p, MatrixView<float>(p, 4, 5), p, p),
                       doctest::Contains("layernorm_forward: out is [4, 5], x is [4, 6]"), moe::Error);
  CHECK_THROWS_WITH_AS(
      moe::cuda::nn::layernorm_forward<float>(device, x, p, nullptr, MatrixView<float>(p, 4, 6), p, p),
      doctest::Contains("weight and bias [6] must not be null"), moe::Error);
  CHECK_THROWS_WITH_AS(
      moe::cuda::nn::layernorm_forward<float>(device, x, p, p, MatrixView<float>(p, 4, 6), nullptr, p),
      doctest::Contains("mean and rstd [4] (cached for backward) must not be null"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::layernorm_backward<float>(device, ConstMatrixView<float>(p, 3, 6), x, p, p, p,
                                                                MatrixView<float>(p, 4, 6), p, p),
                       doctest::Contains("layernorm_backward: dout is [3, 6], x is [4, 6]"), moe::Error);
  CHECK_THROWS_WITH_AS(
      moe::cuda::nn::layernorm_backward<float>(device, x, x, p, p, p, MatrixView<float>(p, 4, 7), p, p),
      doctest::Contains("layernorm_backward: dx is [4, 7], x is [4, 6]"), moe::Error);
  CHECK_THROWS_WITH_AS(
      moe::cuda::nn::layernorm_backward<float>(device, x, x, p, nullptr, p, MatrixView<float>(p, 4, 6), p, p),
      doctest::Contains("weight [6], mean and rstd [4] must not be null"), moe::Error);
}

// ---- embedding ------------------------------------------------------------------------------

struct EmbeddingInputs {
  Index B, T, V, max_T, C;
  std::vector<std::int32_t> tokens;
  std::vector<float> wte, wpe, dout, dwte, dwpe;  // dwte, dwpe: initial (+=)
};

inline EmbeddingInputs embedding_inputs(Index B, Index T, Index V, Index max_T, Index C, std::uint64_t seed) {
  EmbeddingInputs in{B, T, V, max_T, C, {}, {}, {}, {}, {}, {}};
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int32_t> id(0, std::int32_t(V - 1));
  in.tokens.resize(std::size_t(B * T));
  for (auto& t : in.tokens) t = id(rng);
  in.wte = normal_values(std::size_t(V * C), seed + 1);
  in.wpe = normal_values(std::size_t(max_T * C), seed + 2);
  in.dout = normal_values(std::size_t(B * T * C), seed + 3);
  in.dwte = normal_values(std::size_t(V * C), seed + 4, 0.5f);
  in.dwpe = normal_values(std::size_t(max_T * C), seed + 5, 0.5f);
  return in;
}

template <class S>
EmbeddingInputs rounded(const EmbeddingInputs& in) {
  EmbeddingInputs r = in;
  for (std::vector<float>* v : {&r.wte, &r.wpe, &r.dout, &r.dwte, &r.dwpe}) *v = rounded<S>(*v);
  return r;
}

struct EmbeddingResult {
  std::vector<float> out, dwte, dwpe;
};

inline EmbeddingResult embedding_cpu(const EmbeddingInputs& in, bool with_dwte = true, bool with_dwpe = true) {
  const Index rows = in.B * in.T, C = in.C;
  EmbeddingResult r;
  r.out.assign(std::size_t(rows * C), 0.f);
  moe::nn::embedding_forward<float>(in.tokens, in.B, in.T, ConstMatrixView<float>(in.wte.data(), in.V, C),
                                    ConstMatrixView<float>(in.wpe.data(), in.max_T, C),
                                    MatrixView<float>(r.out.data(), rows, C), 3);
  r.dwte = in.dwte, r.dwpe = in.dwpe;
  moe::nn::embedding_backward<float>(
      ConstMatrixView<float>(in.dout.data(), rows, C), in.tokens, in.B, in.T,
      with_dwte ? MatrixView<float>(r.dwte.data(), in.V, C) : MatrixView<float>(),
      with_dwpe ? MatrixView<float>(r.dwpe.data(), in.max_T, C) : MatrixView<float>(), 3);
  return r;
}

template <class S>
struct EmbeddingRaw {
  std::vector<S> out, dwte, dwpe;
};

template <class S>
EmbeddingRaw<S> embedding_device_raw(const EmbeddingInputs& in, bool with_dwte = true, bool with_dwpe = true) {
  const TestDevice device = make_device();
  const Index rows = in.B * in.T, C = in.C;
  Array<S> wte = to_device<S>(device, in.wte), wpe = to_device<S>(device, in.wpe);
  Array<S> dout = to_device<S>(device, in.dout), out(rows * C);
  Array<S> dwte = to_device<S>(device, in.dwte), dwpe = to_device<S>(device, in.dwpe);
  moe::cuda::nn::embedding_forward<S>(device, in.tokens, in.B, in.T, ConstMatrixView<S>(wte.data(), in.V, C),
                                      ConstMatrixView<S>(wpe.data(), in.max_T, C),
                                      MatrixView<S>(out.data(), rows, C));
  moe::cuda::nn::embedding_backward<S>(device, ConstMatrixView<S>(dout.data(), rows, C), in.tokens, in.B, in.T,
                                       with_dwte ? MatrixView<S>(dwte.data(), in.V, C) : MatrixView<S>(),
                                       with_dwpe ? MatrixView<S>(dwpe.data(), in.max_T, C) : MatrixView<S>());
  EmbeddingRaw<S> r;
  r.out = raw_host(device, out.data(), rows * C);
  r.dwte = raw_host(device, dwte.data(), in.V * C);
  r.dwpe = raw_host(device, dwpe.data(), in.max_T * C);
  return r;
}

struct EmbeddingShape {
  Index B, T, V, max_T, C;
};
inline const std::vector<EmbeddingShape>& embedding_shapes() {
  // T = 1, B = 1, V = 1 (every row the same token), many repeats (V small), max_T > T, primes; then widths that go in
  // 16-byte packs (C = 16: 4 fp32 or 2 bf16 packs a row; C = 24: 6 fp32 packs, bf16 element by element), with runs of
  // a token longer than the fetch's batch of 8 rows
  static const std::vector<EmbeddingShape> shapes = {
      {1, 1, 1, 1, 1},      {3, 5, 11, 7, 13},  {4, 1, 50, 3, 17},   {1, 9, 1, 9, 6},
      {2, 37, 9, 40, 33},   {5, 23, 301, 31, 19}, {3, 29, 4, 30, 16}, {2, 41, 60, 41, 24}, {1, 1, 1, 1, 8}};
  return shapes;
}

template <class S>
void check_embedding_parity(const EmbeddingShape& s, std::uint64_t seed, double tolerance) {
  CAPTURE(s.B);
  CAPTURE(s.T);
  CAPTURE(s.V);
  CAPTURE(s.C);
  const EmbeddingInputs in = rounded<S>(embedding_inputs(s.B, s.T, s.V, s.max_T, s.C, seed));
  for (const auto& wanted : {std::pair{true, true}, std::pair{true, false}, std::pair{false, true}}) {
    const bool with_dwte = wanted.first, with_dwpe = wanted.second;
    CAPTURE(with_dwte);
    CAPTURE(with_dwpe);
    const EmbeddingResult cpu = embedding_cpu(in, with_dwte, with_dwpe);
    const EmbeddingRaw<S> gpu = embedding_device_raw<S>(in, with_dwte, with_dwpe);
    CHECK(relative_error(floats(gpu.out), cpu.out) < tolerance);
    CHECK(relative_error(floats(gpu.dwte), cpu.dwte) < tolerance);
    CHECK(relative_error(floats(gpu.dwpe), cpu.dwpe) < tolerance);
    if (!with_dwte) CHECK(floats(gpu.dwte) == in.dwte);
    if (!with_dwpe) CHECK(floats(gpu.dwpe) == in.dwpe);
    const EmbeddingRaw<S> again = embedding_device_raw<S>(in, with_dwte, with_dwpe);
    CHECK(same_bits(again.out, gpu.out));
    CHECK(same_bits(again.dwte, gpu.dwte));
    CHECK(same_bits(again.dwpe, gpu.dwpe));
  }
}

TEST_CASE(CUDA_TEST_NAME("embedding: forward and backward match the CPU version in fp32, same bits twice")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  std::uint64_t seed = 1000;
  for (const EmbeddingShape& s : embedding_shapes()) check_embedding_parity<float>(s, seed += 10, 1e-5);
}

TEST_CASE(CUDA_TEST_NAME("embedding: bf16 storage matches the CPU version within 2e-2")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  std::uint64_t seed = 2000;
  for (const EmbeddingShape& s : embedding_shapes()) check_embedding_parity<moe::bfloat16>(s, seed += 10, 2e-2);
}

TEST_CASE(CUDA_TEST_NAME("embedding: a repeated token sums its rows in row order, as the CPU version")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  // Every row is token 2 of V = 4: dwte[2] is one long fixed-order sum (133 rows: 16 batches of the fetch's 8 and 5
  // more); fp32 bits equal the CPU's, element by element (C = 5) and in 16-byte packs (C = 12, 16).
  for (const Index C : {Index(5), Index(12), Index(16)}) {
    CAPTURE(C);
    EmbeddingInputs in = embedding_inputs(7, 19, 4, 19, C, 3000 + std::uint64_t(C));
    std::fill(in.tokens.begin(), in.tokens.end(), 2);
    in.tokens[40] = 1;  // another token at row 40: token 2's sorted run skips that row
    const EmbeddingResult cpu = embedding_cpu(in);
    const EmbeddingRaw<float> gpu = embedding_device_raw<float>(in);
    CHECK(gpu.dwte == cpu.dwte);
    CHECK(gpu.dwpe == cpu.dwpe);
    CHECK(gpu.out == cpu.out);
  }
}

TEST_CASE(CUDA_TEST_NAME("embedding: bad ids and shapes throw before any device work, naming them")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  const TestDevice device = make_device();
  const Index B = 2, T = 3, V = 5, max_T = 4, C = 3;
  EmbeddingInputs in = embedding_inputs(B, T, V, max_T, C, 4000);
  Array<float> wte = to_device<float>(device, in.wte), wpe = to_device<float>(device, in.wpe);
  Array<float> dout = to_device<float>(device, in.dout);
  const std::vector<float> sentinel(std::size_t(B * T * C), 7.f);
  Array<float> out = to_device<float>(device, sentinel);
  Array<float> dwte = to_device<float>(device, in.dwte), dwpe = to_device<float>(device, in.dwpe);
  const ConstMatrixView<float> wte_view(wte.data(), V, C), wpe_view(wpe.data(), max_T, C);
  const MatrixView<float> out_view(out.data(), B * T, C), dwte_view(dwte.data(), V, C),
      dwpe_view(dwpe.data(), max_T, C);
  const ConstMatrixView<float> dout_view(dout.data(), B * T, C);

  for (std::int32_t bad : {std::int32_t(-1), std::int32_t(V)}) {
    std::vector<std::int32_t> tokens = in.tokens;
    tokens[4] = bad;  // b = 1, t = 1
    const std::string message = "token id " + std::to_string(bad) + " at position 4 (b = 1, t = 1) is outside the "
                                "vocabulary [0, 5)";
    CHECK_THROWS_WITH_AS(moe::cuda::nn::embedding_forward<float>(device, tokens, B, T, wte_view, wpe_view, out_view),
                         doctest::Contains(message.c_str()), moe::Error);
    CHECK_THROWS_WITH_AS(moe::cuda::nn::embedding_backward<float>(device, dout_view, tokens, B, T, dwte_view,
                                                                  dwpe_view),
                         doctest::Contains(message.c_str()), moe::Error);
  }
  // Nothing was written.
  CHECK(to_host(device, out.data(), B * T * C) == sentinel);
  CHECK(to_host(device, dwte.data(), V * C) == in.dwte);
  CHECK(to_host(device, dwpe.data(), max_T * C) == in.dwpe);

  CHECK_THROWS_WITH_AS(moe::cuda::nn::embedding_forward<float>(device, std::span(in.tokens).first(5), B, T, wte_view,
                                                               wpe_view, out_view),
                       doctest::Contains("tokens has 5 ids, expected B * T = 2 * 3 = 6"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::embedding_forward<float>(device, std::span(in.tokens).first(5), 1, 5, wte_view,
                                                               wpe_view, MatrixView<float>(out.data(), 5, C)),
                       doctest::Contains("sequence length T = 5 exceeds the 4 positions of wpe"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::embedding_forward<float>(device, in.tokens, B, T, wte_view,
                                                               ConstMatrixView<float>(wpe.data(), max_T, 2),
                                                               out_view),
                       doctest::Contains("wte is [5, 3], wpe is [4, 2] (the widths differ)"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::embedding_forward<float>(device, in.tokens, B, T, wte_view, wpe_view,
                                                               MatrixView<float>(out.data(), 5, C)),
                       doctest::Contains("the [B*T, C] matrix is [5, 3], expected [6, 3]"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::embedding_backward<float>(device, dout_view, in.tokens, B, T,
                                                                MatrixView<float>(dwte.data(), V, 2), dwpe_view),
                       doctest::Contains("dwte is [5, 2], dout is [6, 3]"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::embedding_backward<float>(device, dout_view, in.tokens, B, T, dwte_view,
                                                                MatrixView<float>(dwpe.data(), 2, C)),
                       doctest::Contains("sequence length T = 3 exceeds the 2 positions of wpe"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::embedding_backward<float>(device, dout_view, in.tokens, B, -1, dwte_view,
                                                                dwpe_view),
                       doctest::Contains("B = 2 and T = -1 must be >= 0"), moe::Error);
  // Without a dwte the ids are not bounded by V; B*T = 0 is a no-op.
  std::vector<std::int32_t> large = in.tokens;
  large[0] = 1000;
  CHECK_NOTHROW(moe::cuda::nn::embedding_backward<float>(device, dout_view, large, B, T, MatrixView<float>(),
                                                          dwpe_view));
  CHECK_NOTHROW(moe::cuda::nn::embedding_forward<float>(device, std::span<const std::int32_t>(), 0, T, wte_view,
                                                         wpe_view, MatrixView<float>(out.data(), 0, C)));
}

// ---- linear -----------------------------------------------------------------------------------

struct LinearInputs {
  Index T, I, O;
  std::vector<float> in, weight, bias, dout, din, dweight, dbias;  // din, dweight, dbias: initial (+=)
};

inline LinearInputs linear_inputs(Index T, Index I, Index O, std::uint64_t seed) {
  LinearInputs x{T, I, O, {}, {}, {}, {}, {}, {}, {}};
  x.in = normal_values(std::size_t(T * I), seed);
  x.weight = normal_values(std::size_t(O * I), seed + 1, 0.3f);
  x.bias = normal_values(std::size_t(O), seed + 2);
  x.dout = normal_values(std::size_t(T * O), seed + 3);
  x.din = normal_values(std::size_t(T * I), seed + 4, 0.5f);
  x.dweight = normal_values(std::size_t(O * I), seed + 5, 0.5f);
  x.dbias = normal_values(std::size_t(O), seed + 6, 0.5f);
  return x;
}

template <class S>
LinearInputs rounded(const LinearInputs& x) {
  LinearInputs r = x;
  for (std::vector<float>* v : {&r.in, &r.weight, &r.bias, &r.dout, &r.din, &r.dweight, &r.dbias}) *v = rounded<S>(*v);
  return r;
}

// Which of the optional pieces take part: the bias and each gradient.
struct LinearParts {
  bool bias = true, din = true, dweight = true, dbias = true;
};

struct LinearResult {
  std::vector<float> out, din, dweight, dbias;
};

inline LinearResult linear_cpu(const LinearInputs& x, LinearParts parts,
                               moe::nn::GradInto din_into = moe::nn::GradInto::add) {
  const Index T = x.T, I = x.I, O = x.O;
  LinearResult r;
  r.out.assign(std::size_t(T * O), 0.f);
  r.din = x.din, r.dweight = x.dweight, r.dbias = x.dbias;
  moe::nn::linear_forward<float>(ConstMatrixView<float>(x.in.data(), T, I), ConstMatrixView<float>(x.weight.data(), O, I),
                                 parts.bias ? x.bias.data() : nullptr, MatrixView<float>(r.out.data(), T, O), 3);
  moe::nn::linear_backward<float>(ConstMatrixView<float>(x.in.data(), T, I), ConstMatrixView<float>(x.dout.data(), T, O),
                                  ConstMatrixView<float>(x.weight.data(), O, I),
                                  parts.din ? MatrixView<float>(r.din.data(), T, I) : MatrixView<float>(),
                                  parts.dweight ? MatrixView<float>(r.dweight.data(), O, I) : MatrixView<float>(),
                                  parts.dbias ? r.dbias.data() : nullptr, 3, din_into);
  return r;
}

template <class S>
struct LinearRaw {
  std::vector<S> out, din, dweight, dbias;
};

// lanes > 0: a GPU device's side streams for the two backward products (set_gemm_lanes; 1: in order).
template <class S>
LinearRaw<S> linear_device_raw(const LinearInputs& x, LinearParts parts, int lanes = 0,
                               moe::nn::GradInto din_into = moe::nn::GradInto::add) {
  const TestDevice device = make_device();
  if (lanes > 0) set_gemm_lanes(device, lanes);
  const Index T = x.T, I = x.I, O = x.O;
  Array<S> in = to_device<S>(device, x.in), weight = to_device<S>(device, x.weight), bias = to_device<S>(device, x.bias);
  Array<S> dout = to_device<S>(device, x.dout), din = to_device<S>(device, x.din);
  Array<S> dweight = to_device<S>(device, x.dweight), dbias = to_device<S>(device, x.dbias), out(T * O);
  moe::cuda::nn::linear_forward<S>(device, ConstMatrixView<S>(in.data(), T, I), ConstMatrixView<S>(weight.data(), O, I),
                                   parts.bias ? bias.data() : nullptr, MatrixView<S>(out.data(), T, O));
  moe::cuda::nn::linear_backward<S>(device, ConstMatrixView<S>(in.data(), T, I), ConstMatrixView<S>(dout.data(), T, O),
                                    ConstMatrixView<S>(weight.data(), O, I),
                                    parts.din ? MatrixView<S>(din.data(), T, I) : MatrixView<S>(),
                                    parts.dweight ? MatrixView<S>(dweight.data(), O, I) : MatrixView<S>(),
                                    parts.dbias ? dbias.data() : nullptr, din_into);
  LinearRaw<S> r;
  r.out = raw_host(device, out.data(), T * O);
  r.din = raw_host(device, din.data(), T * I);
  r.dweight = raw_host(device, dweight.data(), O * I);
  r.dbias = raw_host(device, dbias.data(), O);
  return r;
}

template <class S>
void check_linear_parity(Index T, Index I, Index O, LinearParts parts, std::uint64_t seed, double tolerance) {
  CAPTURE(T);
  CAPTURE(I);
  CAPTURE(O);
  CAPTURE(parts.bias);
  const LinearInputs x = rounded<S>(linear_inputs(T, I, O, seed));
  const LinearResult cpu = linear_cpu(x, parts);
  const LinearRaw<S> gpu = linear_device_raw<S>(x, parts);
  CHECK(relative_error(floats(gpu.out), cpu.out) < tolerance);
  CHECK(relative_error(floats(gpu.din), cpu.din) < tolerance);
  CHECK(relative_error(floats(gpu.dweight), cpu.dweight) < tolerance);
  CHECK(relative_error(floats(gpu.dbias), cpu.dbias) < tolerance);
  // Skipped gradients are untouched (bit for bit), and a second run gives the same bits, with the
  // backward's two products in order on the stream (on a GPU the first run had them side by side).
  if (!parts.din) CHECK(floats(gpu.din) == x.din);
  if (!parts.dweight) CHECK(floats(gpu.dweight) == x.dweight);
  if (!parts.dbias) CHECK(floats(gpu.dbias) == x.dbias);
  const LinearRaw<S> again = linear_device_raw<S>(x, parts, 1);
  CHECK(same_bits(again.out, gpu.out));
  CHECK(same_bits(again.din, gpu.din));
  CHECK(same_bits(again.dweight, gpu.dweight));
  CHECK(same_bits(again.dbias, gpu.dbias));
}

inline const std::vector<std::array<Index, 3>>& linear_shapes() {
  // (T, I, O): T = 0 and 1, one input or output, sizes around the 64-row chunk of the bias sums, primes
  static const std::vector<std::array<Index, 3>> shapes = {{0, 5, 3},  {1, 1, 1},   {1, 7, 5},   {9, 1, 4},
                                                           {64, 16, 9}, {65, 33, 17}, {131, 24, 40}};
  return shapes;
}

TEST_CASE(CUDA_TEST_NAME("linear: forward and backward match the CPU version in fp32, same bits twice")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  std::uint64_t seed = 5000;
  for (const auto& [T, I, O] : linear_shapes()) check_linear_parity<float>(T, I, O, {}, seed += 10, 1e-5);
}

TEST_CASE(CUDA_TEST_NAME("linear: bf16 storage with fp32 accumulation matches the CPU version within 2e-2")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  std::uint64_t seed = 6000;
  for (const auto& [T, I, O] : linear_shapes()) check_linear_parity<moe::bfloat16>(T, I, O, {}, seed += 10, 2e-2);
}

template <class S>
void check_linear_overwrite(Index T, Index I, Index O, std::uint64_t seed) {
  CAPTURE(T);
  CAPTURE(I);
  CAPTURE(O);
  // din written over NaNs gives din added into zeros: the same bits on the CPU and the emulated device (one GEMM
  // definition), on a GPU within a kernel's rounding (cuBLAS may pick another kernel for beta = 0); the rest as before.
  LinearInputs zeros = rounded<S>(linear_inputs(T, I, O, seed)), nans = zeros;
  std::fill(zeros.din.begin(), zeros.din.end(), 0.f);
  std::fill(nans.din.begin(), nans.din.end(), std::numeric_limits<float>::quiet_NaN());
  const LinearRaw<S> added = linear_device_raw<S>(zeros, {});
  const LinearRaw<S> written = linear_device_raw<S>(nans, {}, 0, moe::nn::GradInto::overwrite);
  if constexpr (kEmulatedDevice)
    CHECK(same_bits(written.din, added.din));
  else
    CHECK(relative_error(floats(written.din), floats(added.din)) < (std::is_same_v<S, float> ? 1e-6 : 1e-2));
  CHECK(same_bits(written.dweight, added.dweight));
  CHECK(same_bits(written.dbias, added.dbias));
  const LinearResult cpu_added = linear_cpu(zeros, {}), cpu_written = linear_cpu(nans, {}, moe::nn::GradInto::overwrite);
  CHECK(cpu_written.din == cpu_added.din);
  CHECK(relative_error(floats(written.din), cpu_written.din) < (std::is_same_v<S, float> ? 1e-5 : 2e-2));
}

TEST_CASE(CUDA_TEST_NAME("linear: din written over (GradInto::overwrite) is din added into zeros")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  std::uint64_t seed = 7500;
  for (const auto& [T, I, O] : linear_shapes()) {
    check_linear_overwrite<float>(T, I, O, seed += 10);
    check_linear_overwrite<moe::bfloat16>(T, I, O, seed += 10);
  }
}

TEST_CASE(CUDA_TEST_NAME("linear: no bias, and skipped gradients, leave the rest matching")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  check_linear_parity<float>(70, 13, 21, {.bias = false, .din = true, .dweight = true, .dbias = false}, 7000, 1e-5);
  check_linear_parity<float>(70, 13, 21, {.bias = true, .din = false, .dweight = true, .dbias = true}, 7010, 1e-5);
  check_linear_parity<float>(70, 13, 21, {.bias = true, .din = true, .dweight = false, .dbias = false}, 7020, 1e-5);
}

TEST_CASE(CUDA_TEST_NAME("linear: bad shapes throw, naming them")) {
  CUDA_NN_NORM_SKIP_WITHOUT_DEVICE();
  const TestDevice device = make_device();
  Array<float> buffer(256);
  float* p = buffer.data();
  const ConstMatrixView<float> in(p, 4, 6), weight(p, 5, 6), dout(p, 4, 5);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::linear_forward<float>(device, in, ConstMatrixView<float>(p, 5, 7), p,
                                                            MatrixView<float>(p, 4, 5)),
                       doctest::Contains("linear_forward: in is [4, 6], weight is [5, 7] (expected [O, 6])"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::linear_forward<float>(device, in, weight, p, MatrixView<float>(p, 4, 4)),
                       doctest::Contains("linear_forward: out is [4, 4], expected [T, O] = [4, 5]"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::linear_backward<float>(device, in, ConstMatrixView<float>(p, 3, 5), weight,
                                                             MatrixView<float>(), MatrixView<float>(), p),
                       doctest::Contains("linear_backward: dout is [3, 5], expected [T, O] = [4, 5]"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::linear_backward<float>(device, in, dout, weight, MatrixView<float>(p, 4, 5),
                                                             MatrixView<float>(), p),
                       doctest::Contains("linear_backward: din is [4, 5], in is [4, 6]"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::cuda::nn::linear_backward<float>(device, in, dout, weight, MatrixView<float>(),
                                                             MatrixView<float>(p, 6, 5), p),
                       doctest::Contains("linear_backward: dweight is [6, 5], weight is [5, 6]"), moe::Error);
}

#undef CUDA_NN_NORM_SKIP_WITHOUT_DEVICE

}  // namespace cuda_test::nn_norm
