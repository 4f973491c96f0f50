// bench/gpu/guarded.hpp: the GPU benchmarks' error handling. Google Benchmark lets an exception end
// the whole run (and every later row with it): guarded() skips the one benchmark with its message
// instead, and remembers that one failed, for the binary's exit status.
#pragma once

#include <benchmark/benchmark.h>

#include <exception>

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

}  // namespace bench_gpu
