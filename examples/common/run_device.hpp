// examples/common/run_device.hpp: where an example trains (--device) and in which arithmetic
// (--precision), shared by gpt2_moe and vit_moe:
//
//   cpu       the CPU model, fp32
//   cuda      the GPU (a build with CUDA and a device)
//   emulated  the GPU's code on the host (moe::cuda::EmulatedDevice): slow, for tests
//
//   fp32  exact fp32 (cuBLAS without TF32 on a GPU: what parity is checked with)
//   tf32  fp32 storage, TF32 tensor-core products (cuda only)
//   bf16  bf16 storage and products with fp32 accumulation, fp32 master weights and optimizer state
#pragma once

#include <string_view>

#include "attention_kernel.hpp"
#include "moe/config.hpp"

namespace examples {

enum class Device { cpu, cuda, emulated };
enum class Precision { fp32, tf32, bf16 };

inline Device parse_device(std::string_view name) {
  if (name == "cpu") return Device::cpu;
  if (name == "cuda") return Device::cuda;
  if (name == "emulated") return Device::emulated;
  moe::fail("--device must be cpu, cuda or emulated, got '", name, "'");
}
inline Precision parse_precision(std::string_view name) {
  if (name == "fp32") return Precision::fp32;
  if (name == "tf32") return Precision::tf32;
  if (name == "bf16") return Precision::bf16;
  moe::fail("--precision must be fp32, tf32 or bf16, got '", name, "'");
}
inline std::string_view precision_name(Precision p) {
  return p == Precision::fp32 ? "fp32" : p == Precision::tf32 ? "tf32" : "bf16";
}
// A run's precision where --precision is not given: bf16 on a GPU, fp32 elsewhere.
inline Precision default_precision(Device device) { return device == Device::cuda ? Precision::bf16 : Precision::fp32; }

// The combinations that cannot run, refused naming the flag: bf16 or TF32 on the CPU, TF32 on the
// emulated device.
inline void check_precision(Device device, Precision precision) {
  moe::check(device != Device::cpu || precision == Precision::fp32, "--precision ", precision_name(precision),
             " needs --device cuda (the CPU trains in fp32)");
  moe::check(device != Device::emulated || precision != Precision::tf32,
             "--precision tf32 needs --device cuda (the emulated device has no TF32)");
}
// --attention chooses between the device models' two attentions: the CPU has one.
inline void check_attention(Device device, AttentionKernel attention) {
  moe::check(device != Device::cpu || attention == kDefaultAttention, "--attention ", attention_name(attention),
             " needs --device cuda or emulated (the CPU has one attention)");
}
// The attention a run on `device` takes from --attention (`given`: whether the flag is there,
// `value` its value; absent: the default); the flag itself is refused on the CPU, whatever it names.
inline AttentionKernel attention_from_flag(bool given, std::string_view value, Device device) {
  moe::check(!given || device != Device::cpu, "--attention needs --device cuda or emulated (the CPU has one attention)");
  return given ? parse_attention(value) : kDefaultAttention;
}

}  // namespace examples
