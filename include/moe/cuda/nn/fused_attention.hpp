// moe/cuda/nn/fused_attention.hpp: multi-head self-attention (causal or bidirectional) with the probabilities kept on
// chip, bf16, forward and backward, on a CUDA-backend device (moe/cuda/device.hpp). FlashAttention's scheme (Dao et
// al., 2022; FlashAttention-2, 2023) over the device's tensor-core tiles (D::for_each_warp). Same semantics, layout
// and "+=" convention as moe/cuda/nn/attention.hpp, which materialises the [B, heads, T, T] probabilities: here the
// forward keeps only each query row's log-sum-exp of its scaled scores (lse, float, [B * heads * T]), and the backward
// recomputes the probabilities tile by tile from q, k and lse.
//
// Work: one warp per tile of rows of one (b, h) pair (32 rows up to head size 64, else 16): query rows for the forward
// and for dq, keys for dk and dv. The warp copies its tile and each block of 16 rows of the other side into its
// staging memory (asynchronous copies, the next block's in flight during this one's products; zero past T and past the
// block's end, so a tile product reads nothing else) and runs the products on tensor cores with the scores, the
// probabilities, the softmax's running max and sum and every accumulator (out, dq, dk, dv) in registers: each lane
// knows which elements of a tile it holds (D::Warp's element-wise calls), so the softmax and its gradient run in place
// and a probability tile becomes the next product's operand without a trip through the staging. A row's max and sum
// are folded over its lanes in the device's fixed order.
// No floating-point atomics: dq has a pass of its own (over key blocks) instead of FlashAttention-2's atomic adds, so
// every output element has one writer and reruns give the same bits.
//
// Rounding: scores, the running max and sum, and the accumulators in float; a probability (or dS) is rounded to bf16
// before its product, as the materialised path stores it; out is the accumulator / sum, rounded once. Results match
// attention.hpp's within bf16 rounding (tests/cuda/cuda_nn_fused_attention_cases.hpp), not bit for bit.
//
// Non-finite inputs: a masked score's probability and gradient (dS) are exactly 0, whatever dP is there (so is the
// gradient of any probability that is 0: one that underflowed too, where the CPU's 0 x inf would be NaN). The tile
// products still multiply them, so an infinite or NaN value row makes NaN the rows of out (and of dv, through dout)
// that share its block of 16 keys without seeing it (0 x inf), as attention.hpp's and the CPU's products over whole
// blocks do. Finite inputs give finite results either way.
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
#include "moe/cuda/device_operands.hpp"
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

// The exponentials in base 2 (FlashAttention's way): exp(scale * s - m) = exp2(s * scale * log2(e) - m * log2(e)), a
// fused multiply-add and one ex2 instruction per probability where expf takes a range reduction around its ex2. lse
// stays in natural-log units outside the kernels.
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

// NaN-ignoring max (IEEE maxNum) and the sum, for fold_rows: both commutative on the bits, so a fold's lanes agree. A
// NaN score leaves the max to the rest of its row; its own exponential carries it into that row's output.
struct Max {
  MOE_HOST_DEVICE float operator()(float a, float b) const { return std::fmax(a, b); }
};
struct Sum {
  MOE_HOST_DEVICE float operator()(float a, float b) const { return a + b; }
};

// The tile products, their sizes compile-time constants so that the loops unroll and the register arrays of tiles are
// indexed by constants. Scores, probabilities and accumulators stay in registers (D::Warp's element-wise calls); only
// the operands of the other side come from the staging.

