// moe/cpu/gemm.hpp: C = beta*C + op(A) op(B) on row-major views, cut into tiles that run in
// parallel, each through a sequential kernel: for float, the register-blocked kernel below
// (written over Eigen's SIMD packets); for other types, Eigen's sequential GEMM kernel.
//
// Why not `C.noalias() = A * B`: Eigen's own threading picks its cache blocking from the thread
// count, so results would change with the number of threads. Calling a sequential kernel on
// tiles chosen from the shapes keeps every bit fixed (see moe/cpu/parallel.hpp).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <span>
#include <type_traits>
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
  // If set (op_a none only): A's rows are gathered, op(A)'s row i is a.row(a_rows[i] / a_rows_divisor)
  // (the MoE layer's expert rows straight from its input: a_rows is the routing plan's slot_of_row,
  // the divisor top_k), with no copy of A: the kernels gather a cache-sized block at a time. The
  // products' bits are those of the gathered copy.
  const std::int32_t* a_rows = nullptr;
  std::int32_t a_rows_divisor = 1;
  // Set by run_gemms, not by callers: op(B) already packed, every (NC, KC) block of it, shared by
  // the product's row tiles (kernel::shared_b_size), so each tile need not pack it again.
  const float* b_packed = nullptr;

  Index m() const { return c.rows; }
  Index n() const { return c.cols; }
  Index depth() const { return op_a == Op::none ? a.cols : a.rows; }
  // op(A)'s row i, for a row-major A (op_a none): gathered or not.
  const S* a_row(Index i) const { return a.row(a_rows ? Index(a_rows[i] / a_rows_divisor) : i); }
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

