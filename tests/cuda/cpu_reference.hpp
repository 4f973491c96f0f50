// tests/cuda/cpu_reference.hpp: the CPU backend's MoELayer as a plain function, so the CUDA
// backend's tests (compiled by nvcc, which never sees Eigen) compare against it. Implemented in
// cpu_reference.cpp by the host compiler.
#pragma once

#include <cstdint>
#include <vector>

#include "moe/aux_loss.hpp"
#include "moe/config.hpp"

namespace cuda_test {

using moe::Index;

enum class GateKind { self, linear, fixed_random, random };
enum class ExpertKind { gelu, swiglu };

struct Case {
  moe::LayerConfig config;
  GateKind gate = GateKind::self;
  ExpertKind expert = ExpertKind::gelu;
  Index tokens = 0;
  std::uint64_t seed = 1;
  bool separate_router_input = false;  // forward_into(x, router_input, y)
  int gemm_lanes = 0;                  // a GPU device's side streams for the experts' products (0: its default)
  bool dgelu_transposed = false;       // the device's DgeluWeights::transposed (the backward's TN products)
};

// Everything one forward + backward produced, on the host.
struct Outcome {
  std::vector<float> y, dx, d_router_input;  // [T, H] each (d_router_input: separate input only)
  std::vector<std::vector<float>> grads;     // parameters() order; empty for frozen ones
  std::vector<std::int32_t> expert, row;     // [T*k]
  std::vector<Index> offsets;                // [N+1]
  std::vector<float> weights;                // [T*k]
  std::vector<std::int64_t> assignments;     // stats after this one forward
  std::int64_t dropped_slots = 0, rows_with_nonfinite = 0;
  moe::AuxLosses aux;
};

struct Inputs {
  std::vector<std::vector<float>> params;  // parameters() order, values
  std::vector<float> x, router_input, dy;  // [T, H]
  std::vector<std::uint8_t> mask;          // [T] or empty
};

// The CPU (Eigen, fp32, 1 thread) layer with these parameter values.
Outcome cpu_layer(const Case& c, const Inputs& in);

}  // namespace cuda_test
