// bench_moe_cpu: the CPU backend's MoE layer against a dense floor, fp32, 2 threads.
//
// Shapes: GPT-2 (H=768, F=3072, N=8, k=2, T=2048) and small (H=128, F=512, N=8, k=2, T=8192).
//
//   Floor/<H>                         the dense floor: ONE expert's two GEMMs + bias + GELU over all
//                                     T*k rows (the MoE forward's FLOPs with perfect batching), done
//                                     by the faster of Eigen's own multithreaded product and
//                                     moe::cpu::run_gemm (the label says which)
//   Forward/<Gate>/<H>                MoELayer<Gate, GeluMLP, cpu::Backend>::forward
//   ForwardBackward/<Gate>/<H>        forward + backward
//   Routing/SelfRoute/<H>             gate + top-k + softmax + dispatch (backend.route on the
//                                     SelfRoute logits view): counter share_of_forward
//   ForwardNonExpert/SelfRoute/<H>    (information) every forward step except the expert bank:
//                                     input copy, route, combine
//
// Counters: GFLOP/s with the model FLOPs (forward = 2 GEMMs over T*k rows = 4*T*k*H*F,
// forward+backward = 3x that) and ratio_to_floor = time per iteration / floor time (floor_ms).
// At startup each shape picks its floor's implementation (median of several runs of each, see the
// context); the floor time is that implementation's median of 3 runs just after each benchmark.
//
// Timings are wall-clock (UseRealTime): the work runs on OpenMP threads. The GPT-2-shape
// benchmarks run a fixed number of iterations (a forward takes ~0.3 s); the small shape follows
// --benchmark_min_time. With --benchmark_repetitions each benchmark also reports a "min"
// aggregate (its fastest repetition), useful on a machine shared with other work. The ratio and
// share counters of that aggregate are those of the fastest repetition; its GFLOP/s is the
// smallest of the repetitions' (every counter's aggregate is taken on its own).
//
// bench/run_cpu.sh builds and runs this, runs the PyTorch peer and prints the comparison.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include <moe/moe.hpp>

namespace {

using moe::Index;
using Backend = moe::cpu::Backend;
using Scalar = Backend::Scalar;
using Matrix = Backend::Matrix;
using Clock = std::chrono::steady_clock;

constexpr int kThreads = 2;
constexpr std::uint64_t kLayerSeed = 1234;
constexpr std::uint64_t kInputSeed = 42;

struct Shape {
  const char* name;
  Index H, F, N, k, T;
  // Iterations per benchmark run for the slow shape (0: let --benchmark_min_time decide).
  int forward_iterations, forward_backward_iterations, floor_iterations;

