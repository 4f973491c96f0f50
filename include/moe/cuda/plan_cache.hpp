// moe/cuda/plan_cache.hpp: a bounded, thread-safe map from a problem's description to what a library chose for it
// (CudaDevice keeps cuBLASLt's algorithm per GEMM shape in one, so its heuristic runs once per shape, not per call).
// Host code only; no CUDA needed.
//
// Keys are arrays of integers (sizes, types, flags). When the cache holds `capacity` plans and a new key comes, it
// starts over empty: shapes that change every call (an expert's row count) cannot grow it without bound, and the
// shapes that repeat (every other GEMM of a training step) are back after one miss each.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <unordered_map>

#include "moe/config.hpp"

namespace moe::cuda {

template <std::size_t N, class Plan>
class PlanCache {
 public:
  using Key = std::array<std::int64_t, N>;

  explicit PlanCache(std::size_t capacity = 4096) : capacity_(capacity) {
    check(capacity >= 1, "PlanCache: a capacity of ", capacity, " plans");
  }

  // The plan stored for `key`, if any.
  std::optional<Plan> find(const Key& key) const {
    const std::lock_guard lock(mutex_);
    const auto it = plans_.find(key);
    if (it == plans_.end()) return std::nullopt;
    return it->second;
  }
  // Stores (or replaces) the plan of `key`, emptying the cache first when it is full.
  void insert(const Key& key, const Plan& plan) {
    const std::lock_guard lock(mutex_);
    if (plans_.size() >= capacity_ && !plans_.contains(key)) plans_.clear();
    plans_[key] = plan;
  }
  std::size_t size() const {
    const std::lock_guard lock(mutex_);
    return plans_.size();
  }

 private:
  struct Hash {  // FNV-1a over the key's 64-bit words, each mixed first (splitmix64's finaliser)
    std::size_t operator()(const Key& key) const {
      std::uint64_t h = 0xcbf29ce484222325ull;
      for (const std::int64_t word : key) {
        std::uint64_t x = std::uint64_t(word) + 0x9e3779b97f4a7c15ull;
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
        h = (h ^ (x ^ (x >> 31))) * 0x100000001b3ull;
      }
      return std::size_t(h);
    }
  };
  std::size_t capacity_;
  mutable std::mutex mutex_;
  std::unordered_map<Key, Plan, Hash> plans_;
};

}  // namespace moe::cuda
