// moe/cuda/multi_tensor.hpp: one launch over the elements of many tensors (PyTorch's
// multi_tensor_apply, on the device interface of moe/cuda/device.hpp).
//
// An optimizer step or a gradient norm touches every parameter tensor of a model: GPT-2 small with
// MoE blocks has about 170, most of them small (LayerNorm scales, biases). A launch per tensor costs
// a few microseconds of launch each, longer than the small tensors' own work. Here the tensors go
// in launches of up to `Capacity` at once, their descriptions passed in the kernel's parameters (a
// table under 4 KB, CUDA's long-standing limit), so nothing is uploaded and nothing waits.
//
// Each tensor of n elements is cut into units = ceil(n / chunk) units; unit q takes the elements
// q, q + units, q + 2 units, ... (about `chunk` of them), so neighbouring threads read neighbouring
// elements (coalesced on the GPU). A unit belongs to exactly one tensor, so every element has one
// writer and the results do not depend on how the tensors are grouped into launches.
#pragma once

#include <cstddef>
#include <span>

#include "moe/config.hpp"
#include "moe/host_device.hpp"

namespace moe::cuda {

// Bytes of kernel parameters a table may take (the rest of the 4 KB: the body's own captures).
inline constexpr std::size_t kTensorTableBytes = 3072;

// Up to `Capacity` tensors of one launch: tensor[t] and the first of its units (first_unit[count]
// is the launch's total).
template <class Tensor, int Capacity>
struct TensorTable {
  Tensor tensor[Capacity];
  Index first_unit[Capacity + 1];
  int count = 0;

  // The tensor that unit u (< first_unit[count]) belongs to: the last t with first_unit[t] <= u.
  MOE_HOST_DEVICE int find(Index u) const {
    int low = 0, high = count - 1;
    while (low < high) {
      const int mid = (low + high + 1) / 2;
      if (first_unit[mid] <= u)
        low = mid;
      else
        high = mid - 1;
    }
    return low;
  }
};

// How many units a tensor of n elements takes, about `chunk` elements each.
MOE_HOST_DEVICE inline Index units_of(Index n, Index chunk) { return (n + chunk - 1) / chunk; }

// The most tensors of type Tensor one launch takes.
template <class Tensor>
inline constexpr int kTensorsPerLaunch = int(kTensorTableBytes / (sizeof(Tensor) + sizeof(Index)));

// body(tensor, q, units) for every unit q in [0, units) of every tensor (Tensor has an Index `n`,
// its element count; empty tensors take no unit), tensors in launches of kTensorsPerLaunch.
template <class Tensor, class D, class Body>
void for_each_tensor_unit(const D& device, std::span<const Tensor> tensors, Index chunk, Body body) {
  constexpr int kCapacity = kTensorsPerLaunch<Tensor>;
  static_assert(kCapacity >= 8, "moe::cuda::for_each_tensor_unit: a tensor description this large leaves a table of few tensors");
  using Table = TensorTable<Tensor, kCapacity>;
  std::size_t next = 0;
  while (next < tensors.size()) {
    Table table;
    Index units = 0;
    for (; next < tensors.size() && table.count < kCapacity; ++next) {
      if (tensors[next].n <= 0) continue;
      table.tensor[table.count] = tensors[next];
      table.first_unit[table.count++] = units;
      units += units_of(tensors[next].n, chunk);
    }
    table.first_unit[table.count] = units;
    if (units == 0) continue;
    auto launch = [=] MOE_HOST_DEVICE(Index u) {
      const int t = table.find(u);
      body(table.tensor[t], u - table.first_unit[t], table.first_unit[t + 1] - table.first_unit[t]);
    };
    static_assert(sizeof(launch) + sizeof(Index) <= 4096, "moe::cuda::for_each_tensor_unit: the launch's parameters pass 4 KB");
    device.for_each(units, launch);
  }
}

// body(tensor, j) for every element j of every tensor (elementwise work: any grouping gives the same
// results).
template <class Tensor, class D, class Body>
void for_each_tensor_element(const D& device, std::span<const Tensor> tensors, Index chunk, Body body) {
  for_each_tensor_unit(device, tensors, chunk, [=] MOE_HOST_DEVICE(const Tensor& tensor, Index q, Index units) {
    for (Index j = q; j < tensor.n; j += units) body(tensor, j);
  });
}

// body(tensor, first, count) for every pack of W consecutive elements [first, first + count) of
// every tensor (count = W but in a tensor's last pack), in units as for_each_tensor_unit's: unit q
// takes packs q, q + units, q + 2 units, ..., so neighbouring threads take neighbouring packs. A
// pack lets the body move 16 bytes per load (moe/cuda/pack.hpp, W = kPackSize): one 2-byte element
// per load left AdamW and gradient clipping at 1-2 TB/s of an H200's ~4.3.
template <Index W, class Tensor, class D, class Body>
void for_each_tensor_pack(const D& device, std::span<const Tensor> tensors, Index chunk, Body body) {
  for_each_tensor_unit(device, tensors, chunk, [=] MOE_HOST_DEVICE(const Tensor& tensor, Index q, Index units) {
    const Index packs = (tensor.n + W - 1) / W;
    for (Index p = q; p < packs; p += units) {
      const Index first = p * W;
      body(tensor, first, tensor.n - first < W ? tensor.n - first : W);
    }
  });
}

}  // namespace moe::cuda
