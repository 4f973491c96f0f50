// moe/cuda/cuda_error.cuh: CudaError, what a failure the CUDA runtime or cuBLAS reports throws
// (a bad argument throws moe::Error instead), and the checks that throw it.
// Include only from code compiled by nvcc.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace moe::cuda {

struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A failed runtime call also leaves its status as the runtime's last error, which the next
// cudaGetLastError() would return: an unrelated launch check later would then throw it under its
// own name. So the check takes it first (a sticky error stays; the context is lost then anyway).
inline void check_cuda(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();
  throw CudaError(std::string("moe: CUDA error in ") + what + ": " + cudaGetErrorString(status));
}
inline void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw CudaError(std::string("moe: cuBLAS error in ") + what + ": " + cublasGetStatusString(status));
}

}  // namespace moe::cuda
