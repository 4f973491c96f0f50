// moe/cuda/emulated_device.hpp: the CUDA backend's device on the host. Memory is host memory,
// for_each is a loop, the GEMM is the column-major definition and the sort is std::stable_sort.
// It exists to test: every index body, launch size and GEMM mapping of moe::cuda::BasicBackend
// runs here with the host compiler (and under AddressSanitizer), on machines without a GPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <numeric>
#include <string>
#include <vector>

#include "moe/config.hpp"
#include "moe/cuda/device.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda {

// A row of EmulatedDevice::for_each_row: the warp's lanes and butterfly in loops (device.hpp).
struct EmulatedRow {
  template <class F>
  auto sum(Index n, F f) const {
    using T = decltype(f(Index{}));
    T lanes[kRowLanes] = {};
    for (int l = 0; l < kRowLanes; ++l)
      for (Index c = l; c < n; c += kRowLanes) lanes[l] += f(c);
    return butterfly(lanes, [](T a, T b) { return a + b; });
  }
  template <class F>
  auto max(Index n, F f) const {
    using T = decltype(f(Index{}));
    T lanes[kRowLanes];
    for (int l = 0; l < kRowLanes; ++l) {
      lanes[l] = -T(INFINITY);
      for (Index c = l; c < n; c += kRowLanes) {
        const T v = f(c);
        lanes[l] = v > lanes[l] ? v : lanes[l];
      }
    }
    return butterfly(lanes, [](T a, T b) { return b > a ? b : a; });
  }
  template <class F>
  void for_each(Index n, F f) const {
    for (Index c = 0; c < n; ++c) f(c);
  }
  bool first() const { return true; }  // the body runs once per row here
};

struct EmulatedDevice {
  using Row = EmulatedRow;
  static constexpr std::size_t kAlignment = 256;  // cudaMalloc's alignment
  std::string description() const { return "emulated CUDA device (host loops)"; }
  static void* allocate(std::size_t bytes) { return ::operator new(bytes == 0 ? 1 : bytes, std::align_val_t{kAlignment}); }
  static void deallocate(void* p) { ::operator delete(p, std::align_val_t{kAlignment}); }

  void upload(void* dst, const void* src, std::size_t bytes) const { copy_bytes(dst, src, bytes); }
  void download(void* dst, const void* src, std::size_t bytes) const { copy_bytes(dst, src, bytes); }
  void synchronize() const {}

  template <class Body>
  void for_each(Index n, Body body) const {
    for (Index i = 0; i < n; ++i) body(i);
  }
  template <class Body>
  void for_each_2d(Index rows, Index cols, Body body) const {
    for (Index r = 0; r < rows; ++r)
      for (Index c = 0; c < cols; ++c) body(r, c);
  }
  template <class Body>
  void for_each_row(Index rows, Body body) const {
    for (Index r = 0; r < rows; ++r) body(r, Row{});
  }

  // The column-major definition, accumulated in the scalar's compute type in k order; a batch is
  // its products one after another.
  template <class S>
  void gemm(const BlasGemm<S>& g) const {
    using C = Compute<S>;
    const auto at = [](const S* p, Index ld, BlasOp op, Index r, Index c) {
      return C(op == BlasOp::none ? p[r + c * ld] : p[c + r * ld]);
    };
    for (Index q = 0; q < g.batch; ++q) {
      const S* a = g.a + q * g.stride_a;
      const S* b = g.b + q * g.stride_b;
      S* c = g.c + q * g.stride_c;
      for (Index j = 0; j < g.n; ++j)
        for (Index i = 0; i < g.m; ++i) {
          C sum = g.accumulate ? C(c[i + j * g.ldc]) : C(0);
          C product = 0;
          for (Index p = 0; p < g.k; ++p) product += at(a, g.lda, g.op_a, i, p) * at(b, g.ldb, g.op_b, p, j);
          c[i + j * g.ldc] = S(sum + product);
        }
    }
  }

  // One growing host buffer, shared by copies of this device (as CudaDevice's context is).
  void* scratch(std::size_t bytes) const {
    if (bytes > scratch_->size) {
      scratch_->data.reset(static_cast<unsigned char*>(allocate(bytes)));
      scratch_->size = bytes;
    }
    return scratch_->data.get();
  }

  // (keys_out, values_out) = (keys_in, values_in) ordered by ascending key, equal keys keeping
  // their order. Only the low `bits` bits of a key count (all keys fit them).
  void stable_sort_pairs(const std::uint32_t* keys_in, std::uint32_t* keys_out, const std::int32_t* values_in,
                         std::int32_t* values_out, Index n, int /*bits*/) const {
    std::vector<Index> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), Index{0});
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return keys_in[a] < keys_in[b]; });
    for (Index i = 0; i < n; ++i) keys_out[i] = keys_in[order[i]], values_out[i] = values_in[order[i]];
  }

 private:
  template <class S>
  using Compute = typename ComputeTypeOf<S>::type;
  struct Scratch {
    struct Free {
      void operator()(unsigned char* p) const { deallocate(p); }
    };
    std::unique_ptr<unsigned char, Free> data;
    std::size_t size = 0;
  };
  std::shared_ptr<Scratch> scratch_ = std::make_shared<Scratch>();
  static void copy_bytes(void* dst, const void* src, std::size_t bytes) {
    if (bytes) std::memcpy(dst, src, bytes);
  }
};

}  // namespace moe::cuda
