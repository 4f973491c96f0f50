// tests/cuda/cuda_nn_operand_cases.hpp: host memory, or a view running past its buffer's end, handed
// to the CUDA transformer pieces and the optimizer (moe/cuda/nn/) is named by the call that got it,
// operand by operand (moe/cuda/device_operands.hpp), not read by a kernel (on a GPU, an illegal
// address the next sync reports, or another buffer's values). Written once over the device, as the other cuda_nn_*_cases.hpp: the including file
// defines, in namespace cuda_test, `TestDevice`, `kEmulatedDevice`, `make_device()`,
// `device_available()` and CUDA_TEST_NAME(text).
#pragma once

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moe/bfloat16.hpp"
#include "moe/cuda/buffer.hpp"
#include "moe/cuda/nn/adamw.hpp"
#include "moe/cuda/nn/attention.hpp"
#include "moe/cuda/nn/cross_entropy.hpp"
#include "moe/cuda/nn/embedding.hpp"
#include "moe/cuda/nn/fused_attention.hpp"
#include "moe/cuda/nn/layernorm.hpp"
#include "moe/cuda/nn/linear.hpp"

namespace cuda_test::nn_operands {

using moe::ConstMatrixView;
using moe::Index;
using moe::MatrixView;
template <class S>
using Matrix = moe::cuda::DeviceMatrix<S, TestDevice>;
template <class T>
using Array = moe::cuda::DeviceArray<T, TestDevice>;

// What operand `chosen` of a call is given instead of its device buffer.
enum class Misuse {
  host,     // host memory of the same shape (zeros, so a GPU that reads pageable memory computes on something)
  shifted,  // its buffer 16 bytes on (alignment kept): the extent runs past the allocation's end, so the
            // check's count for it is not short of what the kernels touch
};

// One call's operands, each its device buffer but for the one numbered `chosen`.
class Operands {
 public:
  Operands(int chosen, Misuse misuse, std::vector<double>& host) : chosen_(chosen), misuse_(misuse), host_(host) {}
  template <class S>
  MatrixView<S> operator()(int i, Matrix<S>& m) const {
    if (i != chosen_) return MatrixView<S>(m);
    return MatrixView<S>(misuse_ == Misuse::host ? host<S>(m.size()) : m.data() + 16 / sizeof(S), m.rows(), m.cols());
  }
  template <class T>
  T* operator()(int i, Array<T>& a) const {
    if (i != chosen_) return a.data();
    return misuse_ == Misuse::host ? host<T>(a.size()) : a.data() + 16 / sizeof(T);
  }