// acc[i][j] = A[row tile i] B[tile j]^T over HS, B given by its staged rows (load_bt): q k^T, k q^T, dout v^T and
// v dout^T. load_a_tile(a, i, d) gives A's fragment at row tile i, depth tile d (held in registers or loaded from the
// staging). Each fragment of either side is loaded once.
template <Index RT, Index CT, Index HS, class Warp, class LoadA>
MOE_HOST_DEVICE void times_rows(const Warp& warp, typename Warp::Acc (&acc)[RT][CT], LoadA load_a_tile, const Bf16* b,
                                Index ld) {
  MOE_UNROLL
  for (Index i = 0; i < RT; ++i) {
    MOE_UNROLL
    for (Index j = 0; j < CT; ++j) warp.fill(acc[i][j], 0.f);
  }
  MOE_UNROLL
  for (Index d = 0; d < HS / kTile; ++d) {
    typename Warp::ARows a[RT];
    MOE_UNROLL
    for (Index i = 0; i < RT; ++i) load_a_tile(a[i], i, d);
    MOE_UNROLL
    for (Index j = 0; j < CT; ++j) {
      typename Warp::BCols bt;
      warp.load_bt(bt, b + j * kTile * ld + d * kTile, ld);
      MOE_UNROLL
      for (Index i = 0; i < RT; ++i) warp.mma(acc[i][j], a[i], bt);
    }
  }
}

