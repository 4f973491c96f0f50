// moe/cuda/products.hpp: the device's products on row-major views (moe/cuda/device.hpp's
// column-major BlasGemm underneath): one product, one with an epilogue, and a group of independent
// ones handed to the device at once. The backend's expert banks and the nn pieces' linear layers
// call these.
#pragma once

#include <span>
#include <vector>

#include "moe/config.hpp"
#include "moe/cuda/device.hpp"
#include "moe/host_device.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda::detail {

// Shape::varies: the sizes change from call to call (BlasGemm::shape_varies: an expert's block).
enum class Shape { fixed, varies };

template <class D, class S>
void gemm(const D& device, MatrixView<S> out, ConstMatrixView<S> a, BlasOp op_a, ConstMatrixView<S> b, BlasOp op_b,
          bool accumulate, Shape shape = Shape::fixed) {
  BlasGemm<S> call = column_major_gemm(out, a, op_a, b, op_b, accumulate);
  call.shape_varies = shape == Shape::varies;
  if (call.m == 0 || call.n == 0) return;
  if (call.k > 0) {
    device.gemm(call);
  } else if (!accumulate) {  // an empty sum (e.g. a weight gradient over 0 tokens): cuBLAS is not asked
    for_each_2d(device, out.rows, out.cols, [=] MOE_HOST_DEVICE(Index r, Index c) { out(r, c) = S(0); });
  }
}

// out = epilogue(a op_b(b)) (device.hpp's Epilogue): a bias per output column, and for bias_gelu
// the pre-activation into aux as well. One fused GEMM on the GPU.
template <class D, class S>
void gemm_epilogue(const D& device, MatrixView<S> out, ConstMatrixView<S> a, ConstMatrixView<S> b, BlasOp op_b,
                   Epilogue epilogue, const S* bias, MatrixView<S> aux = {}, Shape shape = Shape::fixed) {
  BlasGemm<S> call = column_major_gemm_epilogue(out, a, b, op_b, epilogue, bias, aux);
  call.shape_varies = shape == Shape::varies;
  if (call.m > 0 && call.n > 0) device.gemm(call);
}

// Products that do not depend on each other (an expert's block against its own weights, one per
// expert; a linear layer's weight and input gradients), gathered and then handed to the device at
// once (device.gemm_group): a GPU runs them concurrently, so one small product does not leave the
// SMs idle while the next waits. `shape`: whether their sizes vary from call to call (an expert's
// block: Shape::varies). Nothing runs before run().
template <class D, class S>
class GemmGroup {
 public:
  explicit GemmGroup(const D& device, Shape shape = Shape::varies) : device_(device), shape_(shape) {}
  // As detail::gemm: out (=|+=) op_a(a) op_b(b), row-major.
  void gemm(MatrixView<S> out, ConstMatrixView<S> a, BlasOp op_a, ConstMatrixView<S> b, BlasOp op_b, bool accumulate) {
    BlasGemm<S> call = column_major_gemm(out, a, op_a, b, op_b, accumulate);
    if (call.m == 0 || call.n == 0) return;
    if (call.k > 0)
      add(call);
    else  // an empty sum: as detail::gemm does it, now (no product of the group reads out, so the order is free)
      detail::gemm(device_, out, a, op_a, b, op_b, accumulate);
  }
  // As detail::gemm_epilogue.
  void gemm_epilogue(MatrixView<S> out, ConstMatrixView<S> a, ConstMatrixView<S> b, BlasOp op_b, Epilogue epilogue,
                     const S* bias, MatrixView<S> aux = {}) {
    BlasGemm<S> call = column_major_gemm_epilogue(out, a, b, op_b, epilogue, bias, aux);
    if (call.m > 0 && call.n > 0) add(call);
  }
  void run() {
    if (!products_.empty()) device_.gemm_group(std::span<const BlasGemm<S>>(products_));
    products_.clear();
  }

 private:
  void add(BlasGemm<S> call) {
    call.shape_varies = shape_ == Shape::varies;
    products_.push_back(call);
  }
  const D& device_;
  Shape shape_;
  std::vector<BlasGemm<S>> products_;
};

}  // namespace moe::cuda::detail
