// examples/common/memory.hpp: the process's peak resident memory, printed after every run (the
// README and bench/RESULTS.md quote it).
#pragma once

#include <sys/resource.h>

#include <cstdint>
#include <cstdio>

namespace train {

// Peak resident memory of this process so far (bytes).
inline std::int64_t peak_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return std::int64_t(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

inline void print_peak_memory() {
  std::fprintf(stderr, "peak resident memory: %.0f MiB\n", double(peak_rss_bytes()) / (1 << 20));
}

}  // namespace train
