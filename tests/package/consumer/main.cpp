// A project outside the moe tree, built against the installed package: a layer of each gate kind
// trained a step (forward, backward, clipping, AdamW).
#include <moe/moe.hpp>
#include <moe/nn.hpp>

template <template <class> class Gate, template <class> class Experts>
bool trains() {
  moe::MoELayer<Gate, Experts, moe::cpu::Backend> layer({.hidden = 16, .ffn = 32, .experts = 4, .top_k = 2}, 7);
  moe::cpu::Backend::Matrix x = moe::cpu::Backend::Matrix::Ones(3, 16);
  auto y = layer.forward(x);
  auto dx = layer.backward(y);
  auto params = layer.parameters();
  moe::nn::clip_grad_norm(params, 1.0);
  moe::nn::AdamW<float> optimizer;
  optimizer.step(params);
  return y.rows() == 3 && dx.cols() == 16 && optimizer.step_count() == 1;
}

int main() {
  const bool self_routes = moe::MoELayer<moe::SelfRoute, moe::GeluMLP, moe::cpu::Backend>(
                               {.hidden = 16, .ffn = 32, .experts = 4, .top_k = 2}, 7)
                               .router_parameter_count() == 0;
  return self_routes && trains<moe::SelfRoute, moe::GeluMLP>() && trains<moe::Linear, moe::SwiGLU>() ? 0 : 1;
}