  Index rows() const { return T * k; }
  double forward_flops() const { return 2.0 * 2.0 * double(T * k) * double(H) * double(F); }
  moe::LayerConfig config() const { return {.hidden = H, .ffn = F, .experts = N, .top_k = k}; }
  std::string tag() const { return std::to_string(H); }
};

// Each GPT-2-shape forward takes ~0.3 s on 2 cores, so a few iterations suffice there.
const Shape kShapes[] = {
    {"gpt2", 768, 3072, 8, 2, 2048, 4, 2, 4},
    {"small", 128, 512, 8, 2, 8192, 0, 0, 0},
};

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

Matrix normal_matrix(Index rows, Index cols, double std_dev, std::uint64_t seed, std::uint64_t stream) {
  Matrix m(rows, cols);
  Backend(kThreads).fill_normal(m, std_dev, seed, stream);
  return m;
}

// The layer input: N(0, 1), so SelfRoute's logits (the last N coordinates) spread the tokens
// evenly over the experts, as do the Linear gate's N(0, 1/H) projections.
Matrix make_input(const Shape& s) { return normal_matrix(s.T, s.H, 1.0, kInputSeed, 0); }

// ---- the dense floor -----------------------------------------------------------------------------

// One expert's weights over all T*k rows: Y = gelu(X W1^T + b1) W2^T + b2.
struct Floor {
  Matrix x, w1, b1, w2, b2, a, y;
  explicit Floor(const Shape& s)
      : x(normal_matrix(s.rows(), s.H, 1.0, kInputSeed, 1)),
        w1(normal_matrix(s.F, s.H, 0.02, kInputSeed, 2)),
        b1(normal_matrix(1, s.F, 0.02, kInputSeed, 3)),
        w2(normal_matrix(s.H, s.F, 0.02, kInputSeed, 4)),
        b2(normal_matrix(1, s.H, 0.02, kInputSeed, 5)),
        a(s.rows(), s.F),
        y(s.rows(), s.H) {}
};

// m[r] = gelu(m[r] + bias) (tanh form), or m[r] += bias: one fused pass, rows split over the threads.
template <bool Gelu>
void add_bias_rows(Matrix& m, const Matrix& bias) {
  const Index cols = m.cols();
  const auto b = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>(bias.data(), cols);
  moe::cpu::parallel_chunks(kThreads, Index(m.rows()), 16, [&](Index begin, Index end) {
    for (Index r = begin; r < end; ++r) {
      auto v = Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>>(m.row(r).data(), cols);
      v += b;
      if constexpr (Gelu) {
        const Scalar scale = Scalar(moe::activation::kGeluScale), cubic = Scalar(moe::activation::kGeluCubic);
        v = Scalar(0.5) * v * (Scalar(1) + (scale * (v + cubic * v.cube())).tanh());
      }
    }
  });
}

// Eigen's own multithreaded GEMM (Eigen::setNbThreads(2)), then a fused parallel bias+GELU pass.
void floor_eigen(Floor& f) {
  f.a.noalias() = f.x * f.w1.transpose();
  add_bias_rows<true>(f.a, f.b1);
  f.y.noalias() = f.a * f.w2.transpose();
  add_bias_rows<false>(f.y, f.b2);
}

// moe::cpu::run_gemm (bias added per tile), the backend's GELU.
void floor_run_gemm(Floor& f) {
  using moe::cpu::Gemm, moe::cpu::Op;
  const Backend be(kThreads);
  moe::cpu::run_gemm(Gemm<Scalar>{f.a, f.x, Op::none, f.w1, Op::transpose, false, f.b1.data()}, kThreads);
  be.gelu_forward(f.a, f.a);
  moe::cpu::run_gemm(Gemm<Scalar>{f.y, f.a, Op::none, f.w2, Op::transpose, false, f.b2.data()}, kThreads);
}

struct FloorTime {
  double eigen = 0, run_gemm = 0;  // startup medians, seconds
  bool eigen_wins() const { return eigen <= run_gemm; }
  double best() const { return std::min(eigen, run_gemm); }
  const char* impl() const { return eigen_wins() ? "eigen-mt" : "run_gemm"; }
};
std::map<Index, FloorTime> g_floor;  // by H

// Median of `runs` timed runs of each implementation, interleaved, after one warm-up each.
FloorTime measure_floor(const Shape& s, int runs) {
  Floor f(s);
  floor_eigen(f);
  floor_run_gemm(f);
  std::vector<double> te, tg;
  for (int i = 0; i < runs; ++i) {
    auto t0 = Clock::now();
    floor_eigen(f);
    benchmark::DoNotOptimize(f.y.data());
    te.push_back(seconds_since(t0));
    t0 = Clock::now();
    floor_run_gemm(f);
    benchmark::DoNotOptimize(f.y.data());
    tg.push_back(seconds_since(t0));
  }
  return {median(te), median(tg)};
}

// ---- helpers shared by the benchmarks ------------------------------------------------------------

// Times the body of every iteration; returns the mean seconds per iteration.
template <class Body>
double timed_loop(benchmark::State& state, Body&& body) {
  double total = 0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    body();
    total += seconds_since(t0);
  }
  return state.iterations() ? total / double(state.iterations()) : 0;
}

// The floor again, just after a benchmark's loop: the median of 3 runs of the implementation that
// won at startup. A shared VM's speed drifts by 10-20% over minutes (bench/RESULTS.md,
// 2026-12-06 17:08), so a ratio against the startup floor alone moved with the drift.
double floor_seconds_now(const Shape& s) {
  const FloorTime& floor = g_floor.at(s.H);
  Floor f(s);
  const auto run = floor.eigen_wins() ? floor_eigen : floor_run_gemm;
  run(f);
  std::vector<double> t;
  for (int i = 0; i < 3; ++i) {
    const auto t0 = Clock::now();
    run(f);
    benchmark::DoNotOptimize(f.y.data());
    t.push_back(seconds_since(t0));
  }
  return median(t);
}

