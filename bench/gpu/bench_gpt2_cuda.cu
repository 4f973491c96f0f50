// bench_gpt2_cuda: GPU training throughput of the GPT-2 MoE example at GPT-2-small scale (issue 6),
// the same trainer gpt2_moe --device cuda runs (examples/gpt2_moe/device_trainer.hpp).
//
// Model: gpt2::Config::gpt2_small() (V = 50257, context 1024, 12 layers, 12 heads, H = 768,
// F = 3072; MoE: N = 8 experts, top-2, in every layer). Batch: B = 8 sequences (the environment
// variable BATCH overrides it) of T = 1024 tokens, 8192 tokens per micro-batch, the ids
// bench/gpu/torch_gpt2_cuda.py uses: ids[i] = bits(42, 0, i) % V. ACCUMULATION = A micro-batches
// per optimizer step (default 1; gpt2_moe's --accumulation), the m-th reading ids [m B T, (m+1) B T):
// the paper's steps are ~0.5M tokens, and AdamW's fixed cost per step (521M parameters) then
// spreads over A times the tokens.
//
//   Train/<variant>/<precision>   variant self, linear (MoE FFN) or dense (GPT-2's MLP);
//                                 precision bf16 (fp32 master weights and optimizer state) or tf32
//   Train/self_dgelu_transposed/bf16
//                                 self with the device's DgeluWeights::transposed (moe/cuda/device.hpp):
//                                 the experts' backward through the GELU over W2's transposes (TN)
//   Train/self_grouped/bf16       self with the device's ExpertGemm::grouped: the experts' forward
//                                 products from the routing plan (the Hopper grouped GEMM; no host
//                                 wait in the forward), their backward per expert; fails where that
//                                 kernel is not built for the GPU
//   Peak/bf16_gemm                cuBLAS bf16 GEMM, 8192^3 on N(0, 1) operands, fp32 accumulation:
//                                 the matmul peak MFU is measured against, in the same process
//   Attention/<kernel>/bf16/<fwd|fwdbwd>
//                                 one layer's causal attention alone, fused (on-chip probabilities) or
//                                 materialized, forward or forward + backward (attention() below)
//
// One iteration is one full training step, as gpt2_moe's loop runs it (routing statistics off):
// zero_grad, A times forward (loss) and
// backward, clip_grad_norm(1.0) of the mean gradient, AdamW; wall-clock time with the GPU drained at the end of each
// step (the step's own syncs: the expert offsets per MoE layer, the loss, the gradient norm).
// Warm-up steps first (12, or WARMUP: every buffer is allocated in the first; afterwards nothing is), then 8 timed.
// The experts' products run on the device's default side streams (GEMM_LANES=n: n; 1: in order).
// Attention: the trainer's default (examples::kDefaultAttention, the stored probabilities of
// moe/cuda/nn/attention.hpp); ATTENTION=fused for moe/cuda/nn/fused_attention.hpp.
//
// Counters: tokens/s and step_ms from the median step (as the PyTorch peer's), step_ms_mean and
// step_ms_max beside them, flops_per_token (= 6 P_active + 6 V H + 12 L H T, the formula of
// torch_gpt2_cuda.py), tflops and mfu (against Peak/bf16_gemm, measured first), device_gib (GPU
// memory the trainer took: cudaMemGetInfo's use after the steps less its use before the trainer
// was built, so the CUDA context is not counted, cuBLAS's own workspaces are), peak_gib (the most
// the library's own allocations held at once: moe/cuda/memory_ledger.hpp, as torch's
// max_memory_allocated counts its tensors), loss,
// and for MoE max_expert_fraction (the busiest expert's share of a layer's choices in the last
// step, the worst layer). Then one more step, timed by phase and by kind of device call on the
// host (time_phases below).
//
// bench/gpu/run.sh runs it beside the PyTorch peer and bench/gpu/report_gpt2.py prints the table.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../../examples/gpt2_moe/device_trainer.hpp"
#include "guarded.hpp"
#include "host_counters.hpp"
#include "moe/cuda.cuh"

