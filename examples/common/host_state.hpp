// examples/common/host_state.hpp: a model's training state as host floats, whichever world the
// model lives in: its parameters (the fp32 master weights where its optimizer keeps them, as for
// bf16) and AdamW's step count and moments. Checkpoints go through it, so a file written from a
// GPU's model is the CPU model's file, and loads into either. No Eigen, no CUDA headers.
#pragma once

#include <algorithm>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/config.hpp"
#include "moe/tensor.hpp"

namespace examples {

// AdamW's state in host memory: step count and, per parameter, the moments (empty where the
// parameter was never updated).
struct OptimizerState {
  int step = 0;
  std::vector<std::vector<float>> m, v;
};

namespace host_state_detail {

// The host list must be the model's: same names, same sizes, same order.
template <class S>
void check_list(std::string_view who, std::span<const moe::ParamRef<float>> host, std::span<const moe::ParamRef<S>> ours) {
  moe::check(host.size() == ours.size(), who, ": ", host.size(), " host parameters for a model with ", ours.size());
  for (std::size_t i = 0; i < host.size(); ++i)
    moe::check(host[i].name == ours[i].name && host[i].value.size() == ours[i].value.size(), who, ": host parameter ", i,
               " is '", host[i].name, "' with ", host[i].value.size(), " values, the model's is '", ours[i].name,
               "' with ", ours[i].value.size());
}
// A CPU fp32 model asked to copy into (or from) its own tensors: nothing to do.
template <class S>
bool same_memory(std::span<const float> host, std::span<const S> ours) {
  return static_cast<const void*>(host.data()) == static_cast<const void*>(ours.data());
}
template <class T>
std::vector<std::vector<float>> to_float(const std::vector<std::vector<T>>& in) {
  std::vector<std::vector<float>> out(in.size());
  for (std::size_t i = 0; i < in.size(); ++i) out[i].assign(in[i].begin(), in[i].end());
  return out;
}
template <class Optimizer>
auto from_float(const std::vector<std::vector<float>>& in) {
  using Moment = typename std::remove_cvref_t<decltype(std::declval<Optimizer&>().m())>::value_type::value_type;
  std::vector<std::vector<Moment>> out(in.size());
  for (std::size_t i = 0; i < in.size(); ++i) out[i].assign(in[i].begin(), in[i].end());
  return out;
}

}  // namespace host_state_detail

// `params` (model.parameters(), taken once) -> `into` (a CPU model's host parameters of the same
// names and order): values as fp32, master weights where the optimizer keeps them; the optimizer's
// state into `state` when it is not null. A device's downloads wait for its stream.
template <class Model, class Optimizer, class S>
void download_state(std::string_view who, const Model& model, const Optimizer& optimizer,
                    std::span<moe::ParamRef<S>> params, std::vector<moe::ParamRef<float>>& into, OptimizerState* state) {
  host_state_detail::check_list<S>(who, into, params);
  std::vector<std::vector<float>> master;
  if constexpr (requires { optimizer.master_weights(); }) master = host_state_detail::to_float(optimizer.master_weights());
  for (std::size_t i = 0; i < params.size(); ++i) {
    if (i < master.size() && !master[i].empty())
      std::copy(master[i].begin(), master[i].end(), into[i].value.begin());
    else if (!host_state_detail::same_memory<S>(into[i].value, params[i].value))
      model.ops().download(params[i].value, into[i].value);
  }
  if (!state) return;
  state->step = optimizer.step_count();
  state->m = host_state_detail::to_float(optimizer.m());
  state->v = host_state_detail::to_float(optimizer.v());
}

// The reverse: `from` (host fp32 values) -> the model's parameters (rounded to its scalar; the fp32
// values kept as master weights where the optimizer keeps them), and the optimizer's state when
// `state` is not null.
template <class Model, class Optimizer, class S>
void upload_state(std::string_view who, const Model& model, Optimizer& optimizer, std::span<moe::ParamRef<S>> params,
                  std::vector<moe::ParamRef<float>>& from, const OptimizerState* state) {
  host_state_detail::check_list<S>(who, from, params);
  for (std::size_t i = 0; i < params.size(); ++i)
    if (!host_state_detail::same_memory<S>(from[i].value, params[i].value)) model.ops().upload(from[i].value, params[i].value);
  if constexpr (requires { optimizer.set_master_weights({}); }) {
    std::vector<std::vector<float>> master(from.size());
    for (std::size_t i = 0; i < from.size(); ++i) master[i].assign(from[i].value.begin(), from[i].value.end());
    optimizer.set_master_weights(master);
  }
  if (state) optimizer.set_state(state->step, host_state_detail::from_float<Optimizer>(state->m),
                                 host_state_detail::from_float<Optimizer>(state->v));
}

}  // namespace examples