// ---- the float kernel ---------------------------------------------------------------------------
// BLIS's structure, in Eigen's portable SIMD packets (16 lanes with AVX-512, 8 with AVX, 4 with
// SSE or NEON): a micro-kernel keeps an MR x NR block of C in registers (NR = two packets) and
// runs the depth loop as broadcast(A) x packet(B) FMAs. Blocks: NC columns of B, KC of the depth
// and MC rows of A at a time, sized so a B panel (KC x NR) stays in L1 and an A block in L2.
// op(A) is read where it lies (row-major A: one row per register row; a transposed A with rows
// close together too, MR neighbours of a row per depth step; otherwise packed, MR values per
// depth step); op(B) is packed into KC x NR panels (see read_b_in_place for the
// one exception). Against Eigen's kernel, one thread (bench/bench_gemm_cpu, bench/RESULTS.md):
// 12-18% more GFLOP/s on a Zen 4 VM; on an AVX-512 Xeon VM 5-20% more on the small config's
// expert products and a draw on GPT-2's.
//
// Every C element sums its depth in KC blocks, in order, one FMA chain per block: the bits depend
// on the tile's shape and values alone.
namespace kernel {

using FloatPacket = Eigen::internal::packet_traits<float>::type;
inline constexpr Index kLanes = Eigen::internal::packet_traits<float>::size;
inline constexpr bool kEnabled = kLanes >= 4;  // a vectorised build
// 16 accumulators of 16 lanes fill half of AVX-512's 32 registers; 12 of 8 or 4 leave room in 16.
inline constexpr Index MR = kLanes >= 16 ? 8 : 6;
inline constexpr Index NR = 2 * kLanes;
inline constexpr Index KC = 256, MC = 144, NC = 512;

// C[rows, cols] += sum_k A(r, k) B(k, c) over k < depth, A(r, k) = a[r * a_row + k * a_step],
// B(k, c) = b[k * b_step + c]; with `overwrite`, C = that sum instead (C is not read), and with a
// `bias` (this block's cols values) the result + bias[c] is stored. Folding the "=" and the bias
// into the store saves the tile two passes over C: a zero fill before and a bias add after.
// Full tiles update C in place; edge tiles go through a buffer.
// Always inlined: two instantiations of gemm() call it, and GCC's out-of-line copies of it cost the
// products 3-5%.
// a_rows: where each of the MR rows starts (edge tiles repeat the last valid row).
template <bool FullTile>
[[gnu::always_inline]] inline void micro_kernel(const float* const* a_rows, Index a_step,
                                                const float* __restrict b, Index b_step, Index depth, float* c,
                                                Index ldc, Index rows, [[maybe_unused]] Index cols, bool overwrite,
                                                const float* bias) {
  using namespace Eigen::internal;
  using P = FloatPacket;
  P acc0[MR], acc1[MR];
  for (Index r = 0; r < MR; ++r) {
    acc0[r] = pset1<P>(0.f);
    acc1[r] = pset1<P>(0.f);
  }
  for (Index k = 0; k < depth; ++k) {
    const P b0 = ploadu<P>(b + k * b_step), b1 = ploadu<P>(b + k * b_step + kLanes);
#pragma GCC unroll 8
    for (Index r = 0; r < MR; ++r) {
      const P a_rk = pset1<P>(a_rows[r][k * a_step]);
      acc0[r] = pmadd(a_rk, b0, acc0[r]);
      acc1[r] = pmadd(a_rk, b1, acc1[r]);
    }
  }
  // The sum's order is C's old value, this depth block, then the bias: as a zero fill, the
  // accumulation and a bias pass would give it.
  if constexpr (FullTile) {
    const P bias0 = bias ? ploadu<P>(bias) : pset1<P>(0.f), bias1 = bias ? ploadu<P>(bias + kLanes) : pset1<P>(0.f);
#pragma GCC unroll 8
    for (Index r = 0; r < MR; ++r) {
      float* c_row = c + r * ldc;
      P sum0 = overwrite ? acc0[r] : padd(ploadu<P>(c_row), acc0[r]);
      P sum1 = overwrite ? acc1[r] : padd(ploadu<P>(c_row + kLanes), acc1[r]);
      if (bias) {
        sum0 = padd(sum0, bias0);
        sum1 = padd(sum1, bias1);
      }
      pstoreu(c_row, sum0);
      pstoreu(c_row + kLanes, sum1);
    }
  } else {
    alignas(64) float block[MR * NR];
    for (Index r = 0; r < MR; ++r) {
      pstore(block + r * NR, acc0[r]);
      pstore(block + r * NR + kLanes, acc1[r]);
    }
    for (Index r = 0; r < rows; ++r)
      for (Index j = 0; j < cols; ++j) {
        float sum = overwrite ? block[r * NR + j] : c[r * ldc + j] + block[r * NR + j];
        if (bias) sum += bias[j];
        c[r * ldc + j] = sum;
      }
  }
}

// out[i * NR + r] = rows[r][k + i] for r, i < kLanes: a kLanes x kLanes block, transposed.
inline void transpose_block(const float* const* rows, Index k, float* out) {
  using namespace Eigen::internal;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // the packet's vector attributes, as in Eigen's own uses
  PacketBlock<FloatPacket, kLanes> block;
#pragma GCC diagnostic pop
  for (Index r = 0; r < kLanes; ++r) block.packet[r] = ploadu<FloatPacket>(rows[r] + k);
  ptranspose(block);
  for (Index i = 0; i < kLanes; ++i) pstoreu(out + i * NR, block.packet[i]);
}

// Columns [j0, j0 + nc) and depth [k0, k0 + kc) of op(B) into KC x NR panels (panel q at
// out + q * kc), padded to whole panels (with zeros, or for a transposed B with copies of its last
// column: padding lanes are multiplied but never stored, so their values change nothing).
inline void pack_b(const Gemm<float>& g, Index j0, Index nc, Index k0, Index kc, float* out) {
  for (Index q = 0; q < nc; q += NR) {
    const Index cols = std::min(NR, nc - q);
    float* panel = out + q * kc;
    if (g.op_b == Op::none) {
      if (cols == NR) {  // two packets a depth step (GCC left the general loop below scalar)
        using namespace Eigen::internal;
        for (Index k = 0; k < kc; ++k) {
          const float* src = g.b.row(k0 + k) + j0 + q;
          pstoreu(panel + k * NR, ploadu<FloatPacket>(src));
          pstoreu(panel + k * NR + kLanes, ploadu<FloatPacket>(src + kLanes));
        }
        continue;
      }
      for (Index k = 0; k < kc; ++k) {
        const float* src = g.b.row(k0 + k) + j0 + q;
        for (Index j = 0; j < NR; ++j) panel[k * NR + j] = j < cols ? src[j] : 0.f;
      }
    } else {  // op(B)(k, j) = B(j, k): NR rows of B, read across (writes stay sequential)
      const float* src[NR];
      for (Index j = 0; j < NR; ++j) src[j] = g.b.row(j0 + q + std::min(j, cols - 1)) + k0;
      // kLanes x kLanes blocks at a time through a register transpose: the scalar gather (left
      // for the depth's tail) cost as much as the products it fed on short tiles (the ViT's
      // linear layers; attention's 17-key score blocks).
      Index k = 0;
      for (; k + kLanes <= kc; k += kLanes) {
        transpose_block(src, k, panel + k * NR);
        transpose_block(src + kLanes, k, panel + k * NR + kLanes);
      }
      for (; k < kc; ++k)
        for (Index j = 0; j < NR; ++j) panel[k * NR + j] = src[j][k];
    }
  }
}

// Rows [i0, i0 + mc) of a transposed A (op(A)(i, k) = A(k, i)), depth [k0, k0 + kc), into KC x MR
// panels (panel p at out + p * kc).
inline void pack_transposed_a(const Gemm<float>& g, Index i0, Index mc, Index k0, Index kc, float* out) {
  for (Index p = 0; p < mc; p += MR) {
    const Index rows = std::min(MR, mc - p);
    float* panel = out + p * kc;
    if (rows == MR) {  // a fixed-length copy, which the compiler turns into one vector move
      for (Index k = 0; k < kc; ++k) std::copy_n(g.a.row(k0 + k) + i0 + p, MR, panel + k * MR);
      continue;
    }
    for (Index k = 0; k < kc; ++k) {
      const float* src = g.a.row(k0 + k) + i0 + p;
      for (Index r = 0; r < MR; ++r) panel[k * MR + r] = r < rows ? src[r] : 0.f;
    }
  }
}

// Whether the micro-kernel reads op(B) where it lies instead of from packed panels. A panel read
// in place has its KC rows one B stride apart, and the widths of these models make that stride a
// multiple of 512 bytes, which maps the rows to a few L1 sets: each of the MC / MR passes over
// the panel misses L1 again. Packed, they are contiguous. Measured on one thread of an AVX-512
// Xeon VM: packing is 4-35% faster on the GPT-2 example's expert and projection shapes (GPT-2
// small's 512x3072x768: 35%; the ViT's 197x192x192: 1%). Only tiles of <= 4 * MR rows with a
// short depth (attention's 32-row blocks against a head's keys) are ~10% faster in place: 4
// passes over <= 128 rows cost less than the copy.
inline bool read_b_in_place(const Gemm<float>& g) {
  return g.op_b == Op::none && g.n() % NR == 0 && g.m() <= 4 * MR && g.depth() <= KC / 2;
}

// Whether a transposed A is read where it lies instead of packed: the MR values the micro-kernel
// broadcasts at a depth step are then neighbours in one row of A, and the next step is one A stride
// on. Packing costs a pass over A per tile, which on the weight gradients (dW += dY^T X, depth =
// an expert's rows) took a fifth of the product at the small config (bench/RESULTS.md,
// 2026-12-06). Rows up to 1024 floats apart only: GPT-2 small's F = 3072 apart measured slower.
inline bool read_a_in_place(const Gemm<float>& g) { return g.op_a == Op::transpose && g.a.stride <= 1024; }

// n columns rounded up to whole NR panels: a packing's width.
inline Index panel_width(Index n) { return (n + NR - 1) / NR * NR; }

// The size (floats) of op(B) packed whole, as kernel::gemm reads it from Gemm::b_packed: block
// (j0, k0) at j0 * depth + panel_width(nc) * k0. 0 where sharing one packing does not pay: no
// depth, B read in place, a product of one row tile, or a packing past 512 KB, half of a Zen 4
// core's L2 (each tile's own KC x NC blocks stay in L2 as it packs them; the small config's
// weight gradients, 1 MB packings, measured no faster shared). At the small config (H = 128,
// F = 512) the expert products' weights are shared: ~5% of the layer's forward.
inline Index shared_b_size(const Gemm<float>& g, Index tile_rows) {
  if (g.depth() == 0 || read_b_in_place(g) || g.m() <= tile_rows || g.m() < g.n()) return 0;
  const Index size = panel_width(g.n()) * g.depth();
  return size <= 128 * 1024 ? size : 0;
}
inline void pack_b_whole(const Gemm<float>& g, float* out) {
  const Index n = g.n(), depth = g.depth();
  for (Index j0 = 0; j0 < n; j0 += NC) {
    const Index nc = std::min(NC, n - j0);
    for (Index k0 = 0; k0 < depth; k0 += KC)
      pack_b(g, j0, nc, k0, std::min(KC, depth - k0), out + j0 * depth + panel_width(nc) * k0);
  }
}

// The packing buffers, per thread, shared by gemm's instantiations.
struct PackBuffers {
  std::vector<float, Eigen::aligned_allocator<float>> a, b;
};
inline PackBuffers& pack_buffers() {
  thread_local PackBuffers buffers;
  return buffers;
}

// c (+)= op(a) op(b) (+ bias), single-threaded, as g says. depth >= 1: the first depth block
// writes C (or adds to it), the last one adds the bias. AInPlace = read_a_in_place(g), a template
// argument: chosen at run time inside the loops, it cost the other products ~8% in GCC's code.
template <bool AInPlace>
void gemm(const Gemm<float>& g) {
  const Index m = g.m(), n = g.n(), depth = g.depth();
  auto& [a_buffer, b_buffer] = pack_buffers();
  const bool a_packed = !AInPlace && g.op_a == Op::transpose;
  // Gathered rows (Gemm::a_rows) are copied MC at a time into a contiguous block: read where they
  // lie, each micro-kernel's MR rows come from anywhere in A, past the hardware prefetchers, and
  // the small config's first expert product took 0.5 ms more than on the sorted copy (of 14).
  const bool a_gathered = g.a_rows != nullptr;
  const bool b_packed = !read_b_in_place(g);
  if (a_packed || a_gathered) a_buffer.resize(std::size_t(KC * ((MC + MR - 1) / MR * MR)));
  if (b_packed && !g.b_packed) b_buffer.resize(std::size_t(KC * ((NC + NR - 1) / NR * NR)));
  for (Index j0 = 0; j0 < n; j0 += NC) {
    const Index nc = std::min(NC, n - j0);
    for (Index k0 = 0; k0 < depth; k0 += KC) {
      const Index kc = std::min(KC, depth - k0);
      const float* b_block = g.b_packed ? g.b_packed + j0 * depth + panel_width(nc) * k0 : b_buffer.data();
      if (b_packed && !g.b_packed) pack_b(g, j0, nc, k0, kc, b_buffer.data());
      for (Index i0 = 0; i0 < m; i0 += MC) {
        const Index mc = std::min(MC, m - i0);
        if (a_packed) pack_transposed_a(g, i0, mc, k0, kc, a_buffer.data());
        if (a_gathered)
          for (Index r = 0; r < mc; ++r) std::copy_n(g.a_row(i0 + r) + k0, kc, a_buffer.data() + r * kc);
        for (Index q = 0; q < nc; q += NR) {
          const Index cols = std::min(NR, nc - q);
          const float* b_panel = b_packed ? b_block + q * kc : g.b.row(k0) + j0 + q;
          const Index b_step = b_packed ? NR : g.b.stride;
          for (Index p = 0; p < mc; p += MR) {
            const Index rows = std::min(MR, mc - p);
            const float* a_rows[MR];  // edge rows repeat the last valid one
            for (Index r = 0; r < MR; ++r) {
              const Index i = std::min(r, rows - 1);
              a_rows[r] = AInPlace     ? g.a.row(k0) + i0 + p + i
                          : a_packed   ? a_buffer.data() + p * kc + i
                          : a_gathered ? a_buffer.data() + (p + i) * kc
                                       : g.a.row(i0 + p + i) + k0;
            }
            const Index a_step = AInPlace ? g.a.stride : a_packed ? MR : 1;
            float* c_block = g.c.row(i0 + p) + j0 + q;
            const bool overwrite = !g.accumulate && k0 == 0;
            const float* bias = g.bias && k0 + kc == depth ? g.bias + j0 + q : nullptr;
            if (rows == MR && cols == NR)
              micro_kernel<true>(a_rows, a_step, b_panel, b_step, kc, c_block, g.c.stride, rows, cols, overwrite,
                                 bias);
            else
              micro_kernel<false>(a_rows, a_step, b_panel, b_step, kc, c_block, g.c.stride, rows, cols, overwrite,
                                  bias);
          }
        }
      }
    }
  }
}

}  // namespace kernel

