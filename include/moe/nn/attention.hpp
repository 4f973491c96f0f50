// moe/nn/attention.hpp: multi-head scaled dot-product self-attention (GPT-2's causal, ViT's
// bidirectional), forward and backward on the CPU.
//
// Layout as in GPT-2 / llm.c: row b*T + t of qkv is token t of sequence b and holds
// q (C values) | k (C) | v (C); head h reads columns [h*hs, (h+1)*hs) of each, hs = C / heads.
//
// Work is one (sequence, head) pair per task, so each pair is computed by one thread with a
// fixed order of arithmetic (moe/cpu/parallel.hpp's determinism rule). Inside a pair, queries go
// in blocks of kAttentionBlock rows: a block's scores, softmax and weighted sum are formed
// together while they are hot in cache, and a causal block skips the keys after its last query.
// Every product runs through the sequential GEMM kernel of moe/cpu/gemm.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "moe/config.hpp"
#include "moe/cpu/gemm.hpp"
#include "moe/cpu/parallel.hpp"
#include "moe/cpu/simd.hpp"
#include "moe/nn/checks.hpp"
#include "moe/tensor.hpp"

namespace moe::nn {

// Query rows per block: small enough that a causal block wastes little of the masked triangle,
// large enough to keep Eigen's kernel busy (depth hs, width up to T). At GPT-2 small's T = 128,
// hs = 32, 32 rows measured 11% faster than 64 (forward + backward, one thread; 16: 3% slower).
inline constexpr Index kAttentionBlock = 32;

namespace attention_detail {

// row[0..n) = softmax(scale * row[0..n)), max-subtracted, in the fixed-order SIMD loops of
// moe/cpu/simd.hpp (the bits depend on the row alone, never on its address or the thread). n >= 1.
template <class S>
void softmax_row(S* row, Index n, S scale) {
  const S max = cpu::simd::max(row, n);
  const S inverse = S(1) / cpu::simd::exp_and_sum(row, n, max, scale, row);
  for (Index j = 0; j < n; ++j) row[j] *= inverse;
}

// c = op(a) op(b) on one thread.
template <class S>
void product(MatrixView<S> c, ConstMatrixView<S> a, cpu::Op op_a, ConstMatrixView<S> b, cpu::Op op_b) {
  cpu::detail::gemm_tile(cpu::Gemm<S>{c, a, op_a, b, op_b, false});
}

// c += op(a) op(b) on one thread.
template <class S>
void add_product(MatrixView<S> c, ConstMatrixView<S> a, cpu::Op op_a, ConstMatrixView<S> b, cpu::Op op_b) {
  cpu::detail::gemm_tile(cpu::Gemm<S>{c, a, op_a, b, op_b, true});
}

// The [T, hs] q, k or v block (part 0, 1, 2) of head h in sequence b.
template <class S>
MatrixView<S> head_part(MatrixView<S> qkv, Index part, Index b, Index h, Index T, Index C, Index hs) {
  return qkv.col_block(part * C + h * hs, hs).row_block(b * T, T);
}

// The q, k and v blocks of head h in sequence b.
template <class S>
struct HeadQKV {
  MatrixView<S> q, k, v;
};
template <class S>
HeadQKV<S> head_qkv(MatrixView<S> qkv, Index b, Index h, Index T, Index C, Index hs) {
  return {head_part(qkv, 0, b, h, T, C, hs), head_part(qkv, 1, b, h, T, C, hs), head_part(qkv, 2, b, h, T, C, hs)};
}

// The shared checks (moe/nn/checks.hpp) and the thread count.
template <class S>
detail::AttentionShape check_shapes(const char* where, ConstMatrixView<S> qkv, Index B, Index T, Index heads,
                                    Index out_rows, Index out_cols, const char* out_name, const S* att, int threads) {
  check(threads >= 1, where, ": thread count must be >= 1, got ", threads);
  return detail::check_attention(where, qkv, B, T, heads, out_rows, out_cols, out_name, att);
}

}  // namespace attention_detail

// qkv: [B*T, 3C] -> out: [B*T, C], att: [B, heads, T, T]
//   scores = q k^T / sqrt(hs), causal: -inf where t' > t; att = softmax(scores) per row;
//   out = att v, head h into columns [h*hs, (h+1)*hs).
// Cached for backward: att (the probabilities; masked entries exactly 0) and qkv itself.
template <class S>
void attention_forward(ConstMatrixView<S> qkv, Index B, Index T, Index heads, bool causal, MatrixView<S> out, S* att,
                       int threads = cpu::default_threads()) {
  static_assert(std::is_floating_point_v<S>, "attention_forward: S must be float or double");
  namespace ad = attention_detail;
  const auto [C, hs] = ad::check_shapes("attention_forward", qkv, B, T, heads, out.rows, out.cols, "out", att, threads);
  const S scale = S(1) / std::sqrt(S(hs));
  using cpu::Op;

  cpu::parallel_for(threads, B * heads, [&, C = C, hs = hs](Index pair) {
    const Index b = pair / heads, h = pair % heads;
    const auto [q, k, v] = ad::head_qkv(qkv, b, h, T, C, hs);
    const auto o = out.col_block(h * hs, hs).row_block(b * T, T);
    const MatrixView<S> probs(att + pair * T * T, T, T);
    for (Index r0 = 0; r0 < T; r0 += kAttentionBlock) {
      const Index rows = std::min(kAttentionBlock, T - r0);
      const Index keys = causal ? r0 + rows : T;  // keys any query of this block may see
      const auto p = probs.row_block(r0, rows).col_block(0, keys);
      ad::product<S>(p, q.row_block(r0, rows), Op::none, k.row_block(0, keys), Op::transpose);
      for (Index i = 0; i < rows; ++i) {
        const Index seen = causal ? r0 + i + 1 : T;
        ad::softmax_row(p.row(i), seen, scale);
        std::fill(probs.row(r0 + i) + seen, probs.row(r0 + i) + T, S(0));  // masked: exactly 0
      }
      const auto o_block = o.row_block(r0, rows);
      ad::product<S>(o_block, p, Op::none, v.row_block(0, keys), Op::none);
    }
  });
}

// dout: [B*T, C], qkv: [B*T, 3C], att: [B, heads, T, T] (from forward) -> dqkv: [B*T, 3C], added
// into (+=, llm.c's convention), or written over (GradInto::overwrite: each pair zeroes its part of
// dqkv first, as its query blocks add into dk and dv). With P = att, dP = dout v^T:
//   dv += P^T dout;  dS = P * (dP - rowsum(P * dP)) / sqrt(hs);  dq += dS k;  dk += dS^T q.
template <class S>
void attention_backward(ConstMatrixView<S> dout, ConstMatrixView<S> qkv, const S* att, Index B, Index T, Index heads,
                        bool causal, MatrixView<S> dqkv, int threads = cpu::default_threads(),
                        GradInto into = GradInto::add) {
  static_assert(std::is_floating_point_v<S>, "attention_backward: S must be float or double");
  namespace ad = attention_detail;
  const auto [C, hs] =
      ad::check_shapes("attention_backward", qkv, B, T, heads, dout.rows, dout.cols, "dout", att, threads);
  check(dqkv.rows == B * T && dqkv.cols == 3 * C, "attention_backward: dqkv is [", dqkv.rows, ", ", dqkv.cols,
        "], expected [B*T, 3C] = [", B * T, ", ", 3 * C, "]");
  const S scale = S(1) / std::sqrt(S(hs));
  using cpu::Op;

  cpu::parallel_for(threads, B * heads, [&, C = C, hs = hs](Index pair) {
    const Index b = pair / heads, h = pair % heads;
    const auto [q, k, v] = ad::head_qkv(qkv, b, h, T, C, hs);
    const auto [dq, dk, dv] = ad::head_qkv(dqkv, b, h, T, C, hs);
    if (into == GradInto::overwrite)
      for (const MatrixView<S>& d : {dq, dk, dv})
        for (Index t = 0; t < T; ++t) std::fill(d.row(t), d.row(t) + hs, S(0));
    const auto d_o = dout.col_block(h * hs, hs).row_block(b * T, T);
    const ConstMatrixView<S> probs(att + pair * T * T, T, T);
    std::vector<S> scratch(std::size_t(std::min(kAttentionBlock, T) * T));
    for (Index r0 = 0; r0 < T; r0 += kAttentionBlock) {
      const Index rows = std::min(kAttentionBlock, T - r0);
      const Index keys = causal ? r0 + rows : T;
      const auto p = probs.row_block(r0, rows).col_block(0, keys);
      const auto d_o_block = d_o.row_block(r0, rows);
      const MatrixView<S> ds(scratch.data(), rows, keys);  // holds dP, then dS in place

      ad::add_product<S>(dv.row_block(0, keys), p, Op::transpose, d_o_block, Op::none);
      ad::product<S>(ds, d_o_block, Op::none, v.row_block(0, keys), Op::transpose);
      for (Index i = 0; i < rows; ++i) {
        const Index seen = causal ? r0 + i + 1 : T;
        const S* p_row = p.row(i);
        S* ds_row = ds.row(i);
        const S p_dot_dp = cpu::simd::dot(p_row, ds_row, seen);
        for (Index j = 0; j < seen; ++j) ds_row[j] = p_row[j] * (ds_row[j] - p_dot_dp) * scale;
        std::fill(ds_row + seen, ds_row + keys, S(0));  // masked keys get no gradient
      }
      ad::add_product<S>(dq.row_block(r0, rows), ds, Op::none, k.row_block(0, keys), Op::none);
      ad::add_product<S>(dk.row_block(0, keys), ds, Op::transpose, q.row_block(r0, rows), Op::none);
    }
  });
}

}  // namespace moe::nn
