// moe/cuda/index_kernels.cuh: the kernels that run a CudaDevice's index bodies (moe/cuda/device.hpp:
// for_each, for_each_2d, for_each_row, for_each_warp) and what they hand a body: a warp as a row
// (WarpRow: folds and scans by shuffles) or as a tile unit (WarpTiles: shared-memory staging,
// ldmatrix and mma.sync fragments). Include only from code compiled by nvcc (C++20, --extended-lambda).
#pragma once

#include <cuda_bf16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "moe/bfloat16.hpp"
#include "moe/config.hpp"
#include "moe/cuda/device.hpp"

namespace moe::cuda {

// One thread per index, grid-stride so any n fits any grid.
template <class Body>
__global__ void for_each_kernel(Index n, Body body) {
  const Index stride = Index(gridDim.x) * blockDim.x;
  for (Index i = Index(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) body(i);
}

// body(r, c) over a [rows, cols] grid: threadIdx.x runs along a row (coalesced), blocks stride
// over both dimensions, so any shape fits any grid and no thread divides an index.
template <class Body>
__global__ void for_each_2d_kernel(Index rows, Index cols, Body body) {
  const Index row_stride = Index(gridDim.y) * blockDim.y, col_stride = Index(gridDim.x) * blockDim.x;
  for (Index r = Index(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += row_stride)
    for (Index c = Index(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += col_stride) body(r, c);
}

// A row of CudaDevice::for_each_row: the calling warp (device.hpp's order: lane-strided
// folds, then a shuffle butterfly). Callable from host-device code; only device code runs it.
struct WarpRow {
  unsigned lane = 0;

  template <class F>
  __host__ __device__ auto sum(Index n, F f) const {
    using T = decltype(f(Index{}));
    T acc = 0;
#if defined(__CUDA_ARCH__)
    for (Index c = lane; c < n; c += kRowLanes) acc += f(c);
    for (int offset = kRowLanes / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
#else
    (void)n, (void)f;  // the host pass compiles this body, never runs it
#endif
    return acc;
  }
  template <class F>
  __host__ __device__ auto max(Index n, F f) const {
    using T = decltype(f(Index{}));
    T acc = -T(INFINITY);
#if defined(__CUDA_ARCH__)
    for (Index c = lane; c < n; c += kRowLanes) {
      const T v = f(c);
      acc = v > acc ? v : acc;
    }
    for (int offset = kRowLanes / 2; offset > 0; offset /= 2) {
      const T other = __shfl_xor_sync(0xffffffffu, acc, offset);
      acc = other > acc ? other : acc;
    }
#endif
    return acc;
  }
  template <class T, class Fold, class Combine>
  __host__ __device__ T reduce(Index n, T identity, Fold fold, Combine combine) const {
    T acc = identity;
#if defined(__CUDA_ARCH__)
    for (Index c = lane; c < n; c += kRowLanes) acc = fold(acc, c);
    for (int offset = kRowLanes / 2; offset > 0; offset /= 2) acc = combine(acc, shuffle_xor(acc, offset));
#else
    (void)n, (void)fold, (void)combine;  // the host pass compiles this body, never runs it
#endif
    return acc;
  }
  template <class F>
  __host__ __device__ void for_each(Index n, F f) const {
    for (Index c = lane; c < n; c += kRowLanes) f(c);
  }
  template <class Acc, class Load, class Store>
    requires std::integral<Acc>
  __host__ __device__ Acc exclusive_scan(Index n, Load load, Store store) const {
    Acc total = 0;
#if defined(__CUDA_ARCH__)
    const RowRun run = row_run(n, int(lane));
    Acc own = 0;
    fetch_in_batches<8>(run.begin, run.end, load, [&](auto v) { own += Acc(v); });
    Acc inclusive = own;  // the lanes' sums scanned: Hillis-Steele over the warp
    for (int offset = 1; offset < kRowLanes; offset *= 2) {
      const Acc other = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (int(lane) >= offset) inclusive += other;
    }
    total = __shfl_sync(0xffffffffu, inclusive, kRowLanes - 1);
    Acc before = inclusive - own;
    Index c = run.begin;
    fetch_in_batches<8>(run.begin, run.end, load, [&](auto v) {  // a batch's loads come before its stores
      store(c++, before);
      before += Acc(v);
    });
#else
    (void)n, (void)load, (void)store;
#endif
    return total;
  }
  __host__ __device__ bool first() const { return lane == 0; }

 private:
  // Lane (lane ^ offset)'s value of a trivially copyable T, word by word.
  template <class T>
  __device__ static T shuffle_xor(const T& value, int offset) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) % sizeof(unsigned) == 0,
                  "WarpRow::reduce: the value must be whole 32-bit words");
    unsigned words[sizeof(T) / sizeof(unsigned)];
    std::memcpy(words, &value, sizeof(T));
    for (unsigned& w : words) w = __shfl_xor_sync(0xffffffffu, w, offset);
    T out;
    std::memcpy(&out, words, sizeof(T));
    return out;
  }
};

// One warp per row, grid-stride over the rows. Every lane of a warp takes the same rows, so the
// shuffles always run with the full warp.
template <class Body>
__global__ void for_each_row_kernel(Index rows, Body body) {
  const unsigned lane = threadIdx.x % kRowLanes;
  const Index warps = Index(gridDim.x) * (blockDim.x / kRowLanes);
  for (Index r = (Index(blockIdx.x) * blockDim.x + threadIdx.x) / kRowLanes; r < rows; r += warps)
    body(r, WarpRow{lane});
}

// A warp of CudaDevice::for_each_warp (device.hpp): its lanes and its part of the block's shared memory, tiles as
// register fragments of mma.sync.m16n8k16 (bf16 in, float accumulators), loaded from the staging by ldmatrix. The
// layouts are the PTX ISA's ("Matrix Fragments for mma.m16n8k16"), so the element-wise calls know where each element
// is. With g = lane / 4 and t = lane % 4:
//   Acc: x[e] is element (g + 8 * ((e / 2) % 2), 2 * t + e % 2 + 8 * (e / 4)), two m16n8 accumulators side by side;
//   ARows: x[0..3] hold A(g, 2t..2t+1), A(g + 8, 2t..), A(g, 2t + 8..), A(g + 8, 2t + 8..) as bf16 pairs;
//   BRows / BCols: x[0], x[1] the B fragment of columns 0-7 (B(2t..2t+1, g), B(2t + 8.., g)), x[2], x[3] of 8-15;
//   Rows: x[0] row g's value, x[1] row g + 8's (the 4 lanes of a quad hold the same rows).
// Callable from host-device code; only device code runs it.
struct WarpTiles {
  unsigned lane = 0;
  unsigned char* memory = nullptr;

  struct Acc {
    float x[8];
  };
  struct ARows {
    unsigned x[4];
  };
  struct BRows {
    unsigned x[4];
  };
  struct BCols {
    unsigned x[4];
  };
  struct Rows {
    float x[2];
  };

  __host__ __device__ unsigned char* staging() const { return memory; }
  __host__ __device__ void sync() const {
#if defined(__CUDA_ARCH__)
    __syncwarp();
#endif
  }
  template <class F>
  __host__ __device__ void lanes(Index n, F f) const {
    for (Index i = lane; i < n; i += kRowLanes) f(i);
#if defined(__CUDA_ARCH__)
    __syncwarp();
#endif
  }
  template <class E, class RowOf>
  __host__ __device__ void copy_rows(E* dst, Index ld, Index rows, Index valid, Index cols, RowOf row_of) const {
#if defined(__CUDA_ARCH__)
    __syncwarp();  // every lane is past its reads of what the copies may overwrite (a double buffer's other half)
    constexpr Index kPer = Index(16 / sizeof(E));
    const Index packs = cols / kPer;
    for (Index i = lane; i < rows * packs; i += kRowLanes) {
      const Index r = i / packs, c = (i % packs) * kPer;
      E* to = dst + r * ld + c;
      if (r < valid)
        __pipeline_memcpy_async(to, row_of(r) + c, 16);
      else
        *reinterpret_cast<uint4*>(to) = make_uint4(0u, 0u, 0u, 0u);
    }
#else
    (void)dst, (void)ld, (void)rows, (void)valid, (void)cols, (void)row_of;
#endif
  }
  __host__ __device__ void commit_copies() const {
#if defined(__CUDA_ARCH__)
    __pipeline_commit();
#endif
  }
  __host__ __device__ void wait_copies(int pending) const {
#if defined(__CUDA_ARCH__)
    if (pending == 0)
      __pipeline_wait_prior(0);
    else
      __pipeline_wait_prior(1);
    __syncwarp();
#else
    (void)pending;
#endif
  }

  // Where this lane's element e of an accumulator sits.
  __host__ __device__ Index row_of(int e) const { return Index(lane / 4 + 8 * ((e / 2) % 2)); }
  __host__ __device__ Index col_of(int e) const { return Index(2 * (lane % 4) + e % 2 + 8 * (e / 4)); }

  __host__ __device__ void fill(Acc& acc, float value) const {
    for (float& x : acc.x) x = value;
  }
  __host__ __device__ void load_acc(Acc& acc, const float* p, Index ld) const {
    for (int e = 0; e < 8; e += 2) {
      const float2 v = *reinterpret_cast<const float2*>(p + row_of(e) * ld + col_of(e));
      acc.x[e] = v.x, acc.x[e + 1] = v.y;
    }
  }
  __host__ __device__ void store_acc(float* p, Index ld, const Acc& acc) const {
    for (int e = 0; e < 8; e += 2)
      *reinterpret_cast<float2*>(p + row_of(e) * ld + col_of(e)) = make_float2(acc.x[e], acc.x[e + 1]);
#if defined(__CUDA_ARCH__)
    __syncwarp();
#endif
  }
  // ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8 x 8 matrix i, which lands in x[i].
  __host__ __device__ void load_a(ARows& a, const bfloat16* p, Index ld) const {
    const unsigned i = lane / 8, r = lane % 8;  // matrices: rows 0-7 | 8-15, then columns 8-15
    load_matrices<false>(a.x, p + (Index(i % 2) * 8 + r) * ld + Index(i / 2) * 8);
  }
  __host__ __device__ void load_b(BRows& b, const bfloat16* p, Index ld) const {
    const unsigned i = lane / 8, r = lane % 8;  // B(k, c) = p[k * ld + c]: k rows 0-7 | 8-15, then columns 8-15
    load_matrices<true>(b.x, p + (Index(i % 2) * 8 + r) * ld + Index(i / 2) * 8);
  }
  __host__ __device__ void load_bt(BCols& b, const bfloat16* p, Index ld) const {
    const unsigned i = lane / 8, r = lane % 8;  // B(k, c) = p[c * ld + k]: column rows 0-7 (k 0-7 | 8-15), then 8-15
    load_matrices<false>(b.x, p + (Index(i / 2) * 8 + r) * ld + Index(i % 2) * 8);
  }
  template <class B>
  __host__ __device__ void mma(Acc& acc, const ARows& a, const B& b) const {
    mma_m16n8k16(acc.x, a.x, b.x[0], b.x[1]);
    mma_m16n8k16(acc.x + 4, a.x, b.x[2], b.x[3]);
  }

  template <class F>
  __host__ __device__ void map(Acc& acc, F f) const {
    for (int e = 0; e < 8; ++e) acc.x[e] = f(row_of(e), col_of(e), acc.x[e]);
  }
  template <class F>
  __host__ __device__ void map_rows(Acc& acc, const Rows& rows, F f) const {
    for (int e = 0; e < 8; ++e) acc.x[e] = f(row_of(e), col_of(e), acc.x[e], rows.x[(e / 2) % 2]);
  }
  template <class F>
  __host__ __device__ void zip(Acc& acc, const Acc& other, F f) const {
    for (int e = 0; e < 8; ++e) acc.x[e] = f(row_of(e), col_of(e), acc.x[e], other.x[e]);
  }
  // A lane's 4 elements of each of its rows, then the quad's 4 lanes by butterfly: with op commutative, every lane
  // of the quad ends with the same bits.
  template <class Op>
  __host__ __device__ void fold_rows(Rows& rows, const Acc& acc, Op op) const {
    for (int h = 0; h < 2; ++h) {
      float x = op(op(acc.x[2 * h], acc.x[2 * h + 1]), op(acc.x[4 + 2 * h], acc.x[5 + 2 * h]));
#if defined(__CUDA_ARCH__)
      x = op(x, __shfl_xor_sync(0xffffffffu, x, 1));
      x = op(x, __shfl_xor_sync(0xffffffffu, x, 2));
#endif
      rows.x[h] = op(rows.x[h], x);
    }
  }
  template <class F, class... R>
  __host__ __device__ void for_rows(F f, R&... rows) const {
    for (int h = 0; h < 2; ++h) f(Index(lane / 4 + 8 * h), rows.x[h]...);
  }
  template <class F, class... R>
  __host__ __device__ void each_row(F f, const R&... rows) const {
    if (lane % 4 == 0)
      for (int h = 0; h < 2; ++h) f(Index(lane / 4 + 8 * h), rows.x[h]...);
#if defined(__CUDA_ARCH__)
    __syncwarp();
#endif
  }
  __host__ __device__ void to_a(ARows& a, const Acc& acc) const {
    for (int i = 0; i < 4; ++i) a.x[i] = bf16_pair(acc.x[2 * i], acc.x[2 * i + 1]);
  }

 private:
  template <bool Transposed>
  __host__ __device__ static void load_matrices(unsigned (&x)[4], const bfloat16* row) {
#if defined(__CUDA_ARCH__)
    const unsigned at = unsigned(__cvta_generic_to_shared(row));
    if constexpr (Transposed)
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                   : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
                   : "r"(at)
                   : "memory");
    else
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                   : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
                   : "r"(at)
                   : "memory");
#else
    (void)row;
    x[0] = x[1] = x[2] = x[3] = 0u;
#endif
  }
  __host__ __device__ static void mma_m16n8k16(float* d, const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    (void)d, (void)a, (void)b0, (void)b1;
#endif
  }
  // The low half is the first (lower-column) element, as the fragments order them.
  __host__ __device__ static unsigned bf16_pair(float lo, float hi) {
#if defined(__CUDA_ARCH__)
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&pair);
#else
    (void)lo, (void)hi;
    return 0u;
#endif
  }
};
static_assert(sizeof(bfloat16) == sizeof(__nv_bfloat16), "moe::bfloat16 must be stored as __nv_bfloat16 is");

// Warps of a block each take their own `staging_bytes` of the block's shared memory, grid-stride over w.
template <class Body>
__global__ void for_each_warp_kernel(Index count, unsigned staging_bytes, Body body) {
  extern __shared__ __align__(128) unsigned char warp_staging[];
  const unsigned lane = threadIdx.x % kRowLanes, slot = threadIdx.x / kRowLanes;
  const Index per_block = blockDim.x / kRowLanes, warps = Index(gridDim.x) * per_block;
  for (Index w = Index(blockIdx.x) * per_block + slot; w < count; w += warps) {
    body(w, WarpTiles{lane, warp_staging + std::size_t(slot) * staging_bytes});
    __syncwarp();  // the next w's writes to the staging wait for this one's last reads
  }
}

}  // namespace moe::cuda
