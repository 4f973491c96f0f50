// tests/cuda/grouped_gemm_operands.hpp: random host operands of a grouped product
// (moe/cuda/grouped_gemm.hpp) and its exact value, shared by the host emulation's cases
// (tests/test_grouped_gemm.cpp) and the GPU kernel's (tests/cuda/test_cuda_grouped_gemm.cu).
#pragma once

#include <algorithm>
#include <cstdint>
#include <new>
#include <random>
#include <utility>
#include <vector>

#include "moe/bfloat16.hpp"
#include "moe/config.hpp"
#include "moe/cuda/grouped_gemm.hpp"

namespace grouped_test {

using moe::bfloat16;
using moe::Index;
using moe::cuda::Epilogue;
using moe::cuda::GroupedGemm;

// Host arrays start 64-byte aligned, as device allocations do (the kernel's 16-byte copies, and
// so check_grouped_gemm, need 16).
template <class T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  bool operator==(const AlignedAllocator&) const { return true; }
};
using Bf16s = std::vector<bfloat16, AlignedAllocator<bfloat16>>;

inline Bf16s random_bf16(std::size_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, scale);
  Bf16s v(n);
  for (bfloat16& x : v) x = bfloat16(normal(rng));
  return v;
}

// Groups of the given row counts; A of padded rows (lda > K: lda is honoured) that the gathered
// rows pick in any order, some twice (source / divisor); W and the bias N(0, scale).
struct Operands {
  std::vector<Index> offsets;
  Index groups = 0, rows = 0, n = 0, k = 0, lda = 0, divisor = 2;
  Bf16s a, w, bias;
  std::vector<std::int32_t> source;

  // The problem over these arrays, writing out (and aux for bias_gelu); max_rows is rows + slack,
  // a loose bound as the backend's T * k.
  GroupedGemm<bfloat16> problem(Epilogue epilogue, bool gather, bfloat16* out, bfloat16* aux, Index slack) const {
    GroupedGemm<bfloat16> p;
    p.a = a.data(), p.lda = lda;
    p.gather = gather ? source.data() : nullptr, p.gather_divisor = std::int32_t(divisor);
    p.offsets = offsets.data(), p.groups = groups, p.max_rows = rows + slack;
    p.w = w.data(), p.w_stride = n * k;
    p.bias = epilogue == Epilogue::none ? nullptr : bias.data(), p.bias_stride = n;
    p.out = out, p.ldc = n;
    p.aux = epilogue == Epilogue::bias_gelu ? aux : nullptr, p.ldaux = n;
    p.n = n, p.k = k, p.epilogue = epilogue;
    return p;
  }
  // Group g's row r, column c before rounding and the activation, in double: its source row times
  // W_g's row c, plus the bias where the epilogue adds one.
  double exact(const GroupedGemm<bfloat16>& p, Index g, Index r, Index c) const {
    const Index src = p.gather ? source[std::size_t(r)] / divisor : r;
    double sum = p.bias ? double(float(bias[std::size_t(g * n + c)])) : 0.0;
    for (Index j = 0; j < k; ++j)
      sum += double(float(a[std::size_t(src * lda + j)])) * double(float(w[std::size_t((g * n + c) * k + j)]));
    return sum;
  }
};

inline Operands make_operands(const std::vector<Index>& group_rows, Index N, Index K, bool gather, Index lda_padding,
                              float w_scale, std::uint32_t seed) {
  std::mt19937 rng(seed);
  Operands o;
  o.offsets = {0};
  for (Index r : group_rows) o.offsets.push_back(o.offsets.back() + r);
  o.groups = Index(group_rows.size()), o.rows = o.offsets.back(), o.n = N, o.k = K, o.lda = K + lda_padding;
  const Index a_rows = gather ? o.rows / o.divisor + 7 : o.rows;
  o.a = random_bf16(std::size_t(std::max<Index>(a_rows, 1) * o.lda), 1.0f, rng);
  o.w = random_bf16(std::size_t(o.groups * N * K), w_scale, rng);
  o.bias = random_bf16(std::size_t(o.groups * N), 0.5f, rng);
  o.source.resize(std::size_t(o.rows));
  std::uniform_int_distribution<std::int32_t> pick(0, std::int32_t(a_rows * o.divisor - 1));
  for (std::int32_t& s : o.source) s = pick(rng);
  return o;
}

// A routing of T tokens, each to k distinct experts of `groups` at random with random weights, laid
// out as the backend's dispatch lays it: rows grouped by expert, each expert's in choice-major
// order (every first choice before any second). For the combine (GroupedGemm::combine).
struct Routing {
  Index tokens = 0, top_k = 0;
  std::vector<Index> group_rows;                         // rows per expert
  std::vector<std::int32_t> slot_of_row, row_of_slot;    // [T * k] each
  Bf16s weights;                                          // [T * k]

  moe::cuda::GroupedCombine<bfloat16> combine(bfloat16* y, Index ldy, std::uint32_t* arrivals) const {
    return {y, ldy, tokens, top_k, slot_of_row.data(), row_of_slot.data(), weights.data(), arrivals};
  }
  // y[t, c] from the rows out holds: the backend's combine (gather_sum), one fp32 sum per element.
  Bf16s expected_combine(const bfloat16* out, Index ldc, Index n) const {
    Bf16s y(std::size_t(tokens * n));
    for (Index t = 0; t < tokens; ++t)
      for (Index c = 0; c < n; ++c) {
        float sum = 0;
        for (Index j = 0; j < top_k; ++j) {
          const std::size_t slot = std::size_t(t * top_k + j);
          sum += float(weights[slot]) * float(out[Index(row_of_slot[slot]) * ldc + c]);
        }
        y[std::size_t(t * n + c)] = bfloat16(sum);
      }
    return y;
  }
};

inline Routing make_routing(Index T, Index k, Index groups, std::uint32_t seed) {
  std::mt19937 rng(seed);
  Routing rt;
  rt.tokens = T, rt.top_k = k;
  std::vector<std::int32_t> expert(std::size_t(T * k));
  std::vector<std::int32_t> order(static_cast<std::size_t>(groups));
  for (Index t = 0; t < T; ++t) {
    for (Index g = 0; g < groups; ++g) order[std::size_t(g)] = std::int32_t(g);
    std::shuffle(order.begin(), order.end(), rng);
    for (Index j = 0; j < k; ++j) expert[std::size_t(t * k + j)] = order[std::size_t(j)];
  }
  rt.group_rows.assign(std::size_t(groups), 0);
  for (std::int32_t e : expert) ++rt.group_rows[std::size_t(e)];
  std::vector<Index> next(std::size_t(groups), 0);
  for (Index g = 1; g < groups; ++g) next[std::size_t(g)] = next[std::size_t(g - 1)] + rt.group_rows[std::size_t(g - 1)];
  rt.slot_of_row.resize(std::size_t(T * k));
  rt.row_of_slot.resize(std::size_t(T * k));
  for (Index j = 0; j < k; ++j)
    for (Index t = 0; t < T; ++t) {
      const Index slot = t * k + j, row = next[std::size_t(expert[std::size_t(slot)])]++;
      rt.slot_of_row[std::size_t(row)] = std::int32_t(slot), rt.row_of_slot[std::size_t(slot)] = std::int32_t(row);
    }
  std::uniform_real_distribution<float> weight(0.0f, 1.0f);
  rt.weights.resize(std::size_t(T * k));
  for (bfloat16& w : rt.weights) w = bfloat16(weight(rng));
  return rt;
}

}  // namespace grouped_test
