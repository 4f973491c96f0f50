// moe/cuda/per_device.hpp: a value worked out once per GPU, for the facts and settings that
// belong to a device rather than to the process: whether the current device runs a kernel, and a
// kernel's shared-memory size attribute (cudaFuncSetAttribute applies to the current device only).
// A process that switches devices with cudaSetDevice gets each device's own answer. Thread-safe:
// compute() runs under the object's lock (so it must not ask the same object again), once per
// device. No CUDA headers: the caller passes the current device's ordinal. Users keep theirs as a
// never-destroyed static (*new PerDevice), so a call during static destruction stays defined.
#pragma once

#include <map>
#include <mutex>
#include <utility>

namespace moe::cuda {

template <class T>
class PerDevice {
 public:
  // The value for `device`, from compute() the first time that device asks.
  template <class Compute>
  T get(int device, Compute&& compute) {
    const std::lock_guard<std::mutex> lock(mutex_);
    auto found = values_.find(device);
    if (found == values_.end()) found = values_.emplace(device, std::forward<Compute>(compute)()).first;
    return found->second;
  }

 private:
  std::mutex mutex_;
  std::map<int, T> values_;
};

}  // namespace moe::cuda
