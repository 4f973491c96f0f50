// moe/backend_checks.hpp: the shape checks of the backends' element-wise and routing primitives
// (moe/backend.hpp), one set for the CPU and CUDA backends (same messages), made before any work.
// The layer always passes matching shapes; a custom gate or expert policy calling a primitive
// itself gets an error naming the operand instead of a read or write past a buffer.
#pragma once

#include "moe/config.hpp"

namespace moe::backend_checks {

// b has a's shape.
template <class A, class B>
void same_shape(const char* primitive, const char* a_name, const A& a, const char* b_name, const B& b) {
  check(a.rows == b.rows && a.cols == b.cols, primitive, ": ", b_name, " is [", b.rows, ", ", b.cols, "], ", a_name,
        " is [", a.rows, ", ", a.cols, "]");
}

// v is [rows, cols]; `what` says where those come from.
template <class V>
void shape_is(const char* primitive, const char* name, const V& v, Index rows, Index cols, const char* what) {
  check(v.rows == rows && v.cols == cols, primitive, ": ", name, " is [", v.rows, ", ", v.cols, "], expected [", rows,
        ", ", cols, "] (", what, ")");
}

// v holds at least the plan's `rows` expert rows, `cols` wide.
template <class V>
void holds_rows(const char* primitive, const char* name, const V& v, Index rows, Index cols) {
  check(v.rows >= rows && v.cols == cols, primitive, ": ", name, " is [", v.rows, ", ", v.cols,
        "], the plan's expert rows need [", rows, ", ", cols, "]");
}

// A vector with an entry per slot of the plan (the routing weights, their gradient).
inline void one_per_slot(const char* primitive, const char* name, Index size, Index slots) {
  check(size == slots, primitive, ": ", name, " has ", size, " entries, the plan has ", slots, " slots (T * k)");
}

}  // namespace moe::backend_checks
