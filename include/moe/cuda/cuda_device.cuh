// moe/cuda/cuda_device.cuh: the GPU device of moe::cuda::BasicBackend (see moe/cuda/device.hpp):
// a stream, a cuBLAS handle and a reusable CUB workspace, shared by copies of the device.
// Include only from code compiled by nvcc (C++20, --extended-lambda).
//
// Every call is ordered on the device's stream; only download() waits for it.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "moe/bfloat16.hpp"
#include "moe/config.hpp"
#include "moe/cuda/device.hpp"

namespace moe::cuda {

// A failure reported by the CUDA runtime or cuBLAS (not a bad argument: those throw moe::Error).
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw CudaError(std::string("moe: CUDA error in ") + what + ": " + cudaGetErrorString(status));
}
inline void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw CudaError(std::string("moe: cuBLAS error in ") + what + ": " + cublasGetStatusString(status));
}

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
  template <class F>
  __host__ __device__ void for_each(Index n, F f) const {
    for (Index c = lane; c < n; c += kRowLanes) f(c);
  }
  __host__ __device__ bool first() const { return lane == 0; }
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

// fp32 GEMMs: exact fp32 (the default, what parity is checked with) or TF32 tensor cores.
enum class Fp32Math { exact, tf32 };

class CudaDevice {
 public:
  // stream: the caller's stream (nullptr = the legacy default stream). The device does not own it.
  explicit CudaDevice(cudaStream_t stream = nullptr, Fp32Math math = Fp32Math::exact)
      : context_(std::make_shared<Context>(stream, math)) {}

  cudaStream_t stream() const { return context_->stream; }
  Fp32Math fp32_math() const { return context_->math; }

