// moe/cuda/cuda_device.cuh: the GPU device of moe::cuda::BasicBackend (see moe/cuda/device.hpp):
// a stream, a cuBLAS handle and a reusable CUB workspace, shared by copies of the device.
// Include only from code compiled by nvcc (C++20, --extended-lambda).
//
// Every call is ordered on the device's stream; only download() waits for it.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cub/device/device_radix_sort.cuh>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/activations.hpp"
#include "moe/bfloat16.hpp"
#include "moe/config.hpp"
#include "moe/cuda/cuda_error.cuh"
#include "moe/cuda/device.hpp"
#include "moe/cuda/grouped_gemm.hpp"
#include "moe/cuda/hopper_grouped_gemm.cuh"
#include "moe/cuda/host_times.hpp"
#include "moe/cuda/index_kernels.cuh"
#include "moe/cuda/memory_ledger.hpp"
#include "moe/cuda/plan_cache.hpp"
#include "moe/cuda/reference_gemm.hpp"

namespace moe::cuda {

// fp32 GEMMs: exact fp32 (the default, what parity is checked with) or TF32 tensor cores.
enum class Fp32Math { exact, tf32 };

// What runs the products (gemm, gemm_group): cuBLAS and cuBLASLt (the default), or the definition,
// a thread per output element (moe/cuda/reference_gemm.hpp: the emulated device's bits, slow), for
// checking: compute-sanitizer's racecheck breaks down inside cuBLAS's bf16 kernels on an H100, so
// bench/gpu/racecheck.sh runs the tests with the reference engine. A new device takes it from the
// environment: MOE_CUDA_GEMM=reference (or cublas; unset = cublas; anything else is refused).
enum class BlasEngine { cublas, reference };

inline BlasEngine blas_engine_from_environment() {
  const char* value = std::getenv("MOE_CUDA_GEMM");
  if (!value || !*value || std::strcmp(value, "cublas") == 0) return BlasEngine::cublas;
  if (std::strcmp(value, "reference") == 0) return BlasEngine::reference;
  throw std::invalid_argument(std::string("MOE_CUDA_GEMM=") + value + ": expected cublas or reference");
}

class CudaDevice;
// A GEMM's epilogue as its own pass over C (device.hpp's Epilogue), for products cuBLASLt does
// not fuse: C already holds the product, rounded to S. Defined after CudaDevice.
template <class S>
void epilogue_pass(const CudaDevice& device, const BlasGemm<S>& g);
// BlasEngine::reference's product (defined after CudaDevice).
template <class S>
void reference_gemm_pass(const CudaDevice& device, const BlasGemm<S>& g);

namespace lt_detail {
// Owners of cuBLASLt's descriptors, destroyed on every path out of a call.
struct MatmulDesc {
  cublasLtMatmulDesc_t handle = nullptr;
  ~MatmulDesc() {
    if (handle) cublasLtMatmulDescDestroy(handle);
  }
  template <class T>
  void set(cublasLtMatmulDescAttributes_t attribute, const T& value) {
    check_cublas(cublasLtMatmulDescSetAttribute(handle, attribute, &value, sizeof(value)),
                 "cublasLtMatmulDescSetAttribute");
  }
};
struct Layout {
  cublasLtMatrixLayout_t handle = nullptr;
  Layout(cudaDataType_t type, Index rows, Index cols, Index ld) {
    check_cublas(cublasLtMatrixLayoutCreate(&handle, type, std::uint64_t(rows), std::uint64_t(cols), std::int64_t(ld)),
                 "cublasLtMatrixLayoutCreate");
  }
  ~Layout() {
    if (handle) cublasLtMatrixLayoutDestroy(handle);
  }
  Layout(const Layout&) = delete;
  Layout& operator=(const Layout&) = delete;
};
struct Preference {
  cublasLtMatmulPreference_t handle = nullptr;
  ~Preference() {
    if (handle) cublasLtMatmulPreferenceDestroy(handle);
  }
  template <class T>
  void set(cublasLtMatmulPreferenceAttributes_t attribute, const T& value) {
    check_cublas(cublasLtMatmulPreferenceSetAttribute(handle, attribute, &value, sizeof(value)),
                 "cublasLtMatmulPreferenceSetAttribute");
  }
};
}  // namespace lt_detail

namespace cuda_device_detail {
// Built for the same architectures as every other kernel of the translation unit that asks.
template <int = 0>
__global__ void image_probe_kernel() {}
}  // namespace cuda_device_detail

// Why this process can use no CUDA device, or "" when it can: none found, the runtime's own error
// (a driver older than the CUDA runtime, no access to /dev/nvidia*), named as it names it, or a
// current device this program's GPU code was not built for (say sm_90a code on another GPU), which
// would otherwise surface at the first launch as "no kernel image".
inline std::string no_device_reason() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) return std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
  if (count == 0) return "no CUDA device found";
  cudaFuncAttributes attributes{};
  const cudaError_t image =
      cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(&cuda_device_detail::image_probe_kernel<>));
  if (image == cudaSuccess) return {};
  cudaGetLastError();  // an answer, not an error to leave for the next check
  if (image != cudaErrorNoKernelImageForDevice && image != cudaErrorInvalidDeviceFunction)
    return std::string(cudaGetErrorName(image)) + ": " + cudaGetErrorString(image);  // busy, out of memory, ...
  int device = 0, major = 0, minor = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return "this program's GPU code does not run on device " + std::to_string(device) + " (compute capability " +
         std::to_string(major) + "." + std::to_string(minor) + "): " + cudaGetErrorString(image);
}