// acc[i][d] += P[row tile i, KT tiles of depth] V[depth, column tile d]: P as A operands (to_a of score tiles), V a
// staged block of rows (load_b): out += P v, dv += P^T dout, dk += dS^T q, dq += dS k. Each fragment of V is loaded
// once.
template <Index RT, Index KT, Index DT, class Warp>
MOE_HOST_DEVICE void accumulate(const Warp& warp, typename Warp::Acc (&acc)[RT][DT],
                                const typename Warp::ARows (&p)[RT][KT], const Bf16* v, Index ld) {
  MOE_UNROLL
  for (Index j = 0; j < KT; ++j) {
    MOE_UNROLL
    for (Index d = 0; d < DT; ++d) {
      typename Warp::BRows b;
      warp.load_b(b, v + j * kTile * ld + d * kTile, ld);
      MOE_UNROLL
      for (Index i = 0; i < RT; ++i) warp.mma(acc[i][d], p[i][j], b);
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

// Register tiles -> a staged float tile [RT * 16, DT * 16] (for write_rows); zero -> the register tiles.
template <Index RT, Index DT, class Warp>
MOE_HOST_DEVICE void store_accumulators(const Warp& warp, float* out, Index ld_out,
                                        const typename Warp::Acc (&acc)[RT][DT]) {
  MOE_UNROLL
  for (Index i = 0; i < RT; ++i) {
    MOE_UNROLL
    for (Index d = 0; d < DT; ++d) warp.store_acc(out + i * kTile * ld_out + d * kTile, ld_out, acc[i][d]);
  }
}
template <Index RT, Index DT, class Warp>
MOE_HOST_DEVICE void zero_accumulators(const Warp& warp, typename Warp::Acc (&acc)[RT][DT]) {
  MOE_UNROLL
  for (Index i = 0; i < RT; ++i) {
    MOE_UNROLL
    for (Index d = 0; d < DT; ++d) warp.fill(acc[i][d], 0.f);
  }
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

// acc(r, c) = value(r, c, acc(r, c)) where visible(r, c), else `hidden`. `whole` (the same in every lane): the block
// is all visible (away from the causal diagonal and from T), and the per-element test is skipped.
template <class Warp, class Visible, class Value>
MOE_HOST_DEVICE void map_visible(const Warp& warp, typename Warp::Acc& acc, bool whole, float hidden, Visible visible,
                                 Value value) {
  if (whole)
    warp.map(acc, [&](Index r, Index c, float x) { return value(r, c, x); });
  else
    warp.map(acc, [&](Index r, Index c, float x) { return visible(r, c) ? value(r, c, x) : hidden; });
}

// Rows of a warp's tile: 32 (two 16-row tiles share each staged fragment of the other side) up to head size 64; 16
// above, where the registers would not hold two.
MOE_HOST_DEVICE constexpr Index tile_rows(Index hs) { return hs <= 64 ? 32 : 16; }
// Rows of a staged block of the other side (keys for the forward and dq, queries for dk and dv): one tile, so that a
// warp's staging stays under 19 KB at head size 64 and two or three warps share a block's 48 KB.
inline constexpr Index kBlockRows = kTile;

// The forward's staging for head size hs: a tile of `rows` query rows against blocks of `keys` keys, two blocks (k and
// v) staged at a time: the next one's copies run during this one's products. The scores, the running max and sum and
// the output's accumulator are in registers; out goes through a float tile over the key blocks once they are done.
struct ForwardStaging {
  std::size_t q, k[2], v[2], inverse, o, bytes;
  explicit ForwardStaging(Index hs) {
    const Index rows = tile_rows(hs), keys = kBlockRows;
    StagingLayout layout;
    q = layout.add(std::size_t(rows * ld_rows(hs)) * sizeof(Bf16));
    for (int b = 0; b < 2; ++b) {
      k[b] = layout.add(std::size_t(keys * ld_rows(hs)) * sizeof(Bf16));
      v[b] = layout.add(std::size_t(keys * ld_rows(hs)) * sizeof(Bf16));
    }
    inverse = layout.add(std::size_t(rows) * sizeof(float));
    o = layout.overlay(k[0], std::size_t(rows * ld_floats(hs)) * sizeof(float));
    bytes = layout.bytes;
  }
};

// The backward's two passes, both reading lse and D = rowsum(dout * out) per query row. dk and dv: a tile of `rows`
// keys against blocks of 16 queries (q and dout, two blocks staged at a time). dq: a tile of `rows` queries against
// blocks of `keys` keys (k and v, two at a time).
struct KeyStaging {
  static constexpr Index kQueries = kBlockRows;
  std::size_t k, v, q[2], dout[2], lse, dsum, grad, bytes;
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
    // dk's float tile, then dv's, on their way out: over the query blocks, done with by then.
    grad = layout.overlay(q[0], std::size_t(rows * ld_floats(hs)) * sizeof(float));
    bytes = layout.bytes;
  }
};

// The query tile goes into registers at the first block; dq's float tile goes over it and the rest on its way out.
struct QueryStaging {
  std::size_t q, dout, lse, dsum, k[2], v[2], dq, bytes;
  explicit QueryStaging(Index hs) {
    const Index rows = tile_rows(hs), keys = kBlockRows;
    StagingLayout layout;
    q = layout.add(std::size_t(rows * ld_rows(hs)) * sizeof(Bf16));
    dout = layout.add(std::size_t(rows * ld_rows(hs)) * sizeof(Bf16));
    lse = layout.add(std::size_t(rows) * sizeof(float));
    dsum = layout.add(std::size_t(rows) * sizeof(float));
    for (int b = 0; b < 2; ++b) {
      k[b] = layout.add(std::size_t(keys * ld_rows(hs)) * sizeof(Bf16));
      v[b] = layout.add(std::size_t(keys * ld_rows(hs)) * sizeof(Bf16));
    }
    dq = layout.overlay(q, std::size_t(rows * ld_floats(hs)) * sizeof(float));
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

// One pair's head slice of a [B*T, *] matrix (Heads::head): row t at base + t * ld. A warp makes each once, so a staged
// row's address is a multiply-add, not Heads::row's division of the pair by `heads` (64-bit) for every copy.
template <class E>
struct HeadRows {
  E* base;
  Index ld;
  MOE_HOST_DEVICE E* row(Index t) const { return base + t * ld; }
};
template <class E>
MOE_HOST_DEVICE HeadRows<E> head_rows(const Heads& heads_of, E* m, Index ld, Index part, Index pair) {
  return {heads_of.head(m, ld, part, pair), ld};
}

// The pair's q, k and v slices of qkv, made once per warp.
struct QkvRows {
  HeadRows<const Bf16> q, k, v;
};
template <class S>
MOE_HOST_DEVICE QkvRows qkv_rows(const Heads& heads_of, const S* qkv, Index ld, Index pair) {
  return {head_rows(heads_of, qkv, ld, 0, pair), head_rows(heads_of, qkv, ld, 1, pair),
          head_rows(heads_of, qkv, ld, 2, pair)};
}

// Starts the copies of `valid` rows of a head slice (rows first, first + 1, ...) into a staged block of `rows` rows
// (zeros past `valid`).
template <Index HS, class Warp, class E>
MOE_HOST_DEVICE void stage_head_rows(const Warp& warp, Bf16* dst, Index rows, Index valid, HeadRows<const E> src,
                                     Index first) {
  warp.copy_rows(dst, ld_rows(HS), rows, valid, HS, [&](Index r) { return src.row(first + r); });
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
                                     const std::size_t (&v_at)[2], HeadRows<const Bf16> k_rows,
                                     HeadRows<const Bf16> v_rows, Index key_end, Body body) {
  const auto keys_in = [&](Index kb) { return key_end - kb < K ? key_end - kb : K; };
  const auto fetch = [&](Index kb, int buf) {
    stage_head_rows<HS>(warp, region<Bf16>(base, k_at[buf]), K, keys_in(kb), k_rows, kb);
    stage_head_rows<HS>(warp, region<Bf16>(base, v_at[buf]), K, keys_in(kb), v_rows, kb);
    warp.commit_copies();
  };
  over_blocks(warp, 0, key_end, K, fetch, [&](Index kb, int buf) {
    body(kb, keys_in(kb), region<const Bf16>(base, k_at[buf]), region<const Bf16>(base, v_at[buf]));
  });
}

// The forward for head size HS (fused_attention_forward checks the arguments). Per block of keys, per row tile: the
// scaled, masked scores (in log2 units); the row's new max and the old terms' factor; the probabilities, rounded to
// bf16 as their product takes them (the row's sum adds the rounded values); then out += P v. All in registers.
template <Index HS, class S, class D>
void forward(const D& device, ConstMatrixView<S> qkv, Index B, Index T, Index heads, bool causal, MatrixView<S> out,
             float* lse) {
  using Warp = typename D::Warp;
  using Acc = typename Warp::Acc;
  using RowValues = typename Warp::Rows;
  const Index channels = HS * heads;
  const ForwardStaging at(HS);
  constexpr Index R = tile_rows(HS), K = kBlockRows, RT = R / kTile, KT = K / kTile, DT = HS / kTile;
  const Heads heads_of{T, heads, channels, HS};
  const Index pairs = B * heads, tiles = (T + R - 1) / R, ld_qkv = qkv.stride, ld_out = out.stride;
  constexpr Index ldh = ld_rows(HS), ldo = ld_floats(HS);
  const float scale2 = kLog2e / std::sqrt(float(HS));  // scores -> log2 units
  const S* qkv_all = qkv.data;
  S* out_all = out.data;
  device.for_each_warp(pairs * tiles, at.bytes, [=] MOE_HOST_DEVICE(Index w, const Warp& warp) {
    const TileOf tile = tile_of(w, pairs, T, R, causal);
    const Index pair = tile.pair, row0 = tile.first, rows = tile.rows;
    unsigned char* base = warp.staging();
    Bf16* q = region<Bf16>(base, at.q);
    const QkvRows parts = qkv_rows(heads_of, qkv_all, ld_qkv, pair);
    stage_head_rows<HS>(warp, q, R, rows, parts.q, row0);  // lands with block 0
    HeldRows<R, HS, Warp> q_held;
    Acc o[RT][DT];
    RowValues m[RT], l[RT];  // per row: the running max of the scaled scores (log2 units), the probabilities' sum
    zero_accumulators<RT, DT>(warp, o);
    MOE_UNROLL
    for (Index i = 0; i < RT; ++i)
      warp.for_rows([](Index, float& mi, float& li) { mi = -INFINITY, li = 0.f; }, m[i], l[i]);
    const Index key_end = causal ? row0 + rows : T;
    over_key_blocks<HS, K>(warp, base, at.k, at.v, parts.k, parts.v, key_end,
                           [&](Index kb, Index keys, const Bf16* k, const Bf16* v) {
      if (kb == 0) hold_rows<R, HS>(warp, q_held, q, ldh);
      Acc s[RT][KT];
      times_rows<RT, KT, HS>(
          warp, s, [&](typename Warp::ARows& a, Index i, Index d) { a = q_held[i * DT + d]; }, k, ldh);
      typename Warp::ARows p[RT][KT];
      const bool whole = keys == K && (!causal || kb + K - 1 <= row0);  // every row of the tile sees every key
      MOE_UNROLL
      for (Index i = 0; i < RT; ++i) {
        RowValues block_max, factor, sum;
        warp.for_rows([](Index, float& mx, float& sm) { mx = -INFINITY, sm = 0.f; }, block_max, sum);
        MOE_UNROLL
        for (Index j = 0; j < KT; ++j) {
          map_visible(  // masked: past the block's keys, or later than the row
              warp, s[i][j], whole, -INFINITY,
              [&](Index r, Index c) {
                const Index key = j * kTile + c;
                return key < keys && (!causal || kb + key <= row0 + i * kTile + r);
              },
              [&](Index, Index, float x) { return x * scale2; });
          warp.fold_rows(block_max, s[i][j], Max{});
        }
        // The new max; the old terms' factor (1 while a row has seen nothing: its terms are all 0).
        warp.for_rows(
            [](Index, float& mi, float& mx, float& f) {
              const float next = std::fmax(mi, mx);
              f = next == mi ? 1.f : exp2f(mi - next);
              mi = next;
            },
            m[i], block_max, factor);
        MOE_UNROLL
        for (Index j = 0; j < KT; ++j) {
          warp.map_rows(s[i][j], m[i], [](Index, Index, float x, float mi) { return float(Bf16(exp2f(x - mi))); });
          warp.fold_rows(sum, s[i][j], Sum{});
          warp.to_a(p[i][j], s[i][j]);
        }
        warp.for_rows([](Index, float& li, float& f, float& sm) { li = li * f + sm; }, l[i], factor, sum);
        MOE_UNROLL
        for (Index d = 0; d < DT; ++d)
          warp.map_rows(o[i][d], factor, [](Index, Index, float x, float f) { return x * f; });
      }
      accumulate<RT, KT, DT>(warp, o, p, v, ldh);
    });
    // out = o / l, rounded once; lse = (max + log2(sum)) ln 2.
    float* inverse = region<float>(base, at.inverse);
    MOE_UNROLL
    for (Index i = 0; i < RT; ++i)
      warp.each_row(
          [&](Index r, float mi, float li) {
            const Index row = i * kTile + r;
            inverse[row] = 1.f / li;
            if (row < rows) lse[pair * T + row0 + row] = (mi + log2f(li)) * kLn2;
          },
          m[i], l[i]);
    warp.sync();  // every lane is past its reads of the last key block before o's tile goes over it
    float* o_tile = region<float>(base, at.o);
    store_accumulators<RT, DT>(warp, o_tile, ldo, o);
    const HeadRows<Bf16> out_rows = head_rows(heads_of, out_all, ld_out, 0, pair);
    write_rows(
        warp, o_tile, ldo, rows, HS, false, [&](Index r) { return out_rows.row(row0 + r); },
        [&](Index r) { return inverse[r]; });
  });
}

// The backward for head size HS (fused_attention_backward checks the arguments): D per query row, then the two
// passes.
template <Index HS, class S, class D>
void backward(const D& device, ConstMatrixView<S> dout, ConstMatrixView<S> qkv, ConstMatrixView<S> out,
              const float* lse, Index B, Index T, Index heads, bool causal, MatrixView<S> dqkv, bool add) {
  using Warp = typename D::Warp;
  using Acc = typename Warp::Acc;
  using ARows = typename Warp::ARows;
  const Index channels = HS * heads;
  const Index pairs = B * heads;
  const Heads heads_of{T, heads, channels, HS};
  const Index ld_qkv = qkv.stride, ld_out = out.stride, ld_dout = dout.stride, ld_dqkv = dqkv.stride;
  constexpr Index ldh = ld_rows(HS), ldacc = ld_floats(HS), DT = HS / kTile;
  const float scale = 1.f / std::sqrt(float(HS)), scale2 = scale * kLog2e;  // scale2: scores -> log2 units
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

  // dk and dv: a warp per tile of keys, over the blocks of queries that see them. Per block: S^T = k q^T and
  // dP^T = v dout^T; P^T = exp(scale S^T - lse) and dS^T = P^T (dP^T - D) scale, each rounded to bf16 as its product
  // takes it; dv += P^T dout, dk += dS^T q.
  const KeyStaging ks(HS);
  constexpr Index kQueries = KeyStaging::kQueries;
  constexpr Index RK = tile_rows(HS), KRT = RK / kTile;
  const Index key_tiles = (T + RK - 1) / RK;
  device.for_each_warp(pairs * key_tiles, ks.bytes, [=] MOE_HOST_DEVICE(Index w, const Warp& warp) {
    const TileOf tile = tile_of(w, pairs, T, RK, false);
    const Index pair = tile.pair, key0 = tile.first, keys = tile.rows;
    unsigned char* base = warp.staging();
    Bf16* k = region<Bf16>(base, ks.k);
    Bf16* v = region<Bf16>(base, ks.v);
    float* lse_q = region<float>(base, ks.lse);
    float* dsum_q = region<float>(base, ks.dsum);
    const auto queries_in = [&](Index qb) { return T - qb < kQueries ? T - qb : kQueries; };
    Acc dk[KRT][DT], dv[KRT][DT];
    zero_accumulators<KRT, DT>(warp, dk);
    zero_accumulators<KRT, DT>(warp, dv);
    const QkvRows parts = qkv_rows(heads_of, qkv_all, ld_qkv, pair);
    const HeadRows<const Bf16> dout_rows = head_rows(heads_of, dout_all, ld_dout, 0, pair);
    stage_head_rows<HS>(warp, k, RK, keys, parts.k, key0);
    stage_head_rows<HS>(warp, v, RK, keys, parts.v, key0);
    const auto fetch = [&](Index qb, int buf) {  // block qb's queries and their output gradients
      stage_head_rows<HS>(warp, region<Bf16>(base, ks.q[buf]), kQueries, queries_in(qb), parts.q, qb);
      stage_head_rows<HS>(warp, region<Bf16>(base, ks.dout[buf]), kQueries, queries_in(qb), dout_rows, qb);
      warp.commit_copies();
    };
    over_blocks(warp, causal ? key0 : 0, T, kQueries, fetch, [&](Index qb, int buf) {
      const Index queries = queries_in(qb);
      const Bf16* q = region<Bf16>(base, ks.q[buf]);
      const Bf16* g = region<Bf16>(base, ks.dout[buf]);
      warp.lanes(kQueries, [&](Index j) {  // lse in log2 units
        lse_q[j] = j < queries ? lse[pair * T + qb + j] * kLog2e : 0.f;
        dsum_q[j] = j < queries ? dsum_all[pair * T + qb + j] : 0.f;
      });
      Acc st[KRT][1], dpt[KRT][1];
      times_rows<KRT, 1, HS>(
          warp, st, [&](ARows& a, Index i, Index d) { warp.load_a(a, k + i * kTile * ldh + d * kTile, ldh); }, q, ldh);
      times_rows<KRT, 1, HS>(
          warp, dpt, [&](ARows& a, Index i, Index d) { warp.load_a(a, v + i * kTile * ldh + d * kTile, ldh); }, g, ldh);
      ARows pt[KRT][1], dst[KRT][1];
      const bool whole = keys == RK && queries == kQueries && (!causal || qb >= key0 + RK - 1);
      MOE_UNROLL
      for (Index i = 0; i < KRT; ++i) {
        map_visible(  // key i * 16 + r, query c of the block
            warp, st[i][0], whole, 0.f,
            [&](Index r, Index c) {
              return i * kTile + r < keys && c < queries && (!causal || qb + c >= key0 + i * kTile + r);
            },
            [&](Index, Index c, float x) { return exp2f(x * scale2 - lse_q[c]); });
        // dS is 0 where P is (masked, or underflowed), not 0 * (dP - D): a non-finite dP there (an infinite
        // dout or v) must not reach dk. A select, not the mask again: the registers are full here at head size 64.
        warp.zip(dpt[i][0], st[i][0], [&](Index, Index c, float dp, float p) {
          return p == 0.f ? 0.f : p * (dp - dsum_q[c]) * scale;
        });
        warp.to_a(pt[i][0], st[i][0]);
        warp.to_a(dst[i][0], dpt[i][0]);
      }
      accumulate<KRT, 1, DT>(warp, dv, pt, g, ldh);   // dv += P^T dout
      accumulate<KRT, 1, DT>(warp, dk, dst, q, ldh);  // dk += dS^T q
    });
    float* grad = region<float>(base, ks.grad);
    warp.sync();  // every lane is past its reads of the last query block before the float tile goes over it
    const HeadRows<Bf16> dk_rows = head_rows(heads_of, dqkv_all, ld_dqkv, 1, pair),
                         dv_rows = head_rows(heads_of, dqkv_all, ld_dqkv, 2, pair);
    store_accumulators<KRT, DT>(warp, grad, ldacc, dk);
    write_rows(warp, grad, ldacc, keys, HS, add, [&](Index r) { return dk_rows.row(key0 + r); }, unscaled);
    store_accumulators<KRT, DT>(warp, grad, ldacc, dv);
    write_rows(warp, grad, ldacc, keys, HS, add, [&](Index r) { return dv_rows.row(key0 + r); }, unscaled);
  });

  // dq: a warp per tile of queries, over the blocks of keys they see. Per block: S = q k^T, dP = dout v^T,
  // dS = exp(scale S - lse) (dP - D) scale rounded to bf16, dq += dS k.
  const QueryStaging qs(HS);
  constexpr Index RQ = tile_rows(HS), K = kBlockRows, QRT = RQ / kTile, KT = K / kTile;
  const Index query_tiles = (T + RQ - 1) / RQ;
  device.for_each_warp(pairs * query_tiles, qs.bytes, [=] MOE_HOST_DEVICE(Index w, const Warp& warp) {
    const TileOf tile = tile_of(w, pairs, T, RQ, causal);
    const Index pair = tile.pair, row0 = tile.first, rows = tile.rows;
    unsigned char* base = warp.staging();
    Bf16* q = region<Bf16>(base, qs.q);
    Bf16* g = region<Bf16>(base, qs.dout);
    float* lse_q = region<float>(base, qs.lse);
    float* dsum_q = region<float>(base, qs.dsum);
    warp.lanes(RQ, [&](Index r) {  // lse in log2 units
      lse_q[r] = r < rows ? lse[pair * T + row0 + r] * kLog2e : 0.f;
      dsum_q[r] = r < rows ? dsum_all[pair * T + row0 + r] : 0.f;
    });
    Acc dq[QRT][DT];
    zero_accumulators<QRT, DT>(warp, dq);
    const QkvRows parts = qkv_rows(heads_of, qkv_all, ld_qkv, pair);
    stage_head_rows<HS>(warp, q, RQ, rows, parts.q, row0);  // q and dout land with block 0
    stage_head_rows<HS>(warp, g, RQ, rows, head_rows(heads_of, dout_all, ld_dout, 0, pair), row0);
    HeldRows<RQ, HS, Warp> q_held;
    const Index key_end = causal ? row0 + rows : T;
    over_key_blocks<HS, K>(warp, base, qs.k, qs.v, parts.k, parts.v, key_end,
                           [&](Index kb, Index keys, const Bf16* k, const Bf16* v) {
      if (kb == 0) hold_rows<RQ, HS>(warp, q_held, q, ldh);
      Acc s[QRT][KT], dp[QRT][KT];
      times_rows<QRT, KT, HS>(warp, s, [&](ARows& a, Index i, Index d) { a = q_held[i * DT + d]; }, k, ldh);
      times_rows<QRT, KT, HS>(
          warp, dp, [&](ARows& a, Index i, Index d) { warp.load_a(a, g + i * kTile * ldh + d * kTile, ldh); }, v, ldh);
      ARows ds[QRT][KT];
      const bool whole = rows == RQ && keys == K && (!causal || kb + K - 1 <= row0);
      MOE_UNROLL
      for (Index i = 0; i < QRT; ++i) {
        MOE_UNROLL
        for (Index j = 0; j < KT; ++j) {
          map_visible(  // P: query row i * 16 + r, key j * 16 + c of the block
              warp, s[i][j], whole, 0.f,
              [&](Index r, Index c) {
                const Index row = i * kTile + r, key = j * kTile + c;
                return row < rows && key < keys && (!causal || kb + key <= row0 + row);
              },
              [&](Index r, Index, float x) { return exp2f(x * scale2 - lse_q[i * kTile + r]); });
          warp.zip(dp[i][j], s[i][j], [&](Index r, Index, float dpv, float p) {  // 0 where P is, as above
            return p == 0.f ? 0.f : p * (dpv - dsum_q[i * kTile + r]) * scale;
          });
          warp.to_a(ds[i][j], dp[i][j]);
        }
      }
      accumulate<QRT, KT, DT>(warp, dq, ds, k, ldh);  // dq += dS k
    });
    float* dq_tile = region<float>(base, qs.dq);
    warp.sync();  // every lane is past its reads of q, dout and the last key block before the float tile goes over them
    store_accumulators<QRT, DT>(warp, dq_tile, ldacc, dq);
    const HeadRows<Bf16> dq_rows = head_rows(heads_of, dqkv_all, ld_dqkv, 0, pair);
    write_rows(warp, dq_tile, ldacc, rows, HS, add, [&](Index r) { return dq_rows.row(row0 + r); }, unscaled);
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
// 1 / sqrt(hs)), kept for the backward. Staging: 14 KB a warp at head size 64 (its queries are held in registers).
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
  const DeviceOperands on_device(device, "fused_attention_forward");
  on_device("qkv", qkv); on_device("out", out); on_device("lse", lse, B * heads * T);
  switch (hs) {  // fused_attention_fits took only these
    case 32: return fd::forward<32>(device, qkv, B, T, heads, causal, out, lse);
    case 64: return fd::forward<64>(device, qkv, B, T, heads, causal, out, lse);
    default: return fd::forward<128>(device, qkv, B, T, heads, causal, out, lse);
  }
}

// dout: [B*T, C], qkv: [B*T, 3C], out and lse from fused_attention_forward -> dqkv: [B*T, 3C], added into (+=), as
// attention_backward, or written over (GradInto::overwrite: every element has one writer, which then stores instead
// of adding; the same bits as adding into zeros). Scratch: one float per query row (D = rowsum(dout * out),
// FlashAttention's identity for rowsum(P * dP)). Staging: 18 KB (dk, dv) and 18 KB (dq) a warp at head size 64.
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
  const DeviceOperands on_device(device, "fused_attention_backward");
  on_device("dout", dout); on_device("qkv", qkv); on_device("out", out); on_device("lse", lse, B * heads * T);
  on_device("dqkv", dqkv);
  const bool add = into == moe::nn::GradInto::add;
  switch (hs) {  // fused_attention_fits took only these
    case 32: return fd::backward<32>(device, dout, qkv, out, lse, B, T, heads, causal, dqkv, add);
    case 64: return fd::backward<64>(device, dout, qkv, out, lse, B, T, heads, causal, dqkv, add);
    default: return fd::backward<128>(device, dout, qkv, out, lse, B, T, heads, causal, dqkv, add);
  }
}

}  // namespace moe::cuda::nn
