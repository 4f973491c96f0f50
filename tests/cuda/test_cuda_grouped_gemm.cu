// The Hopper grouped GEMM (moe/cuda/hopper_grouped_gemm.cuh) on the GPU, against a double
// product on the host and against the kernel's host emulation (moe/cuda/grouped_gemm.hpp, whose
// index arithmetic tests/test_grouped_gemm.cpp checks without a GPU). Part of moe_cuda_tests.
//
// The kernel exists only in device code built for sm_90a. Where this binary was (CMake defines
// MOE_TEST_SM90A), an H100/H200 must run it; built for plain sm_90, the cases say so and skip.
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda/grouped_gemm_operands.hpp"
#include "moe/cuda.cuh"
#include "moe/cuda/hopper_grouped_gemm.cuh"

namespace {

using moe::bfloat16;
using moe::Index;
using moe::cuda::Epilogue;
using moe::cuda::GroupedGemm;

bool skip_without_wgmma() {
  if (!moe::cuda::no_device_reason().empty()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return true;
  }
#ifdef MOE_TEST_SM90A
  REQUIRE_MESSAGE(moe::cuda::grouped_gemm_available(), "built for sm_90a, but the device does not run the wgmma kernel");
  return false;
#else
  if (!moe::cuda::grouped_gemm_available()) {
    MESSAGE("skipped: this binary's device code was not built for sm_90a (CMAKE_CUDA_ARCHITECTURES 90a)");
    return true;
  }
  return false;
#endif
}

template <class Host>
auto* device_copy(const Host& host) {
  using T = typename Host::value_type;
  T* p = nullptr;
  REQUIRE(cudaMalloc(&p, host.size() * sizeof(T) + 16) == cudaSuccess);
  REQUIRE(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  return p;
}
template <class T>
std::vector<T> host_copy(const T* p, std::size_t n) {
  std::vector<T> host(n);
  REQUIRE(cudaMemcpy(host.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
  return host;
}

// One shape through the kernel with BN columns a tile, twice (the same bits both times), against
// a double product (bf16's rounding of the stored value) and the host emulation (a few bf16 steps:
// the tensor cores add in their own order).
template <int BN, int Stages, int MinBlocks>
void check_kernel(Epilogue epilogue, bool gather, const std::vector<Index>& group_rows, Index N, Index K,
                  std::uint32_t seed) {
  const grouped_test::Operands o = grouped_test::make_operands(group_rows, N, K, gather, 64, 0.03f, seed);
  const Index rows = o.rows;
  const bfloat16 poison = bfloat16(12345.0f);
  const grouped_test::Bf16s poisoned(std::size_t(rows * N + 64), poison);
  grouped_test::Bf16s out_e = poisoned, aux_e = poisoned;
  const GroupedGemm<bfloat16> host = o.problem(epilogue, gather, out_e.data(), aux_e.data(), 100);
  moe::cuda::grouped_gemm_emulated<BN>(host);

  // The same problem over device copies of the operands.
  bfloat16 *d_a = device_copy(o.a), *d_w = device_copy(o.w), *d_bias = device_copy(o.bias);
  bfloat16 *d_out = device_copy(poisoned), *d_aux = device_copy(poisoned);
  std::int32_t* d_source = device_copy(o.source.empty() ? std::vector<std::int32_t>{0} : o.source);
  Index* d_offsets = device_copy(o.offsets);
  GroupedGemm<bfloat16> dev = host;
  dev.a = d_a, dev.gather = gather ? d_source : nullptr, dev.offsets = d_offsets, dev.w = d_w;
  dev.bias = host.bias ? d_bias : nullptr, dev.out = d_out, dev.aux = host.aux ? d_aux : nullptr;
  const moe::cuda::CudaDevice device(nullptr);
  moe::cuda::grouped_gemm<BN, Stages, MinBlocks>(device.stream(), dev);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const std::vector<bfloat16> out = host_copy(d_out, poisoned.size()), aux = host_copy(d_aux, poisoned.size());
  moe::cuda::grouped_gemm<BN, Stages, MinBlocks>(device.stream(), dev);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const std::vector<bfloat16> again = host_copy(d_out, poisoned.size());

  Index differ = 0, far_from_exact = 0, far_from_emulation = 0;
  for (Index g = 0; g < o.groups; ++g)
    for (Index r = o.offsets[std::size_t(g)]; r < o.offsets[std::size_t(g) + 1]; ++r) {
      for (Index c = 0; c < N; ++c) {
        const double exact = o.exact(host, g, r, c);
        const std::size_t i = std::size_t(r * N + c);
        const double pre = epilogue == Epilogue::bias_gelu ? double(float(aux[i])) : double(float(out[i]));
        far_from_exact += std::abs(pre - exact) > 1e-2 * (std::abs(exact) + 1e-2);
        const double emulated = double(float(out_e[i])), got = double(float(out[i]));
        far_from_emulation += std::abs(got - emulated) > 2e-2 * (std::abs(emulated) + 1e-2);
        differ += again[i].bits != out[i].bits;
      }
    }
  CHECK(far_from_exact == 0);
  CHECK(far_from_emulation == 0);
  CHECK(differ == 0);  // run to run
  for (std::size_t i = std::size_t(rows * N); i < poisoned.size(); ++i) {
    CHECK(out[i].bits == poison.bits);  // nothing written past the last row
    CHECK(aux[i].bits == poison.bits);
  }
  for (void* p : {static_cast<void*>(d_a), static_cast<void*>(d_w), static_cast<void*>(d_bias), static_cast<void*>(d_out),
                  static_cast<void*>(d_aux), static_cast<void*>(d_source), static_cast<void*>(d_offsets)})
    cudaFree(p);
}

// Probes for a kernel that reads the wrong elements: exact small integers (bf16 holds 0-256
// exactly) so each output says which element it read. One group of 128 rows, K = 64 (one stage),
// N = 128, no epilogue:
//   rows:    A[r][0] = r, W[n][0] = 1, the rest 0       -> out[r][n] = r  (which A row)
//   columns: A[r][0] = 1, W[n][0] = n                   -> out[r][n] = n  (which W row)
//   k:       A[r][k] = 1 iff k = r % 64, W[n][k] = k    -> out[r][n] = r % 64  (which k)
// The first mismatches of each probe are printed with what was read, to tell a descriptor or
// swizzle fault (k) from a fragment fault (rows, columns) on the first GPU run.
struct Probe {
  const char* name;
  float (*a)(Index r, Index k);
  float (*w)(Index n, Index k);
  float (*expected)(Index r, Index n);
};

void run_probe(const Probe& probe) {
  constexpr Index R = 128, N = 128, K = 64;
  std::vector<bfloat16> a(std::size_t(R * K)), w(std::size_t(N * K));
  for (Index r = 0; r < R; ++r)
    for (Index k = 0; k < K; ++k) a[std::size_t(r * K + k)] = bfloat16(probe.a(r, k));
  for (Index n = 0; n < N; ++n)
    for (Index k = 0; k < K; ++k) w[std::size_t(n * K + k)] = bfloat16(probe.w(n, k));
  const std::vector<Index> offsets{0, R};
  bfloat16 *d_a = device_copy(a), *d_w = device_copy(w), *d_out = device_copy(std::vector<bfloat16>(std::size_t(R * N)));
  Index* d_offsets = device_copy(offsets);
  GroupedGemm<bfloat16> p;
  p.a = d_a, p.lda = K, p.offsets = d_offsets, p.groups = 1, p.max_rows = R, p.w = d_w, p.w_stride = N * K;
  p.out = d_out, p.ldc = N, p.n = N, p.k = K;
  moe::cuda::grouped_gemm<128, 4, 1>(nullptr, p);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const std::vector<bfloat16> out = host_copy(d_out, std::size_t(R * N));
  Index wrong = 0;
  for (Index r = 0; r < R; ++r)
    for (Index n = 0; n < N; ++n) {
      const float got = float(out[std::size_t(r * N + n)]), expected = probe.expected(r, n);
      if (got == expected) continue;
      if (wrong++ < 8) MESSAGE(probe.name << " probe: out[" << r << "][" << n << "] = " << got << ", expected " << expected);
    }
  CHECK_MESSAGE(wrong == 0, probe.name << " probe: " << wrong << " of " << R * N << " outputs read the wrong element");
  for (void* q : {static_cast<void*>(d_a), static_cast<void*>(d_w), static_cast<void*>(d_out), static_cast<void*>(d_offsets)})
    cudaFree(q);
}

// The combine riding on the kernel (GroupedGemm::combine): T tokens routed to k of `groups` experts.
// y against the combine of the rows the kernel wrote (the backend's gather_sum arithmetic on the
// host: within a bf16 step, as the GPU may fuse its multiply-adds), every arrival count back at
// zero, the same bits on a second launch, and the rows within bf16's rounding of the emulation.
template <int BN>
void check_kernel_combine(Index T, Index k, Index groups, Index N, Index K, std::uint32_t seed) {
  const grouped_test::Routing rt = grouped_test::make_routing(T, k, groups, seed);
  const grouped_test::Operands o = grouped_test::make_operands(rt.group_rows, N, K, false, 0, 0.03f, seed + 1);
  const bfloat16 poison = bfloat16(12345.0f);
  const grouped_test::Bf16s poisoned_rows(std::size_t(o.rows * N + 64), poison), poisoned_y(std::size_t(T * N + 64), poison);
  grouped_test::Bf16s out_e = poisoned_rows;
  moe::cuda::grouped_gemm_emulated<BN>(o.problem(Epilogue::bias, false, out_e.data(), nullptr, 0));

  bfloat16 *d_a = device_copy(o.a), *d_w = device_copy(o.w), *d_bias = device_copy(o.bias);
  bfloat16 *d_out = device_copy(poisoned_rows), *d_y = device_copy(poisoned_y), *d_weights = device_copy(rt.weights);
  std::int32_t *d_slot_of_row = device_copy(rt.slot_of_row), *d_row_of_slot = device_copy(rt.row_of_slot);
  std::uint32_t* d_arrivals = device_copy(std::vector<std::uint32_t>(std::size_t(T * (N / moe::cuda::kGroupedGemmColumns)), 0));
  Index* d_offsets = device_copy(o.offsets);
  GroupedGemm<bfloat16> dev = o.problem(Epilogue::bias, false, d_out, nullptr, 0);
  dev.a = d_a, dev.offsets = d_offsets, dev.w = d_w, dev.bias = d_bias;
  dev.combine = {d_y, N, T, k, d_slot_of_row, d_row_of_slot, d_weights, d_arrivals};
  const moe::cuda::CudaDevice device(nullptr);
  moe::cuda::grouped_gemm<BN, 4, 1>(device.stream(), dev);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const std::vector<bfloat16> out = host_copy(d_out, poisoned_rows.size()), y = host_copy(d_y, poisoned_y.size());
  const std::vector<std::uint32_t> arrivals = host_copy(d_arrivals, std::size_t(T * (N / moe::cuda::kGroupedGemmColumns)));
  moe::cuda::grouped_gemm<BN, 4, 1>(device.stream(), dev);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const std::vector<bfloat16> y_again = host_copy(d_y, poisoned_y.size());

  Index far_rows = 0, far_y = 0, differ = 0;
  for (Index i = 0; i < o.rows * N; ++i) {
    const double got = double(float(out[std::size_t(i)])), emulated = double(float(out_e[std::size_t(i)]));
    far_rows += std::abs(got - emulated) > 2e-2 * (std::abs(emulated) + 1e-2);
  }
  const grouped_test::Bf16s expected = rt.expected_combine(out.data(), N, N);
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const double got = double(float(y[i])), want = double(float(expected[i]));
    far_y += std::abs(got - want) > 8e-3 * (std::abs(want) + 1e-2);
    differ += y_again[i].bits != y[i].bits;
  }
  CHECK(far_rows == 0);
  CHECK_MESSAGE(far_y == 0, far_y << " of " << expected.size() << " combined values differ from the rows' combine");
  CHECK(differ == 0);  // run to run, whichever row of a token came last
  CHECK(std::all_of(arrivals.begin(), arrivals.end(), [](std::uint32_t a) { return a == 0; }));
  for (std::size_t i = std::size_t(T * N); i < poisoned_y.size(); ++i) CHECK(y[i].bits == poison.bits);
  for (void* p : {static_cast<void*>(d_a), static_cast<void*>(d_w), static_cast<void*>(d_bias), static_cast<void*>(d_out),
                  static_cast<void*>(d_y), static_cast<void*>(d_weights), static_cast<void*>(d_slot_of_row),
                  static_cast<void*>(d_row_of_slot), static_cast<void*>(d_arrivals), static_cast<void*>(d_offsets)})
    cudaFree(p);
}

// SwiGLU in the tiles (GroupedGemm::swiglu): the kernel against its emulation (bf16 steps apart:
// the tensor cores add in their own order), twice with the same bits, nothing past the last row.
template <int BN>
void check_kernel_swiglu(bool gather, const std::vector<Index>& group_rows, Index F, Index K, std::uint32_t seed) {
  const grouped_test::Operands o = grouped_test::make_operands(group_rows, 2 * F, K, gather, 64, 0.03f, seed);
  const bfloat16 poison = bfloat16(12345.0f);
  const grouped_test::Bf16s poisoned(std::size_t(o.rows * F + 64), poison);
  grouped_test::Bf16s act_e = poisoned;
  GroupedGemm<bfloat16> host = o.problem(Epilogue::none, gather, act_e.data(), nullptr, 100);
  host.n = F, host.ldc = F, host.swiglu = true;
  moe::cuda::grouped_gemm_emulated<BN>(host);

  bfloat16 *d_a = device_copy(o.a), *d_w = device_copy(o.w), *d_act = device_copy(poisoned);
  std::int32_t* d_source = device_copy(o.source.empty() ? std::vector<std::int32_t>{0} : o.source);
  Index* d_offsets = device_copy(o.offsets);
  GroupedGemm<bfloat16> dev = host;
  dev.a = d_a, dev.gather = gather ? d_source : nullptr, dev.offsets = d_offsets, dev.w = d_w, dev.out = d_act;
  const moe::cuda::CudaDevice device(nullptr);
  moe::cuda::grouped_gemm<BN, 4, 1>(device.stream(), dev);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const std::vector<bfloat16> act = host_copy(d_act, poisoned.size());
  moe::cuda::grouped_gemm<BN, 4, 1>(device.stream(), dev);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const std::vector<bfloat16> again = host_copy(d_act, poisoned.size());
  Index far = 0, differ = 0;
  for (std::size_t i = 0; i < std::size_t(o.rows * F); ++i) {
    const double got = double(float(act[i])), emulated = double(float(act_e[i]));
    far += std::abs(got - emulated) > 3e-2 * (std::abs(emulated) + 1e-2);
    differ += again[i].bits != act[i].bits;
  }
  CHECK_MESSAGE(far == 0, far << " of " << o.rows * F << " SwiGLU outputs far from the emulation");
  CHECK(differ == 0);
  for (std::size_t i = std::size_t(o.rows * F); i < poisoned.size(); ++i) CHECK(act[i].bits == poison.bits);
  for (void* p : {static_cast<void*>(d_a), static_cast<void*>(d_w), static_cast<void*>(d_act), static_cast<void*>(d_source),
                  static_cast<void*>(d_offsets)})
    cudaFree(p);
}

}  // namespace

TEST_CASE("hopper grouped gemm, GPU: SwiGLU in the tiles (gate and up halves), 128 and 256 columns a tile") {
  if (skip_without_wgmma()) return;
  check_kernel_swiglu<128>(true, {300, 0, 1, 129, 517}, 448, 256, 51);
  check_kernel_swiglu<256>(false, {200, 70}, 256, 128, 52);
}

TEST_CASE("hopper grouped gemm, GPU: the combine rides on the product (top-2 of 8 and top-1; 128 and 256 columns a tile)") {
  if (skip_without_wgmma()) return;
  check_kernel_combine<128>(1000, 2, 8, 768, 512, 31);
  check_kernel_combine<256>(513, 1, 5, 512, 256, 32);
  check_kernel_combine<128>(70, 4, 4, 256, 128, 33);
}

TEST_CASE("hopper grouped gemm, GPU: gathered rows through uneven experts, bias + GELU, 128 columns a tile") {
  if (skip_without_wgmma()) return;
  check_kernel<128, 4, 1>(Epilogue::bias_gelu, true, {300, 0, 1, 129, 64, 517, 2, 250}, 512, 768, 1);
}

TEST_CASE("hopper grouped gemm, GPU: 256 columns a tile, bias; two blocks an SM with three stages; no epilogue") {
  if (skip_without_wgmma()) return;
  check_kernel<256, 4, 1>(Epilogue::bias, true, {700, 33, 0, 128}, 512, 256, 2);
  check_kernel<128, 3, 2>(Epilogue::none, false, {129, 1000}, 256, 192, 3);
}

TEST_CASE("hopper grouped gemm, GPU: no rows, one stage of K") {
  if (skip_without_wgmma()) return;
  check_kernel<128, 4, 1>(Epilogue::bias, true, {0, 0, 0}, 128, 64, 4);
  check_kernel<128, 4, 1>(Epilogue::bias_gelu, false, {5}, 128, 64, 5);
}

TEST_CASE("hopper grouped gemm, GPU: integer probes say which row, column and k each output read") {
  if (skip_without_wgmma()) return;
  run_probe({"rows", [](Index r, Index k) { return k == 0 ? float(r) : 0.0f; }, [](Index, Index k) { return k == 0 ? 1.0f : 0.0f; },
             [](Index r, Index) { return float(r); }});
  run_probe({"columns", [](Index, Index k) { return k == 0 ? 1.0f : 0.0f; }, [](Index n, Index k) { return k == 0 ? float(n) : 0.0f; },
             [](Index, Index n) { return float(n); }});
  run_probe({"k", [](Index r, Index k) { return k == r % 64 ? 1.0f : 0.0f; }, [](Index, Index k) { return float(k); },
             [](Index r, Index) { return float(r % 64); }});
}
