// moe/cuda/hopper_grouped_gemm.cuh: moe/cuda/grouped_gemm.hpp's grouped product as a Hopper
// (sm_90a) kernel. Include only from code nvcc compiles.
//
// A block of 2 warpgroups (256 threads) computes one tile: kTileRows rows of one group (its
// rows gathered through `gather` as they load) by BN columns. Its K runs in stages of 64: every
// thread copies 16-byte chunks of A's rows and W_g's rows into the stage with cp.async (zero fill
// past the tile's rows), in the 128-byte swizzle (grouped_gemm_detail::swizzled_chunk); each
// warpgroup then multiplies its 64 rows by the stage's BN rows of W_g with 4 wgmma m64nBNk16
// products read straight from shared memory (no ldmatrix, no registers for the operands). A
// ring of `Stages` stages, filled Stages - 2 ahead: a stage is refilled two iterations after
// the products that read it were issued, once every warpgroup has waited for them
// (wgmma.wait_group 1, then the next iteration's barrier, right after which the refill starts). The epilogue adds the bias (and GELU),
// rounds once, and stores pairs of columns from the accumulator fragment (swiglu: silu(gate) * up
// from the two halves of the tile's columns, which the same thread holds). With a combine, each
// row then counts its arrival, and a token's last row sums its k rows into y (combine_rows).
//
// wgmma needs the arch-specific target: compile with -gencode=arch=compute_90a,code=sm_90a
// (CMAKE_CUDA_ARCHITECTURES 90a). Built for anything else, the kernel's body traps and
// grouped_gemm_available() says false, so callers take another path (a runtime call that fails
// while it asks throws CudaError instead).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moe/bfloat16.hpp"
#include "moe/config.hpp"
#include "moe/cuda/cuda_error.cuh"
#include "moe/cuda/grouped_gemm.hpp"
#include "moe/cuda/per_device.hpp"

