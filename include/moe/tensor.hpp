// moe/tensor.hpp: non-owning row-major matrix views, the currency between the layer, its
// policies and a backend (host or device pointers alike), and named parameter references.
#pragma once

#include <cstdint>
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
  // Elements from the first to one past the last, the memory the rows span: (rows - 1) * stride +
  // cols; 0 if empty.
  MOE_HOST_DEVICE Index extent() const { return rows > 0 && cols > 0 ? (rows - 1) * stride + cols : 0; }
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

// Throws moe::Error unless v is a view of memory: rows, cols >= 0, a stride of at least cols (rows
// must not overlap), and data unless it is empty: "<where>: <name> is [r, c] with stride s ...".
template <class T>
void check_view(const char* where, const char* name, MatrixView<T> v) {
  check(v.rows >= 0 && v.cols >= 0, where, ": ", name, " is [", v.rows, ", ", v.cols, "]: negative extent");
  check(v.rows <= 1 || v.stride >= v.cols, where, ": ", name, " is [", v.rows, ", ", v.cols, "] with row stride ",
        v.stride, ": rows would overlap (the stride must be >= the columns)");
  check(v.data != nullptr || v.rows == 0 || v.cols == 0, where, ": ", name, " is [", v.rows, ", ", v.cols,
        "] with no data (null pointer)");
}

// Whether views a and b share memory (host or device pointers alike; empty views share none; a view
// whose rows overlap themselves, which check_view refuses, is taken to overlap anything). Exact
// for views of one element type and one row stride (e.g. two column blocks of one matrix, which
// interleave without touching); otherwise by the address ranges they span, which may say yes for
// views that interleave without touching.
template <class T, class U>
bool overlaps(MatrixView<T> a, MatrixView<U> b) {
  if (!a.data || !b.data || a.rows <= 0 || a.cols <= 0 || b.rows <= 0 || b.cols <= 0) return false;
  if ((a.rows > 1 && a.stride < a.cols) || (b.rows > 1 && b.stride < b.cols)) return true;  // not views of memory
  const auto first = [](const auto& v) { return reinterpret_cast<std::uintptr_t>(v.data); };
  const auto last = [](const auto& v) { return reinterpret_cast<std::uintptr_t>(v.data + v.extent()); };
  if (first(a) >= last(b) || first(b) >= last(a)) return false;
  using TA = std::remove_cv_t<T>;
  using UB = std::remove_cv_t<U>;
  if constexpr (std::is_same_v<TA, UB>) {
    const std::intptr_t bytes = std::intptr_t(first(a)) - std::intptr_t(first(b));
    const Index s = a.stride;
    if (s == b.stride && s > 0 && bytes % std::intptr_t(sizeof(TA)) == 0 && a.cols <= s && b.cols <= s) {
      // Element (r1, c1) of a is (r2, c2) of b when d = (r2 - r1) s + (c2 - c1), d = a - b in elements:
      // c2 - c1 in (-a.cols, b.cols) leaves at most two row offsets q = r2 - r1 to try.
      const Index d = Index(bytes / std::intptr_t(sizeof(TA)));
      const auto floor_div = [](Index x, Index y) { return x >= 0 ? x / y : -((-x + y - 1) / y); };
      for (Index q = floor_div(d - (b.cols - 1), s); q <= floor_div(d + (a.cols - 1), s); ++q)
        if (q >= -(a.rows - 1) && q <= b.rows - 1 && d - q * s > -a.cols && d - q * s < b.cols) return true;
      return false;
    }
  }
  return true;  // the ranges meet
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
