// moe/cuda/nn/attention.hpp: multi-head scaled dot-product self-attention (GPT-2's causal, ViT's bidirectional),
// forward and backward on a CUDA-backend device (moe/cuda/device.hpp): the semantics, layout, scale, masking and "+="
// conventions of moe/nn/attention.hpp.
//
// Layout as in GPT-2 / llm.c: row b*T + t of qkv is token t of sequence b and holds q (C values) | k (C) | v (C); head
// h reads columns [h*hs, (h+1)*hs) of each, hs = C / heads. att is [B, heads, T, T]: the probabilities of pair (b, h) =
// b*heads + h at att + pair*T*T.
//
// Plan: every product is one batched GEMM over all B*heads pairs at once (cublasGemmBatchedEx: the pairs' operands sit
// at no single stride, so a launch first writes their pointers into the scratch); where the operands are not 16-byte
// aligned (T or the head size not a multiple of 8 bf16 / 4 floats: ViT's T = 17 or 197), which that call's kernels
// assume, a strided batch per head (or per sequence, whichever are fewer), which cuBLAS checks itself (every operand
// is a base plus whole multiples of a stride per sequence and one per head); and every softmax step is one row of
// the device's row work per (b, h, t) (a warp on the GPU; moe/cuda/device.hpp), whose arithmetic runs in a fixed order
// in Compute<S> (float for bf16), reading 16-byte packs when T fills whole packs (moe/cuda/row_packs.hpp). The probabilities are materialised ([B, heads, T, T]; no fused kernel yet). Causal
// attention skips the masked half: the rows go in blocks (about 8; `block` rows each, default_block), and block i's
// products span only keys [0, end of block i) -- about 9/16 of the full T x T work at 8 blocks. Masked probabilities
// are still stored as exact zeros. No floating-point atomics: each element has one writer, so the results are
// bit-identical run to run.
#pragma once

#include <algorithm>
#include <cmath>

#include "moe/config.hpp"
#include "moe/cuda/buffer.hpp"
#include "moe/cuda/device.hpp"
#include "moe/cuda/device_operands.hpp"
#include "moe/cuda/row_packs.hpp"
#include "moe/nn/checks.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda::nn {

