// The CUDA transformer pieces (moe/cuda/nn/: layernorm, embedding, attention, cross-entropy,
// AdamW) on the emulated device, against the CPU functions of moe/nn/ (every CI run, ASan too).
// tests/cuda/test_cuda_nn.cu runs the same cases on a GPU (moe_cuda_tests).
#include "cuda/emulated_test_device.hpp"

#define CUDA_TEST_NAME(text) "cuda nn, emulated device: " text
#include "cuda/cuda_nn_attention_cases.hpp"
#include "cuda/cuda_nn_loss_cases.hpp"
#include "cuda/cuda_nn_norm_cases.hpp"
