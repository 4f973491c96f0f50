// moe/cuda/nn/attention.hpp: multi-head scaled dot-product self-attention (GPT-2's causal, ViT's bidirectional),
// forward and backward on a CUDA-backend device (moe/cuda/device.hpp): the semantics, layout, scale, masking and "+="
// conventions of moe/nn/attention.hpp.
//
// Layout as in GPT-2 / llm.c: row b*T + t of qkv is token t of sequence b and holds q (C values) | k (C) | v (C); head
// h reads columns [h*hs, (h+1)*hs) of each, hs = C / heads. att is [B, heads, T, T]: the probabilities of pair (b, h) =
// b*heads + h at att + pair*T*T.
//
// Plan (simple rather than fast): each product is one strided-batched GEMM per sequence over its heads (head h+1's
// q, k, v start hs columns after head h's; a host loop of B calls, full T x T even when causal: the masked
// probabilities are exactly 0, so they add nothing), and every softmax step is one row of the device's row work per
// (b, h, t) (a warp on the GPU; moe/cuda/device.hpp), whose arithmetic runs in a fixed order in Compute<S> (float for
// bf16). No floating-point atomics: each element has
// one writer, so the results are bit-identical run to run.
#pragma once

#include <cmath>

#include "moe/config.hpp"
#include "moe/cuda/backend.hpp"
#include "moe/cuda/buffer.hpp"
#include "moe/cuda/device.hpp"
#include "moe/nn/checks.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda::nn {

namespace attention_detail {

// The [T, hs] q, k or v block (part 0, 1, 2) of head h in sequence b (T may be const S).
template <class T>
MatrixView<T> head_part(MatrixView<T> qkv, Index part, Index b, Index h, Index len, Index C, Index hs) {
  return qkv.col_block(part * C + h * hs, hs).row_block(b * len, len);
}

// For every head h of one sequence: out_h (+)= op_a(a_h) op_b(b_h), where x_h starts stride_x elements after x_{h-1}
// (views of head 0 come in; mutable views convert to the const operands here). One batched GEMM.
template <class S, class D>
void per_head(const D& device, Index heads, MatrixView<S> out, Index stride_out, ConstMatrixView<S> a, BlasOp op_a,
              Index stride_a, ConstMatrixView<S> b, BlasOp op_b, Index stride_b, bool accumulate) {
  device.gemm(column_major_gemm_batched<S>(out, a, op_a, b, op_b, accumulate, heads, stride_out, stride_a, stride_b));
}

}  // namespace attention_detail

// qkv: [B*T, 3C] -> out: [B*T, C], att: [B, heads, T, T] (device memory)
//   scores = q k^T / sqrt(hs), causal: -inf where t' > t; att = softmax(scores) per row;
//   out = att v, head h into columns [h*hs, (h+1)*hs).
// Cached for backward: att (the probabilities; masked entries exactly 0) and qkv itself. As on the CPU, the scale goes
// inside the exponent: p_j = exp((s_j - max) * scale) / sum.
template <class S, class D>
void attention_forward(const D& device, ConstMatrixView<S> qkv, Index B, Index T, Index heads, bool causal,
                       MatrixView<S> out, S* att) {
  namespace ad = attention_detail;
  using C = Compute<S>;
  const auto [channels, hs] = moe::nn::detail::check_attention("attention_forward", qkv, B, T, heads, out.rows, out.cols, "out", att);
  const Index pairs = B * heads;

  // Raw scores q k^T into att, one batched GEMM per sequence.
  const Index TT = T * T;
  for (Index b = 0; b < B; ++b)
    ad::per_head<S>(device, heads, MatrixView<S>(att + b * heads * TT, T, T), TT,
                    ad::head_part(qkv, 0, b, 0, T, channels, hs), BlasOp::none, hs,
                    ad::head_part(qkv, 1, b, 0, T, channels, hs), BlasOp::transpose, hs, false);

  // One row of work per (b, h, t): scaled, masked, max-subtracted softmax in place; masked keys 0. The stored
  // probability is the stored exponential (as S) times 1 / sum, as on the CPU.
  const C scale = C(1) / std::sqrt(C(hs));
  device.for_each_row(pairs * T, [=] MOE_HOST_DEVICE(Index i, const typename D::Row& r) {
    const Index t = i % T;
    const Index seen = causal ? t + 1 : T;
    S* row = att + i * T;
    const C max = r.max(seen, [&](Index j) { return C(row[j]); });
    const C sum = r.sum(seen, [&](Index j) { return C(std::exp((C(row[j]) - max) * scale)); });
    const C inverse = C(1) / sum;
    r.for_each(T, [&](Index j) {
      row[j] = j < seen ? S(C(S(std::exp((C(row[j]) - max) * scale))) * inverse) : S(0);
    });
  });

  // out = att v into each head's column block, one batched GEMM per sequence.
  for (Index b = 0; b < B; ++b)
    ad::per_head<S>(device, heads, out.col_block(0, hs).row_block(b * T, T), hs,
                    ConstMatrixView<S>(att + b * heads * TT, T, T), BlasOp::none, TT,
                    ad::head_part(qkv, 2, b, 0, T, channels, hs), BlasOp::none, hs, false);
}