namespace attention_detail {

// Rows per block of the causal products: about 8 blocks, each a multiple of 64 rows (aligned operands for the
// tensor cores); all T rows in one block when bidirectional (nothing to skip).
inline Index default_block(Index T, bool causal) {
  if (!causal) return T;
  const Index eighth = (T + 7) / 8;
  return std::max<Index>(64, (eighth + 63) / 64 * 64);
}

struct Blocks {
  Index size, count;
  MOE_HOST_DEVICE Index begin(Index i) const { return i * size; }
  Index rows(Index i, Index T) const { return std::min(size, T - i * size); }
  // The keys rows of block i attend to: up to the block's end when causal, all of them otherwise.
  Index keys(Index i, Index T, bool causal) const { return causal ? begin(i) + rows(i, T) : T; }
};

inline Blocks blocks(const char* where, Index T, bool causal, Index block) {
  check(block >= 0, where, ": block = ", block, " rows (0 = the default)");
  const Index size = block == 0 ? default_block(T, causal) : std::min(block, T);
  return {size, (T + size - 1) / size};
}

// Where pair p = b*heads + h starts in each buffer: its [T, T] probabilities (or their gradient), and its [T, hs]
// block of a [B*T, C] or [B*T, 3C] matrix (`part` 0, 1, 2: q, k, v of qkv; 0 of out).
template <class S>
struct PairBases {
  Index T, heads, C, hs;
  template <class E>
  MOE_HOST_DEVICE E* square(E* all, Index p) const { return all + p * T * T; }
  template <class E>
  MOE_HOST_DEVICE E* head(E* m, Index ld, Index part, Index p) const {
    return m + (p / heads) * T * ld + part * C + (p % heads) * hs;
  }
  // Row t of that block (fused_attention.hpp's D, a row of work per query row).
  template <class E>
  MOE_HOST_DEVICE E* row(E* m, Index ld, Index part, Index p, Index t) const {
    return head(m, ld, part, p) + t * ld;
  }
};

// The pointer arrays of `calls` batched products over `pairs` pairs, in the scratch: call c's product i reads
// a[c * pairs + i] and b[...] and writes out[...].
template <class S>
struct PointerArrays {
  const S** a;
  const S** b;
  S** out;
};

// What one product of one pair reads (a, b) and writes (out).
template <class S>
struct Operands {
  const S* a;
  const S* b;
  S* out;
};

// Writes the pointer arrays of `calls` products over `pairs` pairs from operands(call, pair) in one launch.
template <class S, class D, class OperandsOf>
void write_pointer_arrays(const D& device, const PointerArrays<S>& arrays, Index calls, Index pairs,
                          OperandsOf operands) {
  device.for_each(calls * pairs, [=] MOE_HOST_DEVICE(Index i) {
    const Operands<S> o = operands(i / pairs, i % pairs);
    arrays.a[i] = o.a, arrays.b[i] = o.b, arrays.out[i] = o.out;
  });
}

// One product over every pair p = b * heads + h, in row-major terms: out_p [rows, cols] (+)= op_a(a_p) op_b(b_p) with
// depth `depth`, operands(call, p). With `arrays` (their operands `alignment`-aligned, at least kBatchedAlignment):
// one batch by pointers. Without: a strided batch per head over the B sequences, or per sequence over the heads,
// whichever makes fewer calls, with the strides read off the operands of pairs (0, 0), (1, 0) and (0, 1): every
// operand of the callers' is a base plus b times one stride plus h times another.
template <class S, class D, class OperandsOf>
void per_pair(const D& device, const PointerArrays<S>* arrays, OperandsOf operands, Index call, Index B, Index heads,
              Index rows, Index cols, Index depth, Index ld_out, BlasOp op_a, Index ld_a, BlasOp op_b, Index ld_b,
              bool accumulate, std::uint32_t alignment) {
  const Index pairs = B * heads;
  const Index a_rows = op_a == BlasOp::none ? rows : depth, a_cols = op_a == BlasOp::none ? depth : rows;
  const Index b_rows = op_b == BlasOp::none ? depth : cols, b_cols = op_b == BlasOp::none ? cols : depth;
  if (arrays) {
    const MatrixView<S> out(nullptr, rows, cols, ld_out);
    const ConstMatrixView<S> a(nullptr, a_rows, a_cols, ld_a), b(nullptr, b_rows, b_cols, ld_b);
    const Index first = call * pairs;
    device.gemm(column_major_gemm_pointers<S>(out, a, op_a, b, op_b, accumulate, pairs, arrays->out + first,
                                             arrays->a + first, arrays->b + first, alignment));
    return;
  }
  struct Strides {
    Index a, b, out;
  };
  const auto from = [](const Operands<S>& o, const Operands<S>& to) {
    return Strides{Index(to.a - o.a), Index(to.b - o.b), Index(to.out - o.out)};
  };
  const Operands<S> origin = operands(call, 0);
  const Strides along_b = from(origin, B > 1 ? operands(call, heads) : origin);
  const Strides along_h = from(origin, heads > 1 ? operands(call, 1) : origin);
  const bool per_head = heads <= B;  // the loop runs over the fewer of heads and sequences
  const Index loops = per_head ? heads : B, batch = per_head ? B : heads;
  const Strides step = per_head ? along_h : along_b;     // from one call to the next
  const Strides stride = per_head ? along_b : along_h;  // within a call's batch
  for (Index l = 0; l < loops; ++l) {
    const MatrixView<S> out(origin.out + l * step.out, rows, cols, ld_out);
    const ConstMatrixView<S> a(origin.a + l * step.a, a_rows, a_cols, ld_a);
    const ConstMatrixView<S> b(origin.b + l * step.b, b_rows, b_cols, ld_b);
    device.gemm(column_major_gemm_batched<S>(out, a, op_a, b, op_b, accumulate, batch, stride.out, stride.a, stride.b));
  }
}

// One row of work per (b, h, t), row i of the [rows, T] probabilities at att + i * T: the scaled, masked,
// max-subtracted softmax of the raw scores in place; masked keys 0 (written, never read: the products left them
// unset). The max and the sum of exponentials come from one read of the row (row_max_sum), the probabilities from a
// second. The stored probability is the stored exponential (as S) times 1 / sum, as on the CPU. Packed: in 16-byte
// packs (moe/cuda/row_packs.hpp).
template <bool Packed, class S, class D, class C = Compute<S>>
void softmax_rows(const D& device, S* att, Index rows, Index T, bool causal, C scale) {
  device.for_each_row(rows, [=] MOE_HOST_DEVICE(Index i, const typename D::Row& r) {
    const Index seen = causal ? i % T + 1 : T;
    S* row = att + i * T;
    const MaxSum<C> stats = row_max_sum<Packed>(r, seen, [](Index, S x) { return C(x); }, row, scale);
    const C max = stats.max, inverse = C(1) / stats.sum;
    row_update_live<Packed>(
        r, T, seen, [&](Index, S x) { return S(C(S(std::exp((C(x) - max) * scale))) * inverse); }, row);
  });
}

// One row of work per (b, h, t): dS = P * (dP - P . dP) * scale in place of dP (ds, rows as att's). Written over the
// keys the products read, [0, end of the row's block of `block` rows) when causal (masked keys there exactly 0),
// every key otherwise; past that ds is left alone. Masked keys are never read.
template <bool Packed, class S, class D, class C = Compute<S>>
void softmax_backward_rows(const D& device, const S* att, S* ds_all, Index rows, Index T, bool causal, Index block,
                           C scale) {
  device.for_each_row(rows, [=] MOE_HOST_DEVICE(Index i, const typename D::Row& r) {
    const Index t = i % T, seen = causal ? t + 1 : T;
    const Index block_end = (t / block + 1) * block, written = causal && block_end < T ? block_end : T;
    const S* p = att + i * T;
    S* ds = ds_all + i * T;
    const C p_dot_dp = row_sum<Packed>(r, seen, [](Index, S pj, S dj) { return C(pj) * C(dj); }, p, ds);
    row_update_live<Packed>(
        r, written, seen, [&](Index, S dj, S pj) { return S(C(pj) * (C(dj) - p_dot_dp) * scale); }, ds, p);
  });
}

}  // namespace attention_detail

