// bench_moe_cuda: the CUDA backend's MoE layer against a dense cuBLAS floor, on one GPU.
//
// Shapes (N=8 experts, top-2):
//   gpt2_T16384, gpt2_T1024   H=768,  F=3072,  GeluMLP (GPT-2's MLP, with biases)
//   mixtral_T4096             H=4096, F=14336, SwiGLU  (Mixtral's experts, no biases)
// Precisions: bf16 (storage; fp32 accumulation) for every shape; fp32 (exact) and tf32 (fp32
// storage, TF32 tensor-core GEMMs) for the GPT-2 shapes.
//
// Benchmarks, named <what>/<shape>/<precision> (Google Benchmark appends /manual_time):
//   moe_fwd            MoELayer<SelfRoute, Experts>::forward_into for inference (ForwardOptions::
//                      for_backward = false: nothing kept for backward), as the torch peers'
//                      forwards under torch.no_grad()
//   moe_fwd_train      the same forward keeping what backward needs (the input's copy, GeluMLP's
//                      pre-activation: R x F more values written)
//   moe_fwdbwd         training forward_into + backward_into (d(x) and every parameter gradient)
//   moe_fwd_linear     the inference forward with the learned Linear router
//   moe_fwd_grouped    (bf16) moe_fwd with the experts' products from the routing plan
//                      (ExpertGemm::grouped: the Hopper grouped GEMM, rows gathered as they load,
//                      no expert-sorted copy, no host sync); fails where that kernel is not built
//   moe_fwd_train_grouped, moe_fwdbwd_grouped
//                      (bf16) moe_fwd_train and moe_fwdbwd the same way: the training forward's
//                      products from the routing plan (no host wait; pre-activations kept a row per
//                      slot), its backward gathering the sorted rows its weight gradients read
//   moe_fwd_lanes1, moe_fwdbwd_lanes1
//                      (bf16) moe_fwd and moe_fwdbwd with the experts' products in order on the
//                      stream (CudaDevice::set_gemm_lanes(1)) instead of spread over side streams
//   floor_fwd          the dense floor: T*k rows through ONE expert's two GEMMs (cublasGemmEx,
//                      the layer's precision, fp32 compute), no routing, no bias, no activation.
//                      The same FLOPs as the MoE forward with perfect batching. Ten calls are
//                      queued per timed iteration, so launch latency is hidden: the strictest floor.
//                      (Its minimum time is fixed at 0.1 s of GPU time: --benchmark_min_time
//                      would cost ten times its value in wall time here.)
//   expert_gemm        (bf16, GPT-2's H=768, F=3072) one expert's products over a block of R rows,
//                      alone, through the layer's own path (CudaDevice::gemm with a varying shape:
//                      cuBLASLt, a plan per size bucket), named expert_gemm/<product>_R<rows>/bf16:
//                        gelu_fwd   act = gelu(x W1^T + b1), pre kept  (the layer's first product: TN, GELU_AUX_BIAS)
//                        bias_fwd   y = act W2^T + b2                  (its second: TN, BIAS)
//                        dgelu_nn   din = (dy W2) * gelu'(pre)         (its backward through the GELU: NN, DGELU)
//                        dgelu_tn   the same from W2's transpose [F, H] (TN, DGELU: a layout the layer could keep)
//                        plain_nn, plain_tn   dy W2 without the epilogue, in the two layouts
//                        dgelu_split  plain_nn, then din *= gelu'(pre) in one packed pass (BasicBackend::gelu_backward)
//                      The first H200 profile ran the DGELU products at ~355 TFLOP/s on an older
//                      kernel family (sm90_xmma) against ~430-600 for the others; these rows say
//                      whether the layout or the epilogue is the cause, before the layer is changed.
//   expert_product     (bf16, every shape) the expert bank's first or second product over a routed
//                      layer's rows, named expert_product/<first|second>/<way>/<shape>/bf16: the
//                      Hopper grouped GEMM (one launch, gathered rows, device offsets; ways
//                      grouped_<BN>x<stages>[x<blocks an SM>]) against the layer's cuBLAS path
//                      (cublas_experts: the gather, then a product per expert) and one dense
//                      cuBLAS product of the same FLOPs (cublas_dense): is the kernel worth wiring in?
//                      The second product also as grouped_128x4_combine: with the layer's combine in
//                      its epilogue, as moe_fwd_grouped runs it (its cost = this row less grouped_128x4)
//   routing_grouped    (bf16) the same for moe_fwd_grouped: route (and the combine where the
//                      products cannot take it: a capacity); its products gather their own rows and
//                      read the offsets on the device
//   routing_dispatch   everything of the SelfRoute forward around the expert bank: backend.route
//                      (top-k, softmax, dispatch; ends with the forward's one host sync),
//                      gather_rows and combine, on the SelfRoute logits view of x
//
// Timing: cudaEvents on the benchmark's stream around each iteration (UseManualTime), after a
// warm-up (at least 3 runs and 100 ms). The MoE forward syncs with the host once by design (the
// expert offsets), so its events include that round trip and the launches after it.
// Counters: tokens_per_s (T / time per iteration) and TFLOP/s with the expert FLOPs
// (forward = 2 GEMMs over T*k rows: 4*T*k*H*F for GeluMLP, 6*T*k*H*F for SwiGLU; forward +
// backward = 3x). The layer's rows also carry its host calls per call, by kind
// (bench/gpu/host_counters.hpp, over kHostTimedCalls more calls after the timed loop): what the
// host spends queueing a forward, and how long the offsets' sync waits.
// bench/gpu/report.py turns the JSON into the comparison table.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <type_traits>

