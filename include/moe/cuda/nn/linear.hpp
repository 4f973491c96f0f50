// moe/cuda/nn/linear.hpp: dense nn.Linear(I, O) (weight [O, I], optional bias [O]) on a device
// (moe/cuda/device.hpp), forward then backward: moe::nn::linear_forward/backward
// (moe/nn/linear.hpp) with the same semantics and "+=" gradients, written once for CudaDevice and
// EmulatedDevice. The products are the device's GEMM (cuBLAS: fp32, TF32, or bf16 operands with
// fp32 accumulation); the bias rides the forward GEMM's epilogue (cuBLASLt on the GPU: added to
// the unrounded sum), and its gradient is summed by an element-wise pass in Compute<S> through
// fixed-order chunk partials in the device's scratch, so the same bits every run.
#pragma once

#include "moe/config.hpp"
#include "moe/nn/checks.hpp"
#include "moe/cuda/column_sums.hpp"
#include "moe/cuda/device.hpp"
#include "moe/cuda/device_operands.hpp"
#include "moe/cuda/products.hpp"
#include "moe/host_device.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda::nn {

using moe::nn::GradInto;  // moe/nn/checks.hpp

// in: [T, I], weight: [O, I], bias: [O] or null -> out: [T, O] = in weight^T + bias.
// Nothing is cached: backward takes in again. out must not alias in.
template <class S, class D>
void linear_forward(const D& device, ConstMatrixView<S> in, ConstMatrixView<S> weight, const S* bias,
                    MatrixView<S> out) {
  const DeviceOperands on_device(device, "linear_forward");
  moe::nn::detail::check_linear_forward(in, weight, out, [&] {
    on_device("in", in); on_device("weight", weight); on_device("bias", bias, weight.rows); on_device("out", out);
  });
  if (bias)
    moe::cuda::detail::gemm_epilogue(device, out, in, weight, BlasOp::transpose, Epilogue::bias, bias);
  else
    moe::cuda::detail::gemm(device, out, in, BlasOp::none, weight, BlasOp::transpose, false);
}

// in: [T, I], dout: [T, O], weight: [O, I]
//   -> din: [T, I] += dout weight        (skipped if din.data is null; = with GradInto::overwrite: beta = 0)
//      dweight: [O, I] += dout^T in      (skipped if dweight.data is null)
//      dbias: [O] += column sums of dout (skipped if null)
// din must not alias in, dout or weight: the two products are one group (device.gemm_group), run
// at the same time on a GPU (as on the CPU's threads), where a weight gradient's small output
// [O, I] over the long depth T may not fill the SMs alone.
template <class S, class D>
void linear_backward(const D& device, ConstMatrixView<S> in, ConstMatrixView<S> dout, ConstMatrixView<S> weight,
                     MatrixView<S> din, MatrixView<S> dweight, S* dbias, GradInto din_into = GradInto::add) {
  using C = Compute<S>;
  const Index T = in.rows, O = weight.rows;
  const DeviceOperands on_device(device, "linear_backward");
  moe::nn::detail::check_linear_backward(in, dout, weight, din, dweight, [&] {
    on_device("in", in); on_device("dout", dout); on_device("weight", weight); on_device("din", din);
    on_device("dweight", dweight); on_device("dbias", dbias, O);
  });
  moe::cuda::detail::GemmGroup<D, S> products(device, moe::cuda::detail::Shape::fixed);
  if (dweight.data) products.gemm(dweight, dout, BlasOp::transpose, in, BlasOp::none, true);
  if (din.data) products.gemm(din, dout, BlasOp::none, weight, BlasOp::none, din_into == GradInto::add);
  products.run();
  if (!dbias) return;
  ScratchLayout layout;
  const auto partial_slot = layout.add<C>(moe::cuda::detail::column_sum_partials(T, O));
  moe::cuda::detail::add_column_sums(device, dout, dbias, partial_slot.in(device.scratch(layout.bytes())));
}

}  // namespace moe::cuda::nn
