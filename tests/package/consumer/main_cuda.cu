// The installed moe::cuda target: a GPU layer type compiles with nvcc from find_package(moe).
// Runs a forward only where there is a GPU (the package test just builds it).
#include <moe/cuda.cuh>

#include <cstdio>

int main() {
  using Layer = moe::MoELayer<moe::SelfRoute, moe::GeluMLP, moe::cuda::Backend>;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("consumer_cuda: built against moe::cuda; no GPU, nothing run\n");
    return 0;
  }
  Layer layer(moe::LayerConfig{64, 128, 8, 2}, 1);
  moe::cuda::Backend::Matrix x(16, 64);
  layer.backend().fill_normal(x, 1.0, 1, 1);
  const auto y = layer.forward(x);
  std::printf("consumer_cuda: forward of [%ld, %ld] on the GPU\n", long(y.rows()), long(y.cols()));
  return 0;
}
