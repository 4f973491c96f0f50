// tests/cuda/cpu_reference.cpp: cpu_layer, the CPU MoELayer the CUDA backend is held up against.
#include "cpu_reference.hpp"

#include <moe/moe.hpp>

#include <algorithm>

namespace cuda_test {
namespace {

template <template <class> class G, template <class> class E>
Outcome run(const Case& c, const Inputs& in) {
  using B = moe::cpu::Backend;
  moe::MoELayer<G, E, B> layer(c.config, c.seed, {}, {}, B(1));
  auto params = layer.parameters();
  moe::check(params.size() == in.params.size(), "cpu_layer: ", in.params.size(), " parameter tensors for ",
             params.size());
  for (std::size_t i = 0; i < params.size(); ++i) std::copy(in.params[i].begin(), in.params[i].end(), params[i].value.begin());

  const Index T = c.tokens, H = c.config.hidden;
  Outcome out;
  out.y.assign(T * H, 0.f), out.dx.assign(T * H, 0.f);
  const moe::ConstMatrixView<float> x(in.x.data(), T, H), dy(in.dy.data(), T, H);
  const moe::MatrixView<float> y(out.y.data(), T, H), dx(out.dx.data(), T, H);
  const moe::ForwardOptions options{in.mask};
  if (c.separate_router_input) {
    out.d_router_input.assign(T * H, 0.f);
    layer.forward_into(x, moe::ConstMatrixView<float>(in.router_input.data(), T, H), y, options);
    layer.backward_into(dy, dx, moe::MatrixView<float>(out.d_router_input.data(), T, H));
  } else {
    layer.forward_into(x, y, options);
    layer.backward_into(dy, dx);
  }
  for (auto& p : layer.parameters()) out.grads.emplace_back(p.grad.begin(), p.grad.end());
  const auto& plan = layer.last_plan();
  out.expert = plan.expert, out.row = plan.row, out.offsets = plan.expert_offsets;
  out.weights.assign(layer.last_weights().begin(), layer.last_weights().end());
  out.assignments = layer.stats().assignments;
  out.dropped_slots = layer.stats().dropped_slots;
  out.rows_with_nonfinite = layer.stats().rows_with_nonfinite;
  out.aux = layer.aux_losses();
  return out;
}

template <template <class> class G>
Outcome run_gate(const Case& c, const Inputs& in) {
  return c.expert == ExpertKind::gelu ? run<G, moe::GeluMLP>(c, in) : run<G, moe::SwiGLU>(c, in);
}

}  // namespace

Outcome cpu_layer(const Case& c, const Inputs& in) {
  switch (c.gate) {
    case GateKind::self: return run_gate<moe::SelfRoute>(c, in);
    case GateKind::linear: return run_gate<moe::Linear>(c, in);
    case GateKind::fixed_random: return run_gate<moe::FixedRandom>(c, in);
    case GateKind::random: return run_gate<moe::Random>(c, in);
  }
  moe::fail("cpu_layer: unknown gate");
}

}  // namespace cuda_test