void set_counters(benchmark::State& state, const Shape& s, double seconds, double flops) {
  if (flops > 0) state.counters["GFLOP/s"] = flops / seconds / 1e9;
  const double floor = floor_seconds_now(s);
  state.counters["ratio_to_floor"] = seconds / floor;
  state.counters["floor_ms"] = floor * 1e3;
}

// SelfRoute forward times per iteration (one per run of Forward/SelfRoute/<H>), by H: the
// denominator of Routing's share_of_forward.
std::map<Index, std::vector<double>> g_selfroute_forward;

template <template <class> class Gate>
using Layer = moe::MoELayer<Gate, moe::GeluMLP, Backend>;

template <template <class> class Gate>
Layer<Gate> make_layer(const Shape& s) {
  return Layer<Gate>(s.config(), kLayerSeed, {}, {}, Backend(kThreads));
}

double selfroute_forward_seconds(const Shape& s) {
  auto& recorded = g_selfroute_forward[s.H];
  if (recorded.empty()) {  // Forward/SelfRoute was filtered out: measure it here
    auto layer = make_layer<moe::SelfRoute>(s);
    const Matrix x = make_input(s);
    Matrix y(s.T, s.H);
    layer.forward_into(x, y);
    std::vector<double> t;
    for (int i = 0; i < 3; ++i) {
      const auto t0 = Clock::now();
      layer.forward_into(x, y);
      t.push_back(seconds_since(t0));
    }
    recorded.push_back(median(t));
  }
  return median(recorded);
}

// ---- the benchmarks -----------------------------------------------------------------------------

void BM_Floor(benchmark::State& state, const Shape& s) {
  const FloorTime& floor = g_floor.at(s.H);
  Floor f(s);
  const auto run = floor.eigen_wins() ? floor_eigen : floor_run_gemm;
  run(f);  // warm-up
  const double seconds = timed_loop(state, [&] {
    run(f);
    benchmark::DoNotOptimize(f.y.data());
    benchmark::ClobberMemory();
  });
  set_counters(state, s, seconds, s.forward_flops());
  state.counters["floor_eigen_ms"] = floor.eigen * 1e3;
  state.counters["floor_run_gemm_ms"] = floor.run_gemm * 1e3;
  state.SetLabel(std::string(floor.impl()) + " (faster at startup; used as the floor)");
}

template <template <class> class Gate>
void BM_Forward(benchmark::State& state, const Shape& s) {
  auto layer = make_layer<Gate>(s);
  const Matrix x = make_input(s);
  Matrix y(s.T, s.H);
  layer.forward_into(x, y);  // warm-up: sizes every buffer
  const double seconds = timed_loop(state, [&] {
    layer.forward_into(x, y);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  });
  set_counters(state, s, seconds, s.forward_flops());
  if constexpr (std::is_same_v<Gate<Backend>, moe::SelfRoute<Backend>>) g_selfroute_forward[s.H].push_back(seconds);
}

template <template <class> class Gate>
void BM_ForwardBackward(benchmark::State& state, const Shape& s) {
  auto layer = make_layer<Gate>(s);
  const Matrix x = make_input(s);
  const Matrix dy = normal_matrix(s.T, s.H, 1.0 / double(s.T), kInputSeed, 6);
  Matrix y(s.T, s.H), dx(s.T, s.H);
  layer.forward_into(x, y);  // warm-up
  layer.backward_into(dy, dx);
  const double seconds = timed_loop(state, [&] {
    layer.forward_into(x, y);
    layer.backward_into(dy, dx);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  });
  set_counters(state, s, seconds, 3 * s.forward_flops());
}