// qkv: [B*T, 3C] -> out: [B*T, C], att: [B, heads, T, T] (device memory)
//   scores = q k^T / sqrt(hs), causal: -inf where t' > t; att = softmax(scores) per row;
//   out = att v, head h into columns [h*hs, (h+1)*hs).
// Cached for backward: att (the probabilities; masked entries exactly 0) and qkv itself. As on the CPU, the scale goes
// inside the exponent: p_j = exp((s_j - max) * scale) / sum. `block`: rows per causal block (0 = default_block).
// Scratch: 3 pointers per pair and product, where the operands are aligned for a batch by pointers.
template <class S, class D>
void attention_forward(const D& device, ConstMatrixView<S> qkv, Index B, Index T, Index heads, bool causal,
                       MatrixView<S> out, S* att, Index block = 0) {
  namespace ad = attention_detail;
  using C = Compute<S>;
  const auto [channels, hs] = moe::nn::detail::check_attention("attention_forward", qkv, B, T, heads, out.rows, out.cols, "out", att);
  const DeviceOperands on_device(device, "attention_forward");
  on_device("qkv", qkv); on_device("out", out); on_device("att", att, B * heads * T * T);
  const Index pairs = B * heads;
  const ad::Blocks blocks = ad::blocks("attention_forward", T, causal, block);

  // The operands of the 2 * blocks.count products (scores, then att v, per block) for each pair: as pointer arrays
  // written by one launch, where they are aligned for a batch by pointers (else per_pair's strided batches).
  enum { kScores, kValues, kKinds };
  const Index calls = kKinds * blocks.count;
  const ad::PairBases<S> at{T, heads, channels, hs};
  const S* qkv_all = qkv.data;
  S* out_all = out.data;
  const Index ld_qkv = qkv.stride, ld_out = out.stride;
  const auto operands = [=] MOE_HOST_DEVICE(Index call, Index p) {
    const Index row = blocks.begin(call % blocks.count);
    if (call / blocks.count == kScores)  // att[rows of the block, keys] = q[rows] k[keys]^T
      return ad::Operands<S>{at.head(qkv_all, ld_qkv, 0, p) + row * ld_qkv, at.head(qkv_all, ld_qkv, 1, p),
                             at.square(att, p) + row * T};
    // out[rows] = att[rows, keys] v[keys]
    return ad::Operands<S>{at.square(att, p) + row * T, at.head(qkv_all, ld_qkv, 2, p),
                           at.head(out_all, ld_out, 0, p) + row * ld_out};
  };
  // Every operand pointer is a base plus whole multiples of these element counts.
  const std::uint32_t aligned =
      common_alignment<S>({qkv_all, out_all, att}, {T, hs, channels, ld_qkv, ld_out, blocks.size});
  ad::PointerArrays<S> arrays{};
  const bool by_pointers = aligned >= kBatchedAlignment;
  if (by_pointers) {
    ScratchLayout layout;
    const auto a_slot = layout.add<const S*>(calls * pairs), b_slot = layout.add<const S*>(calls * pairs);
    const auto out_slot = layout.add<S*>(calls * pairs);
    void* scratch = device.scratch(layout.bytes());
    arrays = {a_slot.in(scratch), b_slot.in(scratch), out_slot.in(scratch)};
    ad::write_pointer_arrays(device, arrays, calls, pairs, operands);
  }
  const ad::PointerArrays<S>* pointers = by_pointers ? &arrays : nullptr;

  // Raw scores q k^T into att, block by block.
  for (Index i = 0; i < blocks.count; ++i)
    ad::per_pair(device, pointers, operands, kScores * blocks.count + i, B, heads, blocks.rows(i, T),
                 blocks.keys(i, T, causal), hs, T, BlasOp::none, ld_qkv, BlasOp::transpose, ld_qkv, false, aligned);

  const C scale = C(1) / std::sqrt(C(hs));
  if (row_packs_fit(att, T))
    ad::softmax_rows<true>(device, att, pairs * T, T, causal, scale);
  else
    ad::softmax_rows<false>(device, att, pairs * T, T, causal, scale);

  // out = att v into each head's column block, block by block.
  for (Index i = 0; i < blocks.count; ++i)
    ad::per_pair(device, pointers, operands, kValues * blocks.count + i, B, heads, blocks.rows(i, T), hs,
                 blocks.keys(i, T, causal), ld_out, BlasOp::none, T, BlasOp::none, ld_qkv, false, aligned);
}

