// moe/cuda/dispatch.hpp: routing and dispatch on the device: route_tokens selects each token's
// experts and weights (moe::route_one_token, a thread a token) and counts its choices per tile;
// dispatch_by_counts turns the counts into the expert-sorted rows (a stable counting sort, the
// contract's order and capacity). moe::cuda::BasicBackend::route runs the two.
#pragma once

#include <algorithm>
#include <cstdint>

#include "moe/config.hpp"
#include "moe/cuda/device.hpp"
#include "moe/host_device.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda {

// Selection runs per token in one thread's registers; these bound that thread's loop.
inline constexpr Index kMaxExperts = 256;
inline constexpr Index kMaxTopK = 8;

namespace detail {

// Dispatch: route_tokens' choices grouped by expert in the contract's order (moe/routing.hpp: a
// stable counting sort of the choice-major slots, the capacity keeping each expert's first ones),
// as rows, slot_of_row, the counts and the offsets. No sort, and no atomics but integer ones (whose
// sums have no order). The choice-major order is cut into tiles (dispatch_tiles), and:
//   1. count:   in route_tokens, each choice adds one to its tile's count   -> tile_count[e][c]
//   2. scan:    a warp per expert turns its column into the counts before
//               each tile (a row's exclusive_scan), and keeps the total     -> tile_count[e][c], count[e]
//   3. scatter: thread (c, e) walks tile c in order and gives each slot that chose e its rank
//               among e's slots (tile_count[e][c], then one more per match); a rank under the
//               capacity keeps row offsets[e] + rank, the others are dropped (row -1). Every
//               thread adds up offsets[e] (the clipped counts before e) from count itself, and
//               thread (0, e) stores it: no launch of its own for N numbers. It then puts its
//               tile_count back to zero, ready for the next route's counts (route() zeroes the
//               array once, when it is allocated).
// Apart from the counts, each index writes only its own elements, so the launches run in any order
// with the same result. (Counting in its own launch, a thread per tile and expert walking the tile,
// cost ~5 µs on an H100; the scan, a thread per expert walking its column, ~7 µs.)
struct DispatchTiles {
  Index size = 0;   // slots a tile (a multiple of 16: one 16-byte load brings 16 choices)
  Index count = 0;  // tiles (at least one, so an empty batch still gets its zero offsets)
};
// Tiles of 128 slots, made longer where there would be more than 1024: a lane of the scan walks a
// 32nd of its column, so that walk stays short.
inline DispatchTiles dispatch_tiles(Index slots) {
  constexpr Index kBase = 128, kMaxTiles = 1024;
  const Index size = kBase * std::max<Index>(1, (slots + kBase * kMaxTiles - 1) / (kBase * kMaxTiles));
  return {size, std::max<Index>(1, (slots + size - 1) / size)};
}

// Positions, slots, ranks and rows are 32-bit in the count and scatter walks: the backend checks
// T * k < 2^31 (the rows are int32 too), and the walks are unrolled over a whole tile, where 64-bit
// arithmetic doubles the instructions of every slot.
using SlotIndex = std::int32_t;

// 16 choices, one byte each, as four words: choice b is byte b % 4 (little-endian) of word b / 4, which
// is what a 128-bit load gives on the GPU. Words move and shift in 4 registers where 16 single bytes
// took 16.
struct alignas(16) ChoicePack {
  std::uint32_t w[4];
};
MOE_HOST_DEVICE inline ChoicePack load_choices(const std::uint8_t* at) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const ChoicePack*>(at);
#else
  const Pack<std::uint8_t> bytes = load_pack(at);  // checks the alignment the GPU's load needs
  ChoicePack c;
  for (int i = 0; i < 4; ++i)
    c.w[i] = std::uint32_t(bytes.v[4 * i]) | std::uint32_t(bytes.v[4 * i + 1]) << 8 |
             std::uint32_t(bytes.v[4 * i + 2]) << 16 | std::uint32_t(bytes.v[4 * i + 3]) << 24;
  return c;
#endif
}
MOE_HOST_DEVICE inline SlotIndex choice_in(const ChoicePack& c, int b) {
  return SlotIndex((c.w[b >> 2] >> (8 * (b & 3))) & 0xffu);
}

