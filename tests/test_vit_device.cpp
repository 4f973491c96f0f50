// The ViT MoE model on a CUDA-backend device (examples/vit_moe/model.hpp over
// moe::cuda::BasicBackend), run here on the host-emulated device: the model cases of
// tests/cuda/vit_model_cases.hpp (initial values, loss, logits and every gradient against the CPU
// model, same bits twice; moe_cuda_tests runs them on a GPU).
#include <doctest/doctest.h>

#include "cuda/emulated_test_device.hpp"

#define CUDA_TEST_NAME(text) "cuda, emulated device: " text
#include "cuda/vit_model_cases.hpp"