 private:
  template <class T>
  T* host(Index count) const {
    const std::size_t doubles = (std::size_t(count) * sizeof(T) + sizeof(double) - 1) / sizeof(double);
    REQUIRE(host_.size() >= doubles);  // never grown: a GPU that reads pageable memory may still be at it
    return reinterpret_cast<T*>(host_.data());
  }
  int chosen_;
  Misuse misuse_;
  std::vector<double>& host_;
};

// The call's moe::Error, if any, after the device has finished what it queued (a GPU that reads pageable
// memory takes a host operand: its kernels must be done with it before the next call).
inline std::string error_of(const TestDevice& device, const std::function<void()>& call) {
  std::string error;
  try {
    call();
  } catch (const moe::Error& e) {
    error = e.what();
  }
  device.synchronize();
  return error;
}

// `call(operands)` with every operand on the device runs. With operand i in host memory it throws
// naming `where: names[i]` (the emulated device by the extent, a GPU by the kind of memory, or takes it
// where it reads pageable memory: HMM, ATS); with operand i shifted past its buffer's end it throws
// naming it as running past the end (both devices: the library's own allocations are in a ledger).
inline void check_each_operand(const TestDevice& device, const char* where, std::initializer_list<const char*> names,
                               const std::function<void(const Operands&)>& call) {
  std::vector<double> host(4096, 0.0);
  CHECK_MESSAGE(error_of(device, [&] { call(Operands(-1, Misuse::host, host)); }).empty(), where,
                " refused its device operands");
  int i = 0;
  for (const char* name : names) {
    const std::string operand = std::string(where) + ": " + name;
    const std::string in_host = error_of(device, [&] { call(Operands(i, Misuse::host, host)); });
    if constexpr (kEmulatedDevice)
      CHECK_MESSAGE(in_host.find(operand + " (") != std::string::npos, operand, " in host memory gave: ", in_host);
    else
      CHECK_MESSAGE((in_host.empty() || in_host.find(operand + " is pageable host memory") != std::string::npos),
                    operand, " in host memory gave: ", in_host);
    const std::string past = error_of(device, [&] { call(Operands(i, Misuse::shifted, host)); });
    CHECK_MESSAGE((past.find(operand + " (") != std::string::npos &&
                   past.find("runs past the end of its device allocation") != std::string::npos),
                  operand, " shifted past its buffer's end gave: ", past);
    ++i;
  }
}

TEST_CASE(CUDA_TEST_NAME("bad input: host memory or an extent past its buffer given to layernorm, linear, embedding and cross-entropy is named")) {
  if (!device_available()) return;
  const TestDevice device = make_device();
  const Index T = 6, C = 8, O = 16, V = 12;
  Matrix<float> x(T, C), out(T, C), dout(T, C), dx(T, C), weight2(O, C), y(T, O), dy(T, O), dw2(O, C);
  Array<float> weight(C), bias(C), mean(T), rstd(T), dweight(C), dbias(C), bias2(O), dbias2(O);
  check_each_operand(device, "layernorm_forward", {"x", "out", "weight", "bias", "mean", "rstd"}, [&](const Operands& on) {
    moe::cuda::nn::layernorm_forward<float>(device, on(0, x), on(2, weight), on(3, bias), on(1, out), on(4, mean),
                                            on(5, rstd));
  });
  check_each_operand(device, "layernorm_backward", {"dout", "x", "weight", "mean", "rstd", "dx", "dweight", "dbias"},
                     [&](const Operands& on) {
                       moe::cuda::nn::layernorm_backward<float>(device, on(0, dout), on(1, x), on(2, weight),
                                                                on(3, mean), on(4, rstd), on(5, dx), on(6, dweight),
                                                                on(7, dbias));
                     });
  check_each_operand(device, "linear_forward", {"in", "weight", "bias", "out"}, [&](const Operands& on) {
    moe::cuda::nn::linear_forward<float>(device, on(0, x), on(1, weight2), on(2, bias2), on(3, y));
  });
  check_each_operand(device, "linear_backward", {"in", "dout", "weight", "din", "dweight", "dbias"}, [&](const Operands& on) {
    moe::cuda::nn::linear_backward<float>(device, on(0, x), on(1, dy), on(2, weight2), on(3, dx), on(4, dw2),
                                          on(5, dbias2));
  });

  const Index B = 2, S = 3;  // B * S = T rows
  const std::vector<std::int32_t> tokens{0, 3, 11, 5, 5, 1}, targets{2, -1, 7, 0, 11, 4};
  Matrix<float> wte(V, C), wpe(S, C), dwte(V, C), dwpe(S, C), logits(T, V), dlogits(T, V);
  Array<float> losses(T), stats(2 * T);
  check_each_operand(device, "embedding_forward", {"wte", "wpe", "out"}, [&](const Operands& on) {
    moe::cuda::nn::embedding_forward<float>(device, tokens, B, S, on(0, wte), on(1, wpe), on(2, out));
  });
  check_each_operand(device, "embedding_backward", {"dout", "dwte", "dwpe"}, [&](const Operands& on) {
    moe::cuda::nn::embedding_backward<float>(device, on(0, dout), tokens, B, S, on(1, dwte), on(2, dwpe));
  });
  check_each_operand(device, "cross_entropy_forward", {"logits", "losses", "row_stats"}, [&](const Operands& on) {
    moe::cuda::nn::cross_entropy_forward<float>(device, on(0, logits), targets, on(1, losses), on(2, stats));
  });
  check_each_operand(device, "cross_entropy_backward", {"logits", "dlogits", "row_stats"}, [&](const Operands& on) {
    moe::cuda::nn::cross_entropy_backward<float>(device, on(0, logits), targets, 1.0, on(1, dlogits), on(2, stats));
  });
}

TEST_CASE(CUDA_TEST_NAME("bad input: host memory or an extent past its buffer given to the attentions is named")) {
  if (!device_available()) return;
  const TestDevice device = make_device();
  const Index B = 2, T = 5, heads = 2, C = 64;  // head size 32, which the fused attention takes
  Matrix<float> qkv(B * T, 3 * C), out(B * T, C), dout(B * T, C), dqkv(B * T, 3 * C);
  Array<float> att(B * heads * T * T);
  check_each_operand(device, "attention_forward", {"qkv", "out", "att"}, [&](const Operands& on) {
    moe::cuda::nn::attention_forward<float>(device, on(0, qkv), B, T, heads, true, on(1, out), on(2, att));
  });
  check_each_operand(device, "attention_backward", {"dout", "qkv", "att", "dqkv"}, [&](const Operands& on) {
    moe::cuda::nn::attention_backward<float>(device, on(0, dout), on(1, qkv), on(2, att), B, T, heads, true,
                                             on(3, dqkv));
  });
  using moe::bfloat16;
  Matrix<bfloat16> qkv16(B * T, 3 * C), out16(B * T, C), dout16(B * T, C), dqkv16(B * T, 3 * C);
  Array<float> lse(B * heads * T);
  check_each_operand(device, "fused_attention_forward", {"qkv", "out", "lse"}, [&](const Operands& on) {
    moe::cuda::nn::fused_attention_forward<bfloat16>(device, on(0, qkv16), B, T, heads, true, on(1, out16), on(2, lse));
  });
  check_each_operand(device, "fused_attention_backward", {"dout", "qkv", "out", "lse", "dqkv"}, [&](const Operands& on) {
    moe::cuda::nn::fused_attention_backward<bfloat16>(device, on(0, dout16), on(1, qkv16), on(2, out16), on(3, lse),
                                                      B, T, heads, true, on(4, dqkv16));
  });
}

TEST_CASE(CUDA_TEST_NAME("bad input: host memory or an extent past its buffer in the optimizer's parameter list is named")) {
  if (!device_available()) return;
  const TestDevice device = make_device();
  Array<float> w(24), w_grad(24), b(6), b_grad(6);
  // Operands 0 and 1: w's values and gradient; 2 and 3: b's.
  const auto params = [&](const Operands& on) {
    return std::vector<moe::ParamRef<float>>{
        {"w", {4, 6}, std::span<float>(on(0, w), 24), std::span<float>(on(1, w_grad), 24), true},
        {"b", {6}, std::span<float>(on(2, b), 6), std::span<float>(on(3, b_grad), 6), true}};
  };
  check_each_operand(device, "AdamW",
                     {"parameter 'w' values", "parameter 'w' gradient", "parameter 'b' values", "parameter 'b' gradient"},
                     [&](const Operands& on) {
                       auto list = params(on);
                       moe::cuda::nn::AdamW<float, TestDevice>(device).step(list);
                     });
  // Gradients only: operand 0 is w's, 1 is b's.
  const auto gradients = [&](const Operands& on) {
    return std::vector<moe::ParamRef<float>>{{"w", {4, 6}, std::span<float>(w.data(), 24), std::span<float>(on(0, w_grad), 24), true},
                                             {"b", {6}, std::span<float>(b.data(), 6), std::span<float>(on(1, b_grad), 6), true}};
  };
  using Params = std::vector<moe::ParamRef<float>>;
  const std::pair<const char*, std::function<void(Params&)>> over_gradients[] = {
      {"grad_norm", [&](Params& list) { moe::cuda::nn::grad_norm(device, list); }},
      {"clip_grad_norm", [&](Params& list) { moe::cuda::nn::clip_grad_norm(device, list, 1.0); }},
      {"zero_grads", [&](Params& list) { moe::cuda::nn::zero_grads(device, list); }},
      {"scale_grads", [&](Params& list) { moe::cuda::nn::scale_grads(device, list, 0.5f); }}};
  for (const auto& call : over_gradients)  // (not a structured binding: clang 14 cannot capture one)
    check_each_operand(device, call.first, {"parameter 'w' gradient", "parameter 'b' gradient"},
                       [&](const Operands& on) {
                         Params list = gradients(on);
                         call.second(list);
                       });
}

}  // namespace cuda_test::nn_operands
