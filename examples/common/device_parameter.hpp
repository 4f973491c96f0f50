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
  moe::cuda::DeviceArray<S, D> value, grad;  // uninitialised: NnOps::param zeroes them

  DeviceTensor(std::string name_, std::vector<Index> shape_) : name(std::move(name_)), shape(std::move(shape_)) {
    Index n = 1;
    for (Index d : shape) n *= d;
    value.resize(n);
    grad.resize(n);
  }
  Index size() const { return value.size(); }
  Index rows() const { return shape[0]; }
  Index cols() const { return size() / shape[0]; }
  moe::MatrixView<S> matrix() { return {value.data(), rows(), cols()}; }
  moe::ConstMatrixView<S> matrix() const { return {value.data(), rows(), cols()}; }
  moe::MatrixView<S> grad_matrix() { return {grad.data(), rows(), cols()}; }
  // Spans over device memory: their sizes and pointers are used on the host, never their values.
  moe::ParamRef<S> ref() {
    const auto n = std::size_t(size());
    return {name, shape, std::span<S>(value.data(), n), std::span<S>(grad.data(), n), true};
  }
};

}  // namespace examples
