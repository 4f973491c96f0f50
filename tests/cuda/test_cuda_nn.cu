// The CUDA transformer pieces (moe/cuda/nn/: layernorm, embedding, linear, attention,
// cross-entropy, AdamW) and the whole GPT-2 and ViT MoE models on the GPU, against the CPU
// functions of moe/nn/ and the CPU models: the same cases that tests/test_cuda_nn_emulated.cpp,
// tests/test_gpt2_device.cpp and tests/test_vit_device.cpp run on the emulated device. Part of moe_cuda_tests, whose main()
// (test_cuda_backend.cu) skips everything on a machine without a GPU.
//
// The cases include the CPU library (Eigen) for their reference, so nvcc parses Eigen here; its
// host/device annotation warnings are silenced for this file in tests/CMakeLists.txt.
#include <cuda_runtime.h>

#include "moe/cuda.cuh"

namespace cuda_test {
using TestDevice = moe::cuda::CudaDevice;
inline constexpr bool kEmulatedDevice = false;  // cuBLAS's kernels: some cases compare within rounding, not bits
inline TestDevice make_device() { return TestDevice(nullptr); }
inline bool device_available() { return moe::cuda::no_device_reason().empty(); }
}  // namespace cuda_test

#define CUDA_TEST_NAME(text) "cuda nn, GPU: " text
#include "cuda/cuda_nn_attention_cases.hpp"
#include "cuda/cuda_nn_fused_attention_cases.hpp"
#include "cuda/cuda_nn_loss_cases.hpp"
#include "cuda/cuda_nn_norm_cases.hpp"
#include "cuda/cuda_nn_operand_cases.hpp"
#include "cuda/gpt2_model_cases.hpp"
#include "cuda/vit_model_cases.hpp"
