// moe/cuda/reference_gemm.hpp: a BlasGemm (moe/cuda/device.hpp) by its definition, one output element at a time: the
// column-major product accumulated in the scalar's compute type, one fused multiply-add per term in k order (the
// same bits whatever the operands' layouts), then the epilogue on the unrounded product.
//
// Two users, one definition:
//   - EmulatedDevice::gemm is this over every element of every product of a batch;
//   - CudaDevice runs it as a kernel, a thread per element, in place of cuBLAS, when its BlasEngine is `reference`
//     (moe/cuda/cuda_device.cuh). compute-sanitizer's racecheck breaks down inside cuBLAS's bf16 kernels on an H100
//     (bench/gpu/racecheck.sh); with this engine the test cases that multiply run, and our kernels in them are checked.
//     Slow (no tiling, no tensor cores): for checking, not for training.
#pragma once

#include <cmath>

#include "moe/activations.hpp"
#include "moe/cuda/device.hpp"
#include "moe/host_device.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda {

// Stores element (i, j) of a product through g's epilogue (not none) into c (and aux, for bias_gelu with aux), from
// `product`, the element of op(A) op(B) in the compute type: cuBLASLt's fused epilogues. reference_gemm_element passes
// the unrounded product; CudaDevice's epilogue_pass, after a plain product, C's stored (rounded) value.
template <class S, class C>
MOE_HOST_DEVICE void store_through_epilogue(const BlasGemm<S>& g, S* c, Index i, Index j, C product) {
  S& out = c[i + j * g.ldc];
  if (g.epilogue == Epilogue::dgelu) {
    out = S(product * activation::gelu_grad(C(g.aux[i + j * g.ldaux])));
    return;
  }
  const C pre = product + C(g.bias[i]);
  if (g.epilogue == Epilogue::bias_gelu && g.aux) g.aux[i + j * g.ldaux] = S(pre);
  out = S(g.epilogue == Epilogue::bias_gelu ? activation::gelu(pre) : pre);
}

// Element (i, j) of product q of g: C[i + j ldc] (and aux, for bias_gelu with aux) written. A, B and C are read
// through g's batch (strides or pointer arrays), so the caller needs no other view of the operands.
template <class S>
MOE_HOST_DEVICE void reference_gemm_element(const BlasGemm<S>& g, Index q, Index i, Index j) {
  using C = typename ComputeTypeOf<S>::type;
  const S* a = g.a_of(q);
  const S* b = g.b_of(q);
  S* c = g.c_of(q);
  const bool a_plain = g.op_a == BlasOp::none, b_plain = g.op_b == BlasOp::none;
  C product = 0;
  for (Index p = 0; p < g.k; ++p) {
    const C x = C(a_plain ? a[i + p * g.lda] : a[p + i * g.lda]);
    const C y = C(b_plain ? b[p + j * g.ldb] : b[j + p * g.ldb]);
    product = std::fma(x, y, product);
  }
  if (g.epilogue != Epilogue::none) return store_through_epilogue(g, c, i, j, product);
  S& out = c[i + j * g.ldc];
  out = S((g.accumulate ? C(out) : C(0)) + product);
}

}  // namespace moe::cuda
