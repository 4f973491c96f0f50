// moe/cuda/grouped_gemm.hpp: one product per expert over the experts' blocks of rows, in one
// launch that finds each block's expert from offsets in device memory (no host copy of them) and
// gathers the rows from the layer's input as it loads them (no expert-sorted copy first):
//
//   for every group g and every row r in [offsets[g], offsets[g + 1]):
//     out[r, :] = epilogue(A[source(r), :] W_g^T + bias_g)
//
//   A       [*, K] row-major (lda); source(r) = gather[r] / gather_divisor, or r when gather is null
//           (the backend's slot_of_row over top_k: the token of the expert-sorted row r)
//   W_g     w + g * w_stride: [N, K] row-major, nn.Linear's [out, in] layout
//   bias_g  bias + g * bias_stride: [N] (Epilogue::bias and bias_gelu)
//   out     [rows, N] row-major (ldc); aux the same shape (ldaux) for bias_gelu's pre-activation
//
// With `swiglu`, W_g holds 2N rows, SwiGLU's [gate; up] (the expert bank's gate_up weights), and
//
//   out[r, c] = silu(gate) * up,   gate = A[source(r)] . W_g[c],  up = A[source(r)] . W_g[N + c]
//
// each of gate and up rounded to bf16 first, as the unfused path stores gate_up before its SwiGLU
// pass (the same bits). A tile's BN columns of W are then BN/2 gate rows and the BN/2 up rows of
// the same outputs, so each thread holds both values of its outputs (grouped_gemm_detail::
// weight_row); the [rows, 2N] gate_up matrix and the pass over it are never made.
//
// and, where `combine.y` is set (the MoE layer's second product), the layer's combine as well:
//
//   y[t, :] = sum_j weights[t k + j] * out[row_of_slot[t k + j], :]   in ascending j, in fp32
//
// each token's sum made by whichever of its k rows is written last. Every row counts its arrival in
// `arrivals` (per token and BN-column block, one atomic per row: integers, so the count is exact);
// the k-th reads the others' rows back (from L2 while they are still there) and sums them in slot
// order, so the result does not depend on which row came last: the bits of the separate combine
// (the CUDA backend's gather_sum), without its launch and its second read of every row. It needs every slot
// kept (no capacity drops): then every token gets exactly k arrivals and each count ends where it
// began, at zero.
//
// The GPU runs it as a Hopper kernel (moe/cuda/hopper_grouped_gemm.cuh): wgmma products read
// from shared memory that cp.async fills in 128-byte-swizzled rows, a block of 2 warpgroups per
// tile of kTileRows rows and BN columns. This header holds what the kernel and its host emulation
// share, so the emulation checks the kernel's own arithmetic on indices: the tile plan over the
// groups, the gathered rows' addresses, the swizzled placement in shared memory, the matrix
// descriptors, the accumulator fragment's coordinates and the epilogue. grouped_gemm_emulated
// runs the kernel's steps on the host and reads its shared memory through the descriptors the
// way the PTX ISA describes wgmma reading it (K-major operands, 128-byte swizzle).
//
// Precision: bf16 operands, fp32 accumulation, each output rounded once (aux and out both from the
// fp32 pre-activation, as cuBLASLt's GELU_AUX_BIAS epilogue).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "moe/activations.hpp"
#include "moe/bfloat16.hpp"
#include "moe/config.hpp"
#include "moe/cuda/device.hpp"
#include "moe/host_device.hpp"