class CudaDevice {
 public:
  // stream: the caller's stream (nullptr = the legacy default stream). The device does not own it.
  explicit CudaDevice(cudaStream_t stream = nullptr, Fp32Math math = Fp32Math::exact)
      : context_(std::make_shared<Context>(stream, math)) {}
  // A handle: copies share the context (stream, handles, workspaces). No move operations, so a move
  // copies too and leaves its source usable (a moved-from backend or layer keeps a device rather than
  // a null context).
  CudaDevice(const CudaDevice&) = default;
  CudaDevice& operator=(const CudaDevice&) = default;

  cudaStream_t stream() const { return context_->main.stream; }

  // A pointer the kernels can read: device, managed or page-locked memory, or any host memory where
  // the GPU reads pageable memory. Pageable host memory elsewhere, and memory this GPU has no address
  // for (another GPU's without peer access), are named here instead of faulting in a kernel (an
  // illegal address that the next sync reports, far from its cause). The library's own buffers are
  // found in the ledger, extent and all (a view past its buffer's end is named too), and one on this
  // context's GPU needs no driver call (a training step's ~1,300 operands cost a map lookup each);
  // other memory, another GPU's buffers included, is checked by its kind: one driver query (no
  // sync), and a query that fails decides nothing (the kernels will tell).
  void check_device_memory(const void* p, std::size_t bytes, const char* where, const char* name) const {
    int owner = -1;
    const MemoryLedger::Extent extent = ledger().locate(p, bytes, &owner);
    check(extent != MemoryLedger::Extent::past_end, where, ": ", name, " (", bytes, " bytes at ", p,
          ") runs past the end of its device allocation");
    if ((extent == MemoryLedger::Extent::inside && owner == context_->device) || context_->pageable_access) return;
    cudaPointerAttributes attributes{};
    if (cudaPointerGetAttributes(&attributes, p) != cudaSuccess) {
      cudaGetLastError();  // this query's error only: launches check theirs as they go
      return;
    }
    check(attributes.type != cudaMemoryTypeUnregistered, where, ": ", name, " is pageable host memory (",
          bytes, " bytes at ", p, "); the CUDA backend's kernels read device memory");
    check(attributes.devicePointer != nullptr, where, ": ", name, " (", bytes, " bytes at ", p,
          ") is memory this GPU cannot address (another GPU's, without peer access?)");
  }
  Fp32Math fp32_math() const { return context_->math; }

