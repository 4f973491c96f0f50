// moe/cuda/memory_ledger.hpp: the device memory a kind of device (CudaDevice, EmulatedDevice) has
// allocated for the library, one entry per allocation: its bytes now and at most, over every
// device object of that kind in the process; and where an extent lies among the live allocations
// (locate), which the devices' operand checks ask for every operand of every call (a map lookup).
//
// What cudaMemGetInfo cannot tell: the library's own part (not the CUDA context, cuBLAS's own
// workspaces or other processes) and its peak, not only what is held when asked. The backend's
// buffers only grow, so during training the peak is reached early and stays; reset_peak() starts a
// new measurement from what is held now (e.g. before the next variant of a comparison).
// Host code only (a mutex and a map): allocations are rare, since buffers are reused, and a lookup
// is a few hundred nanoseconds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>

namespace moe::cuda {

// Bytes held now and at most since the start or the last reset_peak; allocations made so far.
struct MemoryUse {
  std::size_t in_use = 0, peak = 0;
  std::uint64_t allocations = 0;
};

class MemoryLedger {
 public:
  // owner: the GPU the memory is on (CudaDevice), so a check can tell another GPU's buffer.
  void add(const void* p, std::size_t bytes, int owner = 0) {
    const std::lock_guard lock(mutex_);
    live_[address(p)] = {bytes, owner};
    in_use_ += bytes;
    if (in_use_ > peak_) peak_ = in_use_;
    ++made_;
  }
  // Forgets p (nothing for a pointer the ledger does not hold, e.g. null).
  void remove(const void* p) {
    const std::lock_guard lock(mutex_);
    const auto found = live_.find(address(p));
    if (found == live_.end()) return;
    in_use_ -= found->second.bytes;
    live_.erase(found);
  }
  MemoryUse use() const {
    const std::lock_guard lock(mutex_);
    return {in_use_, peak_, made_};
  }
  void reset_peak() {
    const std::lock_guard lock(mutex_);
    peak_ = in_use_;
  }
  // Where [p, p + bytes) lies: inside one live allocation (also for 0 bytes), starting in one and
  // running past its end, or starting in none (a host pointer, a freed buffer, another allocator's);
  // with the owner given for the allocation it starts in.
  enum class Extent { inside, past_end, elsewhere };
  Extent locate(const void* p, std::size_t bytes, int* owner = nullptr) const {
    if (bytes == 0) return Extent::inside;
    const std::lock_guard lock(mutex_);
    const std::uintptr_t begin = address(p);
    const auto next = live_.upper_bound(begin);
    if (next == live_.begin()) return Extent::elsewhere;
    const auto& [start, entry] = *std::prev(next);
    if (begin - start >= entry.bytes) return Extent::elsewhere;
    if (owner) *owner = entry.owner;
    return bytes <= entry.bytes - (begin - start) ? Extent::inside : Extent::past_end;
  }

 private:
  static std::uintptr_t address(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }
  mutable std::mutex mutex_;
  struct Entry {
    std::size_t bytes;
    int owner;
  };
  std::map<std::uintptr_t, Entry> live_;  // begin address -> its allocation
  std::size_t in_use_ = 0, peak_ = 0;
  std::uint64_t made_ = 0;
};

}  // namespace moe::cuda