// f(expert of q) for the slots q in [begin, end) in order, their choices fetched 16 at a time
// (begin 16-aligned; the tile's last load may read past end, within the tile, and ignores it).
// Eight loads in flight: a tile of 128 slots is one wait for memory, not two. f's code appears once,
// for one pack: the packs take their turns at the front of the batch in a rolled loop. (Unrolled
// over the batch, f appeared 144 times, and the scatter's kernel took 178 KB of code.)
template <class F>
MOE_HOST_DEVICE void walk_choices(const std::uint8_t* choice, SlotIndex begin, SlotIndex end, F f) {
  constexpr SlotIndex W = SlotIndex(kPackSize<std::uint8_t>);
  constexpr int kInFlight = 8;
  const SlotIndex packs = (end - begin + W - 1) / W;
  SlotIndex q = begin;
  for (SlotIndex first = 0; first < packs; first += kInFlight) {
    ChoicePack batch[kInFlight] = {};  // past the last pack, zeros move forward, never read
    MOE_UNROLL
    for (int i = 0; i < kInFlight; ++i)
      if (first + i < packs) batch[i] = load_choices(choice + begin + (first + i) * W);
    const int here = packs - first < kInFlight ? int(packs - first) : kInFlight;
    MOE_NO_UNROLL
    for (int i = 0; i < here; ++i) {
      MOE_UNROLL
      for (int b = 0; b < int(W); ++b, ++q)
        if (q < end) f(choice_in(batch[0], b));
      MOE_UNROLL
      for (int m = 0; m + 1 < kInFlight; ++m) batch[m] = batch[m + 1];
    }
  }
}

// Thread i of the count and scatter launches: tile c, expert e (i = c * N + e), the tile's slots
// [begin, end).
struct DispatchThread {
  SlotIndex c, e, begin, end;
};
MOE_HOST_DEVICE inline DispatchThread dispatch_thread(Index i, Index N, Index tile_size, Index slots) {
  const Index c = i / N, begin = c * tile_size, end = begin + tile_size < slots ? begin + tile_size : slots;
  return {SlotIndex(c), SlotIndex(i - c * N), SlotIndex(begin), SlotIndex(end)};
}

// The tile_count entry of a choice of expert e at choice-major position q: [e][q's tile].
MOE_HOST_DEVICE inline Index tile_counter(DispatchTiles tiles, std::int32_t e, SlotIndex q) {
  return Index(e) * tiles.count + q / SlotIndex(tiles.size);
}

// Rows expert e keeps: its count clipped to the capacity.
MOE_HOST_DEVICE inline Index kept_rows(std::int64_t count, Index capacity) {
  return count < capacity ? Index(count) : capacity;
}

// The slot s = t * k + j of choice-major position q = j * T + t, stepped one position at a time:
// one division for the walk's start, not one for every slot. (The scatter divided q by T for each
// of its slots: its walk, unrolled over 128 slots, carried 145 inlined 64-bit divisions, and on an
// H100 it took 58 µs a launch where the count launch over the same tile took 5.)
struct ChoiceMajorCursor {
  SlotIndex T, k, j, t;
  MOE_HOST_DEVICE ChoiceMajorCursor(SlotIndex q, SlotIndex tokens, SlotIndex top_k)
      : T(tokens), k(top_k), j(tokens > 0 ? q / tokens : 0), t(q - j * tokens) {}
  MOE_HOST_DEVICE SlotIndex slot() const { return t * k + j; }
  MOE_HOST_DEVICE void next() {
    if (++t == T) t = 0, ++j;
  }
};

