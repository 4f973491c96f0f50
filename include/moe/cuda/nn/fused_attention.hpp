// moe/cuda/nn/fused_attention.hpp: multi-head self-attention (causal or bidirectional) with the probabilities kept on
// chip, bf16, forward and backward, on a CUDA-backend device (moe/cuda/device.hpp). FlashAttention's scheme (Dao et
// al., 2022; FlashAttention-2, 2023) over the device's tensor-core tiles (D::for_each_warp). Same semantics, layout
// and "+=" convention as moe/cuda/nn/attention.hpp, which materialises the [B, heads, T, T] probabilities: here the
// forward keeps only each query row's log-sum-exp of its scaled scores (lse, float, [B * heads * T]), and the backward
// recomputes the probabilities tile by tile from q, k and lse.
//
// Work: one warp per tile of rows of one (b, h) pair (32 rows up to head size 64, else 16): query rows for the forward
// and for dq, keys for dk and dv. The warp copies its tile and each block of the other side into its staging memory
// (asynchronous copies, the next block's in flight during this one's products; zero past T and past the block's end, so
// a tile product reads nothing else) and runs the products there on tensor cores. The forward's float accumulator
// (out) stays there too, as its rows are rescaled when their running max grows; dq, dk and dv accumulate in registers.
// Per row of a tile the softmax arithmetic is one lane's, in a fixed order.
// No floating-point atomics: dq has a pass of its own (over key blocks) instead of FlashAttention-2's atomic adds, so
// every output element has one writer and reruns give the same bits.
//
// Rounding: scores, the running max and sum, and the accumulators in float; a probability (or dS) is rounded to bf16
// before its product, as the materialised path stores it; out is the accumulator / sum, rounded once. Results match
// attention.hpp's within bf16 rounding (tests/cuda/cuda_nn_fused_attention_cases.hpp), not bit for bit.
//
// Taken when fused_attention_fits (bf16, head size 32, 64 or 128, every row on a 16-byte boundary);
// NnOps<cuda> (examples/common/nn_ops_cuda.hpp) falls back to attention.hpp otherwise.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <type_traits>

#include "moe/bfloat16.hpp"
#include "moe/config.hpp"
#include "moe/cuda/device.hpp"
#include "moe/cuda/nn/attention.hpp"
#include "moe/cuda/pack.hpp"
#include "moe/nn/checks.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda::nn {

