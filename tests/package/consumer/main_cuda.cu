// The installed moe::cuda target: a GPU layer type compiles with nvcc from find_package(moe).
// Runs a forward only where there is a GPU (the package test just builds it). Built for plain
// sm_90 (CMakeLists.txt), it also shows that the Hopper grouped GEMM's header compiles without
// sm_90a: its kernel is left out and grouped_gemm_available() says false.
#include <moe/cuda.cuh>
#include <moe/cuda/hopper_grouped_gemm.cuh>

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
  std::printf("consumer_cuda: forward of [%ld, %ld] on the GPU; the wgmma grouped GEMM %s\n", long(y.rows()),
              long(y.cols()), moe::cuda::grouped_gemm_available() ? "runs here" : "is not in this build");
  return 0;
}
