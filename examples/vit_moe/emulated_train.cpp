// examples/vit_moe/emulated_train.cpp: vit_moe's --device emulated (device_train.hpp): the ViT model
// over moe::cuda::BasicBackend<S, EmulatedDevice> in fp32 or bf16 and its training loop, the code
// cuda_train.cu runs on the GPU, here on the host.
#include "device_train.hpp"
#include "moe/cuda/emulated_device.hpp"

namespace vit {

TrainResult train_on_emulated(const Run& run, const Data& data, HostCopy& host) {
  return train_on_device(run, data, moe::cuda::EmulatedDevice{}, host);
}

}  // namespace vit
