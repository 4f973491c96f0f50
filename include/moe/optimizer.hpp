// moe/optimizer.hpp: plain SGD over ParamRefs, enough to train a layer and to show that frozen
// parameters stay put. (Full training machinery lives with the examples' nn pieces.)
#pragma once

#include <span>
#include <vector>

#include "moe/tensor.hpp"

namespace moe {

// value -= lr * grad for every trainable parameter; frozen ones are skipped.
template <class Scalar>
void sgd_step(std::span<ParamRef<Scalar>> params, double learning_rate) {
  for (auto& p : params) {
    if (!p.trainable || p.grad.empty()) continue;
    for (std::size_t i = 0; i < p.value.size(); ++i) p.value[i] -= Scalar(learning_rate) * p.grad[i];
  }
}

template <class Scalar>
void sgd_step(std::vector<ParamRef<Scalar>>& params, double learning_rate) {
  sgd_step(std::span<ParamRef<Scalar>>(params), learning_rate);
}

}  // namespace moe
