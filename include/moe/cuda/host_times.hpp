// moe/cuda/host_times.hpp: where a device's calls spend host time, by kind of call, when asked.
//
// A GPU runs ahead of its host only while the host queues work faster than the GPU does it. When
// a training step's wall time is well over its kernels' time, either the host's calls (launches,
// cuBLAS and cuBLASLt calls, a cuBLASLt heuristic for a new shape, a kernel loaded lazily on its
// first launch) or its waits (downloads, synchronize) are the cause. HostCallTimes tells them
// apart: calls, total and longest host time per kind. A wait's time is the GPU's lead: long waits
// mean the host is not the bottleneck; short waits with long call times mean it is.
//
// Off by default (two clock reads per call when on). Kinds are exclusive: a call made inside
// another timed call (cuBLAS then an epilogue pass, for a product cuBLASLt declines) counts in the
// outer one only, so the kinds add up to the host time spent in the device's calls. The exception
// is lt_heuristic, which is also inside its gemm_lt call: a detail of it, not an addition.
// One host thread per device (the stream's order is the host's order anyway).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <string_view>

namespace moe::cuda {

enum class HostCall {
  launch,        // a kernel of for_each / for_each_2d / for_each_row (the first launch loads it)
  gemm,          // cuBLAS (cublasGemmEx, strided or pointer-array batches): fixed shapes
  gemm_lt,       // products with an epilogue or a varying shape: cuBLASLt (descriptors and
                 // heuristic included), or cuBLAS (then a pass) where cuBLASLt declines
  lt_heuristic,  // of which: cuBLASLt's algorithm search for a shape not asked before
  sort,          // CUB's radix sort (size query and run)
  upload,        // host -> device copies
  wait,          // downloads and synchronize: until the GPU has done everything queued
};
inline constexpr std::size_t kHostCallKinds = 7;

inline constexpr std::string_view host_call_name(HostCall kind) {
  constexpr std::string_view names[kHostCallKinds] = {"launch", "gemm",   "gemm_lt", "lt_heuristic",
                                                      "sort",   "upload", "wait"};
  return names[std::size_t(kind)];
}

struct HostCallStats {
  std::uint64_t calls = 0;
  double seconds = 0;      // in all
  double max_seconds = 0;  // the longest one
};

class HostCallTimes {
  using Clock = std::chrono::steady_clock;

 public:
  // Times one call until it goes out of scope (nothing when timing is off or it is nested).
  class Scope {
   public:
    Scope(HostCallTimes* times, HostCall kind) : times_(times), kind_(kind) {
      if (!times_) return;
      detail_ = kind == HostCall::lt_heuristic;
      if (!detail_ && times_->depth_++ > 0) {  // inside another timed call: it counts there
        nested_ = true;
        return;
      }
      start_ = Clock::now();
    }
    ~Scope() {
      if (!times_) return;
      if (!detail_) --times_->depth_;
      if (nested_) return;
      times_->add(kind_, std::chrono::duration<double>(Clock::now() - start_).count());
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    HostCallTimes* times_;
    HostCall kind_;
    bool detail_ = false, nested_ = false;
    Clock::time_point start_{};
  };

  void enable(bool on) { on_ = on; }
  bool enabled() const { return on_; }
  Scope time(HostCall kind) { return Scope(on_ ? this : nullptr, kind); }
  void reset() { stats_ = {}; }

  const HostCallStats& operator[](HostCall kind) const { return stats_[std::size_t(kind)]; }
  // Host seconds in the device's calls (lt_heuristic is inside gemm_lt, so not added again).
  double total_seconds() const {
    double sum = 0;
    for (std::size_t k = 0; k < kHostCallKinds; ++k)
      if (HostCall(k) != HostCall::lt_heuristic) sum += stats_[k].seconds;
    return sum;
  }

 private:
  void add(HostCall kind, double seconds) {
    HostCallStats& s = stats_[std::size_t(kind)];
    ++s.calls;
    s.seconds += seconds;
    if (seconds > s.max_seconds) s.max_seconds = seconds;
  }
  bool on_ = false;
  int depth_ = 0;
  std::array<HostCallStats, kHostCallKinds> stats_{};
};

}  // namespace moe::cuda
