// The CUDA transformer pieces (moe/cuda/nn/: layernorm, embedding, attention, cross-entropy,
// AdamW) on the emulated device, against the CPU functions of moe/nn/ (every CI run, ASan too).
// The GPU compiles them in tests/cuda/cuda_nn_*_instantiate.cu; running these cases on a GPU
// is left for a machine that has one (they include the Eigen CPU reference).
#include "moe/cuda/emulated_device.hpp"

namespace cuda_test {
using TestDevice = moe::cuda::EmulatedDevice;
inline TestDevice make_device() { return {}; }
inline bool device_available() { return true; }
}  // namespace cuda_test

#define CUDA_TEST_NAME(text) "cuda nn, emulated device: " text
#include "cuda/cuda_nn_attention_cases.hpp"
#include "cuda/cuda_nn_loss_cases.hpp"
#include "cuda/cuda_nn_norm_cases.hpp"
