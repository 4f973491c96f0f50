// tests/cuda/model_parity.hpp: what the example models' device cases (gpt2_model_cases.hpp,
// vit_model_cases.hpp) share: a model's tensors as host floats, the device model started from the
// CPU model's values, and their gradients compared tensor by tensor.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <vector>

#include "cuda/compare.hpp"

namespace cuda_test {

// Every parameter's values (or gradients) of a model, as host floats, in parameters() order.
template <class Model>
std::vector<std::vector<float>> host_tensors(Model& model, bool gradients) {
  std::vector<std::vector<float>> out;
  for (auto& p : model.parameters()) {
    const auto span = gradients ? p.grad : p.value;
    std::vector<float> host(span.size());
    if (!span.empty()) model.ops().download(span, host);
    out.push_back(std::move(host));
  }
  return out;
}

// The CPU model and the device model (scalar S) hold the same names, shapes and initial values,
// the device's rounded to S; the CPU model then takes the device's values, so both start equal.
template <class S, class CpuModel, class DeviceModel>
void start_alike(CpuModel& cpu, DeviceModel& device) {
  auto cpu_params = cpu.parameters();
  auto device_params = device.parameters();
  REQUIRE(cpu_params.size() == device_params.size());
  const auto device_initial = host_tensors(device, false);
  for (std::size_t i = 0; i < cpu_params.size(); ++i) {
    CAPTURE(cpu_params[i].name);
    REQUIRE(cpu_params[i].name == device_params[i].name);
    REQUIRE(cpu_params[i].shape == device_params[i].shape);
    std::vector<float> expected(cpu_params[i].value.begin(), cpu_params[i].value.end());
    for (float& v : expected) v = float(S(v));
    CHECK(device_initial[i] == expected);
    std::copy(device_initial[i].begin(), device_initial[i].end(), cpu_params[i].value.begin());
  }
}

// After both backwards: every parameter's gradient within `tolerance` (relative_error) of the CPU's.
template <class CpuModel, class DeviceModel>
void check_gradients_match(CpuModel& cpu, DeviceModel& device, double tolerance) {
  const auto cpu_params = cpu.parameters();
  const auto cpu_grads = host_tensors(cpu, true), device_grads = host_tensors(device, true);
  for (std::size_t i = 0; i < cpu_grads.size(); ++i) {
    CAPTURE(cpu_params[i].name);
    CHECK(relative_error(device_grads[i], cpu_grads[i]) < tolerance);
  }
}

}  // namespace cuda_test
