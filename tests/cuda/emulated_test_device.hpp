// tests/cuda/emulated_test_device.hpp: the emulated device the host-side device tests run on.
// Each call takes the next launch order (ascending, descending, shuffled, then again), so every
// case that runs twice and compares bits also runs its bodies in two orders: a body that reads
// what another index of its launch writes (a race on a GPU) fails there.
#pragma once

#include "moe/cuda/emulated_device.hpp"

namespace cuda_test {

using TestDevice = moe::cuda::EmulatedDevice;
inline constexpr bool kEmulatedDevice = true;  // GEMMs are one definition: some cases compare bits

inline TestDevice make_device() {
  static int calls = 0;
  constexpr moe::cuda::LaunchOrder kOrders[] = {moe::cuda::LaunchOrder::ascending,
                                                moe::cuda::LaunchOrder::descending,
                                                moe::cuda::LaunchOrder::shuffled};
  return TestDevice(kOrders[calls++ % 3]);
}
inline bool device_available() { return true; }

}  // namespace cuda_test
