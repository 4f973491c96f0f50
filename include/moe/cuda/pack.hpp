// moe/cuda/pack.hpp: 16-byte packs of elements for the element-wise kernels. A GPU thread that moves one bf16 per
// load issues eight times the instructions of one that moves a 16-byte pack (8 bf16, 4 float, 2 double), and the
// row copies and sums of dispatch and combine are bound by exactly that. A kernel takes packs where every row of its
// views starts on a 16-byte boundary and the row length is a whole number of packs (packable), and single elements
// otherwise. Both do the same operations per element in the same order: copies give the same bits, formulas the
// same up to where the compiler fuses a multiply-add (it may choose differently in the two loops). Which path runs
// depends on the shapes and alignments alone, so a rerun gives the same bits.
#pragma once

#include <cstdint>

#include "moe/config.hpp"
#include "moe/host_device.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda {

template <class S>
inline constexpr Index kPackSize = Index(16 / sizeof(S));

// Whether a pack may be loaded or stored at p: 16-byte aligned.
inline bool pack_aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// W elements moved together: W = kPackSize<S> (the default) is a 16-byte pack; W = 1 a single element, so a kernel
// written once over W (load_pack_of / store_pack_of) serves both of its paths.
template <class S, Index W = kPackSize<S>>
struct alignas(sizeof(S) * W) Pack {
  S v[W];
};

#if !defined(__CUDA_ARCH__)
namespace pack_detail {
// On the host (the emulated device) a pack moves element by element and would work at any address;
// on the GPU a misaligned 128-bit access stops the kernel. So the host checks what the GPU assumes.
inline void check_aligned(const void* p, const char* where) {
  check(reinterpret_cast<std::uintptr_t>(p) % 16 == 0, where, ": address ", p,
        " is not 16-byte aligned (a 128-bit access there faults on the GPU; packable() should have said no)");
}
}  // namespace pack_detail
#endif

// The pack at p (16-byte aligned): one 128-bit load on the GPU; element by element on the host (no aliasing
// questions there), after checking the alignment.
template <class S>
MOE_HOST_DEVICE Pack<S> load_pack(const S* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Pack<S>*>(p);
#else
  pack_detail::check_aligned(p, "load_pack");
  Pack<S> x;
  for (Index i = 0; i < kPackSize<S>; ++i) x.v[i] = p[i];
  return x;
#endif
}

template <class S>
MOE_HOST_DEVICE void store_pack(S* p, const Pack<S>& x) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Pack<S>*>(p) = x;
#else
  pack_detail::check_aligned(p, "store_pack");
  for (Index i = 0; i < kPackSize<S>; ++i) p[i] = x.v[i];
#endif
}

// A pack of W elements at p: load_pack / store_pack for W = kPackSize<S>, a plain access for W = 1.
template <Index W, class S>
MOE_HOST_DEVICE Pack<S, W> load_pack_of(const S* p) {
  static_assert(W == 1 || W == kPackSize<S>, "moe::cuda packs: W is 1 or kPackSize<S>");
  if constexpr (W == 1) {
    return Pack<S, 1>{{*p}};
  } else {
    return load_pack(p);
  }
}

template <Index W, class S>
MOE_HOST_DEVICE void store_pack_of(S* p, const Pack<S, W>& x) {
  static_assert(W == 1 || W == kPackSize<S>, "moe::cuda packs: W is 1 or kPackSize<S>");
  if constexpr (W == 1) {
    *p = x.v[0];
  } else {
    store_pack(p, x);
  }
}

// Whether rows of `cols` elements of every view can go in packs: each row starts 16-byte aligned and cols is a
// multiple of kPackSize<S>.
template <class S, class... Views>
bool packable(Index cols, const Views&... views) {
  const auto aligned = [](const auto& view) {
    return pack_aligned(view.data) && (view.stride * Index(sizeof(S))) % 16 == 0;
  };
  return cols % kPackSize<S> == 0 && (aligned(views) && ...);
}

}  // namespace moe::cuda
