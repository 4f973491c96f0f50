// moe/cuda.cuh: the GPU world in one include, for code compiled by nvcc (C++20, --extended-lambda;
// CMake's moe::cuda target sets both). The CPU world is moe/moe.hpp; this header needs no Eigen.
//
//   using Layer = moe::MoELayer<moe::SelfRoute, moe::GeluMLP, moe::cuda::Backend>;
//   Layer layer(config, seed, {}, {}, moe::cuda::Backend(moe::cuda::CudaDevice(stream)));
#pragma once

#include "moe/aux_loss.hpp"
#include "moe/backend.hpp"
#include "moe/bfloat16.hpp"
#include "moe/config.hpp"
#include "moe/cuda/backend.hpp"
#include "moe/cuda/buffer.hpp"
#include "moe/cuda/cuda_device.cuh"
#include "moe/cuda/device.hpp"
#include "moe/experts.hpp"
#include "moe/gate.hpp"
#include "moe/layer.hpp"
#include "moe/routing.hpp"
#include "moe/stats.hpp"
#include "moe/tensor.hpp"
#include "moe/version.hpp"

namespace moe::cuda {

using Backend = BasicBackend<float, CudaDevice>;        // fp32 (TF32 with CudaDevice(stream, Fp32Math::tf32))
using BackendBF16 = BasicBackend<bfloat16, CudaDevice>; // bf16 storage, fp32 accumulation
using Backend64 = BasicBackend<double, CudaDevice>;     // for gradient checks

}  // namespace moe::cuda
