// moe/tensor.hpp: non-owning row-major matrix views, the currency between the layer, its
// policies and a backend (host or device pointers alike), and named parameter references.
#pragma once

#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/config.hpp"
#include "moe/host_device.hpp"

namespace moe {

// The arithmetic type of a storage scalar: the scalar itself, unless it names a wider one
// (moe::bfloat16 computes in float).
template <class S>
struct ComputeTypeOf {
  using type = S;
};
template <class S>
  requires requires { typename S::compute_type; }
struct ComputeTypeOf<S> {
  using type = typename S::compute_type;
};

// A row-major [rows, cols] matrix with a row stride (>= cols). Does not own its memory.
template <class T>
struct MatrixView {
  T* data = nullptr;
  Index rows = 0;
  Index cols = 0;
  Index stride = 0;  // elements between the starts of consecutive rows

  MatrixView() = default;
  MOE_HOST_DEVICE MatrixView(T* data_, Index rows_, Index cols_) : MatrixView(data_, rows_, cols_, cols_) {}
  MOE_HOST_DEVICE MatrixView(T* data_, Index rows_, Index cols_, Index stride_)
      : data(data_), rows(rows_), cols(cols_), stride(stride_) {}
  // A view of mutable data converts to a view of const data.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  MOE_HOST_DEVICE MatrixView(const MatrixView<U>& other)
      : data(other.data), rows(other.rows), cols(other.cols), stride(other.stride) {}
  // Any row-major owner with data()/rows()/cols() (e.g. Eigen RowMajor matrices). A view of
  // const data may also be taken of a temporary, like std::span<const T>: it lives as long as
  // the full expression (enough for layer.forward(make_input())).
  template <class Owner>
    requires(std::is_const_v<T> || std::is_lvalue_reference_v<Owner>) && requires(Owner& m) {
      { m.data() } -> std::convertible_to<T*>;
      m.rows();
      m.cols();
      requires bool(std::remove_cvref_t<Owner>::IsRowMajor);
    }
  MatrixView(Owner&& m)  // NOLINT: implicit on purpose, a view of a matrix.
      : data(m.data()), rows(Index(m.rows())), cols(Index(m.cols())), stride(Index(m.cols())) {
    if constexpr (requires { m.outerStride(); }) stride = Index(m.outerStride());
  }

  MOE_HOST_DEVICE T* row(Index r) const { return data + r * stride; }
  MOE_HOST_DEVICE T& operator()(Index r, Index c) const { return data[r * stride + c]; }
  MOE_HOST_DEVICE bool contiguous() const { return stride == cols; }
  MOE_HOST_DEVICE Index size() const { return rows * cols; }
  // Rows [begin, begin + count).
  // (An empty matrix may have a null data pointer: never offset it.)
  MOE_HOST_DEVICE MatrixView row_block(Index begin, Index count) const { return {data ? data + begin * stride : data, count, cols, stride}; }
  // Columns [begin, begin + count) of every row: a strided view, no copy.
  MOE_HOST_DEVICE MatrixView col_block(Index begin, Index count) const { return {data ? data + begin : data, rows, count, stride}; }
};

template <class T>
using ConstMatrixView = MatrixView<const T>;

// Throws moe::Error unless a and b have the same shape: "<where>: <a_name> is [r, c], <b_name> is [r, c]".
template <class T, class U>
void check_same_shape(const char* where, const char* a_name, MatrixView<T> a, const char* b_name, MatrixView<U> b) {
  check(a.rows == b.rows && a.cols == b.cols, where, ": ", a_name, " is [", a.rows, ", ", a.cols, "], ", b_name,
        " is [", b.rows, ", ", b.cols, "]");
}

// A named parameter: its values, its gradient (same shape; empty if it never gets one) and
// whether an optimizer may update it. Shapes follow PyTorch (nn.Linear weight is [out, in]).
template <class Scalar>
struct ParamRef {
  std::string name;
  std::vector<Index> shape;
  std::span<Scalar> value;
  std::span<Scalar> grad;  // empty for frozen buffers (FixedRandom's projection)
  bool trainable = true;
};

}  // namespace moe