namespace fused_attention_detail {

using Bf16 = bfloat16;
inline constexpr Index kTile = kTileSize;     // a tensor-core tile's side
inline constexpr Index kPack = kPackSize<Bf16>;

// Regions of a warp's staging memory, each kTileAlignment-aligned: offsets in bytes, made on the host.
struct StagingLayout {
  std::size_t bytes = 0;
  std::size_t add(std::size_t size) {
    const std::size_t offset = (bytes + kTileAlignment - 1) / kTileAlignment * kTileAlignment;
    bytes = offset + size;
    return offset;
  }
  // A region at `offset` (a region added before) over what follows it, for a use that starts once those regions are
  // dead; the layout grows if it runs past the end.
  std::size_t overlay(std::size_t offset, std::size_t size) {
    bytes = std::max(bytes, offset + size);
    return offset;
  }
};

// Leading dimensions (elements) of staged tiles: rows of hs bf16 padded by 8 (16 bytes: a multiple of 16 bytes, and
// rows that do not all start in the same shared-memory bank), float rows padded by 4.
MOE_HOST_DEVICE constexpr Index ld_rows(Index hs) { return hs + 8; }
MOE_HOST_DEVICE constexpr Index ld_floats(Index cols) { return cols + 4; }

// Where pair p = b * heads + h finds row t of part `part` (0 q, 1 k, 2 v) of qkv, or row t of out / dout:
// attention.hpp's PairBases::row.
using Heads = attention_detail::PairBases<Bf16>;

// The tile products, their sizes compile-time constants so that the loops unroll and a register array of tiles is
// indexed by constants.
// out[Rows, Cols] = A[Rows, HS] B[Cols, HS]^T: a staged tile of rows times a staged block of rows, transposed (the
// backward's S^T = k q^T and dP^T = v dout^T, dq's dP = dout v^T).
template <Index Rows, Index Cols, Index HS, class Warp>
MOE_HOST_DEVICE void rows_times_rows(const Warp& warp, float* out, Index ld_out, const Bf16* a, const Bf16* b,
                                     Index ld) {
  MOE_UNROLL
  for (Index i = 0; i < Rows; i += kTile) {
    MOE_UNROLL
    for (Index j = 0; j < Cols; j += kTile) {
      typename Warp::Acc acc;
      warp.fill(acc, 0.f);
      MOE_UNROLL
      for (Index d = 0; d < HS; d += kTile) {
        typename Warp::ARows at;
        typename Warp::BCols bt;
        warp.load_a(at, a + i * ld + d, ld);
        warp.load_bt(bt, b + j * ld + d, ld);
        warp.mma(acc, at, bt);
      }
      warp.store_acc(out + i * ld_out + j, ld_out, acc);
    }
  }
}

// A tile of rows [Rows, HS] held in registers as tensor-core A operands across blocks (the queries of the forward and
// of dq: loaded once, not once per key block): held[(i / 16) * (HS / 16) + d / 16] is the tile at rows i, columns d.
template <Index Rows, Index HS, class Warp>
using HeldRows = typename Warp::ARows[(Rows / kTile) * (HS / kTile)];
template <Index Rows, Index HS, class Warp>
MOE_HOST_DEVICE void hold_rows(const Warp& warp, HeldRows<Rows, HS, Warp>& held, const Bf16* a, Index ld) {
  MOE_UNROLL
  for (Index i = 0; i < Rows; i += kTile) {
    MOE_UNROLL
    for (Index d = 0; d < HS; d += kTile) warp.load_a(held[(i / kTile) * (HS / kTile) + d / kTile], a + i * ld + d, ld);
  }
  warp.sync();  // every lane has read the tile before any lane writes over it
}
// out[Rows, Cols] (= when Accumulate is false, else +=) A[Rows, Depth] B[Depth, Cols] in 16 x 16 tiles, A's fragments
// in registers (a(i, d): the tile at rows i, depth d) and B's of a column tile loaded once for every row tile
// (load_b(b, c, d): the tile at depth d, columns c): the stores of out between products would keep the compiler from
// sharing those loads.
template <Index Rows, Index Cols, Index Depth, bool Accumulate, class BTile, class Warp, class ATile, class LoadB>
MOE_HOST_DEVICE void held_product(const Warp& warp, float* out, Index ld_out, ATile a, LoadB load_b) {
  MOE_UNROLL
  for (Index c = 0; c < Cols; c += kTile) {
    BTile b[Depth / kTile];
    MOE_UNROLL
    for (Index d = 0; d < Depth; d += kTile) load_b(b[d / kTile], c, d);
    MOE_UNROLL
    for (Index i = 0; i < Rows; i += kTile) {
      typename Warp::Acc acc;
      if constexpr (Accumulate)
        warp.load_acc(acc, out + i * ld_out + c, ld_out);
      else
        warp.fill(acc, 0.f);
      MOE_UNROLL
      for (Index d = 0; d < Depth; d += kTile) warp.mma(acc, a(i, d), b[d / kTile]);
      warp.store_acc(out + i * ld_out + c, ld_out, acc);
    }
  }
}

// rows_times_rows with A held: the scores of the forward and of dq, q k^T.
template <Index Rows, Index Cols, Index HS, class Warp>
MOE_HOST_DEVICE void held_times_rows(const Warp& warp, float* out, Index ld_out, const HeldRows<Rows, HS, Warp>& held,
                                     const Bf16* b, Index ld) {
  held_product<Rows, Cols, HS, false, typename Warp::BCols>(
      warp, out, ld_out,
      [&](Index i, Index d) -> const typename Warp::ARows& { return held[(i / kTile) * (HS / kTile) + d / kTile]; },
      [&](typename Warp::BCols& bt, Index c, Index d) { warp.load_bt(bt, b + c * ld + d, ld); });
}

// One 16-row tile of P as the A operand of P V: its Depth / 16 fragments, loaded once and used for every column tile
// of V (not once per column tile).
template <Index Depth, class Warp>
using RowTileOfP = typename Warp::ARows[Depth / kTile];
template <Index Depth, class Warp>
MOE_HOST_DEVICE void load_row_tile(const Warp& warp, RowTileOfP<Depth, Warp>& a, const Bf16* p, Index ld_p) {
  MOE_UNROLL
  for (Index j = 0; j < Depth; j += kTile) warp.load_a(a[j / kTile], p + j, ld_p);
}

// One 16 x 16 tile of P V: acc += P[16, Depth] V[Depth, 16], the row tile of P loaded, v at the tile's first column.
template <Index Depth, class Warp>
MOE_HOST_DEVICE void accumulate_tile(const Warp& warp, typename Warp::Acc& acc, const RowTileOfP<Depth, Warp>& a,
                                     const Bf16* v, Index ld) {
  MOE_UNROLL
  for (Index j = 0; j < Depth; j += kTile) {
    typename Warp::BRows bv;
    warp.load_b(bv, v + j * ld, ld);
    warp.mma(acc, a[j / kTile], bv);
  }
}

// acc[Rows, HS] += P[Rows, Depth] V[Depth, HS]: P a staged bf16 tile (the forward's probabilities), V a staged block
// of rows (v); acc a staged float tile (the forward's out, rescaled between blocks). Each fragment of P and of V is
// loaded once.
template <Index Rows, Index Depth, Index HS, class Warp>
MOE_HOST_DEVICE void accumulate_product(const Warp& warp, float* acc_tile, Index ld_acc, const Bf16* p, Index ld_p,
                                        const Bf16* v, Index ld) {
  RowTileOfP<Depth, Warp> a[Rows / kTile];
  MOE_UNROLL
  for (Index i = 0; i < Rows; i += kTile) load_row_tile<Depth>(warp, a[i / kTile], p + i * ld_p, ld_p);
  held_product<Rows, HS, Depth, true, typename Warp::BRows>(
      warp, acc_tile, ld_acc,
      [&](Index i, Index j) -> const typename Warp::ARows& { return a[i / kTile][j / kTile]; },
      [&](typename Warp::BRows& bv, Index c, Index j) { warp.load_b(bv, v + j * ld + c, ld); });
}

// The same product into tiles held in the warp's registers across blocks (dq, dk, dv: nothing rescales them, so no
// round trip through the staging): acc[(i / 16) * (HS / 16) + d / 16] is the tile at rows i, columns d.
template <Index Rows, Index HS, class Warp>
using Accumulators = typename Warp::Acc[(Rows / kTile) * (HS / kTile)];
template <Index Rows, Index Depth, Index HS, class Warp>
MOE_HOST_DEVICE void accumulate_in_registers(const Warp& warp, Accumulators<Rows, HS, Warp>& acc, const Bf16* p,
                                             Index ld_p, const Bf16* v, Index ld) {
  MOE_UNROLL
  for (Index i = 0; i < Rows; i += kTile) {
    RowTileOfP<Depth, Warp> a;
    load_row_tile<Depth>(warp, a, p + i * ld_p, ld_p);
    MOE_UNROLL
    for (Index d = 0; d < HS; d += kTile)
      accumulate_tile<Depth>(warp, acc[(i / kTile) * (HS / kTile) + d / kTile], a, v + d, ld);
  }
}

// Register tiles -> a staged float tile [Rows, HS] (for write_rows); zero -> the register tiles.
template <Index Rows, Index HS, class Warp>
MOE_HOST_DEVICE void store_accumulators(const Warp& warp, float* out, Index ld_out, const Accumulators<Rows, HS, Warp>& acc) {
  MOE_UNROLL
  for (Index i = 0; i < Rows; i += kTile) {
    MOE_UNROLL
    for (Index d = 0; d < HS; d += kTile)
      warp.store_acc(out + i * ld_out + d, ld_out, acc[(i / kTile) * (HS / kTile) + d / kTile]);
  }
}
template <Index Rows, Index HS, class Warp>
MOE_HOST_DEVICE void zero_accumulators(const Warp& warp, Accumulators<Rows, HS, Warp>& acc) {
  MOE_UNROLL
  for (Index a = 0; a < (Rows / kTile) * (HS / kTile); ++a) warp.fill(acc[a], 0.f);
}

// dst row r (r < valid) = S(C(dst) + acc[r]) when adding, S(acc[r] * factor[r]) otherwise; hs columns in packs.
template <class Warp, class RowOf, class Factor>
MOE_HOST_DEVICE void write_rows(const Warp& warp, const float* acc, Index ld_acc, Index valid, Index hs, bool add,
                                RowOf row_of, Factor factor) {
  const Index packs = hs / kPack;
  warp.lanes(valid * packs, [&](Index i) {
    const Index r = i / packs, c = (i % packs) * kPack;
    Bf16* dst = row_of(r) + c;
    Pack<Bf16> x = add ? load_pack(dst) : Pack<Bf16>{};
    const float f = factor(r);
    for (Index e = 0; e < kPack; ++e) {
      const float a = acc[r * ld_acc + c + e];
      x.v[e] = add ? Bf16(float(x.v[e]) + a) : Bf16(a * f);
    }
    store_pack(dst, x);
  });
}

// Step i of row r's walk over its N columns (N a power of two), when one lane per row walks them all: starting at
// column r, the lanes of a step read different shared-memory banks. The staged rows are 4 banks apart (ld_floats,
// ld_rows), so lanes r and r + 8 would meet on one bank at every step of a walk from column 0 (4-way conflicts);
// from column r the forward's float rows (and dq's) meet none, the rest at most 2-way.
template <Index N>
MOE_HOST_DEVICE constexpr Index lane_order(Index i, Index r) {
  static_assert(N > 0 && (N & (N - 1)) == 0, "lane_order: a power of two of columns");
  return (i + r) & (N - 1);
}

// How far a block's scores may pass a row's running max before the forward rescales the row (see forward).
inline constexpr float kRescaleMargin = 8.f;

// Rows of a warp's tile: 32 (a lane per row in the softmax steps, and each staged block of the other side serves 32
// rows) up to head size 64; 16 above, where the staging would not fit. Rows of a block of the other side likewise.
MOE_HOST_DEVICE constexpr Index tile_rows(Index hs) { return hs <= 64 ? 32 : 16; }

// The forward's staging for head size hs: a tile of `rows` query rows against blocks of `keys` keys, two blocks (k and
// v) staged at a time: the next one's copies run during this one's products.
// The query tile lands where the scores go (q_s): the first block reads it into registers before its scores are
// stored there.
struct ForwardStaging {
  std::size_t q_s, k[2], v[2], p, o, m, l, bytes;
  explicit ForwardStaging(Index hs) {
    const Index rows = tile_rows(hs), keys = rows;
    StagingLayout layout;
    q_s = layout.add(std::max(std::size_t(rows * ld_rows(hs)) * sizeof(Bf16),
                              std::size_t(rows * ld_floats(keys)) * sizeof(float)));
    for (int b = 0; b < 2; ++b) {
      k[b] = layout.add(std::size_t(keys * ld_rows(hs)) * sizeof(Bf16));
      v[b] = layout.add(std::size_t(keys * ld_rows(hs)) * sizeof(Bf16));
    }
    p = layout.add(std::size_t(rows * ld_rows(keys)) * sizeof(Bf16));
    o = layout.add(std::size_t(rows * ld_floats(hs)) * sizeof(float));
    m = layout.add(std::size_t(rows) * sizeof(float));
    l = layout.add(std::size_t(rows) * sizeof(float));
    bytes = layout.bytes;
  }
};

// The backward's two passes, both reading lse and D = rowsum(dout * out) per query row. dk and dv: a tile of `rows`
// keys against blocks of 16 queries (q and dout, two blocks staged at a time). dq: a tile of `rows` queries against
// blocks of `keys` keys (k and v, two at a time).
struct KeyStaging {
  static constexpr Index kQueries = 16;
  std::size_t k, v, q[2], dout[2], lse, dsum, st, dpt, pt, dst, grad, bytes;
  explicit KeyStaging(Index hs) {
    const Index rows = tile_rows(hs);
    StagingLayout layout;
    k = layout.add(std::size_t(rows * ld_rows(hs)) * sizeof(Bf16));
    v = layout.add(std::size_t(rows * ld_rows(hs)) * sizeof(Bf16));
    for (int b = 0; b < 2; ++b) {
      q[b] = layout.add(std::size_t(kQueries * ld_rows(hs)) * sizeof(Bf16));
      dout[b] = layout.add(std::size_t(kQueries * ld_rows(hs)) * sizeof(Bf16));
    }
    lse = layout.add(kQueries * sizeof(float));
    dsum = layout.add(kQueries * sizeof(float));
    st = layout.add(std::size_t(rows * ld_floats(kQueries)) * sizeof(float));
    dpt = layout.add(std::size_t(rows * ld_floats(kQueries)) * sizeof(float));
    pt = layout.add(std::size_t(rows * ld_rows(kQueries)) * sizeof(Bf16));
    dst = layout.add(std::size_t(rows * ld_rows(kQueries)) * sizeof(Bf16));
    // dk's float tile, then dv's, on their way out: over the query blocks, done with by then.
    grad = layout.overlay(q[0], std::size_t(rows * ld_floats(hs)) * sizeof(float));
    bytes = layout.bytes;
  }
};

// As the forward's, the query tile lands where the scores go (q_s) and goes into registers at the first block.
struct QueryStaging {
  std::size_t q_s, dout, lse, dsum, k[2], v[2], dp, ds, dq, bytes;
  explicit QueryStaging(Index hs) {
    const Index rows = tile_rows(hs), keys = rows;
    StagingLayout layout;
    q_s = layout.add(std::max(std::size_t(rows * ld_rows(hs)) * sizeof(Bf16),
                              std::size_t(rows * ld_floats(keys)) * sizeof(float)));
    dout = layout.add(std::size_t(rows * ld_rows(hs)) * sizeof(Bf16));
    lse = layout.add(std::size_t(rows) * sizeof(float));
    dsum = layout.add(std::size_t(rows) * sizeof(float));
    for (int b = 0; b < 2; ++b) {
      k[b] = layout.add(std::size_t(keys * ld_rows(hs)) * sizeof(Bf16));
      v[b] = layout.add(std::size_t(keys * ld_rows(hs)) * sizeof(Bf16));
    }
    dp = layout.add(std::size_t(rows * ld_floats(keys)) * sizeof(float));
    ds = layout.add(std::size_t(rows * ld_rows(keys)) * sizeof(Bf16));
    dq = layout.overlay(q_s, std::size_t(rows * ld_floats(hs)) * sizeof(float));  // on its way out, over the rest
    bytes = layout.bytes;
  }
};

template <class T>
MOE_HOST_DEVICE T* region(unsigned char* base, std::size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

// The rows of tile `w` of a launch over pairs * tiles warps: its pair, first row and row count. The launch takes the
// longest jobs first, across all pairs: with `descending`, the last tiles (causal query tiles, which see the most
// keys), else the first (causal key tiles, seen by the most queries).
struct TileOf {
  Index pair, first, rows;
};
MOE_HOST_DEVICE inline TileOf tile_of(Index w, Index pairs, Index T, Index rows_per_tile, bool descending) {
  const Index tiles = (T + rows_per_tile - 1) / rows_per_tile;
  const Index tile = descending ? tiles - 1 - w / pairs : w / pairs, first = tile * rows_per_tile;
  return {w % pairs, first, T - first < rows_per_tile ? T - first : rows_per_tile};
}

// Starts the copies of `valid` rows of pair `pair`'s head slice `part` of m (rows first, first + 1, ...) into a staged
// block of `rows` rows (zeros past `valid`).
template <Index HS, class Warp, class E>
MOE_HOST_DEVICE void stage_head_rows(const Warp& warp, Bf16* dst, Index rows, Index valid, const Heads& heads_of,
                                     const E* m, Index ld, Index part, Index pair, Index first) {
  warp.copy_rows(dst, ld_rows(HS), rows, valid, HS, [&](Index r) { return heads_of.row(m, ld, part, pair, first + r); });
}

// The blocks [first, end) of `step` rows, double-buffered: fetch(b, buf) starts block b's copies into buffer buf and
// commits them (with any copies the caller started before: its own tile); body(b, buf) runs once they have landed,
// while the next block's copies are in flight.
template <class Warp, class Fetch, class Body>
MOE_HOST_DEVICE void over_blocks(const Warp& warp, Index first, Index end, Index step, Fetch fetch, Body body) {
  if (first >= end) {
    warp.commit_copies();
    warp.wait_copies(0);
    return;
  }
  fetch(first, 0);
  int buf = 0;
  for (Index b = first; b < end; b += step, buf ^= 1) {
    if (b + step < end) {
      fetch(b + step, buf ^ 1);
      warp.wait_copies(1);
    } else {
      warp.wait_copies(0);
    }
    body(b, buf);
  }
}

// The blocks of K keys a tile of query rows sees, keys [0, key_end), their keys and values double-buffered into the
// staging regions k_at[buf] and v_at[buf]: body(kb, keys, k, v) per block, with `keys` of its K rows real (the forward
// and dq's pass).
template <Index HS, Index K, class Warp, class Body>
MOE_HOST_DEVICE void over_key_blocks(const Warp& warp, unsigned char* base, const std::size_t (&k_at)[2],
                                     const std::size_t (&v_at)[2], const Heads& heads_of, const Bf16* qkv, Index ld_qkv,
                                     Index pair, Index key_end, Body body) {
  const auto keys_in = [&](Index kb) { return key_end - kb < K ? key_end - kb : K; };
  const auto fetch = [&](Index kb, int buf) {
    stage_head_rows<HS>(warp, region<Bf16>(base, k_at[buf]), K, keys_in(kb), heads_of, qkv, ld_qkv, 1, pair, kb);
    stage_head_rows<HS>(warp, region<Bf16>(base, v_at[buf]), K, keys_in(kb), heads_of, qkv, ld_qkv, 2, pair, kb);
    warp.commit_copies();
  };
  over_blocks(warp, 0, key_end, K, fetch, [&](Index kb, int buf) {
    body(kb, keys_in(kb), region<const Bf16>(base, k_at[buf]), region<const Bf16>(base, v_at[buf]));
  });
}

// The forward for head size HS (fused_attention_forward checks the arguments).
template <Index HS, class S, class D>
void forward(const D& device, ConstMatrixView<S> qkv, Index B, Index T, Index heads, bool causal, MatrixView<S> out,
             float* lse) {
  const Index channels = HS * heads;
  const ForwardStaging at(HS);
  constexpr Index R = tile_rows(HS), K = R;
  const Heads heads_of{T, heads, channels, HS};
  const Index pairs = B * heads, tiles = (T + R - 1) / R, ld_qkv = qkv.stride, ld_out = out.stride;
  constexpr Index ldh = ld_rows(HS), lds = ld_floats(K), ldp = ld_rows(K), ldo = ld_floats(HS);
  const float scale = 1.f / std::sqrt(float(HS));
  const S* qkv_all = qkv.data;
  S* out_all = out.data;
  device.for_each_warp(pairs * tiles, at.bytes, [=] MOE_HOST_DEVICE(Index w, const typename D::Warp& warp) {
    const TileOf tile = tile_of(w, pairs, T, R, causal);
    const Index pair = tile.pair, row0 = tile.first, rows = tile.rows;
    unsigned char* base = warp.staging();
    Bf16* q = region<Bf16>(base, at.q_s);
    float* s = region<float>(base, at.q_s);
    Bf16* p = region<Bf16>(base, at.p);
    float* o = region<float>(base, at.o);
    float* m = region<float>(base, at.m);
    float* l = region<float>(base, at.l);
    warp.lanes(R * HS, [&](Index i) { o[(i / HS) * ldo + i % HS] = 0.f; });
    warp.lanes(R, [&](Index r) { m[r] = -INFINITY, l[r] = 0.f; });
    stage_head_rows<HS>(warp, q, R, rows, heads_of, qkv_all, ld_qkv, 0, pair, row0);  // lands with block 0
    HeldRows<R, HS, typename D::Warp> q_held;
    const Index key_end = causal ? row0 + rows : T;
    over_key_blocks<HS, K>(warp, base, at.k, at.v, heads_of, qkv_all, ld_qkv, pair, key_end,
                           [&](Index kb, Index keys, const Bf16* k, const Bf16* v) {
      if (kb == 0) hold_rows<R, HS>(warp, q_held, q, ldh);
      held_times_rows<R, K, HS>(warp, s, lds, q_held, k, ldh);
      // Online softmax, one lane per query row: the new max, the old terms' factor, this block's probabilities.
      // Each lane walks its row from its own column (lane_order): in step, the lanes' rows would share banks.
      warp.lanes(R, [&](Index r) {
        const Index seen = !causal ? keys : row0 + r - kb + 1 < keys ? row0 + r - kb + 1 : keys;
        float block_max = -INFINITY;
        for (Index i = 0; i < K; ++i) {
          const Index j = lane_order<K>(i, r);
          const float x = j < seen ? s[r * lds + j] * scale : -INFINITY;
          block_max = x > block_max ? x : block_max;
        }
        // The row's reference max moves only when this block's passes it by more than kRescaleMargin: below that the
        // block's probabilities are at most e^8 (no overflow, and bf16's relative rounding does not depend on size),
        // and the rescale of out, the lane's longest loop, is skipped. out / sum and lse = max + log(sum) hold for any
        // reference at or under the true max.
        const float max = block_max > m[r] + kRescaleMargin ? block_max : m[r];
        float sum = 0.f;
        for (Index i = 0; i < K; ++i) {
          const Index j = lane_order<K>(i, r);
          const Bf16 pj = j < seen ? Bf16(std::exp(s[r * lds + j] * scale - max)) : Bf16(0.f);
          p[r * ldp + j] = pj;
          sum += float(pj);
        }
        if (max != m[r]) {  // rescale the terms so far (none before the first block: their factor is 0)
          const float factor = std::exp(m[r] - max);
          l[r] *= factor;
          for (Index i = 0; i < HS; ++i) o[r * ldo + lane_order<HS>(i, r)] *= factor;
        }
        l[r] += sum;
        m[r] = max;
      });
      accumulate_product<R, K, HS>(warp, o, ldo, p, ldp, v, ldh);
    });
    write_rows(
        warp, o, ldo, rows, HS, false, [&](Index r) { return heads_of.row(out_all, ld_out, 0, pair, row0 + r); },
        [&](Index r) { return 1.f / l[r]; });
    warp.lanes(rows, [&](Index r) { lse[pair * T + row0 + r] = m[r] + std::log(l[r]); });
  });
}

// The backward for head size HS (fused_attention_backward checks the arguments): D per query row, then the two
// passes.
template <Index HS, class S, class D>
void backward(const D& device, ConstMatrixView<S> dout, ConstMatrixView<S> qkv, ConstMatrixView<S> out,
              const float* lse, Index B, Index T, Index heads, bool causal, MatrixView<S> dqkv, bool add) {
  const Index channels = HS * heads;
  const Index pairs = B * heads;
  const Heads heads_of{T, heads, channels, HS};
  const Index ld_qkv = qkv.stride, ld_out = out.stride, ld_dout = dout.stride, ld_dqkv = dqkv.stride;
  constexpr Index ldh = ld_rows(HS), ldacc = ld_floats(HS);
  const float scale = 1.f / std::sqrt(float(HS));
  const S* qkv_all = qkv.data;
  const S* out_all = out.data;
  const S* dout_all = dout.data;
  S* dqkv_all = dqkv.data;
  const auto unscaled = [] MOE_HOST_DEVICE(Index) { return 1.f; };

  // D per query row, in the scratch.
  float* dsum_all = static_cast<float*>(device.scratch(std::size_t(pairs * T) * sizeof(float)));
  device.for_each_row(pairs * T, [=] MOE_HOST_DEVICE(Index i, const typename D::Row& r) {
    const Index pair = i / T, t = i % T;
    const S* o = heads_of.row(out_all, ld_out, 0, pair, t);
    const S* g = heads_of.row(dout_all, ld_dout, 0, pair, t);
    const float d = r.sum(HS, [&](Index c) { return float(o[c]) * float(g[c]); });
    if (r.first()) dsum_all[i] = d;
  });

  // dk and dv: a warp per tile of keys, over the blocks of queries that see them.
  const KeyStaging ks(HS);
  constexpr Index kQueries = KeyStaging::kQueries;
  constexpr Index RK = tile_rows(HS), ld_sq = ld_floats(kQueries), ld_pq = ld_rows(kQueries);
  const Index key_tiles = (T + RK - 1) / RK;
  device.for_each_warp(pairs * key_tiles, ks.bytes, [=] MOE_HOST_DEVICE(Index w, const typename D::Warp& warp) {
    const TileOf tile = tile_of(w, pairs, T, RK, false);
    const Index pair = tile.pair, key0 = tile.first, keys = tile.rows;
    unsigned char* base = warp.staging();
    Bf16* k = region<Bf16>(base, ks.k);
    Bf16* v = region<Bf16>(base, ks.v);
    float* lse_q = region<float>(base, ks.lse);
    float* dsum_q = region<float>(base, ks.dsum);
    float* st = region<float>(base, ks.st);
    float* dpt = region<float>(base, ks.dpt);
    Bf16* pt = region<Bf16>(base, ks.pt);
    Bf16* dst = region<Bf16>(base, ks.dst);
    float* grad = region<float>(base, ks.grad);
    const auto queries_in = [&](Index qb) { return T - qb < kQueries ? T - qb : kQueries; };
    Accumulators<RK, HS, typename D::Warp> dk_acc, dv_acc;
    zero_accumulators<RK, HS>(warp, dk_acc);
    zero_accumulators<RK, HS>(warp, dv_acc);
    stage_head_rows<HS>(warp, k, RK, keys, heads_of, qkv_all, ld_qkv, 1, pair, key0);
    stage_head_rows<HS>(warp, v, RK, keys, heads_of, qkv_all, ld_qkv, 2, pair, key0);
    const auto fetch = [&](Index qb, int buf) {  // block qb's queries and their output gradients
      stage_head_rows<HS>(warp, region<Bf16>(base, ks.q[buf]), kQueries, queries_in(qb), heads_of, qkv_all, ld_qkv, 0,
                          pair, qb);
      stage_head_rows<HS>(warp, region<Bf16>(base, ks.dout[buf]), kQueries, queries_in(qb), heads_of, dout_all, ld_dout,
                          0, pair, qb);
      warp.commit_copies();
    };
    over_blocks(warp, causal ? key0 : 0, T, kQueries, fetch, [&](Index qb, int buf) {
      const Index queries = queries_in(qb);
      const Bf16* q = region<Bf16>(base, ks.q[buf]);
      const Bf16* g = region<Bf16>(base, ks.dout[buf]);
      warp.lanes(kQueries, [&](Index j) {
        lse_q[j] = j < queries ? lse[pair * T + qb + j] : 0.f;
        dsum_q[j] = j < queries ? dsum_all[pair * T + qb + j] : 0.f;
      });
      rows_times_rows<RK, kQueries, HS>(warp, st, ld_sq, k, q, ldh);   // S^T = k q^T
      rows_times_rows<RK, kQueries, HS>(warp, dpt, ld_sq, v, g, ldh);  // dP^T = v dout^T
      warp.lanes(RK, [&](Index r) {  // one lane per key: P^T and dS^T
        for (Index i = 0; i < kQueries; ++i) {
          const Index j = lane_order<kQueries>(i, r);
          const bool seen = r < keys && j < queries && (!causal || qb + j >= key0 + r);
          const float pj = seen ? std::exp(st[r * ld_sq + j] * scale - lse_q[j]) : 0.f;
          pt[r * ld_pq + j] = Bf16(pj);
          dst[r * ld_pq + j] = Bf16(pj * (dpt[r * ld_sq + j] - dsum_q[j]) * scale);
        }
      });
      accumulate_in_registers<RK, kQueries, HS>(warp, dv_acc, pt, ld_pq, g, ldh);   // dv += P^T dout
      accumulate_in_registers<RK, kQueries, HS>(warp, dk_acc, dst, ld_pq, q, ldh);  // dk += dS^T q
    });
    store_accumulators<RK, HS>(warp, grad, ldacc, dk_acc);
    write_rows(warp, grad, ldacc, keys, HS, add,
                   [&](Index r) { return heads_of.row(dqkv_all, ld_dqkv, 1, pair, key0 + r); }, unscaled);
    store_accumulators<RK, HS>(warp, grad, ldacc, dv_acc);
    write_rows(warp, grad, ldacc, keys, HS, add,
                   [&](Index r) { return heads_of.row(dqkv_all, ld_dqkv, 2, pair, key0 + r); }, unscaled);
  });

  // dq: a warp per tile of queries, over the blocks of keys they see.
  const QueryStaging qs(HS);
  constexpr Index RQ = tile_rows(HS), K = RQ, ld_sk = ld_floats(K), ld_pk = ld_rows(K);
  const Index query_tiles = (T + RQ - 1) / RQ;
  device.for_each_warp(pairs * query_tiles, qs.bytes, [=] MOE_HOST_DEVICE(Index w, const typename D::Warp& warp) {
    const TileOf tile = tile_of(w, pairs, T, RQ, causal);
    const Index pair = tile.pair, row0 = tile.first, rows = tile.rows;
    unsigned char* base = warp.staging();
    Bf16* q = region<Bf16>(base, qs.q_s);
    Bf16* g = region<Bf16>(base, qs.dout);
    float* lse_q = region<float>(base, qs.lse);
    float* dsum_q = region<float>(base, qs.dsum);
    float* s = region<float>(base, qs.q_s);
    float* dp = region<float>(base, qs.dp);
    Bf16* ds = region<Bf16>(base, qs.ds);
    float* dq = region<float>(base, qs.dq);
    warp.lanes(RQ, [&](Index r) {
      lse_q[r] = r < rows ? lse[pair * T + row0 + r] : 0.f;
      dsum_q[r] = r < rows ? dsum_all[pair * T + row0 + r] : 0.f;
    });
    Accumulators<RQ, HS, typename D::Warp> dq_acc;
    zero_accumulators<RQ, HS>(warp, dq_acc);
    stage_head_rows<HS>(warp, q, RQ, rows, heads_of, qkv_all, ld_qkv, 0, pair, row0);  // q and dout land with block 0
    stage_head_rows<HS>(warp, g, RQ, rows, heads_of, dout_all, ld_dout, 0, pair, row0);
    HeldRows<RQ, HS, typename D::Warp> q_held;
    const Index key_end = causal ? row0 + rows : T;
    over_key_blocks<HS, K>(warp, base, qs.k, qs.v, heads_of, qkv_all, ld_qkv, pair, key_end,
                           [&](Index kb, Index keys, const Bf16* k, const Bf16* v) {
      if (kb == 0) hold_rows<RQ, HS>(warp, q_held, q, ldh);
      held_times_rows<RQ, K, HS>(warp, s, ld_sk, q_held, k, ldh);  // S = q k^T
      rows_times_rows<RQ, K, HS>(warp, dp, ld_sk, g, v, ldh);  // dP = dout v^T
      warp.lanes(RQ, [&](Index r) {  // one lane per query row: dS
        for (Index i = 0; i < K; ++i) {
          const Index j = lane_order<K>(i, r);
          const bool seen = r < rows && j < keys && (!causal || kb + j <= row0 + r);
          const float pj = seen ? std::exp(s[r * ld_sk + j] * scale - lse_q[r]) : 0.f;
          ds[r * ld_pk + j] = Bf16(pj * (dp[r * ld_sk + j] - dsum_q[r]) * scale);
        }
      });
      accumulate_in_registers<RQ, K, HS>(warp, dq_acc, ds, ld_pk, k, ldh);  // dq += dS k
    });
    store_accumulators<RQ, HS>(warp, dq, ldacc, dq_acc);
    write_rows(warp, dq, ldacc, rows, HS, add,
                   [&](Index r) { return heads_of.row(dqkv_all, ld_dqkv, 0, pair, row0 + r); }, unscaled);
  });
}

}  // namespace fused_attention_detail

// Whether the fused path takes these operands: bf16, head size C / heads 32, 64 (GPT-2's) or 128 (each a compile-time
// kernel: its tiles unroll, and dq, dk and dv stay in registers), and every row of every view (qkv and out; dout and
// dqkv for the backward) on a 16-byte boundary.
template <class S, class... Views>
bool fused_attention_fits(Index channels, Index heads, const Views&... views) {
  if constexpr (!std::is_same_v<S, bfloat16>) {
    return false;
  } else {
    if (heads <= 0 || channels % heads != 0) return false;
    const Index hs = channels / heads;
    if (hs != 32 && hs != 64 && hs != 128) return false;
    if constexpr (sizeof...(Views) > 0) return packable<S>(channels, views...);
    return true;  // the shapes alone (NnOps decides its cache by them)
  }
}

// qkv: [B*T, 3C] -> out: [B*T, C], lse: [B * heads * T] (float, device memory; pair-major as attention.hpp's att):
// attention_forward's out, and lse[pair * T + t] = log sum_j exp(scale * s_tj) over the keys row t sees (scale =
// 1 / sqrt(hs)), kept for the backward. Staging: 34 KB a warp at head size 64 (its queries are held in registers).
template <class S, class D>
void fused_attention_forward(const D& device, ConstMatrixView<S> qkv, Index B, Index T, Index heads, bool causal,
                             MatrixView<S> out, float* lse) {
  static_assert(std::is_same_v<S, bfloat16>, "fused_attention_forward: bf16 only (attention.hpp takes every precision)");
  namespace fd = fused_attention_detail;
  check(lse != nullptr, "fused_attention_forward: lse (a float per query row, [B * heads * T]) is null");
  const auto [channels, hs] = moe::nn::detail::check_attention("fused_attention_forward", qkv, B, T, heads, out.rows,
                                                               out.cols, "out", reinterpret_cast<const S*>(lse));
  check(fused_attention_fits<S>(channels, heads, qkv, out), "fused_attention_forward: bf16, a head size of 32, 64 or 128 ",
        "and 16-byte aligned rows are needed (head size ", hs, "); attention_forward takes the rest");
  switch (hs) {  // fused_attention_fits took only these
    case 32: return fd::forward<32>(device, qkv, B, T, heads, causal, out, lse);
    case 64: return fd::forward<64>(device, qkv, B, T, heads, causal, out, lse);
    default: return fd::forward<128>(device, qkv, B, T, heads, causal, out, lse);
  }
}

// dout: [B*T, C], qkv: [B*T, 3C], out and lse from fused_attention_forward -> dqkv: [B*T, 3C], added into (+=), as
// attention_backward, or written over (GradInto::overwrite: every element has one writer, which then stores instead
// of adding; the same bits as adding into zeros). Scratch: one float per query row (D = rowsum(dout * out),
// FlashAttention's identity for rowsum(P * dP)). Staging: 26 KB (dk, dv) and 35 KB (dq) a warp at head size 64.
template <class S, class D>
void fused_attention_backward(const D& device, ConstMatrixView<S> dout, ConstMatrixView<S> qkv,
                              ConstMatrixView<S> out, const float* lse, Index B, Index T, Index heads, bool causal,
                              MatrixView<S> dqkv, moe::nn::GradInto into = moe::nn::GradInto::add) {
  static_assert(std::is_same_v<S, bfloat16>, "fused_attention_backward: bf16 only (attention.hpp takes every precision)");
  namespace fd = fused_attention_detail;
  check(lse != nullptr, "fused_attention_backward: lse (the forward's, [B * heads * T]) is null");
  const auto [channels, hs] = moe::nn::detail::check_attention("fused_attention_backward", qkv, B, T, heads, dout.rows,
                                                               dout.cols, "dout", reinterpret_cast<const S*>(lse));
  check(out.rows == B * T && out.cols == channels, "fused_attention_backward: out is [", out.rows, ", ", out.cols,
        "], expected [B*T, C] = [", B * T, ", ", channels, "]");
  check(dqkv.rows == B * T && dqkv.cols == 3 * channels, "fused_attention_backward: dqkv is [", dqkv.rows, ", ",
        dqkv.cols, "], expected [B*T, 3C] = [", B * T, ", ", 3 * channels, "]");
  check(fused_attention_fits<S>(channels, heads, qkv, out, dout, dqkv),
        "fused_attention_backward: bf16, a head size of 32, 64 or 128 and 16-byte aligned rows are needed (head size ",
        hs, "); attention_backward takes the rest");
  const bool add = into == moe::nn::GradInto::add;
  switch (hs) {  // fused_attention_fits took only these
    case 32: return fd::backward<32>(device, dout, qkv, out, lse, B, T, heads, causal, dqkv, add);
    case 64: return fd::backward<64>(device, dout, qkv, out, lse, B, T, heads, causal, dqkv, add);
    default: return fd::backward<128>(device, dout, qkv, out, lse, B, T, heads, causal, dqkv, add);
  }
}

}  // namespace moe::cuda::nn
