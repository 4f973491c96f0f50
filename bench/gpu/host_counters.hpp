// bench/gpu/host_counters.hpp: a device's host-call times (moe/cuda/host_times.hpp) as Google
// Benchmark counters, for the GPU benchmarks: host_<kind>_calls, host_<kind>_ms and
// host_<kind>_max_ms (the longest single call) per kind, and host_calls_ms, their sum, each
// divided by `calls` (the number of timed calls the figures cover, so they read per call).
#pragma once

#include <benchmark/benchmark.h>

#include <string>

#include "moe/cuda/host_times.hpp"

namespace bench_gpu {

inline void add_host_call_counters(benchmark::State& state, const moe::cuda::HostCallTimes& times, int calls = 1) {
  const double per = 1.0 / double(calls);
  for (std::size_t k = 0; k < moe::cuda::kHostCallKinds; ++k) {
    const auto kind = moe::cuda::HostCall(k);
    const std::string name = "host_" + std::string(moe::cuda::host_call_name(kind));
    state.counters[name + "_calls"] = double(times[kind].calls) * per;
    state.counters[name + "_ms"] = times[kind].seconds * 1e3 * per;
    state.counters[name + "_max_ms"] = times[kind].max_seconds * 1e3;
  }
  state.counters["host_calls_ms"] = times.total_seconds() * 1e3 * per;
}

// `body` run `calls` times with the device's host calls timed, then the counters above. The
// device's timing is left off, as it was found.
template <class Device, class Body>
void time_host_calls(benchmark::State& state, const Device& device, Body&& body, int calls = 1) {
  moe::cuda::HostCallTimes& times = device.host_times();
  times.reset();
  times.enable(true);
  for (int i = 0; i < calls; ++i) body();
  device.synchronize();
  times.enable(false);
  add_host_call_counters(state, times, calls);
}

}  // namespace bench_gpu
