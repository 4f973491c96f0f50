// A project outside the moe tree, built against the installed package.
#include <moe/moe.hpp>
#include <moe/nn.hpp>

int main() {
  moe::MoELayer<moe::SelfRoute, moe::GeluMLP, moe::cpu::Backend> layer({.hidden = 16, .ffn = 32, .experts = 4, .top_k = 2}, 7);
  moe::cpu::Backend::Matrix x = moe::cpu::Backend::Matrix::Ones(3, 16);
  auto y = layer.forward(x);
  auto dx = layer.backward(y);
  return (y.rows() == 3 && dx.cols() == 16 && layer.router_parameter_count() == 0) ? 0 : 1;
}