namespace moe::cuda {
namespace hopper_detail {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOE_HOPPER_WGMMA 1

__device__ inline std::uint32_t shared_address(const void* p) { return std::uint32_t(__cvta_generic_to_shared(p)); }

// 16 bytes global -> shared, bypassing L1; `valid` false writes 16 zero bytes instead (src unread).
__device__ inline void copy_chunk(std::uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ inline void commit_copies() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int Pending>
__device__ inline void wait_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}
// cp.async writes through the generic proxy, wgmma reads through the async proxy: each thread
// fences its own copies before the barrier that publishes them.
__device__ inline void fence_copies_for_wgmma() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ inline void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ inline void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int Pending>
__device__ inline void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
}
// Keeps the compiler from moving reads or writes of an accumulator across the asynchronous
// products (the registers belong to wgmma between its issue and its wait).
template <int Count>
__device__ inline void fence_accumulators(float (&d)[Count]) {
  MOE_UNROLL
  for (int i = 0; i < Count; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d[0, 64) += A (64 x 16, descriptor a) B^T (16 x 128, descriptor b); scale_d = 0 overwrites d instead.
__device__ inline void wgmma_m64n128k16(float (&d)[64], std::uint64_t a, std::uint64_t b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(scale_d));
}

// d[0, 128) += A (64 x 16, descriptor a) B^T (16 x 256, descriptor b); scale_d = 0 overwrites d instead.
__device__ inline void wgmma_m64n256k16(float (&d)[128], std::uint64_t a, std::uint64_t b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,"
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(a), "l"(b), "r"(scale_d));
}

// Two neighbouring bf16 values of global memory, read from L2 (not L1: another block wrote them
// during this kernel).
__device__ inline void load_pair_from_l2(const bfloat16* at, bfloat16& v0, bfloat16& v1) {
  const unsigned int bits = __ldcg(reinterpret_cast<const unsigned int*>(at));
  v0.bits = std::uint16_t(bits & 0xffffu), v1.bits = std::uint16_t(bits >> 16);
}

// The combine after a tile's stores (grouped_gemm.hpp). A row's N values lie with the 4 lanes of a
// quad (the fragment's rows are t / 4 of a warp), 2 rows a lane. Each lane fences its stores;
// after the warp's barrier the quad's first lane counts the row's arrival (fence, barrier, atomic:
// the pattern of CUDA's threadFenceReduction sample, a warp for its block). The token's k-th
// arrival fences again and passes it on through a barrier of the quads that came last, then its
// quad reads the k rows from L2 (a row's BN / 8 pairs a lane in flight together) and writes y; its
// first lane puts the count back to zero (no other row of that token and block comes after it).
template <int BN>
__device__ inline void combine_rows(const GroupedGemm<bfloat16>& p, const grouped_gemm_detail::Tile& tile, int warpgroup,
                                    int thread, Index n0) {
  namespace gd = grouped_gemm_detail;
  const GroupedCombine<bfloat16>& m = p.combine;
  const int lane = thread % 32;
  __threadfence();  // this lane's stores of its rows, before their arrival is counted
  __syncwarp();
  MOE_UNROLL
  for (int half = 0; half < 2; ++half) {  // the lane's rows: values 4 q + 2 half + {0, 1}
    const Index row = tile.row_begin + warpgroup * gd::kWarpgroupRows + gd::fragment_row(thread, 2 * half);
    const bool valid = row < tile.row_end;  // the same for the 4 lanes of the quad
    const Index token = valid ? gd::token_of_row(m, row) : 0;
    std::uint32_t* const count = gd::arrival_counter(p, token, n0, BN);
    unsigned int last = 0;
    if (valid && lane % 4 == 0) last = atomicAdd(count, 1u) == unsigned(m.top_k - 1) ? 1u : 0u;
    last = __shfl_sync(0xffffffffu, last, lane & ~3);
    const unsigned int lasts = __ballot_sync(0xffffffffu, last);
    if (!last) continue;
    __threadfence();   // the count saw the other rows' arrivals: their stores are visible from here,
    __syncwarp(lasts);  // to the first lane's quad-mates too
    // Pair q of the lane: values 2 half + 4 q and the next, column fragment_col of the first.
    const auto column = [&](int q) { return n0 + gd::fragment_col(thread, 2 * half + 4 * q); };
    gd::combined_pairs<BN / 8>(
        m, token, [&](Index r, int q, bfloat16& v0, bfloat16& v1) { load_pair_from_l2(p.out + r * p.ldc + column(q), v0, v1); },
        [&](int q, bfloat16 y0, bfloat16 y1) {
          *reinterpret_cast<std::uint32_t*>(m.y + token * m.ldy + column(q)) = std::uint32_t(y0.bits) | (std::uint32_t(y1.bits) << 16);
        });
    if (lane % 4 == 0) *count = 0u;
  }
}

template <int BN>
__device__ inline void wgmma_step(float (&d)[BN / 2], std::uint64_t a, std::uint64_t b) {
  if constexpr (BN == 128)
    wgmma_m64n128k16(d, a, b, 1);
  else
    wgmma_m64n256k16(d, a, b, 1);
}
#endif  // sm_90a

template <int BN, int Stages>
inline constexpr std::size_t kSharedBytes = std::size_t(Stages) * grouped_gemm_detail::StageLayout<BN>::bytes + 1024;

template <int BN, int Stages, int MinBlocks>
__global__ void __launch_bounds__(grouped_gemm_detail::kThreads, MinBlocks) grouped_gemm_kernel(const GroupedGemm<bfloat16> p) {
#ifdef MOE_HOPPER_WGMMA
  namespace gd = grouped_gemm_detail;
  using Layout = gd::StageLayout<BN>;
  static_assert(BN == 128 || BN == 256, "grouped_gemm_kernel: BN is wgmma's N, 128 or 256");
  static_assert(Stages >= 3, "grouped_gemm_kernel: a stage is refilled two iterations after its products");
  constexpr int kAhead = Stages - 2;                             // stages in flight ahead of the products
  constexpr int kARows = int(gd::kTileRows) * 8 / gd::kThreads;  // A rows each thread copies: 4
  constexpr int kBRows = BN * 8 / gd::kThreads;                  // W_g rows each thread copies: 4 or 8
  extern __shared__ unsigned char shared_raw[];
  // The offsets, loaded at once into shared memory: the tile plan's walk over the groups then waits
  // for shared memory, not for one global load after another.
  __shared__ Index group_offsets[kMaxGroupedGemmGroups + 1];
  for (Index g = threadIdx.x; g <= p.groups; g += gd::kThreads) group_offsets[g] = p.offsets[g];
  __syncthreads();
  const gd::Tile tile = gd::tile_of(group_offsets, p.groups, Index(blockIdx.y));
  if (!tile.valid) return;  // past the groups' last tile (the grid is sized by a bound)
  const std::uint32_t base = (shared_address(shared_raw) + 1023u) & ~1023u;  // the swizzle's period
  const int t = int(threadIdx.x), warpgroup = t / 128, chunk = t % 8;
  const Index n0 = Index(blockIdx.x) * gd::tile_outputs(p, BN);  // the tile's first output column

  // Thread t copies chunk t % 8 of rows t / 8 + 32 j: its sources and places, the same every stage.
  const bfloat16* a_src[kARows];
  bool a_valid[kARows];
  std::uint32_t a_dst[kARows];
  MOE_UNROLL
  for (int j = 0; j < kARows; ++j) {
    const Index r = t / 8 + 32 * j, row = tile.row_begin + r;
    a_valid[j] = row < tile.row_end;
    a_src[j] = p.a + (a_valid[j] ? gd::source_row(p, row) * p.lda : 0) + chunk * 8;
    a_dst[j] = gd::swizzled_chunk(r, chunk);
  }
  const bfloat16* w = p.w + tile.group * p.w_stride;
  const bfloat16* b_src[kBRows];
  std::uint32_t b_dst[kBRows];
  MOE_UNROLL
  for (int j = 0; j < kBRows; ++j) {
    const Index r = t / 8 + 32 * j;
    b_src[j] = w + gd::weight_row(p, n0, BN, r) * p.k + chunk * 8;
    b_dst[j] = Layout::a_bytes + gd::swizzled_chunk(r, chunk);
  }
  const auto load_stage = [&](Index kt) {
    const std::uint32_t stage = base + std::uint32_t(kt % Stages) * Layout::bytes;
    const Index k0 = kt * gd::kStageK;
    MOE_UNROLL
    for (int j = 0; j < kARows; ++j) copy_chunk(stage + a_dst[j], a_src[j] + k0, a_valid[j]);
    MOE_UNROLL
    for (int j = 0; j < kBRows; ++j) copy_chunk(stage + b_dst[j], b_src[j] + k0, true);
  };

  const Index stages_k = p.k / gd::kStageK;
  MOE_UNROLL
  for (int s = 0; s < kAhead; ++s) {
    if (s < stages_k) load_stage(s);
    commit_copies();  // a group per stage, empty or not: the wait below counts groups
  }
  float d[BN / 2];
  MOE_UNROLL
  for (int i = 0; i < BN / 2; ++i) d[i] = 0.0f;
  for (Index kt = 0; kt < stages_k; ++kt) {
    wait_copies<kAhead - 1>();  // this thread's copies of stage kt have landed
    fence_copies_for_wgmma();
    __syncthreads();  // everyone's have; every warpgroup's products of stage kt - 2 are done
    // Stage kt + kAhead refills kt - 2's: every warpgroup waited for kt - 2's products in iteration
    // kt - 1 (wgmma.wait_group 1), before this barrier. Its copies start before this stage's
    // products are issued, while the tensor cores still run kt - 1's.
    if (kt + kAhead < stages_k) load_stage(kt + kAhead);
    commit_copies();
    const std::uint32_t stage = base + std::uint32_t(kt % Stages) * Layout::bytes;
    const std::uint32_t a = stage + std::uint32_t(warpgroup * gd::kWarpgroupRows * gd::kRowBytes), b = stage + Layout::a_bytes;
    fence_accumulators(d);
    wgmma_fence();  // after every register write of d, before the products that accumulate into it
    MOE_UNROLL
    for (int step = 0; step < int(gd::kStageK / gd::kStepK); ++step)
      wgmma_step<BN>(d, gd::operand_descriptor(a + 32u * step), gd::operand_descriptor(b + 32u * step));
    wgmma_commit();
    wgmma_wait<1>();  // the products of stage kt - 1 are done (kt + 1's refill of its stage relies on it)
    fence_accumulators(d);
  }
  wgmma_wait<0>();
  fence_accumulators(d);

  const bfloat16* bias = p.bias ? p.bias + tile.group * p.bias_stride : nullptr;
  const int thread = t % 128;
  if (p.swiglu) {
    MOE_UNROLL
    for (int i = 0; i < BN / 4; i += 2) {  // the gate values (columns < BN/2), each one's up BN/4 values on
      const Index row = tile.row_begin + warpgroup * gd::kWarpgroupRows + gd::fragment_row(thread, i);
      if (row >= tile.row_end) continue;
      const Index c = n0 + gd::fragment_col(thread, i);
      const bfloat16 y0 = gd::swiglu_output<bfloat16>(d[i], d[i + BN / 4]);
      const bfloat16 y1 = gd::swiglu_output<bfloat16>(d[i + 1], d[i + 1 + BN / 4]);
      *reinterpret_cast<std::uint32_t*>(p.out + row * p.ldc + c) = std::uint32_t(y0.bits) | (std::uint32_t(y1.bits) << 16);
    }
    return;
  }
  MOE_UNROLL
  for (int i = 0; i < BN / 2; i += 2) {  // values i and i + 1: one row, two neighbouring columns
    const Index row = tile.row_begin + warpgroup * gd::kWarpgroupRows + gd::fragment_row(thread, i);
    if (row >= tile.row_end) continue;
    const Index c = n0 + gd::fragment_col(thread, i);
    const gd::OutputValues<bfloat16> v0 = gd::output_values(p.epilogue, d[i], bias, c);
    const gd::OutputValues<bfloat16> v1 = gd::output_values(p.epilogue, d[i + 1], bias, c + 1);
    *reinterpret_cast<std::uint32_t*>(p.out + row * p.ldc + c) = std::uint32_t(v0.out.bits) | (std::uint32_t(v1.out.bits) << 16);
    if (p.aux)
      *reinterpret_cast<std::uint32_t*>(p.aux + row * p.ldaux + c) = std::uint32_t(v0.aux.bits) | (std::uint32_t(v1.aux.bits) << 16);
  }
  if (p.combine.y) combine_rows<BN>(p, tile, warpgroup, thread, n0);
#elif defined(__CUDA_ARCH__)
  // Device code built without sm_90a has no kernel here. grouped_gemm_available() keeps the host
  // from launching it, but a program whose translation units were built for different
  // architectures could still reach this copy: stop loudly rather than leave `out` unwritten.
  __trap();
#endif
}

template <int = 0>  // a template: defined in every translation unit that includes this header
__global__ void probe_wgmma_kernel(int* built_for_wgmma) {
#ifdef MOE_HOPPER_WGMMA
  *built_for_wgmma = 1;
#else
  *built_for_wgmma = 0;
#endif
}

// grouped_gemm_available() for `device`, which must be the current one (the probe launches there
// and its answer is kept under that id): the grouped launch, which has asked for it already.
inline bool available_on_current(int device) {
  static PerDevice<bool>& available = *new PerDevice<bool>;  // never destroyed
  return available.get(device, [device] {
    int major = 0, minor = 0;
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
    check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
    if (major != 9 || minor != 0) return false;
    int* flag = nullptr;
    check_cuda(cudaMalloc(&flag, sizeof(int)), "cudaMalloc (grouped GEMM probe)");
    const auto probe = [&] {
      // The flag starts at 0, so a launch that did not run cannot pass for one that did. The
      // launch's own status, not cudaGetLastError's: that would also take (and clear) an earlier
      // error of the caller's. A build without code for this device fails with "no kernel image",
      // an answer rather than an error; its status, which the runtime also keeps as its last
      // error, is cleared.
      check_cuda(cudaMemset(flag, 0, sizeof(int)), "cudaMemset (grouped GEMM probe)");
      void* args[] = {&flag};
      const cudaError_t launched = cudaLaunchKernel(reinterpret_cast<const void*>(&hopper_detail::probe_wgmma_kernel<>),
                                                    dim3(1), dim3(1), args, 0, nullptr);
      if (launched == cudaErrorNoKernelImageForDevice || launched == cudaErrorInvalidDeviceFunction) {
        cudaGetLastError();
        return false;
      }
      check_cuda(launched, "the grouped GEMM probe's launch");
      int host = 0;
      check_cuda(cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost), "cudaMemcpy (grouped GEMM probe)");
      return host == 1;
    };
    try {
      const bool answer = probe();
      cudaFree(flag);
      return answer;
    } catch (...) {
      cudaFree(flag);
      throw;
    }
  });
}
}  // namespace hopper_detail