// dout: [B*T, C], qkv: [B*T, 3C], att: [B, heads, T, T] (from forward) -> dqkv: [B*T, 3C], added into (+=, llm.c's
// convention). With P = att, dP = dout v^T:
//   dv += P^T dout;  dS = P * (dP - rowsum(P * dP)) / sqrt(hs);  dq += dS k;  dk += dS^T q.
// Workspace: dP / dS for every pair, [B, heads, T, T] like att, in the device's scratch.
template <class S, class D>
void attention_backward(const D& device, ConstMatrixView<S> dout, ConstMatrixView<S> qkv, const S* att, Index B,
                        Index T, Index heads, bool causal, MatrixView<S> dqkv) {
  namespace ad = attention_detail;
  using C = Compute<S>;
  const auto [channels, hs] =
      moe::nn::detail::check_attention("attention_backward", qkv, B, T, heads, dout.rows, dout.cols, "dout", att);
  check(dqkv.rows == B * T && dqkv.cols == 3 * channels, "attention_backward: dqkv is [", dqkv.rows, ", ", dqkv.cols,
        "], expected [B*T, 3C] = [", B * T, ", ", 3 * channels, "]");
  const Index pairs = B * heads, TT = T * T;
  ScratchLayout layout;
  const auto ds_slot = layout.add<S>(pairs * TT);
  S* ds_all = ds_slot.in(device.scratch(layout.bytes()));

  // dv += P^T dout and dP = dout v^T, one batched GEMM each per sequence.
  for (Index b = 0; b < B; ++b) {
    const ConstMatrixView<S> p(att + b * heads * TT, T, T);
    const ConstMatrixView<S> d_o = dout.col_block(0, hs).row_block(b * T, T);
    ad::per_head<S>(device, heads, ad::head_part(dqkv, 2, b, 0, T, channels, hs), hs, p, BlasOp::transpose, TT, d_o,
                    BlasOp::none, hs, true);
    ad::per_head<S>(device, heads, MatrixView<S>(ds_all + b * heads * TT, T, T), TT, d_o, BlasOp::none, hs,
                    ad::head_part(qkv, 2, b, 0, T, channels, hs), BlasOp::transpose, hs, false);
  }

  // One row of work per (b, h, t): dS = P * (dP - P . dP) * scale in place; masked keys exactly 0.
  const C scale = C(1) / std::sqrt(C(hs));
  device.for_each_row(pairs * T, [=] MOE_HOST_DEVICE(Index i, const typename D::Row& r) {
    const Index t = i % T;
    const Index seen = causal ? t + 1 : T;
    const S* p = att + i * T;
    S* ds = ds_all + i * T;
    const C p_dot_dp = r.sum(seen, [&](Index j) { return C(p[j]) * C(ds[j]); });
    r.for_each(T, [&](Index j) { ds[j] = j < seen ? S(C(p[j]) * (C(ds[j]) - p_dot_dp) * scale) : S(0); });
  });

  // dq += dS k and dk += dS^T q, one batched GEMM each per sequence.
  for (Index b = 0; b < B; ++b) {
    const ConstMatrixView<S> ds(ds_all + b * heads * TT, T, T);
    ad::per_head<S>(device, heads, ad::head_part(dqkv, 0, b, 0, T, channels, hs), hs, ds, BlasOp::none, TT,
                    ad::head_part(qkv, 1, b, 0, T, channels, hs), BlasOp::none, hs, true);
    ad::per_head<S>(device, heads, ad::head_part(dqkv, 1, b, 0, T, channels, hs), hs, ds, BlasOp::transpose, TT,
                    ad::head_part(qkv, 0, b, 0, T, channels, hs), BlasOp::none, hs, true);
  }
}

}  // namespace moe::cuda::nn