namespace {

using moe::Index;

constexpr Index kSeq = 1024;
constexpr std::uint64_t kDataSeed = 42;
// Steps before timing: the first steps load kernels lazily (CUDA's default module loading) and ask
// cuBLASLt for new shapes (an expert's row count moves between power-of-two buckets while routing
// settles), and cuBLAS picks kernels by the exact row counts of the experts' weight gradients, so a
// new count can still load a kernel steps later. On an H200 with 2 warm-up steps and 5 timed, the
// first variant timed (self) read 93 ms a step and the next (linear) 71 ms, with the same 58 ms of
// kernels in each; with 4 warm-up steps self still read 10 ms more than linear. A warm-up step
// costs under 0.1 s, so 12 by default (the environment variable WARMUP overrides it); the
// counters warmup_first_ms and warmup_last_ms show how far the last one had settled.
int warmup_steps() {
  const char* text = std::getenv("WARMUP");
  return text ? std::max(1, std::atoi(text)) : 12;
}

// The attention kernel: the trainer's default, or ATTENTION (fused or materialized) for a comparison.
examples::AttentionKernel attention_kernel() {
  const char* text = std::getenv("ATTENTION");
  return text ? examples::parse_attention(text) : examples::kDefaultAttention;
}

// Side streams for the experts' products (CudaDevice::set_gemm_lanes): GEMM_LANES, else the
// device's default. GEMM_LANES=1 runs them in order on the stream, for a comparison.
int gemm_lanes() {
  const char* text = std::getenv("GEMM_LANES");
  return text ? std::max(1, std::atoi(text)) : moe::cuda::CudaDevice::kDefaultGemmLanes;
}

Index batch_size() {
  const char* text = std::getenv("BATCH");
  return text ? std::max<Index>(1, std::atoll(text)) : 8;
}

Index accumulation() {
  const char* text = std::getenv("ACCUMULATION");
  return text ? std::max<Index>(1, std::atoll(text)) : 1;
}

bool gpu_available() { return moe::cuda::no_device_reason().empty(); }

// Model FLOPs per token (see the header).
double flops_per_token(const gpt2::Config& c, bool moe, bool linear_router, Index T) {
  const double H = double(c.hidden), F = double(c.ffn), L = double(c.layers);
  double per_layer = 4 * H * H + (moe ? double(c.top_k) * 2 * H * F : 2 * H * F);
  if (linear_router) per_layer += H * double(c.experts);
  return 6 * L * per_layer + 6 * double(c.vocab) * H + 12 * L * H * double(T);
}

double g_peak_tflops = 0;  // Peak/bf16_gemm's result, for the MFU of the training benchmarks

using bench_gpu::guarded;  // an error skips the benchmark with its message; the exit status then says 1

void peak_gemm(benchmark::State& state) {
  using moe::cuda::check_cublas, moe::cuda::check_cuda;
  constexpr int n = 8192, kCalls = 5;
  moe::cuda::DeviceArray<moe::bfloat16, moe::cuda::CudaDevice> a(Index(n) * n), b(Index(n) * n), c(Index(n) * n);
  // Random operands: zeros run faster (less switching power, higher clocks), which would flatter the peak.
  const moe::cuda::BackendBF16 fill{moe::cuda::CudaDevice()};
  fill.fill_normal(moe::MatrixView<moe::bfloat16>(a.data(), n, n), 1.0, 1, 0);
  fill.fill_normal(moe::MatrixView<moe::bfloat16>(b.data(), n, n), 1.0, 2, 0);
  cublasHandle_t handle;
  check_cublas(cublasCreate(&handle), "cublasCreate");
  const std::unique_ptr<cublasContext, cublasStatus_t (*)(cublasHandle_t)> owned(handle, cublasDestroy);
  const float alpha = 1, beta = 0;
  auto run = [&] {
    for (int i = 0; i < kCalls; ++i)
      check_cublas(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a.data(), CUDA_R_16BF, n, b.data(),
                                CUDA_R_16BF, n, &beta, c.data(), CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx (peak)");
  };
  run();
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  double best = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    run();
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    state.SetIterationTime(seconds);
    best = std::max(best, kCalls * 2.0 * double(n) * n * n / seconds / 1e12);
  }
  g_peak_tflops = std::max(g_peak_tflops, best);
  state.counters["tflops"] = best;
}

// One layer's causal self-attention at GPT-2 small's shape (B sequences of 1024 tokens, 768 wide, 12 heads), bf16:
// the fused kernel (moe/cuda/nn/fused_attention.hpp) or the materialised one (attention.hpp), forward alone or forward
// and backward, timed by CUDA events over kCalls calls. Counters: tflops (the causal half's products: 4 B heads T^2 hs
// / 2 forward, 2.5 times that backward) and cache_mib (what the layer keeps for its backward).
void attention(benchmark::State& state, bool fused, bool backward) {
  using S = moe::bfloat16;
  using moe::cuda::check_cuda;
  const gpt2::Config config = gpt2::Config::gpt2_small();
  const Index B = batch_size(), T = kSeq, C = config.hidden, heads = config.heads, hs = C / heads;
  constexpr int kCalls = 10;
  const moe::cuda::CudaDevice device(nullptr);
  const moe::cuda::BackendBF16 fill{device};
  moe::cuda::DeviceMatrix<S, moe::cuda::CudaDevice> qkv(B * T, 3 * C), out(B * T, C), dout(B * T, C),
      dqkv(B * T, 3 * C);
  fill.fill_normal(moe::MatrixView<S>(qkv.data(), B * T, 3 * C), 1.0, 3, 0);
  fill.fill_normal(moe::MatrixView<S>(dout.data(), B * T, C), 1.0, 4, 0);
  fill.fill(moe::MatrixView<S>(dqkv.data(), B * T, 3 * C), S(0.f));
  const Index cache = fused ? B * heads * T * 2 : B * heads * T * T;  // elements of S (the fused: a float per row)
  moe::cuda::DeviceArray<S, moe::cuda::CudaDevice> att(cache);
  const moe::ConstMatrixView<S> q(qkv.data(), B * T, 3 * C);
  const auto run = [&] {
    if (fused) {
      float* lse = reinterpret_cast<float*>(att.data());
      moe::cuda::nn::fused_attention_forward<S>(device, q, B, T, heads, true, moe::MatrixView<S>(out.data(), B * T, C), lse);
      if (backward)
        moe::cuda::nn::fused_attention_backward<S>(device, moe::ConstMatrixView<S>(dout.data(), B * T, C), q,
                                                   moe::ConstMatrixView<S>(out.data(), B * T, C), lse, B, T, heads, true,
                                                   moe::MatrixView<S>(dqkv.data(), B * T, 3 * C));
    } else {
      moe::cuda::nn::attention_forward<S>(device, q, B, T, heads, true, moe::MatrixView<S>(out.data(), B * T, C),
                                          att.data());
      if (backward)
        moe::cuda::nn::attention_backward<S>(device, moe::ConstMatrixView<S>(dout.data(), B * T, C), q, att.data(), B, T,
                                             heads, true, moe::MatrixView<S>(dqkv.data(), B * T, 3 * C));
    }
  };
  run();  // warm-up: kernels loaded, scratch grown
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  cudaEvent_t start, stop;
  check_cuda(cudaEventCreate(&start), "cudaEventCreate");
  check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
  for (auto _ : state) {
    check_cuda(cudaEventRecord(start, device.stream()), "cudaEventRecord");
    for (int i = 0; i < kCalls; ++i) run();
    check_cuda(cudaEventRecord(stop, device.stream()), "cudaEventRecord");
    check_cuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    state.SetIterationTime(double(ms) / 1e3 / kCalls);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  const double forward_flops = 4.0 * double(B * heads) * double(T) * double(T) * double(hs) / 2;
  state.counters["tflops"] = benchmark::Counter((backward ? 3.5 : 1.0) * forward_flops / 1e12,
                                                benchmark::Counter::kIsIterationInvariantRate);
  state.counters["cache_mib"] = double(cache) * sizeof(S) / (1 << 20);
}

// A training step as gpt2_moe's loop takes it, in named phases (time_phases times each).
using Phase = std::pair<const char*, std::function<void()>>;

// One more step with its phases timed twice: on the host (until the call returns) and on the
// device (events on the stream between the calls): <phase>_host_ms and <phase>_gpu_ms. A phase
// whose device span is well over its kernels' time (bench/gpu/profile.sh) is one where the GPU
// waited on the host; a phase whose host time is well over its device span is one whose launches
// or syncs cost more than its kernels.
// The same step's host time in the device's calls, by kind (moe/cuda/host_times.hpp):
// host_<kind>_calls, host_<kind>_ms and host_<kind>_max_ms (the longest call: a kernel loaded on
// its first launch, a new shape's cuBLASLt heuristic), and host_calls_ms, their sum. Waits are
// the GPU's lead over the host; the step's host time less host_calls_ms is the model's own code.
void time_phases(benchmark::State& state, const std::vector<Phase>& phases, moe::cuda::HostCallTimes& times) {
  using moe::cuda::check_cuda;
  using Clock = std::chrono::steady_clock;
  const std::size_t n = phases.size();
  std::vector<cudaEvent_t> events(n + 1);
  for (cudaEvent_t& e : events) check_cuda(cudaEventCreate(&e), "cudaEventCreate");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  std::vector<double> host_ms(n);
  times.reset();
  times.enable(true);
  check_cuda(cudaEventRecord(events[0], nullptr), "cudaEventRecord");
  for (std::size_t i = 0; i < n; ++i) {
    const auto start = Clock::now();
    phases[i].second();
    check_cuda(cudaEventRecord(events[i + 1], nullptr), "cudaEventRecord");
    host_ms[i] = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  }
  times.enable(false);
  check_cuda(cudaEventSynchronize(events[n]), "cudaEventSynchronize");
  bench_gpu::add_host_call_counters(state, times);
  for (std::size_t i = 0; i < n; ++i) {
    float gpu_ms = 0;
    check_cuda(cudaEventElapsedTime(&gpu_ms, events[i], events[i + 1]), "cudaEventElapsedTime");
    // A phase that runs once per micro-batch (forward, backward) adds up over the step.
    state.counters[std::string(phases[i].first) + "_host_ms"].value += host_ms[i];
    state.counters[std::string(phases[i].first) + "_gpu_ms"].value += gpu_ms;
  }
  for (cudaEvent_t e : events) cudaEventDestroy(e);
}

// A device setting a Train row changes from its default.
enum class DeviceSetting { none, dgelu_transposed, grouped };

void train(benchmark::State& state, const std::string& variant, gpt2::Precision precision, DeviceSetting setting) {
  const gpt2::Config config = gpt2::Config::gpt2_small();
  const Index B = batch_size(), T = kSeq, A = accumulation();
  const std::size_t memory_before = moe::cuda::CudaDevice::memory_in_use();
  moe::cuda::CudaDevice::reset_memory_peak();  // the last row's trainer is gone: its peak with it
  const auto math = precision == gpt2::Precision::tf32 ? moe::cuda::Fp32Math::tf32 : moe::cuda::Fp32Math::exact;
  const moe::cuda::CudaDevice device(nullptr, math);  // copies share its context: host_times() sees the trainer's calls
  device.set_gemm_lanes(gemm_lanes());
  if (setting == DeviceSetting::dgelu_transposed) device.set_dgelu_weights(moe::cuda::DgeluWeights::transposed);
  if (setting == DeviceSetting::grouped) {
    moe::check(moe::cuda::CudaDevice::grouped_gemm_supports<moe::bfloat16>(), "the grouped GEMM does not run here (device code for sm_90a on an sm_90 GPU)");
    device.set_expert_gemm(moe::cuda::ExpertGemm::grouped);
  }
  std::unique_ptr<gpt2::Trainer> trainer = gpt2::make_device_trainer(variant, config, {}, precision, device, attention_kernel());
  // As gpt2_moe's loop: statistics would sync once per MoE layer (the dense model has none).
  if (trainer->is_moe()) trainer->collect_routing_stats(false);

  std::vector<std::int32_t> tokens, targets;
  for (Index i = 0; i <= A * B * T; ++i)
    tokens.push_back(std::int32_t(moe::random::bits(kDataSeed, 0, std::uint64_t(i)) % std::uint64_t(config.vocab)));
  targets.assign(tokens.begin() + 1, tokens.end());
  tokens.pop_back();
  auto micro = [&](const std::vector<std::int32_t>& ids, Index m) {
    return std::span<const std::int32_t>(ids).subspan(std::size_t(m * B * T), std::size_t(B * T));
  };

  double loss_sum = 0, loss = 0;
  std::vector<Phase> phases = {{"zero_grad", [&] { trainer->zero_grad(), loss_sum = 0; }}};
  for (Index m = 0; m < A; ++m) {
    phases.push_back({"forward", [&, m] { loss_sum += trainer->forward(micro(tokens, m), micro(targets, m), B, T); }});
    phases.push_back({"backward", [&] { trainer->backward(); }});
  }
  // The mean over the micro-batches' gradients, as gpt2_moe's loop (examples/gpt2_moe/train.hpp).
  phases.push_back({"clip", [&] { trainer->prepare_gradients(1.0f / float(A), 1.0), loss = loss_sum / double(A); }});
  phases.push_back({"adamw", [&] { trainer->optimizer_step(6e-4); }});
  auto step = [&] {
    for (const Phase& phase : phases) phase.second();
    moe::cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  };
  std::vector<double> warmup_ms;
  for (int i = 0, n = warmup_steps(); i < n; ++i) {
    const auto start = std::chrono::steady_clock::now();
    step();
    warmup_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  bench_gpu::profiled_once(step);
  std::vector<double> seconds;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    step();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    state.SetIterationTime(s);
    seconds.push_back(s);
  }
  // The median step, as torch_gpt2_cuda.py reports its peer's: a step that loads a kernel for the
  // first time (a new expert row-count bucket) stalls, and the mean would carry that one-off.
  if (seconds.empty()) return;
  std::sort(seconds.begin(), seconds.end());
  const std::size_t n = seconds.size();
  const double median = n % 2 ? seconds[n / 2] : (seconds[n / 2 - 1] + seconds[n / 2]) / 2;
  double total = 0;
  for (const double s : seconds) total += s;
  const double tokens_per_step = double(A * B * T);
  const double tokens_per_s = tokens_per_step / median;
  const double flops = flops_per_token(config, trainer->is_moe(), variant == "linear", T);
  state.counters["tokens/s"] = tokens_per_s;
  state.counters["step_ms"] = median * 1e3;
  state.counters["step_ms_mean"] = total / double(n) * 1e3;
  state.counters["step_ms_max"] = seconds.back() * 1e3;
  state.counters["warmup_first_ms"] = warmup_ms.front();
  state.counters["warmup_last_ms"] = warmup_ms.back();
  state.counters["flops_per_token"] = flops;
  state.counters["tflops"] = tokens_per_s * flops / 1e12;
  if (g_peak_tflops > 0) state.counters["mfu"] = tokens_per_s * flops / 1e12 / g_peak_tflops;
  state.counters["device_gib"] = double(moe::cuda::CudaDevice::memory_in_use() - memory_before) / double(1 << 30);
  state.counters["peak_gib"] = double(moe::cuda::CudaDevice::memory_use().peak) / double(1 << 30);
  state.counters["loss"] = loss;
  state.counters["batch"] = double(B);
  state.counters["accumulation"] = double(A);
  time_phases(state, phases, device.host_times());  // after the loss counter: this extra step changes `loss`
  if (trainer->is_moe()) {
    // The last step's routing: one more forward with statistics on.
    trainer->reset_routing_stats();
    trainer->collect_routing_stats(true);
    trainer->forward(micro(tokens, 0), micro(targets, 0), B, T);
    double busiest = 0;
    for (Index l = 0; l < config.layers; ++l) busiest = std::max(busiest, trainer->routing_stats(l).max_fraction());
    state.counters["max_expert_fraction"] = busiest;
  }
}


void BM_PeakGemm(benchmark::State& state) {
  if (!gpu_available()) {
    state.SkipWithError("no CUDA device on this machine");
    return;
  }
  guarded(state, [&] { peak_gemm(state); });
}

void BM_Attention(benchmark::State& state, bool fused, bool backward) {
  if (!gpu_available()) {
    state.SkipWithError("no CUDA device on this machine");
    return;
  }
  guarded(state, [&] { attention(state, fused, backward); });
}

void BM_Train(benchmark::State& state, std::string variant, gpt2::Precision precision, DeviceSetting setting) {
  if (!gpu_available()) {
    state.SkipWithError("no CUDA device on this machine");
    return;
  }
  guarded(state, [&] { train(state, variant, precision, setting); });
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::RegisterBenchmark("Peak/bf16_gemm", BM_PeakGemm)->UseManualTime()->Unit(benchmark::kMillisecond)
      ->Iterations(10);
  for (const bool fused : {true, false})
    for (const bool backward : {false, true})
      benchmark::RegisterBenchmark((std::string("Attention/") + (fused ? "fused" : "materialized") + "/bf16/" +
                                    (backward ? "fwdbwd" : "fwd")).c_str(),
                                   BM_Attention, fused, backward)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(5);
  for (const auto& [precision, name] : {std::pair{gpt2::Precision::bf16, "bf16"}, std::pair{gpt2::Precision::tf32, "tf32"}})
    for (const char* variant : {"self", "linear", "dense"})
      benchmark::RegisterBenchmark((std::string("Train/") + variant + "/" + name).c_str(), BM_Train, std::string(variant),
                                   precision, DeviceSetting::none)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(8);
  benchmark::RegisterBenchmark("Train/self_dgelu_transposed/bf16", BM_Train, std::string("self"), gpt2::Precision::bf16,
                               DeviceSetting::dgelu_transposed)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond)
      ->Iterations(8);
  // Last: a fault of the grouped kernel would leave the context unusable for every row after it.
  benchmark::RegisterBenchmark("Train/self_grouped/bf16", BM_Train, std::string("self"), gpt2::Precision::bf16,
                               DeviceSetting::grouped)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond)
      ->Iterations(8);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  // Without a device each benchmark reports the error and the exit status is 77 (skipped, as moe_cuda_tests'):
  // the binary starts (bench/gpu/run.sh checks that) but measured nothing.
  const std::string no_device = moe::cuda::no_device_reason();
  const bool have_device = no_device.empty();
  if (have_device) {  // the GPU's name in the JSON's context, for report_gpt2.py's header
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) benchmark::AddCustomContext("gpu", prop.name);
    benchmark::AddCustomContext("gemm_lanes", std::to_string(gemm_lanes()));
    benchmark::AddCustomContext("attention", attention_kernel() == examples::AttentionKernel::fused ? "fused" : "materialized");
  }
  if (!have_device)
    std::fprintf(stderr, "bench_gpt2_cuda: no usable CUDA device (%s): nothing can be measured\n", no_device.c_str());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return !have_device ? 77 : bench_gpu::any_failed ? 1 : 0;
}