  // The GPU's name and SM count, for logs ("NVIDIA H100 80GB HBM3, 132 SMs, TF32").
  std::string description() const {
    int device = 0;
    cudaDeviceProp properties{};
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaGetDeviceProperties(&properties, device), "cudaGetDeviceProperties");
    return std::string(properties.name) + ", " + std::to_string(context_->sms) + " SMs" +
           (context_->math == Fp32Math::tf32 ? ", TF32" : "") +
           (context_->engine == BlasEngine::reference ? ", reference GEMMs" : "");
  }
  // BlasEngine, for this device and its copies (from MOE_CUDA_GEMM when the device was made).
  BlasEngine blas_engine() const { return context_->engine; }
  void set_blas_engine(BlasEngine engine) const { context_->engine = engine; }
  // Bytes of the GPU's memory in use by every process (cudaMemGetInfo: total - free); needs no
  // device object (static), so a caller can take it before making one.
  static std::size_t memory_in_use() {
    std::size_t free = 0, total = 0;
    check_cuda(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
    return total - free;
  }

  // The bytes this process's CudaDevices hold now and at most (moe/cuda/memory_ledger.hpp): every
  // cudaMalloc of the library (buffers, scratch, the sort's and cuBLASLt's workspaces; all but the
  // grouped GEMM's 4-byte probe, freed at once), over all GPUs; not the context nor cuBLAS's own
  // memory (memory_in_use has those). reset_memory_peak starts the peak again from what is held now.
  static MemoryUse memory_use() { return ledger().use(); }
  static void reset_memory_peak() { ledger().reset_peak(); }

  static void* allocate(std::size_t bytes) { return counted_malloc(bytes, "cudaMalloc"); }
  static void deallocate(void* p) { counted_free(p); }

  // Host time per kind of call (moe/cuda/host_times.hpp), shared by copies of this device; off
  // until host_times().enable(true).
  HostCallTimes& host_times() const { return context_->host_times; }

  void upload(void* dst, const void* src, std::size_t bytes) const {
    const auto timed = context_->host_times.time(HostCall::upload);
    if (bytes) check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream()), "upload");
  }
  // Waits for the stream: the result is on the host when this returns. Small copies (a layer's
  // expert offsets, a loss, a norm: the training step's syncs) go through a page-locked staging
  // buffer, so the copy is one DMA the stream runs in order, not the runtime's pageable path.
  void download(void* dst, const void* src, std::size_t bytes) const {
    const auto timed = context_->host_times.time(HostCall::wait);
    void* staging = bytes <= Context::kStagingBytes ? context_->staging() : nullptr;
    if (bytes) check_cuda(cudaMemcpyAsync(staging ? staging : dst, src, bytes, cudaMemcpyDeviceToHost, stream()), "download");
    synchronize();
    if (bytes && staging) std::memcpy(dst, staging, bytes);
  }
  void synchronize() const {
    const auto timed = context_->host_times.time(HostCall::wait);
    check_cuda(cudaStreamSynchronize(stream()), "cudaStreamSynchronize");
  }

  // A device -> host copy the host collects later (start_download, finish_download): page-locked
  // memory and an event of its own, reused from copy to copy. Move-only; destroying one waits for
  // its copy.
  class PendingDownload {
   public:
    PendingDownload() = default;
    PendingDownload(PendingDownload&& other) noexcept { swap(other); }
    PendingDownload& operator=(PendingDownload&& other) noexcept {
      PendingDownload(std::move(other)).swap(*this);
      return *this;
    }
    ~PendingDownload() {
      if (event_) {
        cudaEventSynchronize(event_);  // the copy may still be writing the page-locked memory
        cudaEventDestroy(event_);
      }
      if (host_) cudaFreeHost(host_);
    }

   private:
    friend class CudaDevice;
    void swap(PendingDownload& other) noexcept {
      std::swap(host_, other.host_), std::swap(capacity_, other.capacity_), std::swap(bytes_, other.bytes_);
      std::swap(event_, other.event_), std::swap(in_flight_, other.in_flight_);
    }
    void* host_ = nullptr;
    std::size_t capacity_ = 0, bytes_ = 0;
    cudaEvent_t event_ = nullptr;
    bool in_flight_ = false;
  };
  // Queues the copy of `bytes` from src and returns at once: work queued after it runs on while
  // the host goes on (a forward's gather, behind its expert offsets).
  void start_download(PendingDownload& pending, const void* src, std::size_t bytes) const {
    if (bytes > pending.capacity_) {
      if (pending.event_) check_cuda(cudaEventSynchronize(pending.event_), "cudaEventSynchronize");
      if (pending.host_) cudaFreeHost(pending.host_);
      pending.host_ = nullptr, pending.capacity_ = 0;
      check_cuda(cudaMallocHost(&pending.host_, bytes), "cudaMallocHost (pending download)");
      pending.capacity_ = bytes;
    }
    if (!pending.event_) check_cuda(cudaEventCreateWithFlags(&pending.event_, cudaEventDisableTiming), "cudaEventCreate");
    if (bytes) check_cuda(cudaMemcpyAsync(pending.host_, src, bytes, cudaMemcpyDeviceToHost, stream()), "download");
    check_cuda(cudaEventRecord(pending.event_, stream()), "cudaEventRecord");
    pending.bytes_ = bytes, pending.in_flight_ = true;
  }
  // Waits for the copy (a sync point up to it, not past it) and puts its bytes at dst.
  void finish_download(PendingDownload& pending, void* dst) const {
    check(pending.in_flight_, "finish_download: no download in flight");
    const auto timed = context_->host_times.time(HostCall::wait);
    check_cuda(cudaEventSynchronize(pending.event_), "cudaEventSynchronize");
    if (pending.bytes_) std::memcpy(dst, pending.host_, pending.bytes_);
    pending.in_flight_ = false;
  }

  template <class Body>
  void for_each(Index n, Body body) const {
    if (n <= 0) return;
    const auto timed = context_->host_times.time(HostCall::launch);
    constexpr Index kThreads = 256;
    const Index max_blocks = Index(context_->sms) * 16;
    const Index blocks = (n + kThreads - 1) / kThreads < max_blocks ? (n + kThreads - 1) / kThreads : max_blocks;
    for_each_kernel<<<unsigned(blocks), unsigned(kThreads), 0, stream()>>>(n, body);
    check_cuda(cudaGetLastError(), "kernel launch");
  }

  template <class Body>
  void for_each_2d(Index rows, Index cols, Body body) const {
    if (rows <= 0 || cols <= 0) return;
    const auto timed = context_->host_times.time(HostCall::launch);
    // 256 threads a block: a warp along each of 8 rows, or fewer rows and wider when the grid has
    // fewer than 8 (a [1, n] view, e.g. a flat parameter's gradient, gets 256 along its one row:
    // with 8 rows a block, 7 of 8 threads would idle and a 1024-block grid could not fill the GPU).
    constexpr Index kThreads = 256;
    const Index ky = rows >= 8 ? 8 : rows >= 4 ? 4 : rows >= 2 ? 2 : 1, kx = kThreads / ky;
    const Index bx = (cols + kx - 1) / kx < 1024 ? (cols + kx - 1) / kx : 1024;
    const Index by = (rows + ky - 1) / ky < 65535 ? (rows + ky - 1) / ky : 65535;
    for_each_2d_kernel<<<dim3(unsigned(bx), unsigned(by)), dim3(unsigned(kx), unsigned(ky)), 0, stream()>>>(
        rows, cols, body);
    check_cuda(cudaGetLastError(), "kernel launch");
  }

  using Row = WarpRow;
  template <class Body>
  void for_each_row(Index rows, Body body) const {
    if (rows <= 0) return;
    const auto timed = context_->host_times.time(HostCall::launch);
    constexpr Index kThreads = 256, kRowsPerBlock = kThreads / kRowLanes;
    const Index max_blocks = Index(context_->sms) * 16;
    const Index needed = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    for_each_row_kernel<<<unsigned(needed < max_blocks ? needed : max_blocks), unsigned(kThreads), 0, stream()>>>(
        rows, body);
    check_cuda(cudaGetLastError(), "kernel launch");
  }

  // Up to 4 warps a block, as many as fit in the default 48 KiB of shared memory; each warp's staging
  // rounded up to 128 bytes.
  using Warp = WarpTiles;
  template <class Body>
  void for_each_warp(Index count, std::size_t staging_bytes, Body body) const {
    check_warp_staging(staging_bytes);
    if (count <= 0) return;
    const auto timed = context_->host_times.time(HostCall::launch);
    const std::size_t staging = (staging_bytes + 127) / 128 * 128;
    const Index per_block = staging == 0 ? 4 : std::min<Index>(4, Index(kWarpStagingMax / staging));
    const Index max_blocks = Index(context_->sms) * 16, needed = (count + per_block - 1) / per_block;
    for_each_warp_kernel<<<unsigned(needed < max_blocks ? needed : max_blocks), unsigned(per_block * kRowLanes),
                           staging * std::size_t(per_block), stream()>>>(count, unsigned(staging), body);
    check_cuda(cudaGetLastError(), "kernel launch");
  }

  // A product with an epilogue goes to cuBLASLt, fused; where cuBLASLt offers no algorithm for
  // it (double, or operands it cannot take), to cuBLAS and then epilogue_pass. A plain product
  // whose shape varies from call to call (an expert's block: BlasGemm::shape_varies) goes to
  // cuBLASLt too, with its algorithm chosen once per size bucket (lt_gemm): cuBLAS would run its
  // heuristic for every new exact shape, and an expert's row count is new at almost every step.
  // All of that with BlasEngine::cublas; the reference engine runs every product as its definition.
  template <class S>
  void gemm(const BlasGemm<S>& g) const {
    check_blas_gemm(g);
    gemm_on(g, context_->main);
  }

  // Independent single products (device.hpp): the first `gemm_lanes()` of them each start a side
  // stream, the rest follow round the lanes; the side streams wait for the stream's work so far,
  // and the stream waits for all of them before its next call. Each lane has its own cuBLAS
  // handle and cuBLASLt workspace, and the plans are shared, so a product gets the same
  // algorithm, hence the same bits, on any lane. With one lane (or one product) they run in order
  // on the stream. A fused product cuBLASLt declines runs on the stream after the join (its
  // epilogue pass is a launch on the stream).
  template <class S>
  void gemm_group(std::span<const BlasGemm<S>> products) const {
    for (const BlasGemm<S>& g : products) check_group_member(g);
    // The reference engine's products are launches on the stream: no side lane would run one.
    const int lanes = context_->engine == BlasEngine::reference              ? 1
                      : int(products.size()) < context_->gemm_lanes ? int(products.size())
                                                                     : context_->gemm_lanes;
    if (lanes <= 1) {
      for (const BlasGemm<S>& g : products) gemm_on(g, context_->main);
      return;
    }
    Context& context = *context_;
    {
      const auto timed = context.host_times.time(HostCall::launch);  // the fork's event calls
      context.make_lanes(lanes);
      check_cuda(cudaEventRecord(context.fork, stream()), "cudaEventRecord (fork)");
      for (int l = 0; l < lanes; ++l)
        check_cuda(cudaStreamWaitEvent(context.side[std::size_t(l)].stream, context.fork), "cudaStreamWaitEvent (fork)");
    }
    std::vector<const BlasGemm<S>*> declined;
    try {
      for (std::size_t i = 0; i < products.size(); ++i)
        if (!gemm_on(products[i], context.side[i % std::size_t(lanes)])) declined.push_back(&products[i]);
    } catch (...) {
      // What was queued on the lanes still runs: the stream's later work (a scratch's regrowth,
      // a free) must wait for it even though the group failed.
      for (int l = 0; l < lanes; ++l) {
        Lane& lane = context.side[std::size_t(l)];
        if (cudaEventRecord(lane.done, lane.stream) == cudaSuccess) cudaStreamWaitEvent(stream(), lane.done);
      }
      cudaGetLastError();  // the failure being thrown is the one to report
      throw;
    }
    {
      const auto timed = context.host_times.time(HostCall::launch);  // the join's event calls
      for (int l = 0; l < lanes; ++l) {
        Lane& lane = context.side[std::size_t(l)];
        check_cuda(cudaEventRecord(lane.done, lane.stream), "cudaEventRecord (join)");
        check_cuda(cudaStreamWaitEvent(stream(), lane.done), "cudaStreamWaitEvent (join)");
      }
    }
    for (const BlasGemm<S>* g : declined) gemm_on(*g, context.main);
  }
  // Side streams a gemm_group may spread over (default kDefaultGemmLanes; 1: none, in order on the
  // stream). It may change between groups: a lane is made when a group first needs it, then kept.
  int gemm_lanes() const { return context_->gemm_lanes; }
  void set_gemm_lanes(int lanes) const {
    check(lanes >= 1 && lanes <= kMaxGemmLanes, "set_gemm_lanes: ", lanes, " lanes, expected 1 to ", kMaxGemmLanes);
    context_->gemm_lanes = lanes;
  }
  static constexpr int kDefaultGemmLanes = 4, kMaxGemmLanes = 16;
  // device.hpp's DgeluWeights, for this device and its copies.
  DgeluWeights dgelu_weights() const { return context_->dgelu_weights; }
  void set_dgelu_weights(DgeluWeights weights) const { context_->dgelu_weights = weights; }
  // device.hpp's ExpertGemm, for this device and its copies.
  ExpertGemm expert_gemm() const { return context_->expert_gemm; }
  void set_expert_gemm(ExpertGemm gemm) const { context_->expert_gemm = gemm; }

  // The Hopper grouped GEMM (moe/cuda/hopper_grouped_gemm.cuh): bf16, in a program whose device
  // code was built for sm_90a, on an sm_90 GPU.
  template <class S>
  static bool grouped_gemm_supports() {
    if constexpr (std::is_same_v<S, bfloat16>)
      return grouped_gemm_available();
    else
      return false;
  }
  template <class S>
  void grouped_gemm(const GroupedGemm<S>& g) const {
    static_assert(std::is_same_v<S, bfloat16>, "CudaDevice::grouped_gemm: bf16 operands only (the wgmma kernel's)");
    const auto timed = context_->host_times.time(HostCall::launch);
    moe::cuda::grouped_gemm<kGroupedGemmColumns, 4, 1>(stream(), g);
  }

 private:
  // A stream and what a product needs on it: a cuBLAS handle bound to it and a cuBLASLt workspace
  // of its own (allocated at its first cuBLASLt product).
  struct Lane {
    cudaStream_t stream = nullptr;
    cublasHandle_t handle = nullptr;
    void* lt_workspace = nullptr;
    cudaEvent_t done = nullptr;  // recorded at a group's join (side lanes)
  };

  // One product on `lane`; false, having queued nothing, for a fused product cuBLASLt declined
  // on a side lane (the caller runs it on the stream, where its epilogue pass can follow).
  template <class S>
  bool gemm_on(const BlasGemm<S>& g, Lane& lane) const {
    const bool on_stream = &lane == &context_->main;
    if (context_->engine == BlasEngine::reference) {
      if (!on_stream) return false;  // for_each_2d launches on the stream: the group runs it after the join
      reference_gemm_pass(*this, g);
      return true;
    }
    const bool lt = g.epilogue != Epilogue::none || (g.shape_varies && !g.pointer_batch() && g.batch == 1);
    const auto timed = context_->host_times.time(lt ? HostCall::gemm_lt : HostCall::gemm);
    if (g.epilogue != Epilogue::none) {
      if (g.m == 0 || g.n == 0 || lt_gemm(g, lane)) return true;
      if (!on_stream) return false;
      BlasGemm<S> plain = g;
      plain.epilogue = Epilogue::none;
      gemm_on(plain, lane);
      epilogue_pass(*this, g);
      return true;
    }
    if (lt && g.m > 0 && g.n > 0 && g.k > 0 && lt_gemm(g, lane)) return true;
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
    check(on_stream || !g.pointer_batch(), "gemm: a batch by pointer arrays runs on the device's stream");
    if (g.pointer_batch() && g.array_alignment < kBatchedAlignment) {
      // cublasGemmBatchedEx would assume aligned pointers it cannot check (seen on an H200: a
      // misaligned address fault that poisons the context). One cublasGemmEx per product, which
      // looks at its pointers; reading the arrays waits for the stream. The library's one caller,
      // attention, sends such shapes (T or the head size not a multiple of 8 in bf16, 4 in fp32)
      // as strided batches instead (moe/cuda/nn/attention.hpp): this serves other callers.
      std::vector<const S*> a_array(std::size_t(g.k > 0 ? g.batch : 0)), b_array(a_array.size());
      std::vector<S*> c_array(std::size_t(g.batch));
      if (g.k > 0) {
        download(a_array.data(), g.a_array, a_array.size() * sizeof(S*));
        download(b_array.data(), g.b_array, b_array.size() * sizeof(S*));
      }
      download(c_array.data(), g.c_array, c_array.size() * sizeof(S*));
      BlasGemm<S> one = g;
      one.a_array = one.b_array = nullptr, one.c_array = nullptr;
      one.batch = 1;
      for (std::size_t q = 0; q < c_array.size(); ++q) {
        one.a = g.k > 0 ? a_array[q] : nullptr, one.b = g.k > 0 ? b_array[q] : nullptr, one.c = c_array[q];
        gemm_on(one, lane);
      }
      return true;
    }
    if (g.pointer_batch()) {
      check_cublas(cublasGemmBatchedEx(lane.handle, op(g.op_a), op(g.op_b), int(g.m), int(g.n), int(g.k), &alpha,
                                       reinterpret_cast<const void* const*>(g.a_array), type, int(g.lda),
                                       reinterpret_cast<const void* const*>(g.b_array), type, int(g.ldb), &beta,
                                       reinterpret_cast<void* const*>(g.c_array), type, int(g.ldc), int(g.batch),
                                       compute, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmBatchedEx");
      return true;
    }
    if (g.batch == 1) {
      check_cublas(cublasGemmEx(lane.handle, op(g.op_a), op(g.op_b), int(g.m), int(g.n), int(g.k), &alpha, g.a,
                                type, int(g.lda), g.b, type, int(g.ldb), &beta, g.c, type, int(g.ldc), compute,
                                CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx");
      return true;
    }
    check_cublas(cublasGemmStridedBatchedEx(lane.handle, op(g.op_a), op(g.op_b), int(g.m), int(g.n), int(g.k),
                                            &alpha, g.a, type, int(g.lda), (long long)g.stride_a, g.b, type,
                                            int(g.ldb), (long long)g.stride_b, &beta, g.c, type, int(g.ldc),
                                            (long long)g.stride_c, int(g.batch), compute, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmStridedBatchedEx");
    return true;
  }

 public:
  // One product (and its epilogue: BIAS, GELU_AUX_BIAS, GELU_BIAS or DGELU; or none, C overwritten
  // or accumulated) in one cuBLASLt call; false, having queued nothing, when cuBLASLt has no
  // algorithm for it or declines the one chosen.
  template <class S>
  bool lt_gemm(const BlasGemm<S>& g) const {
    return lt_gemm(g, context_->main);
  }

 private:
  // lt_gemm on a lane's stream, with its workspace.
  template <class S>
  bool lt_gemm(const BlasGemm<S>& g, Lane& lane) const {
    if constexpr (std::is_same_v<S, double>) {
      return false;
    } else {
      constexpr std::uint32_t kMinAlignment = 16;  // below this, the plain path
      const bool with_aux = g.aux != nullptr;
      const bool biased = g.epilogue == Epilogue::bias || g.epilogue == Epilogue::bias_gelu;
      const void* const pointers[] = {g.a, g.b, g.c, biased ? g.bias : g.c, with_aux ? g.aux : g.c};
      for (const void* p : pointers)
        if (alignment_of(p) < kMinAlignment) return false;
      const Index leading[] = {g.lda, g.ldb, g.ldc, with_aux ? g.ldaux : g.ldc};
      for (const Index ld : leading)
        if (ld * Index(sizeof(S)) % kMinAlignment != 0) return false;
      if (with_aux && g.ldaux % 8 != 0) return false;  // cuBLASLt's rule for the GELU epilogues' aux
      const cudaDataType_t type = std::is_same_v<S, float> ? CUDA_R_32F : CUDA_R_16BF;
      const cublasComputeType_t compute = std::is_same_v<S, float> && context_->math == Fp32Math::tf32
                                              ? CUBLAS_COMPUTE_32F_FAST_TF32
                                              : CUBLAS_COMPUTE_32F;
      lt_detail::MatmulDesc desc;
      check_cublas(cublasLtMatmulDescCreate(&desc.handle, compute, CUDA_R_32F), "cublasLtMatmulDescCreate");
      const auto op = [](BlasOp o) { return o == BlasOp::none ? CUBLAS_OP_N : CUBLAS_OP_T; };
      desc.set(CUBLASLT_MATMUL_DESC_TRANSA, op(g.op_a));
      desc.set(CUBLASLT_MATMUL_DESC_TRANSB, op(g.op_b));
      const cublasLtEpilogue_t epilogue = g.epilogue == Epilogue::none    ? CUBLASLT_EPILOGUE_DEFAULT
                                          : g.epilogue == Epilogue::bias  ? CUBLASLT_EPILOGUE_BIAS
                                          : g.epilogue == Epilogue::dgelu ? CUBLASLT_EPILOGUE_DGELU
                                          : with_aux ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS
                                                     : CUBLASLT_EPILOGUE_GELU_BIAS;
      desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
      if (biased) desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(g.bias));  // of C's type
      if (with_aux) {
        desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, static_cast<void*>(g.aux));  // of C's type
        desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, std::int64_t(g.ldaux));
      }
      const bool a_plain = g.op_a == BlasOp::none, b_plain = g.op_b == BlasOp::none;
      const auto layouts = [&](Index n, Index k) {  // A, B and C (= D) with n columns of C, depth k
        return std::array<lt_detail::Layout, 3>{lt_detail::Layout(type, a_plain ? g.m : k, a_plain ? k : g.m, g.lda),
                                                lt_detail::Layout(type, b_plain ? k : n, b_plain ? n : k, g.ldb),
                                                lt_detail::Layout(type, g.m, n, g.ldc)};
      };
      // The heuristic's answer depends on everything but the pointers' values (their alignments
      // count: cuBLASLt picks kernels by them) and costs tens of microseconds of host time, more
      // than a small GEMM takes on the GPU: it is asked once per key. Where the shape varies (an
      // expert's row count is n of its forward and input-gradient products and k of its weight
      // gradient, new at almost every step), n and k go into the key rounded up to a power of two
      // wherever the stored layouts still hold them (a leading dimension that must cover the
      // dimension), and the heuristic sees those sizes: its algorithm serves every smaller one
      // with no more workspace. Should cuBLASLt decline one, the plain path takes it.
      const auto bucket = [&](Index size, bool fits) {
        const Index up = Index(std::bit_ceil(std::uint64_t(size)));
        return g.shape_varies && fits ? up : size;
      };
      const Index n_key = bucket(g.n, b_plain || g.ldb >= Index(std::bit_ceil(std::uint64_t(g.n))));
      const Index k_up = Index(std::bit_ceil(std::uint64_t(g.k)));
      const Index k_key = bucket(g.k, (a_plain || g.lda >= k_up) && (!b_plain || g.ldb >= k_up));
      const std::uint32_t align_a = alignment_of(g.a), align_b = alignment_of(g.b),
                          align_c = alignment_of(g.c);
      const std::uint32_t align_bias = biased ? alignment_of(g.bias) : 0,
                          align_aux = with_aux ? alignment_of(g.aux) : 0;
      const LtPlans::Key key = {type,    compute, int(g.op_a), int(g.op_b), int(epilogue), int(g.accumulate),
                                g.m,     n_key,   k_key,       g.lda,       g.ldb,         g.ldc,
                                g.ldaux, align_a, align_b,     align_c,     align_bias,    align_aux};
      const std::uint64_t workspace_bytes = Context::kLtWorkspaceBytes;
      std::optional<LtPlan> plan = context_->lt_plans.find(key);
      if (!plan) {
        lt_detail::Preference preference;
        check_cublas(cublasLtMatmulPreferenceCreate(&preference.handle), "cublasLtMatmulPreferenceCreate");
        preference.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace_bytes);
        // cuBLASLt assumes 256-byte aligned operands unless told: an expert's row block is not.
        preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a);
        preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b);
        preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c);
        preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c);
        const auto [a, b, c] = layouts(n_key, k_key);
        const auto searching = context_->host_times.time(HostCall::lt_heuristic);
        cublasLtMatmulHeuristicResult_t heuristic{};
        int found = 0;
        const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(context_->lt, desc.handle, a.handle, b.handle,
                                                                     c.handle, c.handle, preference.handle, 1,
                                                                     &heuristic, &found);
        plan = LtPlan{status == CUBLAS_STATUS_SUCCESS && found > 0, heuristic.algo};
        context_->lt_plans.insert(key, *plan);
      }
      if (!plan->found) return declined(g, lane);
      const auto [a, b, c] = layouts(g.n, g.k);
      const float alpha = 1, beta = g.accumulate ? 1 : 0;  // C is D: accumulate adds in place
      const cublasStatus_t status =
          cublasLtMatmul(context_->lt, desc.handle, &alpha, g.a, a.handle, g.b, b.handle, &beta, g.c, c.handle, g.c,
                         c.handle, &plan->algo, context_->lt_workspace(lane), workspace_bytes, lane.stream);
      // Declined arguments are checked before anything is queued.
      if (status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE) return declined(g, lane);
      check_cublas(status, "cublasLtMatmul");
      return true;
    }
  }

 public:
  // Products meant for cuBLASLt (an epilogue, or a varying shape) that went the plain path (cuBLAS,
  // then a pass for an epilogue) since this device's context was made, though their operands are
  // aligned for it: it offered no algorithm or declined the one chosen. Zero on a GPU where it
  // works (the GPU tests check it).
  std::uint64_t lt_fallbacks() const { return context_->lt_fallbacks.load(); }

  // One growing device buffer per context: reused while big enough; growing waits for the stream
  // (queued work may still read the old one) and keeps a quarter more room.
  void* scratch(std::size_t bytes) const { return context_->scratch(bytes); }

  // CUB's radix sort is stable; the workspace grows once and is reused.
  void stable_sort_pairs(const std::uint32_t* keys_in, std::uint32_t* keys_out, const std::int32_t* values_in,
                         std::int32_t* values_out, Index n, int bits) const {
    check(n < (Index{1} << 31), "sort: ", n, " pairs exceed CUB's 32-bit item count");
    const auto timed = context_->host_times.time(HostCall::sort);
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
  // cuBLASLt's algorithm for one key of lt_gemm, or none (found = false: the plain path).
  struct LtPlan {
    bool found = false;
    cublasLtMatmulAlgo_t algo{};
  };
  using LtPlans = PlanCache<18, LtPlan>;
  // Counted once a product: one with an epilogue declined on a side lane is tried again on the
  // stream (and counted there); a plain one goes to cuBLAS on its lane.
  template <class S>
  bool declined(const BlasGemm<S>& g, const Lane& lane) const {
    if (&lane == &context_->main || g.epilogue == Epilogue::none) ++context_->lt_fallbacks;
    return false;
  }

  struct Context {
    Fp32Math math;
    BlasEngine engine = blas_engine_from_environment();
    Lane main;               // the caller's stream, its cuBLAS handle and cuBLASLt workspace
    std::vector<Lane> side;  // gemm_group's side streams, made at the first group that needs them
    cudaEvent_t fork = nullptr;
    int gemm_lanes = kDefaultGemmLanes;
    DgeluWeights dgelu_weights = DgeluWeights::stored;
    ExpertGemm expert_gemm = ExpertGemm::per_expert;
    cublasLtHandle_t lt = nullptr;
    static constexpr std::size_t kLtWorkspaceBytes = std::size_t{32} << 20;  // NVIDIA's advice for Hopper
    int sms = 1;
    int pageable_access = 0;  // the GPU reads pageable host memory (HMM, ATS): host pointers are operands too
    int device = 0;           // the GPU this context was made on
    void* temp = nullptr;
    std::size_t temp_bytes = 0;
    void* scratch_data = nullptr;
    std::size_t scratch_bytes = 0;
    static constexpr std::size_t kStagingBytes = 4096;  // downloads up to this size are staged
    void* staging_data = nullptr;                       // page-locked host memory, made at the first staged download
    LtPlans lt_plans;
    HostCallTimes host_times;
    std::atomic<std::uint64_t> lt_fallbacks{0};

    Context(cudaStream_t stream, Fp32Math m) : math(m) {
      check_cuda(cudaGetDevice(&device), "cudaGetDevice");
      check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
      check_cuda(cudaDeviceGetAttribute(&pageable_access, cudaDevAttrPageableMemoryAccess, device),
                 "cudaDeviceGetAttribute");
      main.stream = stream;
      try {  // a constructor that throws runs no destructor: undo what was made
        check_cublas(cublasCreate(&main.handle), "cublasCreate");
        check_cublas(cublasSetStream(main.handle, stream), "cublasSetStream");
        check_cublas(cublasLtCreate(&lt), "cublasLtCreate");
      } catch (...) {
        release(main);
        throw;
      }
    }
    ~Context() {
      for (Lane& lane : side) {
        if (lane.stream) cudaStreamSynchronize(lane.stream);
        destroy(lane);
      }
      if (fork) cudaEventDestroy(fork);
      release(main);
      if (lt) cublasLtDestroy(lt);
      counted_free(scratch_data);
      counted_free(temp);
      if (staging_data) cudaFreeHost(staging_data);
    }
    void* staging() {
      if (!staging_data) check_cuda(cudaMallocHost(&staging_data, kStagingBytes), "cudaMallocHost (download staging)");
      return staging_data;
    }
    static void release(Lane& lane) {
      counted_free(lane.lt_workspace);
      if (lane.handle) cublasDestroy(lane.handle);
    }
    // Side lanes up to `count`: a non-blocking stream each (ordered with the caller's stream only
    // by the group's events), a cuBLAS handle on it and the event of its join.
    void make_lanes(int count) {
      if (!fork) check_cuda(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming), "cudaEventCreate");
      while (int(side.size()) < count) {
        // Made whole before it joins `side` (a half-made lane, should a call fail, is undone).
        Lane lane;
        try {
          check_cuda(cudaStreamCreateWithFlags(&lane.stream, cudaStreamNonBlocking), "cudaStreamCreate");
          check_cuda(cudaEventCreateWithFlags(&lane.done, cudaEventDisableTiming), "cudaEventCreate");
          check_cublas(cublasCreate(&lane.handle), "cublasCreate");
          check_cublas(cublasSetStream(lane.handle, lane.stream), "cublasSetStream");
          side.push_back(lane);
        } catch (...) {
          destroy(lane);
          throw;
        }
      }
    }
    static void destroy(Lane& lane) {
      release(lane);
      if (lane.done) cudaEventDestroy(lane.done);
      if (lane.stream) cudaStreamDestroy(lane.stream);
    }
    Context(const Context&) = delete;
    Context& operator=(const Context&) = delete;
    void* workspace(std::size_t bytes) {
      if (bytes > temp_bytes) {
        // The old workspace may still be read by queued work on the stream: wait before freeing.
        check_cuda(cudaStreamSynchronize(main.stream), "cudaStreamSynchronize");
        counted_free(temp);
        temp = nullptr, temp_bytes = 0;  // so that a failed allocation leaves no size without memory
        temp = counted_malloc(bytes, "cudaMalloc (sort workspace)");
        temp_bytes = bytes;
      }
      return temp;
    }
    // A lane's cuBLASLt workspace: allocated at its first cuBLASLt product, then reused (never
    // resized; the plans are chosen for this size, so every lane's must be the same).
    void* lt_workspace(Lane& lane) {
      if (!lane.lt_workspace)
        lane.lt_workspace = counted_malloc(kLtWorkspaceBytes, "cudaMalloc (cuBLASLt workspace)");
      return lane.lt_workspace;
    }
    void* scratch(std::size_t bytes) {
      if (bytes > scratch_bytes) {
        check_cuda(cudaStreamSynchronize(main.stream), "cudaStreamSynchronize");
        counted_free(scratch_data);
        scratch_data = nullptr, scratch_bytes = 0;  // as workspace(): a failed allocation leaves none
        const std::size_t grown = bytes + bytes / 4;
        scratch_data = counted_malloc(grown, "cudaMalloc (scratch)");
        scratch_bytes = grown;
      }
      return scratch_data;
    }
  };
  std::shared_ptr<Context> context_;

  static MemoryLedger& ledger() {
    static MemoryLedger* ledger = new MemoryLedger;  // never destroyed: static device objects may outlive it
    return *ledger;
  }
  // cudaMalloc and cudaFree, entered in the ledger (null for 0 bytes; nothing to free for null).
  static void* counted_malloc(std::size_t bytes, const char* what) {
    void* p = nullptr;
    if (bytes == 0) return p;
    check_cuda(cudaMalloc(&p, bytes), what);
    try {
      int device = 0;
      check_cuda(cudaGetDevice(&device), "cudaGetDevice");  // where cudaMalloc put it
      ledger().add(p, bytes, device);
    } catch (...) {  // the ledger's own allocation failed: the memory must not leak
      cudaFree(p);
      throw;
    }
    return p;
  }
  static void counted_free(void* p) {
    if (!p) return;
    ledger().remove(p);
    cudaFree(p);
  }
};

// A thread per element of C, the batch's products stacked along the launch's rows (row q * n + j). Pointer arrays are
// read on the device, so nothing waits.
template <class S>
void reference_gemm_pass(const CudaDevice& device, const BlasGemm<S>& g) {
  const Index n = g.n;
  device.for_each_2d(g.batch * n, g.m,
                     [=] MOE_HOST_DEVICE(Index r, Index i) { reference_gemm_element(g, r / n, i, r % n); });
}

template <class S>
void epilogue_pass(const CudaDevice& device, const BlasGemm<S>& g) {
  using C = typename ComputeTypeOf<S>::type;
  S* c = g.c;
  const Index ldc = g.ldc;
  // Column j of the column-major C is a row of the row-major output: threads run along it.
  device.for_each_2d(g.n, g.m, [=] MOE_HOST_DEVICE(Index j, Index i) {
    store_through_epilogue(g, c, i, j, C(c[i + j * ldc]));
  });
}

}  // namespace moe::cuda