// One tile, single-threaded: c (+)= op(a) op(b) (+ bias), as g says. (Eigen's kernel takes a
// transposed row-major view as a column-major matrix with the same stride.)
template <class S>
void gemm_tile(const Gemm<S>& g) {
  const Index m = g.m(), n = g.n(), depth = g.depth();
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<S, float> && kernel::kEnabled) {
    if (depth > 0)  // "=" and the bias folded into its stores
      return kernel::read_a_in_place(g) ? kernel::gemm<true>(g) : kernel::gemm<false>(g);
  }
  if (g.a_rows) {  // Eigen's kernel reads a strided A: the gathered rows are copied first
    thread_local std::vector<S> gathered;
    gathered.resize(std::size_t(m * depth));
    for (Index i = 0; i < m; ++i) std::copy_n(g.a_row(i), depth, gathered.data() + i * depth);
    Gemm<S> copy = g;
    copy.a = ConstMatrixView<S>(gathered.data(), m, depth);
    copy.a_rows = nullptr;
    return gemm_tile(copy);
  }
  if (!g.accumulate)
    for (Index r = 0; r < m; ++r) std::fill(g.c.row(r), g.c.row(r) + n, S(0));
  if (depth > 0) {
    constexpr int R = Eigen::RowMajor, C = Eigen::ColMajor;
    const bool ta = g.op_a == Op::transpose, tb = g.op_b == Op::transpose;
    const S *a = g.a.data, *b = g.b.data;
    if (!ta && !tb) eigen_sequential_gemm<S, R, R>(m, n, depth, a, g.a.stride, b, g.b.stride, g.c.data, g.c.stride);
    if (!ta && tb) eigen_sequential_gemm<S, R, C>(m, n, depth, a, g.a.stride, b, g.b.stride, g.c.data, g.c.stride);
    if (ta && !tb) eigen_sequential_gemm<S, C, R>(m, n, depth, a, g.a.stride, b, g.b.stride, g.c.data, g.c.stride);
    if (ta && tb) eigen_sequential_gemm<S, C, C>(m, n, depth, a, g.a.stride, b, g.b.stride, g.c.data, g.c.stride);
  }
  if (g.bias)
    for (Index r = 0; r < m; ++r) {
      S* row = g.c.row(r);
      for (Index j = 0; j < n; ++j) row[j] += g.bias[j];
    }
}

