// moe/cpu/gemm.hpp: C = beta*C + op(A) op(B) on row-major views, cut into tiles that run in
// parallel, each through Eigen's sequential GEMM kernel.
//
// Why not `C.noalias() = A * B`: Eigen's own threading picks its cache blocking from the thread
// count, so results would change with the number of threads. Calling the sequential kernel on
// tiles chosen from the shapes keeps every bit fixed (see moe/cpu/parallel.hpp).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <span>
#include <vector>

#include "moe/config.hpp"
#include "moe/cpu/parallel.hpp"
#include "moe/tensor.hpp"

namespace moe::cpu {

enum class Op { none, transpose };

// One product C[m, n] (=|+=) op(A)[m, kd] op(B)[kd, n], optionally plus a bias row vector.
template <class S>
struct Gemm {
  MatrixView<S> c;
  ConstMatrixView<S> a;
  Op op_a = Op::none;
  ConstMatrixView<S> b;
  Op op_b = Op::none;
  bool accumulate = false;  // false: C = op(A) op(B); true: C += op(A) op(B)
  const S* bias = nullptr;  // if set, bias[0..n) is added to every row of C

  Index m() const { return c.rows; }
  Index n() const { return c.cols; }
  Index depth() const { return op_a == Op::none ? a.cols : a.rows; }
};

namespace detail {

template <class S, int LhsOrder, int RhsOrder>
void eigen_sequential_gemm(Index m, Index n, Index depth, const S* a, Index lda, const S* b, Index ldb, S* c,
                           Index ldc) {
  using namespace Eigen;
  internal::gemm_blocking_space<RowMajor, S, S, Dynamic, Dynamic, Dynamic> blocking(m, n, depth, 1, true);
  internal::general_matrix_matrix_product<Index, S, LhsOrder, false, S, RhsOrder, false, RowMajor, 1>::run(
      m, n, depth, a, lda, b, ldb, c, 1, ldc, S(1), blocking);
}

// c += op(a) op(b) for one tile, single-threaded. A transposed row-major view is a column-major
// matrix with the same stride, which is how Eigen's kernel takes it.
template <class S>
void gemm_tile_accumulate(const Gemm<S>& g) {
  const Index m = g.m(), n = g.n(), depth = g.depth();
  if (m == 0 || n == 0 || depth == 0) return;
  constexpr int R = Eigen::RowMajor, C = Eigen::ColMajor;
  const bool ta = g.op_a == Op::transpose, tb = g.op_b == Op::transpose;
  if (!ta && !tb) eigen_sequential_gemm<S, R, R>(m, n, depth, g.a.data, g.a.stride, g.b.data, g.b.stride, g.c.data, g.c.stride);
  if (!ta && tb) eigen_sequential_gemm<S, R, C>(m, n, depth, g.a.data, g.a.stride, g.b.data, g.b.stride, g.c.data, g.c.stride);
  if (ta && !tb) eigen_sequential_gemm<S, C, R>(m, n, depth, g.a.data, g.a.stride, g.b.data, g.b.stride, g.c.data, g.c.stride);
  if (ta && tb) eigen_sequential_gemm<S, C, C>(m, n, depth, g.a.data, g.a.stride, g.b.data, g.b.stride, g.c.data, g.c.stride);
}

template <class S>
void run_tile(const Gemm<S>& g) {
  if (!g.accumulate)
    for (Index r = 0; r < g.c.rows; ++r) std::fill(g.c.row(r), g.c.row(r) + g.c.cols, S(0));
  gemm_tile_accumulate(g);
  if (g.bias)
    for (Index r = 0; r < g.c.rows; ++r) {
      S* row = g.c.row(r);
      for (Index j = 0; j < g.c.cols; ++j) row[j] += g.bias[j];
    }
}

// Rows [r0, r0+rc) and columns [c0, c0+cc) of C, with the matching parts of A and B.
template <class S>
Gemm<S> sub_problem(const Gemm<S>& g, Index r0, Index rc, Index c0, Index cc) {
  Gemm<S> t = g;
  t.c = g.c.row_block(r0, rc).col_block(c0, cc);
  t.a = g.op_a == Op::none ? g.a.row_block(r0, rc) : g.a.col_block(r0, rc);
  t.b = g.op_b == Op::none ? g.b.col_block(c0, cc) : g.b.row_block(c0, cc);
  if (g.bias) t.bias = g.bias + c0;
  return t;
}

}  // namespace detail

// Tile edge: large enough to keep Eigen's kernel efficient, small enough to feed two cores on
// the per-expert blocks of a typical batch. A multiple of the AVX-512 kernel's 48-wide register
// panel: 192 measured 10-20% more GFLOP/s than 256 on the GPT-2 shape (bench/RESULTS.md).
inline constexpr Index kTileEdge = 192;

// Cuts g along its longer output side into tiles of kTileEdge. Splitting the longer side repeats
// the packing of the smaller operand only.
template <class S>
void append_tiles(const Gemm<S>& g, std::vector<Gemm<S>>& tiles) {
  if (g.m() == 0 || g.n() == 0) return;
  if (g.m() >= g.n()) {
    for (Index r = 0; r < g.m(); r += kTileEdge) tiles.push_back(detail::sub_problem(g, r, std::min(kTileEdge, g.m() - r), 0, g.n()));
  } else {
    for (Index c = 0; c < g.n(); c += kTileEdge) tiles.push_back(detail::sub_problem(g, 0, g.m(), c, std::min(kTileEdge, g.n() - c)));
  }
}

// Runs a batch of independent products (e.g. one per expert) on `threads` threads.
template <class S>
void run_gemms(std::span<const Gemm<S>> problems, int threads) {
  std::vector<Gemm<S>> tiles;
  for (const Gemm<S>& g : problems) {
    check(g.c.rows == (g.op_a == Op::none ? g.a.rows : g.a.cols), "gemm: rows of C and op(A) differ");
    check(g.c.cols == (g.op_b == Op::none ? g.b.cols : g.b.rows), "gemm: columns of C and op(B) differ");
    check(g.depth() == (g.op_b == Op::none ? g.b.rows : g.b.cols), "gemm: inner dimensions differ");
    append_tiles(g, tiles);
  }
  parallel_for(threads, Index(tiles.size()), [&](Index i) { detail::run_tile(tiles[i]); });
}

template <class S>
void run_gemm(const Gemm<S>& problem, int threads) {
  run_gemms(std::span<const Gemm<S>>(&problem, 1), threads);
}

}  // namespace moe::cpu
