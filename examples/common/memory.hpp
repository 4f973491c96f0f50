// examples/common/memory.hpp: the process's peak resident memory, printed after every run (the
// README and bench/RESULTS.md quote it), and byte counts as a report shows them.
#pragma once

#include <sys/resource.h>

#include <cstdint>
#include <cstdio>
#include <string>

namespace train {

// Peak resident memory of this process so far (bytes).
inline std::int64_t peak_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return std::int64_t(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

// "12.34 GiB" from 1 GiB up, else "56.7 MiB": a toy model's memory still reads as a number.
inline std::string format_memory(std::int64_t bytes) {
  char text[32];
  if (bytes >= (std::int64_t(1) << 30))
    std::snprintf(text, sizeof text, "%.2f GiB", double(bytes) / double(std::int64_t(1) << 30));
  else
    std::snprintf(text, sizeof text, "%.1f MiB", double(bytes) / double(1 << 20));
  return text;
}

inline void print_peak_memory() {
  std::fprintf(stderr, "peak resident memory: %.0f MiB\n", double(peak_rss_bytes()) / (1 << 20));
}

}  // namespace train