// Rows [r0, r0+rc) and columns [c0, c0+cc) of C, with the matching parts of A and B.
template <class S>
Gemm<S> sub_problem(const Gemm<S>& g, Index r0, Index rc, Index c0, Index cc) {
  Gemm<S> t = g;
  t.c = g.c.row_block(r0, rc).col_block(c0, cc);
  if (g.a_rows)
    t.a_rows = g.a_rows + r0;  // A itself stays whole
  else
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
  for (const Gemm<S>& g : problems) {
    if (g.a_rows)  // the caller vouches for the indices (a routing plan's): they are not read here
      check(g.op_a == Op::none && g.a_rows_divisor >= 1, "gemm: gathered A rows need op_a none and a divisor >= 1");
    else
      check(g.c.rows == (g.op_a == Op::none ? g.a.rows : g.a.cols), "gemm: rows of C and op(A) differ");
    check(g.c.cols == (g.op_b == Op::none ? g.b.cols : g.b.rows), "gemm: columns of C and op(B) differ");
    check(g.depth() == (g.op_b == Op::none ? g.b.rows : g.b.cols), "gemm: inner dimensions differ");
  }
  // op(B) packed once per product where its row tiles would each pack it (shared_b_size), the
  // packings in parallel first; the buffer persists, so its pages are not touched anew each call.
  std::vector<Index> shared_at(problems.size(), -1);
  Index shared_floats = 0;
  thread_local std::vector<float, Eigen::aligned_allocator<float>> shared_b;
  if constexpr (std::is_same_v<S, float> && detail::kernel::kEnabled) {
    for (std::size_t p = 0; p < problems.size(); ++p)
      if (const Index size = detail::kernel::shared_b_size(problems[p], kTileEdge); size > 0)
        shared_at[p] = shared_floats, shared_floats += size;
    if (shared_floats > 0) {
      if (Index(shared_b.size()) < shared_floats) shared_b.resize(std::size_t(shared_floats));
      float* const packed = shared_b.data();  // a worker naming shared_b would get its own, empty
      parallel_for(threads, Index(problems.size()), [&](Index p) {
        if (shared_at[p] >= 0) detail::kernel::pack_b_whole(problems[p], packed + shared_at[p]);
      });
    }
  }
  std::vector<Gemm<S>> tiles;
  for (std::size_t p = 0; p < problems.size(); ++p) {
    const std::size_t first = tiles.size();
    append_tiles(problems[p], tiles);
    if (shared_at[p] >= 0)
      for (std::size_t t = first; t < tiles.size(); ++t) tiles[t].b_packed = shared_b.data() + shared_at[p];
  }
  parallel_for(threads, Index(tiles.size()), [&](Index i) { detail::gemm_tile(tiles[i]); });
}

template <class S>
void run_gemm(const Gemm<S>& problem, int threads) {
  run_gemms(std::span<const Gemm<S>>(&problem, 1), threads);
}

}  // namespace moe::cpu
