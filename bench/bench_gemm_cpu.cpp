// bench_gemm_cpu: the CPU float GEMM (moe/cpu/gemm.hpp) on one thread, against Eigen's own
// single-threaded product on the same operands, on the products the MoE layer issues per expert.
//
// Shapes: one expert's block of 512 rows (T = 2048 tokens, k = 2, N = 8) for GPT-2 small
// (H = 768, F = 3072) and the example's small config (H = 128, F = 512); weights are stored
// [out, in] as the backends keep them:
//   fc / proj            forward, C = X W^T + b          (B transposed: packed)
//   fc.dX / proj.dX      backward, dX = dY W             (B read row-major, one weight row apart)
//   fc.dW / proj.dW      backward, dW += dY^T X          (A transposed, accumulating)
// plus attention's probabilities times values for one 32-row block of GPT-2 (T = 1024, hs = 64,
// rows of qkv 2304 apart) and a ViT-Tiny-like projection (197 x 192 x 192).
//
//   Kernel/<shape>   moe::cpu::run_gemm(..., 1 thread): GFLOP/s, and speedup_vs_eigen = Eigen's
//                    time (median of 5 runs just before the loop, same operands) / this time
//   Eigen/<shape>    C.noalias() (+)= op(A) op(B) (+ bias pass), Eigen::setNbThreads(1)
//
//   build-bench/bench/bench_gemm_cpu --benchmark_repetitions=3
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include <moe/cpu/gemm.hpp>
#include <moe/random.hpp>

namespace {

using moe::Index;
using moe::cpu::Gemm;
using moe::cpu::Op;
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Clock = std::chrono::steady_clock;

struct Shape {
  std::string name;
  Index m, n, depth;
  Op op_a, op_b;
  bool accumulate, bias;
  Index b_stride = 0;  // 0: B's rows are dense; otherwise B is a column block of a wider matrix
};

std::vector<Shape> expert_shapes(const std::string& model, Index H, Index F, Index rows) {
  return {
      {model + ".fc", rows, F, H, Op::none, Op::transpose, false, true},
      {model + ".proj", rows, H, F, Op::none, Op::transpose, false, true},
      {model + ".proj.dX", rows, F, H, Op::none, Op::none, false, false},
      {model + ".proj.dW", H, F, rows, Op::transpose, Op::none, true, false},
      {model + ".fc.dX", rows, H, F, Op::none, Op::none, false, false},
      {model + ".fc.dW", F, H, rows, Op::transpose, Op::none, true, false},
  };
}

std::vector<Shape> all_shapes() {
  std::vector<Shape> shapes = expert_shapes("gpt2", 768, 3072, 512);
  for (Shape& s : expert_shapes("small", 128, 512, 512)) shapes.push_back(s);
  shapes.push_back({"gpt2.attention.pv", 32, 64, 1024, Op::none, Op::none, false, false, 2304});
  shapes.push_back({"vit.proj", 197, 192, 192, Op::none, Op::transpose, false, true});
  return shapes;
}

RowMatrix random_matrix(Index rows, Index cols, std::uint64_t stream) {
  RowMatrix m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = float(moe::random::normal(7, stream, std::uint64_t(i)));
  return m;
}

// The operands of one shape, laid out as the layer keeps them.
struct Problem {
  RowMatrix a, b_storage, c, bias;
  Shape shape;
  explicit Problem(const Shape& s)
      : a(s.op_a == Op::none ? random_matrix(s.m, s.depth, 1) : random_matrix(s.depth, s.m, 1)),
        b_storage(s.op_b == Op::none ? random_matrix(s.depth, s.b_stride ? s.b_stride : s.n, 2)
                                     : random_matrix(s.n, s.depth, 2)),
        c(random_matrix(s.m, s.n, 3)),
        bias(random_matrix(1, s.n, 4)),
        shape(s) {}

  moe::ConstMatrixView<float> b_view() const {
    return {b_storage.data(), Index(b_storage.rows()), shape.op_b == Op::none ? shape.n : shape.depth,
            Index(b_storage.cols())};
  }
  Gemm<float> gemm() {
    return {moe::MatrixView<float>(c.data(), shape.m, shape.n), moe::ConstMatrixView<float>(a.data(), a.rows(), a.cols()),
            shape.op_a, b_view(), shape.op_b, shape.accumulate, shape.bias ? bias.data() : nullptr};
  }
  double flops() const { return 2.0 * double(shape.m) * double(shape.n) * double(shape.depth); }

  void run_kernel() { moe::cpu::run_gemm(gemm(), 1); }

  void run_eigen() {
    const auto b = b_storage.leftCols(shape.op_b == Op::none ? shape.n : shape.depth);
    if (shape.op_a == Op::none && shape.op_b == Op::transpose) c.noalias() = a * b.transpose();
    if (shape.op_a == Op::none && shape.op_b == Op::none) c.noalias() = a * b;
    if (shape.op_a == Op::transpose) c.noalias() += a.transpose() * b;  // the backward's dW
    if (shape.bias) c.rowwise() += bias.row(0);
  }
};

double eigen_median_seconds(Problem& p) {
  std::vector<double> times;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = Clock::now();
    p.run_eigen();
    times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Runs the benchmark's loop over `product` and returns the wall time per product.
template <class F>
double seconds_per_product(benchmark::State& state, Problem& p, F product) {
  const auto t0 = Clock::now();
  for (auto _ : state) {
    product();
    benchmark::DoNotOptimize(p.c.data());
    benchmark::ClobberMemory();
  }
  return std::chrono::duration<double>(Clock::now() - t0).count() / double(state.iterations());
}

// GFLOP/s and, for the kernel, Eigen's time / ours.
void bm_kernel(benchmark::State& state, const Shape& shape) {
  Problem p(shape);
  const double eigen = eigen_median_seconds(p);
  const double ours = seconds_per_product(state, p, [&] { p.run_kernel(); });
  state.counters["GFLOP/s"] = p.flops() * 1e-9 / ours;
  state.counters["speedup_vs_eigen"] = eigen / ours;
}

void bm_eigen(benchmark::State& state, const Shape& shape) {
  Problem p(shape);
  state.counters["GFLOP/s"] = p.flops() * 1e-9 / seconds_per_product(state, p, [&] { p.run_eigen(); });
}

const bool registered = [] {
  Eigen::setNbThreads(1);
  for (const Shape& s : all_shapes()) {
    benchmark::RegisterBenchmark(("Kernel/" + s.name).c_str(), bm_kernel, s)->UseRealTime()->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(("Eigen/" + s.name).c_str(), bm_eigen, s)->UseRealTime()->Unit(benchmark::kMicrosecond);
  }
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
