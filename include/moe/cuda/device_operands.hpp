// moe/cuda/device_operands.hpp: a CUDA function's operands checked as memory its kernels can read
// (D::check_device_memory, moe/cuda/device.hpp), so a host pointer handed to the layer, a
// transformer piece (moe/cuda/nn/) or the optimizer is named by the call that got it
// ("layernorm_forward: x ..."), not reported as an illegal address at a later sync.
//
// Both devices find the library's own allocations in a ledger and check the whole extent against
// them (a view running past its buffer's end is named too); CudaDevice checks other memory by its
// kind, with one driver query (no sync; nothing where the GPU reads pageable memory), the emulated
// device refuses it. Empty operands are not checked.
#pragma once

#include <cstddef>

#include "moe/config.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda {

// A view its kernels will read or write (its shape checked first: check_view): the bytes its rows
// span (MatrixView::extent); a view with no data (an output the call skips) is not checked.
template <class D, class T>
void check_on_device(const D& device, const char* where, const char* name, MatrixView<T> v) {
  if (v.data && v.extent() > 0) device.check_device_memory(v.data, std::size_t(v.extent()) * sizeof(T), where, name);
}

// An array of `count` elements (a bias, a norm's weight, cached statistics); a null array (an
// optional output the call skips) is not checked.
template <class D, class T>
void check_on_device(const D& device, const char* where, const char* name, const T* p, Index count) {
  if (p && count > 0) device.check_device_memory(p, std::size_t(count) * sizeof(T), where, name);
}

// check_on_device for one call's operands: `const DeviceOperands on_device(device, "linear_forward");`
// then `on_device("in", in); on_device("bias", bias, O);`.
template <class D>
class DeviceOperands {
 public:
  DeviceOperands(const D& device, const char* where) : device_(device), where_(where) {}
  template <class... Operand>
  void operator()(const char* name, Operand... operand) const {
    check_on_device(device_, where_, name, operand...);
  }

 private:
  const D& device_;
  const char* where_;
};

}  // namespace moe::cuda