namespace moe::cuda {

// The layer's combine folded into the grouped product (above); null y: none.
template <class S>
struct GroupedCombine {
  S* y = nullptr;                              // [tokens, N] (ldy)
  Index ldy = 0;
  Index tokens = 0, top_k = 0;
  const std::int32_t* slot_of_row = nullptr;   // row -> slot t * k + j
  const std::int32_t* row_of_slot = nullptr;   // slot -> row
  const S* weights = nullptr;                  // [tokens * k], a slot's weight
  std::uint32_t* arrivals = nullptr;           // [tokens * N / kGroupedGemmColumns], zeros (left zeros)
};

template <class S>
struct GroupedGemm {
  const S* a = nullptr;
  Index lda = 0;
  const std::int32_t* gather = nullptr;  // [rows] or null
  std::int32_t gather_divisor = 1;
  const Index* offsets = nullptr;  // [groups + 1], device memory, ascending from 0
  Index groups = 0;
  Index max_rows = 0;  // an upper bound of offsets[groups] the host knows (sizes the launch)
  const S* w = nullptr;
  Index w_stride = 0;
  const S* bias = nullptr;
  Index bias_stride = 0;
  S* out = nullptr;
  Index ldc = 0;
  S* aux = nullptr;  // bias_gelu: the pre-activation (null: not kept)
  Index ldaux = 0;
  Index n = 0, k = 0;
  Epilogue epilogue = Epilogue::none;  // none, bias or bias_gelu
  bool swiglu = false;                 // W_g is [gate; up], 2N rows; out = silu(gate) * up (epilogue none)
  GroupedCombine<S> combine;           // the layer's combine as well, where combine.y is set
};

// The columns of a tile in the devices' grouped GEMM (CudaDevice and EmulatedDevice::grouped_gemm):
// N must be a multiple of it, K of grouped_gemm_detail::kStageK.
inline constexpr int kGroupedGemmColumns = 128;
// The most groups a launch takes: the kernel keeps their offsets in shared memory (the backend's
// groups are its experts, at most kMaxExperts = 256).
inline constexpr Index kMaxGroupedGemmGroups = 256;

namespace grouped_gemm_detail {

inline constexpr Index kTileRows = 128;        // rows of a block's tile: 2 warpgroups of 64
inline constexpr Index kWarpgroupRows = 64;    // wgmma's M
inline constexpr Index kStageK = 64;           // K per pipeline stage: one 128-byte row of bf16
inline constexpr Index kStepK = 16;            // wgmma's K for 16-bit operands
inline constexpr Index kRowBytes = 128;        // a stage's row of either operand
inline constexpr Index kChunkBytes = 16;       // one cp.async
inline constexpr Index kChunksPerRow = kRowBytes / kChunkBytes;
inline constexpr Index kSwizzleAtomBytes = 8 * kRowBytes;  // 8 rows: the 128-byte swizzle's period
inline constexpr int kThreads = 256;           // 2 warpgroups

// ---- the tile plan -------------------------------------------------------------------------------
// Group g's rows take ceil(rows_g / kTileRows) tiles, the groups' tiles in group order. A launch
// sizes its grid by tiles_bound (the host does not know the offsets); tiles past the last one are
// empty and their blocks return at once.
struct Tile {
  Index group = 0, row_begin = 0, row_end = 0;
  bool valid = false;
};

MOE_HOST_DEVICE inline Tile tile_of(const Index* offsets, Index groups, Index tile) {
  Index first = 0;
  for (Index g = 0; g < groups; ++g) {
    const Index begin = offsets[g], end = offsets[g + 1];
    const Index tiles = (end - begin + kTileRows - 1) / kTileRows;
    if (tile < first + tiles) {
      const Index row_begin = begin + (tile - first) * kTileRows;
      return {g, row_begin, row_begin + kTileRows < end ? row_begin + kTileRows : end, true};
    }
    first += tiles;
  }
  return {};
}

// sum_g ceil(rows_g / kTileRows) <= ceil(sum_g rows_g / kTileRows) + groups.
inline Index tiles_bound(Index max_rows, Index groups) { return (max_rows + kTileRows - 1) / kTileRows + groups; }

// The most row tiles a launch takes: the GPU grid's y dimension (the column tiles run along x).
inline constexpr Index kMaxRowTiles = 65535;
// Whether a launch over up to `max_rows` rows in `groups` groups fits the grid (about 8.35M rows).
inline bool rows_fit(Index max_rows, Index groups) { return tiles_bound(max_rows, groups) <= kMaxRowTiles; }

// Outputs a tile's BN columns of W make: BN, or BN/2 with swiglu (a gate and an up column each).
template <class S>
MOE_HOST_DEVICE Index tile_outputs(const GroupedGemm<S>& p, int block_n) {
  return p.swiglu ? block_n / 2 : block_n;
}
// The W_g row that column j of a tile multiplies by, for the tile whose first output column is f0:
// f0 + j, or with swiglu the gate row f0 + j (j < BN/2) and the up row N + f0 + j - BN/2 (the
// partner of the gate BN/2 columns before it).
template <class S>
MOE_HOST_DEVICE Index weight_row(const GroupedGemm<S>& p, Index f0, int block_n, Index j) {
  if (!p.swiglu) return f0 + j;
  return j < block_n / 2 ? f0 + j : p.n + f0 + j - block_n / 2;
}
// SwiGLU's output from the fp32 gate and up products: each rounded to S as the stored gate_up
// would be, then the unfused pass's arithmetic (BasicBackend::swiglu_forward).
template <class S>
MOE_HOST_DEVICE S swiglu_output(float gate, float up) {
  return S(activation::silu(float(S(gate))) * float(S(up)));
}

// The A row a tile's row r (absolute, in the groups' concatenation) reads.
template <class S>
MOE_HOST_DEVICE Index source_row(const GroupedGemm<S>& p, Index r) {
  return p.gather ? Index(p.gather[r] / p.gather_divisor) : r;
}

// ---- shared memory: 128-byte rows, swizzled ---------------------------------------------------
// A stage holds kStageK columns of kTileRows rows of A, then of BN rows of W_g, each row 128 bytes
// of 8 chunks of 16. Chunk c of row r lies at r * 128 + (c ^ (r % 8)) * 16 from a tile that starts
// on a 1024-byte boundary: the 128-byte swizzle (address bits 4-6 XOR bits 7-9), so the 8 rows a
// wgmma fetches together spread over all of shared memory's banks.
MOE_HOST_DEVICE inline std::uint32_t swizzled_chunk(Index row, Index chunk) {
  return std::uint32_t(row * kRowBytes + ((chunk ^ (row & 7)) * kChunkBytes));
}

template <int BN>
struct StageLayout {
  static constexpr std::uint32_t a_bytes = std::uint32_t(kTileRows * kRowBytes);
  static constexpr std::uint32_t b_bytes = std::uint32_t(BN * kRowBytes);
  static constexpr std::uint32_t bytes = a_bytes + b_bytes;  // a multiple of 1024
  static_assert(bytes % kSwizzleAtomBytes == 0);
};

// A wgmma matrix descriptor for a K-major operand at `address` (shared memory, bytes): rows in
// groups of 8 (the swizzle's atoms) 1024 bytes apart, 128-byte swizzle. Fields (PTX ISA,
// "matrix descriptor"): bits 0-13 address >> 4; 16-29 leading byte offset >> 4 (unused by a
// swizzled K-major operand whose K fits one 128-byte row: 1 by convention); 32-45 stride byte
// offset >> 4 (between 8-row groups); 49-51 base offset (0: the atoms start 1024-aligned);
// 62-63 swizzle mode (1 = 128 bytes). Stepping K by 16 elements adds 32 bytes to the address.
MOE_HOST_DEVICE inline std::uint64_t operand_descriptor(std::uint32_t address) {
  return (std::uint64_t((address & 0x3FFFF) >> 4)) | (std::uint64_t(1) << 16) |
         (std::uint64_t(kSwizzleAtomBytes >> 4) << 32) | (std::uint64_t(1) << 62);
}

// ---- the accumulator fragment -------------------------------------------------------------------
// wgmma m64nNk16 with fp32 accumulators leaves N / 2 values in each of a warpgroup's 128 threads:
// value i of thread t is row 16 (t / 32) + (t % 32) / 4 + 8 ((i / 2) % 2), column
// 8 (i / 4) + 2 (t % 4) + i % 2 (PTX ISA, "wgmma .m64nNk16 register fragment layout for the
// accumulator matrix D": mma.m16n8's C layout, warps stacked along M, repeated along N).
MOE_HOST_DEVICE inline Index fragment_row(int thread, int i) { return 16 * (thread / 32) + (thread % 32) / 4 + 8 * ((i / 2) % 2); }
MOE_HOST_DEVICE inline Index fragment_col(int thread, int i) { return 8 * (i / 4) + 2 * (thread % 4) + i % 2; }

// ---- the epilogue --------------------------------------------------------------------------------
// One output value from its fp32 product: out, and aux (bias_gelu's pre-activation), each rounded
// once from fp32.
template <class S>
struct OutputValues {
  S out, aux;
};
template <class S>
MOE_HOST_DEVICE OutputValues<S> output_values(Epilogue epilogue, float acc, const S* bias, Index c) {
  if (epilogue == Epilogue::none) return {S(acc), S(0.0f)};
  const float pre = acc + float(bias[c]);
  if (epilogue == Epilogue::bias) return {S(pre), S(0.0f)};
  return {S(activation::gelu(pre)), S(pre)};
}

// ---- the combine ---------------------------------------------------------------------------------
// The token a row holds a slot of, and where that token's arrivals are counted for the block of BN
// columns from n0.
template <class S>
MOE_HOST_DEVICE Index token_of_row(const GroupedCombine<S>& m, Index row) {
  return Index(m.slot_of_row[row]) / m.top_k;
}
template <class S>
MOE_HOST_DEVICE std::uint32_t* arrival_counter(const GroupedGemm<S>& p, Index token, Index n0, int block_n) {
  return p.combine.arrivals + token * (p.n / block_n) + n0 / block_n;
}
// Token t's combined values of Pairs pairs of columns, from its k rows in slot order: load(r, i)
// gives pair i of row r, store(i, y0, y1) takes pair i's result. The arithmetic of the backend's
// gather_sum: sum += weight * value in fp32, in ascending j, rounded once. The rows are the outer
// loop, so a row's Pairs loads are in flight together (the kernel's lane has BN / 8 pairs; the
// sums of each pair keep their order, so the bits do not depend on Pairs).
template <int Pairs, class S, class Load, class Store>
MOE_HOST_DEVICE void combined_pairs(const GroupedCombine<S>& m, Index token, Load load, Store store) {
  float sum[Pairs][2] = {};
  for (Index j = 0; j < m.top_k; ++j) {
    const Index slot = token * m.top_k + j;
    const Index r = Index(m.row_of_slot[slot]);
    const float w = float(m.weights[slot]);
    MOE_UNROLL
    for (int i = 0; i < Pairs; ++i) {
      S v0, v1;
      load(r, i, v0, v1);
      sum[i][0] += w * float(v0);
      sum[i][1] += w * float(v1);
    }
  }
  MOE_UNROLL
  for (int i = 0; i < Pairs; ++i) store(i, S(sum[i][0]), S(sum[i][1]));
}

// combined_pairs' load for the host emulation (one pair): row r's pair at column c of out, as any
// other memory. (Functors, not lambdas: a host lambda called from a host-device function is an
// nvcc warning.)
struct PairOfRow {
  const bfloat16* out;
  Index ldc, c;
  MOE_HOST_DEVICE void operator()(Index r, int, bfloat16& v0, bfloat16& v1) const {
    v0 = out[r * ldc + c], v1 = out[r * ldc + c + 1];
  }
};
// And its store: the pair into y at column c.
struct PairInto {
  bfloat16* y;
  Index c;
  MOE_HOST_DEVICE void operator()(int, bfloat16 y0, bfloat16 y1) const { y[c] = y0, y[c + 1] = y1; }
};

// The host's reading of a descriptor: the byte of shared memory that element (row, e) of a
// K-major 16-bit operand (row < 8 * groups, e < 16 within one wgmma step) comes from. The address
// walks rows as the descriptor says (8-row groups at the stride byte offset, 128 bytes between
// the rows of a group), then the 128-byte swizzle permutes the 16-byte chunks within each
// 1024-byte period by the row's place in it.
inline std::uint32_t descriptor_byte(std::uint64_t descriptor, Index row, Index e) {
  const std::uint32_t start = std::uint32_t(descriptor & 0x3FFF) << 4;
  const std::uint32_t stride = std::uint32_t((descriptor >> 32) & 0x3FFF) << 4;
  const std::uint32_t logical = start + std::uint32_t(row / 8) * stride + std::uint32_t(row % 8) * std::uint32_t(kRowBytes) + std::uint32_t(e) * 2;
  return logical ^ (((logical >> 7) & 7) << 4);
}

}  // namespace grouped_gemm_detail

// Whether rows at `data`, `stride` elements apart, go in the kernel's 16-byte copies: A's rows
// and W's (the backend asks it of an input before it skips the gather).
template <class S>
bool rows_copyable(const S* data, Index stride) {
  constexpr Index per_chunk = grouped_gemm_detail::kChunkBytes / Index(sizeof(S));
  return stride % per_chunk == 0 && reinterpret_cast<std::uintptr_t>(data) % grouped_gemm_detail::kChunkBytes == 0;
}
// Whether rows at `data`, `stride` elements apart, take the epilogue's stores of two neighbouring
// 16-bit outputs as one 4-byte word: out, aux and the combine's y (the backend asks it of y before
// it folds the combine in).
template <class S>
bool pairs_storable(const S* data, Index stride) {
  return stride % 2 == 0 && reinterpret_cast<std::uintptr_t>(data) % (2 * sizeof(S)) == 0;
}

// Argument checks shared by every device: what the kernel's tiles assume.
template <class S>
void check_grouped_gemm(const GroupedGemm<S>& p, int block_n) {
  check(p.groups >= 1 && p.groups <= kMaxGroupedGemmGroups && p.offsets, "grouped_gemm: needs groups in [1, ",
        kMaxGroupedGemmGroups, "] and their offsets, got groups = ", p.groups);
  const Index outputs = grouped_gemm_detail::tile_outputs(p, block_n), w_rows = p.swiglu ? 2 * p.n : p.n;
  check(p.n > 0 && p.k > 0 && p.n % outputs == 0 && p.k % grouped_gemm_detail::kStageK == 0,
        "grouped_gemm: N = ", p.n, " must be a multiple of ", outputs, p.swiglu ? " (swiglu: half a tile)" : "",
        " and K = ", p.k, " of ", grouped_gemm_detail::kStageK);
  check(p.max_rows >= 0 && (p.max_rows == 0 || (p.a && p.w && p.out)), "grouped_gemm: A, W and out must be set");
  check(grouped_gemm_detail::rows_fit(p.max_rows, p.groups), "grouped_gemm: max_rows = ", p.max_rows, " in ", p.groups,
        " groups needs more than ", grouped_gemm_detail::kMaxRowTiles, " tiles of ", grouped_gemm_detail::kTileRows,
        " rows");
  check(p.lda >= p.k && p.ldc >= p.n && p.w_stride >= w_rows * p.k, "grouped_gemm: lda = ", p.lda, ", ldc = ", p.ldc,
        ", w_stride = ", p.w_stride, " are too small for N = ", p.n, ", K = ", p.k, p.swiglu ? " (swiglu: 2N rows of W)" : "");
  check(!p.swiglu || (p.epilogue == Epilogue::none && !p.aux && !p.combine.y),
        "grouped_gemm: swiglu is its own epilogue: no bias, aux or combine");
  // 16-byte copies of A's rows and W's (its groups w_stride apart, its rows K apart: a multiple
  // of kStageK), 4-byte stores of two outputs.
  check(rows_copyable(p.a, p.lda) && rows_copyable(p.w, p.w_stride),
        "grouped_gemm: A and W must start 16-byte aligned, with lda and w_stride multiples of 8 elements");
  check(pairs_storable(p.out, p.ldc) && (!p.aux || pairs_storable(p.aux, p.ldaux)),
        "grouped_gemm: out and aux must start 4-byte aligned, with even leading dimensions");
  check(p.epilogue == Epilogue::none || p.epilogue == Epilogue::bias || p.epilogue == Epilogue::bias_gelu,
        "grouped_gemm: the epilogue must be none, bias or bias_gelu");
  check(p.epilogue == Epilogue::none || p.bias, "grouped_gemm: the epilogue needs a bias");
  check(!p.aux || (p.epilogue == Epilogue::bias_gelu && p.ldaux >= p.n),
        "grouped_gemm: aux is bias_gelu's pre-activation, [rows, >= N]");
  check(!p.gather || p.gather_divisor >= 1, "grouped_gemm: gather_divisor must be >= 1");
  const GroupedCombine<S>& m = p.combine;
  if (m.y) {
    check(m.top_k >= 1 && m.tokens >= 0 && (m.tokens == 0 || (m.slot_of_row && m.row_of_slot && m.weights && m.arrivals)),
          "grouped_gemm: the combine needs top_k >= 1, slot_of_row, row_of_slot, weights and arrivals");
    check(m.ldy >= p.n && pairs_storable(m.y, m.ldy),
          "grouped_gemm: the combine's y must start 4-byte aligned, with an even ldy >= N (", m.ldy, ")");
    check(p.max_rows >= m.tokens * m.top_k, "grouped_gemm: the combine needs every slot's row: max_rows = ", p.max_rows,
          " < tokens * top_k = ", m.tokens * m.top_k);
  }
}

// What a grouped product reads and writes, for a device that checks its memory (host copies of
// the offsets and gathered indices: the emulated device's memory is the host's). Calls
// inside(pointer, bytes, what) for every extent.
template <class Inside>
void for_each_grouped_gemm_extent(const GroupedGemm<bfloat16>& p, Inside inside) {
  inside(p.offsets, std::size_t(p.groups + 1) * sizeof(Index), "grouped_gemm's offsets");
  const Index rows = p.offsets[p.groups];
  check(rows <= p.max_rows, "grouped_gemm: the offsets end at ", rows, " rows, past max_rows = ", p.max_rows);
  if (rows == 0) return;
  Index last_source = rows - 1;
  if (p.gather) {
    inside(p.gather, std::size_t(rows) * sizeof(std::int32_t), "grouped_gemm's gathered rows");
    last_source = 0;
    for (Index r = 0; r < rows; ++r) last_source = std::max(last_source, grouped_gemm_detail::source_row(p, r));
  }
  const auto span = [](Index count, Index stride, Index width) { return std::size_t((count - 1) * stride + width); };
  inside(p.a, span(last_source + 1, p.lda, p.k) * sizeof(bfloat16), "grouped_gemm's A");
  inside(p.w, span(p.groups, p.w_stride, (p.swiglu ? 2 * p.n : p.n) * p.k) * sizeof(bfloat16), "grouped_gemm's weights");
  if (p.epilogue != Epilogue::none) inside(p.bias, span(p.groups, p.bias_stride, p.n) * sizeof(bfloat16), "grouped_gemm's bias");
  inside(p.out, span(rows, p.ldc, p.n) * sizeof(bfloat16), "grouped_gemm's out");
  if (p.aux) inside(p.aux, span(rows, p.ldaux, p.n) * sizeof(bfloat16), "grouped_gemm's aux");
  const GroupedCombine<bfloat16>& m = p.combine;
  if (m.y) {
    check(rows == m.tokens * m.top_k, "grouped_gemm: the combine needs every slot kept: the offsets end at ", rows,
          " rows, tokens * top_k = ", m.tokens * m.top_k);
    const std::size_t slots = std::size_t(rows);
    inside(m.slot_of_row, slots * sizeof(std::int32_t), "grouped_gemm's slot_of_row");
    inside(m.row_of_slot, slots * sizeof(std::int32_t), "grouped_gemm's row_of_slot");
    inside(m.weights, slots * sizeof(bfloat16), "grouped_gemm's combine weights");
    inside(m.arrivals, std::size_t(m.tokens * (p.n / kGroupedGemmColumns)) * sizeof(std::uint32_t),
           "grouped_gemm's arrivals");
    inside(m.y, span(m.tokens, m.ldy, p.n) * sizeof(bfloat16), "grouped_gemm's combine output");
  }
}

// The kernel's steps on the host, with host pointers (offsets and gather included): for each tile
// and each BN-column block, the stages are placed in a 1024-aligned buffer by the kernel's
// placement, each warpgroup's products read them through its descriptors (descriptor_byte), and
// its fragment goes through the epilogue by the fragment's coordinates. Products accumulate in
// fp32, one fused multiply-add per term in K order.
template <int BN>
void grouped_gemm_emulated(const GroupedGemm<bfloat16>& p) {
  namespace gd = grouped_gemm_detail;
  check_grouped_gemm(p, BN);
  using Layout = gd::StageLayout<BN>;
  // One stage; offsets in it stand for shared-memory addresses (the kernel's stages start
  // 1024-aligned, so the swizzle sees the same address bits).
  std::vector<unsigned char> buffer(Layout::bytes);
  unsigned char* stage = buffer.data();
  const std::uint32_t a_base = 0, b_base = Layout::a_bytes;
  const auto element = [&](std::uint64_t descriptor, Index row, Index e) {
    bfloat16 v;
    std::memcpy(&v, stage + gd::descriptor_byte(descriptor, row, e), sizeof v);
    return float(v);
  };
  std::vector<float> acc(std::size_t(2 * 128 * (BN / 2)));  // [warpgroup][thread][value]
  const Index tiles = gd::tiles_bound(p.max_rows, p.groups);
  for (Index t = 0; t < tiles; ++t) {
    const gd::Tile tile = gd::tile_of(p.offsets, p.groups, t);
    if (!tile.valid) continue;
    const bfloat16* w = p.w + tile.group * p.w_stride;
    const bfloat16* bias = p.bias ? p.bias + tile.group * p.bias_stride : nullptr;
    for (Index n0 = 0; n0 < p.n; n0 += gd::tile_outputs(p, BN)) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (Index k0 = 0; k0 < p.k; k0 += gd::kStageK) {
        std::memset(stage, 0x7f, Layout::bytes);  // poison: a byte the placement misses reads as garbage
        for (Index r = 0; r < gd::kTileRows; ++r)
          for (Index c = 0; c < gd::kChunksPerRow; ++c) {
            unsigned char* dst = stage + a_base + gd::swizzled_chunk(r, c);
            const Index row = tile.row_begin + r;
            if (row < tile.row_end)
              std::memcpy(dst, p.a + gd::source_row(p, row) * p.lda + k0 + c * 8, gd::kChunkBytes);
            else
              std::memset(dst, 0, gd::kChunkBytes);  // cp.async's zero fill past the tile's rows
          }
        for (Index r = 0; r < BN; ++r)
          for (Index c = 0; c < gd::kChunksPerRow; ++c)
            std::memcpy(stage + b_base + gd::swizzled_chunk(r, c), w + gd::weight_row(p, n0, BN, r) * p.k + k0 + c * 8,
                        gd::kChunkBytes);
        for (int wg = 0; wg < 2; ++wg)
          for (Index step = 0; step < gd::kStageK / gd::kStepK; ++step) {
            const std::uint64_t da = gd::operand_descriptor(std::uint32_t(a_base + wg * gd::kWarpgroupRows * gd::kRowBytes + step * 32));
            const std::uint64_t db = gd::operand_descriptor(std::uint32_t(b_base + step * 32));
            for (int thread = 0; thread < 128; ++thread)
              for (int i = 0; i < BN / 2; ++i) {
                float& d = acc[std::size_t((wg * 128 + thread) * (BN / 2) + i)];
                const Index m = gd::fragment_row(thread, i), n = gd::fragment_col(thread, i);
                for (Index e = 0; e < gd::kStepK; ++e) d = std::fma(element(da, m, e), element(db, n, e), d);
              }
          }
      }
      for (int wg = 0; wg < 2; ++wg)
        for (int thread = 0; thread < 128; ++thread) {
          const float* d = &acc[std::size_t((wg * 128 + thread) * (BN / 2))];
          // swiglu: the gate values are the first BN/4 (columns < BN/2), each one's up BN/4 on.
          for (int i = 0; i < (p.swiglu ? BN / 4 : BN / 2); ++i) {
            const Index row = tile.row_begin + wg * gd::kWarpgroupRows + gd::fragment_row(thread, i);
            if (row >= tile.row_end) continue;
            const Index c = n0 + gd::fragment_col(thread, i);
            if (p.swiglu) {
              p.out[row * p.ldc + c] = gd::swiglu_output<bfloat16>(d[i], d[i + BN / 4]);
              continue;
            }
            const gd::OutputValues<bfloat16> v = gd::output_values(p.epilogue, d[i], bias, c);
            p.out[row * p.ldc + c] = v.out;
            if (p.aux) p.aux[row * p.ldaux + c] = v.aux;
          }
        }
      if (!p.combine.y) continue;
      // The combine: each row of the tile arrives; a token's k-th arrival sums its rows.
      for (Index row = tile.row_begin; row < tile.row_end; ++row) {
        const Index token = gd::token_of_row(p.combine, row);
        std::uint32_t* count = gd::arrival_counter(p, token, n0, BN);
        if (++*count < std::uint32_t(p.combine.top_k)) continue;
        *count = 0;
        bfloat16* y = p.combine.y + token * p.combine.ldy;
        for (Index c = n0; c < n0 + BN; c += 2)
          gd::combined_pairs<1>(p.combine, token, gd::PairOfRow{p.out, p.ldc, c}, gd::PairInto{y, c});
      }
    }
  }
}

}  // namespace moe::cuda
