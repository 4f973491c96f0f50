// moe/cpu/parallel.hpp: the one place the CPU backend touches OpenMP.
//
// Determinism rule: work is cut into pieces by the data's shape alone, never by the thread count,
// and each piece is computed by one thread with fixed-order arithmetic. Which thread runs a piece
// changes nothing, so 1, 2 or 64 threads give the same bits.
#pragma once

#include "moe/config.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace moe::cpu {

inline int default_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Runs body(i) for i in [0, count) on up to `threads` threads, dynamic schedule.
// One thread goes through the same OpenMP region on purpose: a serial fallback would be a second
// compiled copy of body, which the compiler may vectorise or contract (FMA) differently, and
// then 1 and 2 threads would not give the same bits.
template <class Body>
void parallel_for(int threads, Index count, Body&& body) {
  check(threads >= 1, "thread count must be >= 1, got ", threads);  // OpenMP's num_threads(<= 0) is undefined
  if (count <= 0) return;
#if defined(_OPENMP)
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (Index i = 0; i < count; ++i) body(i);
#else
  (void)threads;
  for (Index i = 0; i < count; ++i) body(i);
#endif
}

// Runs body(begin, end) over [0, count) in chunks of `chunk` (the chunk, not the thread count,
// fixes the split).
template <class Body>
void parallel_chunks(int threads, Index count, Index chunk, Body&& body) {
  const Index pieces = (count + chunk - 1) / chunk;
  parallel_for(threads, pieces, [&](Index piece) {
    const Index begin = piece * chunk;
    body(begin, begin + chunk < count ? begin + chunk : count);
  });
}

// Row-wise work (elementwise ops, per-row reductions) goes in tasks of about 16K elements:
// rows_per_task depends on the width alone, never on the thread count.
inline Index rows_per_task(Index cols) { return cols > 0 && cols < 16384 ? 16384 / cols : 1; }

// Reductions over rows (bias and norm gradients) go in blocks of columns; each task owns a block
// and adds the rows in order.
inline constexpr Index kColumnsPerTask = 64;

}  // namespace moe::cpu