  // The GPU's name and SM count, for logs ("NVIDIA H100 80GB HBM3, 132 SMs, TF32").
  std::string description() const {
    int device = 0;
    cudaDeviceProp properties{};
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaGetDeviceProperties(&properties, device), "cudaGetDeviceProperties");
    return std::string(properties.name) + ", " + std::to_string(context_->sms) + " SMs" +
           (context_->math == Fp32Math::tf32 ? ", TF32" : "");
  }
  // Bytes of the GPU's memory in use by every process (cudaMemGetInfo: total - free).
  std::size_t memory_in_use() const {
    std::size_t free = 0, total = 0;
    check_cuda(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
    return total - free;
  }

  static void* allocate(std::size_t bytes) {
    void* p = nullptr;
    if (bytes > 0) check_cuda(cudaMalloc(&p, bytes), "cudaMalloc");
    return p;
  }
  static void deallocate(void* p) { cudaFree(p); }

  void upload(void* dst, const void* src, std::size_t bytes) const {
    if (bytes) check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream()), "upload");
  }
  // Waits for the stream: the result is on the host when this returns.
  void download(void* dst, const void* src, std::size_t bytes) const {
    if (bytes) check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream()), "download");
    synchronize();
  }
  void synchronize() const { check_cuda(cudaStreamSynchronize(stream()), "cudaStreamSynchronize"); }

  template <class Body>
  void for_each(Index n, Body body) const {
    if (n <= 0) return;
    constexpr Index kThreads = 256;
    const Index max_blocks = Index(context_->sms) * 16;
    const Index blocks = (n + kThreads - 1) / kThreads < max_blocks ? (n + kThreads - 1) / kThreads : max_blocks;
    for_each_kernel<<<unsigned(blocks), unsigned(kThreads), 0, stream()>>>(n, body);
    check_cuda(cudaGetLastError(), "kernel launch");
  }

  template <class Body>
  void for_each_2d(Index rows, Index cols, Body body) const {
    if (rows <= 0 || cols <= 0) return;
    constexpr Index kX = 32, kY = 8;  // a warp along the row, 8 rows per block
    const Index bx = (cols + kX - 1) / kX < 1024 ? (cols + kX - 1) / kX : 1024;
    const Index by = (rows + kY - 1) / kY < 65535 ? (rows + kY - 1) / kY : 65535;
    for_each_2d_kernel<<<dim3(unsigned(bx), unsigned(by)), dim3(unsigned(kX), unsigned(kY)), 0, stream()>>>(
        rows, cols, body);
    check_cuda(cudaGetLastError(), "kernel launch");
  }

  using Row = WarpRow;
  template <class Body>
  void for_each_row(Index rows, Body body) const {
    if (rows <= 0) return;
    constexpr Index kThreads = 256, kRowsPerBlock = kThreads / kRowLanes;
    const Index max_blocks = Index(context_->sms) * 16;
    const Index needed = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    for_each_row_kernel<<<unsigned(needed < max_blocks ? needed : max_blocks), unsigned(kThreads), 0, stream()>>>(
        rows, body);
    check_cuda(cudaGetLastError(), "kernel launch");
  }

  template <class S>
  void gemm(const BlasGemm<S>& g) const {
    check_blas_gemm(g);
    const auto op = [](BlasOp o) { return o == BlasOp::none ? CUBLAS_OP_N : CUBLAS_OP_T; };
    cudaDataType_t type;
    cublasComputeType_t compute;
    if constexpr (std::is_same_v<S, double>) {
      type = CUDA_R_64F, compute = CUBLAS_COMPUTE_64F;
    } else if constexpr (std::is_same_v<S, float>) {
      type = CUDA_R_32F;
      compute = context_->math == Fp32Math::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    } else {
      static_assert(std::is_same_v<S, bfloat16>, "CudaDevice::gemm: float, double or moe::bfloat16");
      type = CUDA_R_16BF, compute = CUBLAS_COMPUTE_32F;  // bf16 operands, fp32 accumulation
    }
    using Alpha = std::conditional_t<std::is_same_v<S, double>, double, float>;
    const Alpha alpha = 1, beta = g.accumulate ? 1 : 0;
    if (g.batch == 1) {
      check_cublas(cublasGemmEx(context_->handle, op(g.op_a), op(g.op_b), int(g.m), int(g.n), int(g.k), &alpha, g.a,
                                type, int(g.lda), g.b, type, int(g.ldb), &beta, g.c, type, int(g.ldc), compute,
                                CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx");
      return;
    }
    check_cublas(cublasGemmStridedBatchedEx(context_->handle, op(g.op_a), op(g.op_b), int(g.m), int(g.n), int(g.k),
                                            &alpha, g.a, type, int(g.lda), (long long)g.stride_a, g.b, type,
                                            int(g.ldb), (long long)g.stride_b, &beta, g.c, type, int(g.ldc),
                                            (long long)g.stride_c, int(g.batch), compute, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmStridedBatchedEx");
  }

  // One growing device buffer per context: reused while big enough; growing waits for the stream
  // (queued work may still read the old one) and keeps a quarter more room.
  void* scratch(std::size_t bytes) const { return context_->scratch(bytes); }

  // CUB's radix sort is stable; the workspace grows once and is reused.
  void stable_sort_pairs(const std::uint32_t* keys_in, std::uint32_t* keys_out, const std::int32_t* values_in,
                         std::int32_t* values_out, Index n, int bits) const {
    check(n < (Index{1} << 31), "sort: ", n, " pairs exceed CUB's 32-bit item count");
    std::size_t bytes = 0;
    check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys_in, keys_out, values_in, values_out, int(n), 0,
                                               bits, stream()),
               "cub::DeviceRadixSort (size query)");
    void* temp = context_->workspace(bytes);
    check_cuda(cub::DeviceRadixSort::SortPairs(temp, bytes, keys_in, keys_out, values_in, values_out, int(n), 0, bits,
                                               stream()),
               "cub::DeviceRadixSort");
  }

 private:
  struct Context {
    cudaStream_t stream;
    Fp32Math math;
    cublasHandle_t handle = nullptr;
    int sms = 1;
    void* temp = nullptr;
    std::size_t temp_bytes = 0;
    void* scratch_data = nullptr;
    std::size_t scratch_bytes = 0;

    Context(cudaStream_t s, Fp32Math m) : stream(s), math(m) {
      int device = 0;
      check_cuda(cudaGetDevice(&device), "cudaGetDevice");
      check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
      check_cublas(cublasCreate(&handle), "cublasCreate");
      check_cublas(cublasSetStream(handle, stream), "cublasSetStream");
    }
    ~Context() {
      if (scratch_data) cudaFree(scratch_data);
      if (temp) cudaFree(temp);
      if (handle) cublasDestroy(handle);
    }
    Context(const Context&) = delete;
    Context& operator=(const Context&) = delete;
    void* workspace(std::size_t bytes) {
      if (bytes > temp_bytes) {
        // The old workspace may still be read by queued work on the stream: wait before freeing.
        check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        if (temp) cudaFree(temp);
        temp = nullptr;
        check_cuda(cudaMalloc(&temp, bytes), "cudaMalloc (sort workspace)");
        temp_bytes = bytes;
      }
      return temp;
    }
    void* scratch(std::size_t bytes) {
      if (bytes > scratch_bytes) {
        check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        if (scratch_data) cudaFree(scratch_data);
        scratch_data = nullptr;
        const std::size_t grown = bytes + bytes / 4;
        check_cuda(cudaMalloc(&scratch_data, grown), "cudaMalloc (scratch)");
        scratch_bytes = grown;
      }
      return scratch_data;
    }
  };
  std::shared_ptr<Context> context_;
};

}  // namespace moe::cuda
