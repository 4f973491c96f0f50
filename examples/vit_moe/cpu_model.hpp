// examples/vit_moe/cpu_model.hpp: the ViT MoE model (model.hpp) on the CPU backend:
// DenseModel<S>, MoEModel<Gate, S> and with_variant<S>(name, fn), S = float to train, double for
// gradient checks.
#pragma once

#include <string_view>
#include <utility>

#include "../common/nn_ops_cpu.hpp"
#include "model.hpp"
#include "moe/moe.hpp"

namespace vit {

template <class S>
using DenseModel = Model<DenseMLP<moe::cpu::BasicBackend<S>>>;
template <template <class> class Gate, class S>
using MoEModel = Model<MoEFFN<Gate, moe::cpu::BasicBackend<S>>>;

// with_variant_on (model.hpp) for the CPU model of scalar S, e.g.
//   with_variant<float>(name, [&](auto tag) { typename decltype(tag)::type model(config); ... });
template <class S, class Fn>
decltype(auto) with_variant(std::string_view name, Fn&& fn) {
  return with_variant_on<moe::cpu::BasicBackend<S>>(name, std::forward<Fn>(fn));
}

}  // namespace vit