// dout: [B*T, C], qkv: [B*T, 3C], att: [B, heads, T, T] (from forward) -> dqkv: [B*T, 3C], added into (+=, llm.c's
// convention), or written over (GradInto::overwrite: each element of dqkv is one product's, which then runs with
// beta = 0; no zero fill first). With P = att, dP = dout v^T:
//   dv += P^T dout;  dS = P * (dP - rowsum(P * dP)) / sqrt(hs);  dq += dS k;  dk += dS^T q.
// Causal: query block i's dP and dq span keys [0, end of block i); key block j's dv and dk take only the rows that
// see it ([start of block j, T)). Scratch: dP / dS for every pair ([B, heads, T, T] like att) and 3 pointers per pair
// and product.
template <class S, class D>
void attention_backward(const D& device, ConstMatrixView<S> dout, ConstMatrixView<S> qkv, const S* att, Index B,
                        Index T, Index heads, bool causal, MatrixView<S> dqkv, Index block = 0,
                        moe::nn::GradInto into = moe::nn::GradInto::add) {
  namespace ad = attention_detail;
  using C = Compute<S>;
  const auto [channels, hs] =
      moe::nn::detail::check_attention("attention_backward", qkv, B, T, heads, dout.rows, dout.cols, "dout", att);
  check(dqkv.rows == B * T && dqkv.cols == 3 * channels, "attention_backward: dqkv is [", dqkv.rows, ", ", dqkv.cols,
        "], expected [B*T, 3C] = [", B * T, ", ", 3 * channels, "]");
  const DeviceOperands on_device(device, "attention_backward");
  on_device("dout", dout); on_device("qkv", qkv); on_device("att", att, B * heads * T * T); on_device("dqkv", dqkv);
  const Index pairs = B * heads, TT = T * T;
  const ad::Blocks blocks = ad::blocks("attention_backward", T, causal, block);

  // The operands of the 4 * blocks.count products for each pair, as in the forward (pointer arrays where aligned).
  // Block i is a block of query rows for dP and dq and a block of keys for dv and dk.
  enum { kProbabilityGrad, kValueGrad, kQueryGrad, kKeyGrad, kKinds };
  const Index calls = kKinds * blocks.count;
  const ad::PairBases<S> at{T, heads, channels, hs};
  const S* qkv_all = qkv.data;
  const S* dout_all = dout.data;
  S* dqkv_all = dqkv.data;
  const Index ld_qkv = qkv.stride, ld_dout = dout.stride, ld_dqkv = dqkv.stride;
  // The pointer arrays' room is laid out whether they are made or not: whether they are made depends on the
  // alignment of every operand, dS's (in this scratch) included.
  ScratchLayout layout;
  const auto ds_slot = layout.add<S>(pairs * TT);
  const auto a_slot = layout.add<const S*>(calls * pairs), b_slot = layout.add<const S*>(calls * pairs);
  const auto out_slot = layout.add<S*>(calls * pairs);
  void* scratch = device.scratch(layout.bytes());
  S* ds_all = ds_slot.in(scratch);
  const auto operands = [=] MOE_HOST_DEVICE(Index call, Index p) {
    const Index start = blocks.begin(call % blocks.count);
    const Index seeing = causal ? start : 0;  // the first query row that sees key block `start`
    switch (call / blocks.count) {
      case kProbabilityGrad:  // dP[rows, keys] = dout[rows] v[keys]^T
        return ad::Operands<S>{at.head(dout_all, ld_dout, 0, p) + start * ld_dout, at.head(qkv_all, ld_qkv, 2, p),
                               at.square(ds_all, p) + start * T};
      case kValueGrad:  // dv[keys] += P[seeing rows, keys]^T dout[seeing rows]
        return ad::Operands<S>{at.square(att, p) + seeing * T + start, at.head(dout_all, ld_dout, 0, p) + seeing * ld_dout,
                               at.head(dqkv_all, ld_dqkv, 2, p) + start * ld_dqkv};
      case kQueryGrad:  // dq[rows] += dS[rows, keys] k[keys]
        return ad::Operands<S>{at.square(ds_all, p) + start * T, at.head(qkv_all, ld_qkv, 1, p),
                               at.head(dqkv_all, ld_dqkv, 0, p) + start * ld_dqkv};
      default:  // kKeyGrad: dk[keys] += dS[seeing rows, keys]^T q[seeing rows]
        return ad::Operands<S>{at.square(ds_all, p) + seeing * T + start, at.head(qkv_all, ld_qkv, 0, p) + seeing * ld_qkv,
                               at.head(dqkv_all, ld_dqkv, 1, p) + start * ld_dqkv};
    }
  };
  const std::uint32_t aligned = common_alignment<S>({qkv_all, dout_all, dqkv_all, att, ds_all},
                                                    {T, hs, channels, ld_qkv, ld_dout, ld_dqkv, blocks.size});
  const ad::PointerArrays<S> arrays{a_slot.in(scratch), b_slot.in(scratch), out_slot.in(scratch)};
  const bool by_pointers = aligned >= kBatchedAlignment;
  if (by_pointers) ad::write_pointer_arrays(device, arrays, calls, pairs, operands);
  const ad::PointerArrays<S>* pointers = by_pointers ? &arrays : nullptr;
  const auto call_of = [&](Index kind, Index i) { return kind * blocks.count + i; };
  // Rows of the query blocks that see key block i (from its start when causal, else all T).
  const auto seeing_rows = [&](Index i) { return causal ? T - blocks.begin(i) : T; };
  const bool add = into == moe::nn::GradInto::add;  // the dqkv products' beta

  // dv += P^T dout and dP = dout v^T.
  for (Index i = 0; i < blocks.count; ++i) {
    ad::per_pair(device, pointers, operands, call_of(kValueGrad, i), B, heads, blocks.rows(i, T), hs, seeing_rows(i),
                 ld_dqkv, BlasOp::transpose, T, BlasOp::none, ld_dout, add, aligned);
    ad::per_pair(device, pointers, operands, call_of(kProbabilityGrad, i), B, heads, blocks.rows(i, T),
                 blocks.keys(i, T, causal), hs, T, BlasOp::none, ld_dout, BlasOp::transpose, ld_qkv, false, aligned);
  }

  const C scale = C(1) / std::sqrt(C(hs));
  if (row_packs_fit(att, T) && row_packs_fit(static_cast<const S*>(ds_all), T))
    ad::softmax_backward_rows<true>(device, att, ds_all, pairs * T, T, causal, blocks.size, scale);
  else
    ad::softmax_backward_rows<false>(device, att, ds_all, pairs * T, T, causal, blocks.size, scale);

  // dq += dS k and dk += dS^T q.
  for (Index i = 0; i < blocks.count; ++i) {
    ad::per_pair(device, pointers, operands, call_of(kQueryGrad, i), B, heads, blocks.rows(i, T), hs,
                 blocks.keys(i, T, causal), ld_dqkv, BlasOp::none, T, BlasOp::none, ld_qkv, add, aligned);
    ad::per_pair(device, pointers, operands, call_of(kKeyGrad, i), B, heads, blocks.rows(i, T), hs, seeing_rows(i),
                 ld_dqkv, BlasOp::transpose, T, BlasOp::none, ld_qkv, add, aligned);
  }
}

}  // namespace moe::cuda::nn