// The routing alone: SelfRoute's logits view + backend.route (top-k, softmax, dispatch).
void BM_Routing(benchmark::State& state, const Shape& s) {
  const moe::LayerConfig config = s.config();
  Backend be(kThreads);
  moe::SelfRoute<Backend> gate(be, config, kLayerSeed, {});
  const Matrix x = make_input(s);
  Backend::Plan plan;
  std::vector<Scalar> weights;
  be.route(gate.forward(be, x), config, plan, weights);  // warm-up
  const double seconds = timed_loop(state, [&] {
    be.route(gate.forward(be, x), config, plan, weights);
    benchmark::DoNotOptimize(weights.data());
    benchmark::ClobberMemory();
  });
  const double forward = selfroute_forward_seconds(s);
  set_counters(state, s, seconds, 0);
  state.counters["share_of_forward"] = seconds / forward;
}

// Every forward step but the expert bank: the layer's input copy, routing, combine. (The experts'
// first product reads the input's rows through the plan: there is no gather in the forward.)
void BM_ForwardNonExpert(benchmark::State& state, const Shape& s) {
  const moe::LayerConfig config = s.config();
  Backend be(kThreads);
  moe::SelfRoute<Backend> gate(be, config, kLayerSeed, {});
  const Matrix x = make_input(s);
  Matrix input(s.T, s.H), y(s.T, s.H), rows;
  Backend::Plan plan;
  std::vector<Scalar> weights;
  be.route(gate.forward(be, x), config, plan, weights);
  Backend::resize(rows, Backend::expert_offsets(plan).back(), s.H);
  be.gather_rows(x, plan, rows);  // untimed: these rows stand in for the expert outputs
  auto step = [&] {
    be.copy(x, input);
    be.route(gate.forward(be, input), config, plan, weights);
    be.combine(rows, plan, weights, y);
  };
  step();
  const double seconds = timed_loop(state, [&] {
    step();
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  });
  const double forward = selfroute_forward_seconds(s);
  set_counters(state, s, seconds, 0);
  state.counters["share_of_forward"] = seconds / forward;
}

template <class Fn>
benchmark::internal::Benchmark* add(const std::string& name, const Shape& s, int iterations, Fn fn) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), [fn, &s](benchmark::State& st) { fn(st, s); });
  b->UseRealTime()->Unit(benchmark::kMillisecond);
  if (iterations > 0) b->Iterations(iterations);
  // With --benchmark_repetitions: the best repetition too, an estimate of the uncontended time
  // on a machine shared with other work (mean, median and stddev come by default).
  b->ComputeStatistics("min", [](const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); });
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  Eigen::setNbThreads(kThreads);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

#if defined(_OPENMP)
  const bool openmp = true;
#else
  const bool openmp = false;
#endif
  benchmark::AddCustomContext("moe_threads", std::to_string(kThreads));
  benchmark::AddCustomContext("eigen_threads", std::to_string(Eigen::nbThreads()));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("openmp", openmp ? "yes" : "no (everything runs on one thread)");

  // The floor, once per shape: median of several runs of each implementation.
  for (const Shape& s : kShapes) {
    const FloorTime t = measure_floor(s, s.floor_iterations > 0 ? 5 : 9);
    g_floor[s.H] = t;
    char text[200];
    std::snprintf(text, sizeof text, "%s: eigen-mt %.3f ms, run_gemm %.3f ms (startup medians) -> floor = %s %.3f ms",
                  s.name, t.eigen * 1e3, t.run_gemm * 1e3, t.impl(), t.best() * 1e3);
    benchmark::AddCustomContext("floor_" + s.tag(), text);
  }

  for (const Shape& s : kShapes) {
    const std::string h = "/" + s.tag();
    add("Floor" + h, s, s.floor_iterations, BM_Floor);
    add("Forward/SelfRoute" + h, s, s.forward_iterations, BM_Forward<moe::SelfRoute>);
    add("Forward/Linear" + h, s, s.forward_iterations, BM_Forward<moe::Linear>);
    add("ForwardBackward/SelfRoute" + h, s, s.forward_backward_iterations, BM_ForwardBackward<moe::SelfRoute>);
    add("ForwardBackward/Linear" + h, s, s.forward_backward_iterations, BM_ForwardBackward<moe::Linear>);
    add("Routing/SelfRoute" + h, s, 0, BM_Routing);
    add("ForwardNonExpert/SelfRoute" + h, s, 0, BM_ForwardNonExpert);
  }

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
