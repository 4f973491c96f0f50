// moe/backend_checks.hpp: the shape checks of the backends' element-wise and routing primitives
// (moe/backend.hpp), one set for the CPU and CUDA backends (same messages), made before any work;
// two operands of one shape: moe::check_same_shape (moe/tensor.hpp).
// The layer always passes matching shapes; a custom gate or expert policy calling a primitive
// itself gets an error naming the operand instead of a read or write past a buffer.
#pragma once

#include "moe/config.hpp"
#include "moe/tensor.hpp"

namespace moe::backend_checks {

// v is [rows, cols]; `what` says where those come from.
template <class V>
void shape_is(const char* primitive, const char* name, const V& v, Index rows, Index cols, const char* what) {
  check(v.rows == rows && v.cols == cols, primitive, ": ", name, " is [", v.rows, ", ", v.cols, "], expected [", rows,
        ", ", cols, "] (", what, ")");
}

// v holds at least the plan's `rows` expert rows, `cols` wide; `note` (if any) says why that many.
template <class V>
void holds_rows(const char* primitive, const char* name, const V& v, Index rows, Index cols, const char* note = "") {
  check(v.rows >= rows && v.cols == cols, primitive, ": ", name, " is [", v.rows, ", ", v.cols,
        "], the plan's expert rows need [", rows, ", ", cols, "]", note);
}

// The config a routing primitive is given routes as the plan did (its k and N index the plan).
inline void plan_matches(const char* primitive, Index plan_experts, Index plan_top_k, const LayerConfig& config) {
  check(config.experts == plan_experts && config.top_k == plan_top_k, primitive, ": the config has N = ",
        config.experts, ", k = ", config.top_k, ", the plan N = ", plan_experts, ", k = ", plan_top_k);
}

// A vector with an entry per slot of the plan (the routing weights, their gradient).
inline void one_per_slot(const char* primitive, const char* name, Index size, Index slots) {
  check(size == slots, primitive, ": ", name, " has ", size, " entries, the plan has ", slots, " slots (T * k)");
}

}  // namespace moe::backend_checks
