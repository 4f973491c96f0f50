// examples/common/parameter.hpp: a named parameter tensor that owns its values and gradient, and
// its deterministic initialisation; shared by the GPT-2 and ViT example models.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moe/config.hpp"
#include "moe/random.hpp"
#include "moe/tensor.hpp"

namespace examples {

using moe::Index;

// One named parameter tensor that owns its values and its gradient. Shapes follow PyTorch
// (nn.Linear's weight is [out, in]); 2-D views take the first dimension as rows and the rest as
// columns ([H, C, P, P] -> [H, C*P*P]).
template <class S>
struct Tensor {
  std::string name;
  std::vector<Index> shape;
  std::vector<S> value, grad;

  Tensor(std::string name_, std::vector<Index> shape_) : name(std::move(name_)), shape(std::move(shape_)) {
    Index n = 1;
    for (Index d : shape) n *= d;
    value.assign(std::size_t(n), S(0));
    grad.assign(std::size_t(n), S(0));
  }
  Index rows() const { return shape[0]; }
  Index cols() const { return Index(value.size()) / shape[0]; }
  moe::MatrixView<S> matrix() { return {value.data(), rows(), cols()}; }
  moe::ConstMatrixView<S> matrix() const { return {value.data(), rows(), cols()}; }
  moe::MatrixView<S> grad_matrix() { return {grad.data(), rows(), cols()}; }
  // No padding rows on the CPU (the device's DeviceTensor has them for cuBLAS): the matrix itself.
  moe::MatrixView<S> padded_matrix() { return matrix(); }
  moe::MatrixView<S> padded_grad_matrix() { return grad_matrix(); }
  moe::ParamRef<S> ref() { return {name, shape, value, grad, true}; }
};

// The random stream of a parameter is a hash of its name (FNV-1a): adding or reordering tensors
// never shifts another tensor's initial values.
inline std::uint64_t stream_of(std::string_view name) {
  std::uint64_t hash = 0xcbf29ce484222325ULL;
  for (char c : name) hash = (hash ^ std::uint8_t(c)) * 0x100000001b3ULL;
  return hash;
}
// N(0, std^2) values, deterministic in (seed, name).
template <class S>
void init_normal(Tensor<S>& t, double std_dev, std::uint64_t seed) {
  moe::random::fill_normal(std::span<S>(t.value), std_dev, seed, stream_of(t.name));
}
template <class S>
void fill(Tensor<S>& t, S value) {
  std::fill(t.value.begin(), t.value.end(), value);
}
template <class S>
void zero(moe::MatrixView<S> m) {
  for (Index r = 0; r < m.rows; ++r) std::fill(m.row(r), m.row(r) + m.cols, S(0));
}

}  // namespace examples