// Selection and weights, one thread per token (moe::route_one_token), with k a compile-time
// constant: one kernel per k in [1, kMaxTopK], so the selection is select_top_k_fixed's, in
// registers. The same result as a runtime k. Also dispatch's input: choice[j*T + t] = expert(t, j)
// (choice-major: every first choice before any second; kMaxExperts <= 256, so a byte holds it),
// and its first step: each choice adds one to its tile's count of its expert (dispatch_by_counts).
template <Index kK = 1, class D, class S>
void route_tokens(const D& device, ConstMatrixView<S> logits, Index k, RoutingWeights mode, std::int32_t* expert,
                  std::uint8_t* status, S* w, std::uint8_t* choice, DispatchTiles tiles, std::int32_t* tile_count) {
  static_assert(kMaxExperts <= 256, "route_tokens: an expert index must fit the choice byte");
  if constexpr (kK < kMaxTopK) {
    if (k != kK) return route_tokens<kK + 1>(device, logits, k, mode, expert, status, w, choice, tiles, tile_count);
  }
  check(k == kK, "route_tokens: top_k = ", k, " outside [1, ", kMaxTopK, "]");
  const Index T = logits.rows, N = logits.cols;
  device.for_each(T, [=] MOE_HOST_DEVICE(Index t) {
    std::int32_t chosen[kK];
    status[t] = route_one_token<kK>(logits.row(t), N, kK, mode, chosen, w + t * kK);
    for (Index j = 0; j < kK; ++j) {
      expert[t * kK + j] = chosen[j];
      choice[j * T + t] = std::uint8_t(chosen[j]);
      atomic_add(tile_count + tile_counter(tiles, chosen[j], SlotIndex(j * T + t)), std::int32_t{1});
    }
  });
}

template <class D>
void dispatch_by_counts(const D& device, const std::uint8_t* choice, Index T, Index k, Index N, Index capacity,
                        DispatchTiles tiles, std::int32_t* tile_count, std::int64_t* count, Index* offsets,
                        std::int32_t* row, std::int32_t* slot_of_row) {
  const Index slots = T * k, size = tiles.size, n = tiles.count;
  // tile_count holds route_tokens' counts. The scan: a warp per expert, a run of a column's n counts
  // (256 at T*k = 32768) a lane.
  device.for_each_row(N, [=] MOE_HOST_DEVICE(Index e, const typename D::Row& warp) {
    std::int32_t* column = tile_count + e * n;
    const std::int64_t total = warp.template exclusive_scan<std::int64_t>(
        n, [=](Index c) { return column[c]; }, [=](Index c, std::int64_t before) { column[c] = std::int32_t(before); });
    if (warp.first()) count[e] = total;
  });
  device.for_each(n * N, [=] MOE_HOST_DEVICE(Index i) {
    const DispatchThread my = dispatch_thread(i, N, size, slots);
    Index offset = 0;
    for (Index f = 0; f < my.e; ++f) offset += kept_rows(count[f], capacity);
    if (my.c == 0) {
      offsets[my.e] = offset;
      if (my.e == N - 1) offsets[N] = offset + kept_rows(count[my.e], capacity);
    }
    // Ranks stay below the slots, so the capacity clipped to them keeps every comparison.
    const SlotIndex kept_below = SlotIndex(capacity < slots ? capacity : slots), first_row = SlotIndex(offset);
    SlotIndex rank = tile_count[my.e * n + my.c];
    tile_count[my.e * n + my.c] = 0;  // for the next route's counts
    ChoiceMajorCursor at(my.begin, SlotIndex(T), SlotIndex(k));
    walk_choices(choice, my.begin, my.end, [&](SlotIndex chosen) {
      const SlotIndex s = at.slot();
      at.next();
      if (chosen != my.e) return;
      if (rank < kept_below) {
        row[s] = first_row + rank;
        slot_of_row[first_row + rank] = s;
      } else {
        row[s] = -1;
      }
      ++rank;
    });
  });
}

}  // namespace detail
}  // namespace moe::cuda
