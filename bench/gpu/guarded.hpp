// bench/gpu/guarded.hpp: the GPU benchmarks' error handling. Google Benchmark lets an exception end
// the whole run (and every later row with it): guarded() skips the one benchmark with its message
// instead, and remembers that one failed, for the binary's exit status. Also the hook that lets
// bench/gpu/profile.sh see one timed call alone.
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <exception>
#include <string>

namespace bench_gpu {

inline bool any_failed = false;

template <class Fn>
void guarded(benchmark::State& state, Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    any_failed = true;
  }
}

// MOE_PROFILE_ONE=1 in the environment: profiled_once(call) runs `call` once between
// cudaProfilerStart and cudaProfilerStop, so that `ncu --profile-from-start off`
// (bench/gpu/profile.sh) records the kernels of that one call and nothing else (no setup, no
// warm-up). Without it, nothing happens. Call it after the warm-up, before the timed loop.
// Once per process: Google Benchmark may run a benchmark's function again (to size its
// iterations), and a filter may pass several benchmarks; the profile holds the first call only.
inline bool profiled = false;
template <class Call>
void profiled_once(Call&& call) {
  static const bool on = [] {
    const char* v = std::getenv("MOE_PROFILE_ONE");
    return v && std::string(v) == "1";
  }();
  if (!on || profiled) return;
  profiled = true;
  cudaDeviceSynchronize();
  cudaProfilerStart();
  call();
  cudaDeviceSynchronize();
  cudaProfilerStop();
}

}  // namespace bench_gpu