#include "guarded.hpp"
#include "host_counters.hpp"
#include "moe/cuda.cuh"
#include "moe/cuda/hopper_grouped_gemm.cuh"

namespace {

using moe::Index;
using moe::cuda::check_cublas;
using moe::cuda::check_cuda;
using moe::cuda::CudaDevice;
using moe::cuda::Fp32Math;

constexpr std::uint64_t kLayerSeed = 1234;
constexpr std::uint64_t kInputSeed = 42;
constexpr int kFloorBatch = 10;            // floor calls per timed iteration
constexpr double kFloorMinTime = 0.1;      // seconds of (manual) time per floor repetition
constexpr double kExpertGemmMinTime = 0.02;  // the same for expert_gemm's rows (14 of them: ~0.2 s of wall time each)
constexpr int kMinWarmupRuns = 3;          // the first run sizes every buffer and picks cuBLAS kernels
constexpr double kMinWarmupSeconds = 0.1;  // and long enough for the clocks to settle
constexpr int kHostTimedCalls = 5;         // calls with their host calls timed, after the timed loop

cudaStream_t g_stream = nullptr;  // every benchmark runs on this stream (created in main)

struct Shape {
  const char* name;
  Index H, F, N, k, T;
  bool swiglu;

  Index rows() const { return T * k; }
  // The expert bank's forward FLOPs: GeluMLP [R,H]x[H,F] and [R,F]x[F,H]; SwiGLU [R,H]x[H,2F], [R,F]x[F,H].
  double forward_flops() const { return (swiglu ? 6.0 : 4.0) * double(rows()) * double(H) * double(F); }
  moe::LayerConfig config() const { return {.hidden = H, .ffn = F, .experts = N, .top_k = k}; }
  std::string label() const {
    return "H=" + std::to_string(H) + " F=" + std::to_string(F) + " N=" + std::to_string(N) +
           " k=" + std::to_string(k) + " T=" + std::to_string(T) + (swiglu ? " swiglu" : " gelu-mlp");
  }
};

const Shape kGpt2Large{"gpt2_T16384", 768, 3072, 8, 2, 16384, false};
const Shape kGpt2Small{"gpt2_T1024", 768, 3072, 8, 2, 1024, false};
const Shape kMixtral{"mixtral_T4096", 4096, 14336, 8, 2, 4096, true};

struct Precision {
  const char* name;
  Fp32Math math;  // ignored by the bf16 backend
};
const Precision kBF16{"bf16", Fp32Math::exact};
const Precision kFP32{"fp32", Fp32Math::exact};
const Precision kTF32{"tf32", Fp32Math::tf32};

template <class B>
B make_backend(const Precision& p) {
  return B(CudaDevice(g_stream, p.math));
}

// ---- timing ------------------------------------------------------------------------------------

class EventTimer {
 public:
  EventTimer() {
    check_cuda(cudaEventCreate(&start_), "cudaEventCreate");
    check_cuda(cudaEventCreate(&stop_), "cudaEventCreate");
  }
  ~EventTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  void start() { check_cuda(cudaEventRecord(start_, g_stream), "cudaEventRecord"); }
  // Seconds on the stream since start(); waits for the stream to get there.
  double stop() {
    check_cuda(cudaEventRecord(stop_, g_stream), "cudaEventRecord");
    check_cuda(cudaEventSynchronize(stop_), "cudaEventSynchronize");
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
    return double(ms) * 1e-3;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// Warm-up, then every iteration timed by events around `batch` calls of body; each iteration
// reports the time per call. Returns the mean seconds per call.
template <class Body>
double timed_loop(benchmark::State& state, int batch, Body&& body) {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  const auto seconds_since_start = [&] { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  for (int runs = 0; runs < kMinWarmupRuns || seconds_since_start() < kMinWarmupSeconds; ++runs) {
    body();
    check_cuda(cudaStreamSynchronize(g_stream), "cudaStreamSynchronize (warm-up)");
  }
  bench_gpu::profiled_once([&] { body(); });
  EventTimer timer;
  double total = 0;
  for (auto _ : state) {
    timer.start();
    for (int i = 0; i < batch; ++i) body();
    const double seconds = timer.stop() / batch;
    state.SetIterationTime(seconds);
    total += seconds;
  }
  check_cuda(cudaGetLastError(), "a kernel of the timed loop");
  return state.iterations() > 0 ? total / double(state.iterations()) : 0;
}

void set_counters(benchmark::State& state, const Shape& s, double seconds, double flops) {
  if (seconds <= 0) return;
  state.counters["tokens_per_s"] = double(s.T) / seconds;
  if (flops > 0) state.counters["TFLOP/s"] = flops / seconds / 1e12;
  state.SetLabel(s.label());
}

// A CUDA or library failure skips the benchmark with its message instead of ending the run (an
// out-of-memory on one shape should not hide the others); the exit status then says 1.
using bench_gpu::guarded;

// ---- the MoE layer -----------------------------------------------------------------------------

template <template <class> class Gate, template <class> class Experts, class B>
using Layer = moe::MoELayer<Gate, Experts, B>;

// lanes > 0: the device's side streams for the experts' products (CudaDevice::set_gemm_lanes);
// 0 keeps its default.
template <class B>
B make_backend(const Precision& p, int lanes) {
  B backend = make_backend<B>(p);
  if (lanes > 0) backend.device().set_gemm_lanes(lanes);
  return backend;
}

// kGrouped: the forward's experts from the routing plan (ExpertGemm::grouped: the Hopper grouped
// GEMM, no gather, no host sync); refused (the row fails) where not available.
template <class Layer, class Matrix>
void use_grouped_gemm(Layer& layer, const Matrix& x) {
  layer.backend().device().set_expert_gemm(moe::cuda::ExpertGemm::grouped);
  moe::check(layer.experts().can_infer_routed(layer.backend(), x),
             "the grouped GEMM does not run here (device code for sm_90a on an sm_90 GPU, tiles that fit the shape)");
}

template <template <class> class Gate, template <class> class Experts, class B, bool kForBackward = false,
          int kLanes = 0, bool kGrouped = false>
void bm_forward(benchmark::State& state, const Shape& s, const Precision& p) {
  guarded(state, [&] {
    Layer<Gate, Experts, B> layer(s.config(), kLayerSeed, {}, {}, make_backend<B>(p, kLanes));
    layer.collect_stats(false);  // statistics would copy the routing decisions to the host

    // N(0, 1) input: SelfRoute's logits (the last N coordinates) and the Linear router's N(0, 1/H)
    // projections spread the tokens evenly over the experts.
    typename B::Matrix x(s.T, s.H), y(s.T, s.H);
    layer.backend().fill_normal(x, 1.0, kInputSeed, 0);
    if constexpr (kGrouped) use_grouped_gemm(layer, x);
    moe::ForwardOptions options;
    options.for_backward = kForBackward;
    const auto forward = [&] { layer.forward_into(x, y, options); };
    const double seconds = timed_loop(state, 1, forward);
    set_counters(state, s, seconds, s.forward_flops());
    bench_gpu::time_host_calls(state, layer.backend().device(), forward, kHostTimedCalls);
  });
}

template <template <class> class Gate, template <class> class Experts, class B, int kLanes = 0, bool kGrouped = false>
void bm_forward_backward(benchmark::State& state, const Shape& s, const Precision& p) {
  guarded(state, [&] {
    Layer<Gate, Experts, B> layer(s.config(), kLayerSeed, {}, {}, make_backend<B>(p, kLanes));
    layer.collect_stats(false);
    typename B::Matrix x(s.T, s.H), y(s.T, s.H), dy(s.T, s.H), dx(s.T, s.H);
    layer.backend().fill_normal(x, 1.0, kInputSeed, 0);
    if constexpr (kGrouped) use_grouped_gemm(layer, x);
    layer.backend().fill_normal(dy, 1.0 / double(s.T), kInputSeed, 1);  // a mean loss's gradient scale
    // Parameter gradients accumulate over the iterations, as between two zero_grad() calls.
    const auto step = [&] {
      layer.forward_into(x, y);
      layer.backward_into(dy, dx);
    };
    const double seconds = timed_loop(state, 1, step);
    set_counters(state, s, seconds, 3 * s.forward_flops());
    bench_gpu::time_host_calls(state, layer.backend().device(), step, kHostTimedCalls);
  });
}

// ---- routing + dispatch: the SelfRoute forward without the expert bank --------------------------

// kGrouped: what the grouped forward (moe_fwd_grouped) does around its two products: route only
// (no gather, no wait for the offsets; the combine rides on the second product, where no capacity
// can drop a slot, else it runs here too).
template <class B, bool kGrouped = false>
void bm_routing_dispatch(benchmark::State& state, const Shape& s, const Precision& p) {
  guarded(state, [&] {
    using S = typename B::Scalar;
    B be = make_backend<B>(p);
    const moe::LayerConfig config = s.config();
    typename B::Matrix x(s.T, s.H), rows, y(s.T, s.H);
    be.fill_normal(x, 1.0, kInputSeed, 0);
    const moe::ConstMatrixView<S> input = x;
    const moe::ConstMatrixView<S> logits = input.col_block(s.H - s.N, s.N);  // SelfRoute: the last N coordinates
    typename B::Plan plan;
    typename B::template Vector<S> weights;
    const double seconds = timed_loop(state, 1, [&] {
      be.route(logits, config, plan, weights, !kGrouped);  // the per-expert path's ends by starting the offsets' host copy
      B::resize(rows, s.T * s.k, s.H);           // every slot's row, as the layer does: no allocation after warm-up
      if constexpr (kGrouped) {                  // the rows stand in for the grouped products' output
        if (!B::routed_sum_fits(plan, y)) be.combine(moe::ConstMatrixView<S>(rows), plan, weights, y);
        return;
      }
      be.gather_rows(input, plan, rows);         // queued before the wait, as in the layer
      const moe::Index R = B::expert_offsets(plan).back();  // the wait (the experts' products queue here)
      be.combine(moe::ConstMatrixView<S>(rows).row_block(0, R), plan, weights, y);  // the gathered rows stand in for the expert outputs
    });
    set_counters(state, s, seconds, 0);
  });
}

// ---- the dense cuBLAS floor --------------------------------------------------------------------

template <class S>
constexpr cudaDataType_t cuda_type() {
  if constexpr (std::is_same_v<S, moe::bfloat16>)
    return CUDA_R_16BF;
  else
    return CUDA_R_32F;
}

class CublasHandle {
 public:
  CublasHandle() {
    check_cublas(cublasCreate(&handle_), "cublasCreate");
    check_cublas(cublasSetStream(handle_, g_stream), "cublasSetStream");
  }
  ~CublasHandle() { cublasDestroy(handle_); }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  cublasHandle_t get() const { return handle_; }

 private:
  cublasHandle_t handle_ = nullptr;
};

// Row-major out[M, O] = in[M, I] W^T with W [O, I] (nn.Linear's layout), as the column-major
// product out^T = W in^T: the mapping the backend's own GEMMs use (moe/cuda/device.hpp), so the
// floor and the layer ask cuBLAS for the same kind of kernel.
template <class S>
void linear(cublasHandle_t handle, cublasComputeType_t compute, const S* in, const S* w, S* out, Index M, Index I,
            Index O) {
  const float alpha = 1, beta = 0;  // float scalars: the compute type is fp32 (or TF32) in every case
  const cudaDataType_t type = cuda_type<S>();
  check_cublas(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(O), int(M), int(I), &alpha, w, type, int(I), in,
                            type, int(I), &beta, out, type, int(O), compute, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx (floor)");
}

template <class B>
void bm_floor(benchmark::State& state, const Shape& s, const Precision& p) {
  guarded(state, [&] {
    using S = typename B::Scalar;
    const B be = make_backend<B>(p);  // only for its matrices and fill_normal
    const CublasHandle handle;
    const bool tf32 = !std::is_same_v<S, moe::bfloat16> && p.math == Fp32Math::tf32;  // as CudaDevice::gemm
    const cublasComputeType_t compute = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const Index R = s.rows(), H = s.H, F = s.F, F_in = s.swiglu ? 2 * F : F;
    // x [R, H] -> first [R, F_in] (W1 [F_in, H]); second's input [R, F] -> y [R, H] (W2 [H, F]).
    // GeluMLP's second GEMM reads the first's output; SwiGLU's reads a separate [R, F] matrix
    // (the silu(gate) * up the layer forms in between).
    typename B::Matrix x(R, H), w1(F_in, H), first(R, F_in), act(s.swiglu ? R : 0, F), w2(H, F), y(R, H);
    be.fill_normal(x, 1.0, kInputSeed, 10);
    be.fill_normal(w1, 0.02, kInputSeed, 11);
    be.fill_normal(w2, 0.02, kInputSeed, 12);
    if (s.swiglu) be.fill_normal(act, 1.0, kInputSeed, 13);
    const S* second_in = s.swiglu ? act.data() : first.data();
    const double seconds = timed_loop(state, kFloorBatch, [&] {
      linear<S>(handle.get(), compute, x.data(), w1.data(), first.data(), R, H, F_in);
      linear<S>(handle.get(), compute, second_in, w2.data(), y.data(), R, F, H);
    });
    set_counters(state, s, seconds, s.forward_flops());
  });
}

// ---- one expert's products alone, by layout and epilogue ---------------------------------------

enum class ExpertProduct { gelu_fwd, bias_fwd, dgelu_nn, dgelu_tn, plain_nn, plain_tn, dgelu_split };

struct ExpertGemmCase {
  const char* name;
  ExpertProduct product;
};
const ExpertGemmCase kExpertGemmCases[] = {
    {"gelu_fwd", ExpertProduct::gelu_fwd}, {"bias_fwd", ExpertProduct::bias_fwd}, {"dgelu_nn", ExpertProduct::dgelu_nn},
    {"dgelu_tn", ExpertProduct::dgelu_tn}, {"plain_nn", ExpertProduct::plain_nn}, {"plain_tn", ExpertProduct::plain_tn},
    {"dgelu_split", ExpertProduct::dgelu_split}};
// An expert's rows in a GPT-2-small step (8 x 1024 tokens, top-2, 8 experts, balanced) and in
// issue 5's T = 16384 layer.
const Index kExpertGemmRows[] = {2048, 4096};

void bm_expert_gemm(benchmark::State& state, ExpertProduct product, Index R) {
  guarded(state, [&] {
    using B = moe::cuda::BackendBF16;
    using S = B::Scalar;
    using moe::cuda::BlasOp;
    using moe::cuda::Epilogue;
    using moe::cuda::detail::Shape;
    const B be = make_backend<B>(kBF16);
    const Index H = kGpt2Large.H, F = kGpt2Large.F;
    // Weights in the layer's layouts (nn.Linear's [out, in]) and W2's transpose; inputs N(0, 1).
    B::Matrix x(R, H), w1(F, H), b1(1, F), act(R, F), pre(R, F), w2(H, F), w2t(F, H), b2(1, H), y(R, H), dy(R, H),
        din(R, F);
    be.fill_normal(x, 1.0, kInputSeed, 20);
    be.fill_normal(w1, 0.02, kInputSeed, 21);
    be.fill_normal(b1, 0.02, kInputSeed, 22);
    be.fill_normal(act, 1.0, kInputSeed, 23);
    be.fill_normal(pre, 1.0, kInputSeed, 24);
    be.fill_normal(w2, 0.02, kInputSeed, 25);
    be.fill_normal(w2t, 0.02, kInputSeed, 26);
    be.fill_normal(b2, 0.02, kInputSeed, 27);
    be.fill_normal(dy, 1.0, kInputSeed, 28);
    const auto& device = be.device();
    const auto v = [](B::Matrix& m) { return moe::MatrixView<S>(m); };
    const auto cv = [](B::Matrix& m) { return moe::ConstMatrixView<S>(moe::MatrixView<S>(m)); };
    const double seconds = timed_loop(state, kFloorBatch, [&] {
      switch (product) {
        case ExpertProduct::gelu_fwd:
          moe::cuda::detail::gemm_epilogue(device, v(act), cv(x), cv(w1), BlasOp::transpose,
                                           Epilogue::bias_gelu, b1.data(), v(pre), Shape::varies);
          break;
        case ExpertProduct::bias_fwd:
          moe::cuda::detail::gemm_epilogue(device, v(y), cv(act), cv(w2), BlasOp::transpose, Epilogue::bias,
                                           b2.data(), moe::MatrixView<S>{}, Shape::varies);
          break;
        case ExpertProduct::dgelu_nn:
        case ExpertProduct::dgelu_tn: {
          const bool tn = product == ExpertProduct::dgelu_tn;
          moe::cuda::detail::gemm_epilogue(device, v(din), cv(dy), tn ? cv(w2t) : cv(w2),
                                           tn ? BlasOp::transpose : BlasOp::none, Epilogue::dgelu,
                                           static_cast<const S*>(nullptr), v(pre), Shape::varies);
          break;
        }
        case ExpertProduct::plain_nn:
        case ExpertProduct::plain_tn:
        case ExpertProduct::dgelu_split: {
          const bool tn = product == ExpertProduct::plain_tn;
          moe::cuda::detail::gemm(device, v(din), cv(dy), BlasOp::none, tn ? cv(w2t) : cv(w2),
                                  tn ? BlasOp::transpose : BlasOp::none, false, Shape::varies);
          if (product == ExpertProduct::dgelu_split) be.gelu_backward(cv(pre), cv(din), v(din));
          break;
        }
      }
    });
    if (seconds > 0) {
      state.counters["TFLOP/s"] = 2.0 * double(R) * double(H) * double(F) / seconds / 1e12;
      state.counters["lt_fallbacks"] = double(device.lt_fallbacks());  // > 0: cuBLASLt declined, cuBLAS + a pass ran
    }
    state.SetLabel("R=" + std::to_string(R) + " H=" + std::to_string(H) + " F=" + std::to_string(F));
  });
}

// ---- the experts' products over a routed layer: one grouped launch against cuBLAS per expert ------

// The expert bank's two products at a shape, rows routed by SelfRoute on N(0, 1) input as in the
// layer (the real plan: its device offsets and slot_of_row):
//   first   act = gelu(x[token(r)] W1_e^T + b1_e), pre kept (SwiGLU: [gate | up] = x W_e^T, no bias)
//   second  y = act W2_e^T + b2_e (SwiGLU: no bias)
// Ways:
//   grouped_<BN>x<stages>[x<blocks>]  moe::cuda::grouped_gemm (wgmma, sm_90a): one launch, the rows
//                      gathered as they load (first), the offsets read on the device (no host copy)
//   cublas_experts     the layer's path today: gather_rows into the expert-sorted copy (first),
//                      then one cuBLASLt product per expert (host offsets) on the side streams
//   cublas_dense       one cuBLASLt product over all R rows with expert 0's weights, no gather:
//                      the same FLOPs with perfect batching (the product's floor)
//   grouped_128x4_combine  (second only) grouped_128x4 with the layer's combine in its epilogue
//                      (GroupedGemm::combine, as BasicBackend::routed_linear_forward sets it)
//   grouped_128x4_swiglu   (first, SwiGLU shapes only) grouped_128x4 making silu(gate) * up in its
//                      tiles (GroupedGemm::swiglu, BasicBackend::routed_swiglu_forward): no gate_up
enum class ProductWay { grouped_128x4, grouped_256x4, grouped_128x3x2, cublas_experts, cublas_dense, grouped_combine,
                        grouped_swiglu };
struct ProductWayCase {
  const char* name;
  ProductWay way;
};
const ProductWayCase kProductWays[] = {{"grouped_128x4", ProductWay::grouped_128x4},
                                       {"grouped_256x4", ProductWay::grouped_256x4},
                                       {"grouped_128x3x2", ProductWay::grouped_128x3x2},
                                       {"cublas_experts", ProductWay::cublas_experts},
                                       {"cublas_dense", ProductWay::cublas_dense},
                                       {"grouped_128x4_combine", ProductWay::grouped_combine},
                                       {"grouped_128x4_swiglu", ProductWay::grouped_swiglu}};

void bm_expert_product(benchmark::State& state, const Shape& s, bool first, ProductWay way) {
  guarded(state, [&] {
    using B = moe::cuda::BackendBF16;
    using S = B::Scalar;
    using moe::cuda::Epilogue;
    const B be = make_backend<B>(kBF16);
    const Index R = s.rows(), H = s.H, F = s.F, F_in = s.swiglu ? 2 * F : F;
    const Index K = first ? H : F, O = first ? F_in : H;
    const bool bias = !s.swiglu, gelu = first && !s.swiglu;
    B::Matrix x(s.T, H), rows(first ? R : 0, H), in(first ? 0 : R, F), w(s.N * O, K), b(s.N, O), out(R, O),
        pre(gelu ? R : 0, O);
    be.fill_normal(x, 1.0, kInputSeed, 30);
    be.fill_normal(in, 1.0, kInputSeed, 31);
    be.fill_normal(w, 0.02, kInputSeed, 32);
    be.fill_normal(b, 0.02, kInputSeed, 33);
    const moe::ConstMatrixView<S> input = x;
    B::Plan plan;
    B::Vector<S> weights;
    be.route(input.col_block(H - s.N, s.N), s.config(), plan, weights);
    const std::span<const Index> offsets = B::expert_offsets(plan);
    moe::check(offsets.back() == R, "bench expert products: a capacity dropped rows");
    if (first) be.gather_rows(input, plan, rows);  // the dense product's input (cublas_experts gathers again, timed)
    const std::vector<Index> dense{0, R};
    B::Matrix y(way == ProductWay::grouped_combine ? s.T : 0, H), act(way == ProductWay::grouped_swiglu ? R : 0, F);
    const auto cv = [](const B::Matrix& m) { return moe::ConstMatrixView<S>(m); };

    moe::cuda::GroupedGemm<S> g;
    g.a = first ? x.data() : in.data(), g.lda = K;
    g.gather = first ? plan.slot_of_row.data() : nullptr, g.gather_divisor = std::int32_t(s.k);
    g.offsets = plan.offsets.data(), g.groups = s.N, g.max_rows = R;
    g.w = w.data(), g.w_stride = O * K, g.bias = bias ? b.data() : nullptr, g.bias_stride = O;
    g.out = out.data(), g.ldc = O, g.aux = gelu ? pre.data() : nullptr, g.ldaux = O, g.n = O, g.k = K;
    g.epilogue = gelu ? Epilogue::bias_gelu : bias ? Epilogue::bias : Epilogue::none;
    const B::RoutedSum sum{&weights, y};

    const auto cublas = [&](std::span<const Index> at, moe::ConstMatrixView<S> a) {
      const moe::ConstMatrixView<S> weight = at.size() == 2 ? cv(w).row_block(0, O) : cv(w);
      if (gelu)
        be.grouped_linear_gelu_forward(a, at, weight, b.data(), pre, out);
      else
        be.grouped_linear_forward(a, at, weight, bias ? b.data() : nullptr, out);
    };
    const double seconds = timed_loop(state, 1, [&] {
      switch (way) {
        case ProductWay::grouped_128x4:
          moe::cuda::grouped_gemm<128, 4, 1>(be.device().stream(), g);
          break;
        case ProductWay::grouped_256x4:
          moe::cuda::grouped_gemm<256, 4, 1>(be.device().stream(), g);
          break;
        case ProductWay::grouped_128x3x2:
          moe::cuda::grouped_gemm<128, 3, 2>(be.device().stream(), g);
          break;
        case ProductWay::cublas_experts:
          if (first) be.gather_rows(input, plan, rows);
          cublas(offsets, first ? cv(rows) : cv(in));
          break;
        case ProductWay::cublas_dense:
          cublas(dense, first ? cv(rows) : cv(in));
          break;
        case ProductWay::grouped_combine:  // the backend's call: the same kernel (128 x 4) and arrival counts
          be.routed_linear_forward(cv(in), plan, false, cv(w), bias ? b.data() : nullptr, out, &sum);
          break;
        case ProductWay::grouped_swiglu:  // the backend's call: w is [N * 2F, H], each expert's gate rows then up rows
          be.routed_swiglu_forward(input, plan, true, cv(w), act);
          break;
      }
    });
    if (seconds > 0) state.counters["TFLOP/s"] = 2.0 * double(R) * double(K) * double(O) / seconds / 1e12;
    state.SetLabel(s.label() + (first ? " first product" : " second product"));
  });
}

// ---- registration ------------------------------------------------------------------------------

template <class Fn>
benchmark::internal::Benchmark* add(const std::string& what, const Shape& s, const Precision& p, Fn fn) {
  const std::string name = what + "/" + s.name + "/" + p.name;
  return benchmark::RegisterBenchmark(name.c_str(), [fn, &s, &p](benchmark::State& st) { fn(st, s, p); })
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

// Every benchmark of one (shape, precision). B: the backend; Experts: the shape's expert bank.
template <template <class> class Experts, class B>
void add_all(const Shape& s, const Precision& p) {
  add("moe_fwd", s, p, bm_forward<moe::SelfRoute, Experts, B>);
  add("moe_fwd_train", s, p, bm_forward<moe::SelfRoute, Experts, B, true>);
  add("moe_fwdbwd", s, p, bm_forward_backward<moe::SelfRoute, Experts, B>);
  add("moe_fwd_linear", s, p, bm_forward<moe::Linear, Experts, B>);
  add("floor_fwd", s, p, bm_floor<B>)->MinTime(kFloorMinTime);
  add("routing_dispatch", s, p, bm_routing_dispatch<B>);
  if (&p == &kBF16) {
    add("routing_grouped", s, p, bm_routing_dispatch<B, true>);
    add("moe_fwd_lanes1", s, p, bm_forward<moe::SelfRoute, Experts, B, false, 1>);
    add("moe_fwdbwd_lanes1", s, p, bm_forward_backward<moe::SelfRoute, Experts, B, 1>);
  }
}

void add_gpu_context() {
  int device = 0, runtime = 0, driver = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  check_cuda(cudaRuntimeGetVersion(&runtime), "cudaRuntimeGetVersion");
  check_cuda(cudaDriverGetVersion(&driver), "cudaDriverGetVersion");
  benchmark::AddCustomContext("gpu", prop.name);
  benchmark::AddCustomContext("gpu_sm", std::to_string(prop.major) + "." + std::to_string(prop.minor));
  benchmark::AddCustomContext("gpu_sms", std::to_string(prop.multiProcessorCount));
  benchmark::AddCustomContext("gpu_memory_gib", std::to_string(double(prop.totalGlobalMem) / double(1 << 30)));
  benchmark::AddCustomContext("cuda_runtime", std::to_string(runtime));
  benchmark::AddCustomContext("cuda_driver", std::to_string(driver));
  benchmark::AddCustomContext("cublas_header", std::to_string(CUBLAS_VERSION));
  benchmark::AddCustomContext("floor_batch", std::to_string(kFloorBatch));
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  using moe::cuda::Backend, moe::cuda::BackendBF16;
  for (const Shape* s : {&kGpt2Large, &kGpt2Small}) {
    add_all<moe::GeluMLP, BackendBF16>(*s, kBF16);
    add_all<moe::GeluMLP, Backend>(*s, kFP32);
    add_all<moe::GeluMLP, Backend>(*s, kTF32);
  }
  add_all<moe::SwiGLU, BackendBF16>(kMixtral, kBF16);
  for (const ExpertGemmCase& c : kExpertGemmCases)
    for (const Index R : kExpertGemmRows) {
      const std::string name = std::string("expert_gemm/") + c.name + "_R" + std::to_string(R) + "/bf16";
      const ExpertProduct product = c.product;
      benchmark::RegisterBenchmark(name.c_str(), [product, R](benchmark::State& st) { bm_expert_gemm(st, product, R); })
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond)
          ->MinTime(kExpertGemmMinTime);
    }

  // The Hopper grouped GEMM's rows last: a fault of a kernel that has not yet run on a GPU would
  // leave the CUDA context unusable for every benchmark after it.
  add("moe_fwd_grouped", kGpt2Large, kBF16, bm_forward<moe::SelfRoute, moe::GeluMLP, BackendBF16, false, 0, true>);
  add("moe_fwd_grouped", kGpt2Small, kBF16, bm_forward<moe::SelfRoute, moe::GeluMLP, BackendBF16, false, 0, true>);
  add("moe_fwd_grouped", kMixtral, kBF16, bm_forward<moe::SelfRoute, moe::SwiGLU, BackendBF16, false, 0, true>);
  for (const Shape* s : {&kGpt2Large, &kGpt2Small}) {
    add("moe_fwd_train_grouped", *s, kBF16, bm_forward<moe::SelfRoute, moe::GeluMLP, BackendBF16, true, 0, true>);
    add("moe_fwdbwd_grouped", *s, kBF16, bm_forward_backward<moe::SelfRoute, moe::GeluMLP, BackendBF16, 0, true>);
  }
  add("moe_fwd_train_grouped", kMixtral, kBF16, bm_forward<moe::SelfRoute, moe::SwiGLU, BackendBF16, true, 0, true>);
  add("moe_fwdbwd_grouped", kMixtral, kBF16, bm_forward_backward<moe::SelfRoute, moe::SwiGLU, BackendBF16, 0, true>);
  for (const Shape* s : {&kGpt2Large, &kGpt2Small, &kMixtral})
    for (const bool first : {true, false})
      for (const ProductWayCase& c : kProductWays) {
        if (first && c.way == ProductWay::grouped_combine) continue;  // the combine follows the second product
        if ((!first || !s->swiglu) && c.way == ProductWay::grouped_swiglu) continue;  // SwiGLU's first product only
        const std::string name =
            std::string("expert_product/") + (first ? "first/" : "second/") + c.name + "/" + s->name + "/bf16";
        const ProductWay way = c.way;
        benchmark::RegisterBenchmark(name.c_str(), [s, first, way](benchmark::State& st) { bm_expert_product(st, *s, first, way); })
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond)
            ->MinTime(kExpertGemmMinTime);
      }

  // Without a device the benchmarks still list (--benchmark_list_tests) and each one reports the
  // CUDA error it gets; the exit status 77 (skipped, as moe_cuda_tests') says the run measured nothing.
  const std::string no_device = moe::cuda::no_device_reason();
  const bool have_device = no_device.empty();
  if (have_device) {
    try {
      check_cuda(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking), "cudaStreamCreate");
      add_gpu_context();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_moe_cuda: %s\n", e.what());
      return 1;
    }
  } else {
    std::fprintf(stderr, "bench_moe_cuda: no usable CUDA device (%s): nothing can be measured\n", no_device.c_str());
  }

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (g_stream) cudaStreamDestroy(g_stream);
  return !have_device ? 77 : bench_gpu::any_failed ? 1 : 0;
}