// Whether this program's device code was built for sm_90a (and so holds the wgmma kernel) and
// the current device runs it. Asked once per device (a launch and a sync). A failing runtime call
// throws CudaError and is asked again next time (PerDevice keeps only answers).
inline bool grouped_gemm_available() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice (grouped GEMM probe)");
  return hopper_detail::available_on_current(device);
}

// The grouped product (moe/cuda/grouped_gemm.hpp) on `stream`: one launch, no sync (CudaDevice::
// grouped_gemm calls it with the device's stream). BN: columns per tile (wgmma's N: 128 or 256);
// Stages: the shared-memory ring; MinBlocks: blocks an SM should hold at once
// (__launch_bounds__). Throws where grouped_gemm_available() is false.
template <int BN = 128, int Stages = 4, int MinBlocks = 1>
void grouped_gemm(cudaStream_t stream, const GroupedGemm<bfloat16>& p) {
  check_grouped_gemm(p, BN);
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice (grouped GEMM)");
  check(hopper_detail::available_on_current(device),
        "grouped_gemm: needs an sm_90 GPU and device code built for sm_90a (CMAKE_CUDA_ARCHITECTURES 90a)");
  if (p.max_rows == 0) return;
  constexpr std::size_t bytes = hopper_detail::kSharedBytes<BN, Stages>;
  const auto kernel = hopper_detail::grouped_gemm_kernel<BN, Stages, MinBlocks>;
  // The attribute is the device's (checked above: it can run the kernel). Set once per device; a
  // failure throws and is tried again next time.
  static PerDevice<bool>& sized = *new PerDevice<bool>;  // never destroyed
  sized.get(device, [kernel] {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
               "cudaFuncSetAttribute (the grouped GEMM's shared memory)");
    return true;
  });
  const Index tiles = grouped_gemm_detail::tiles_bound(p.max_rows, p.groups);  // < 65536: check_grouped_gemm
  const Index column_tiles = p.n / grouped_gemm_detail::tile_outputs(p, BN);
  kernel<<<dim3(unsigned(column_tiles), unsigned(tiles)), grouped_gemm_detail::kThreads, bytes, stream>>>(p);
  check_cuda(cudaGetLastError(), "the grouped GEMM's launch");
}

}  // namespace moe::cuda
