// moe/host_device.hpp: MOE_HOST_DEVICE marks a function that both backends run: plain C++ for
// the host compiler, __host__ __device__ under nvcc. The routing contract, the activations, the
// random generator and the matrix view use it, so the GPU executes the very code the CPU
// reference runs, not a second copy of it.
#pragma once

#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif

// MOE_UNROLL before a loop of constant trip count: unroll it, so arrays it indexes can live in
// registers (nvcc's and clang's `#pragma unroll`, GCC's `#pragma GCC unroll`). Nothing in nvcc's
// host pass, whose front end and host compiler each reject the other's spelling.
#if defined(__CUDA_ARCH__) || (defined(__clang__) && !defined(__CUDACC__))
#define MOE_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__CUDACC__)
#define MOE_UNROLL _Pragma("GCC unroll 16")
#else
#define MOE_UNROLL
#endif

// MOE_NO_UNROLL before a loop whose body is long: keep it rolled on the GPU, so that a kernel's code
// stays small enough for the SM's instruction cache (the host compilers decide for themselves).
#if defined(__CUDA_ARCH__)
#define MOE_NO_UNROLL _Pragma("unroll 1")
#else
#define MOE_NO_UNROLL
#endif
