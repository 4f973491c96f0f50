// examples/common/device_parameter.hpp: a named parameter tensor whose values and gradient live in
// a CUDA-backend device's memory (moe/cuda/buffer.hpp): the device twin of examples::Tensor
// (parameter.hpp), with the same shape conventions and accessors. No Eigen: nvcc code includes it.
#pragma once

#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moe/config.hpp"
#include "moe/cuda/buffer.hpp"
#include "moe/tensor.hpp"

namespace examples {

using moe::Index;

template <class S, class D>
struct DeviceTensor {
  std::string name;
  std::vector<Index> shape;
  // Rows of storage: rows() and, below them, zero rows that no optimizer or checkpoint sees. They
  // let a product run over a row count cuBLAS likes: GPT-2's tied classifier reads wte as
  // [50304, H] instead of [50257, H], whose odd row count sends cuBLAS to slow kernels.
  Index storage_rows = 0;
  moe::cuda::DeviceArray<S, D> value, grad;  // uninitialised: NnOps::param zeroes them

  DeviceTensor(std::string name_, std::vector<Index> shape_, Index storage_rows_ = 0)
      : name(std::move(name_)), shape(std::move(shape_)) {
    storage_rows = storage_rows_ > shape[0] ? storage_rows_ : shape[0];
    value.resize(storage_rows * cols());
    grad.resize(storage_rows * cols());
  }
  Index size() const {
    Index n = 1;
    for (Index d : shape) n *= d;
    return n;
  }
  Index rows() const { return shape[0]; }
  Index cols() const { return size() / shape[0]; }
  moe::MatrixView<S> matrix() { return {value.data(), rows(), cols()}; }
  moe::ConstMatrixView<S> matrix() const { return {value.data(), rows(), cols()}; }
  moe::MatrixView<S> grad_matrix() { return {grad.data(), rows(), cols()}; }
  // The storage rows: the matrix and its zero padding.
  moe::MatrixView<S> padded_matrix() { return {value.data(), storage_rows, cols()}; }
  moe::MatrixView<S> padded_grad_matrix() { return {grad.data(), storage_rows, cols()}; }
  // Spans over device memory: their sizes and pointers are used on the host, never their values.
  moe::ParamRef<S> ref() {
    const auto n = std::size_t(size());
    return {name, shape, std::span<S>(value.data(), n), std::span<S>(grad.data(), n), true};
  }
};

}  // namespace examples
