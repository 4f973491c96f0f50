// The smallest complete use of moe: one Self-Routing MoE layer, forward, backward, a few SGD
// steps toward a target, and the routing statistics.
#include <moe/moe.hpp>

#include <cstdio>

int main() {
  using Layer = moe::MoELayer<moe::SelfRoute, moe::GeluMLP, moe::cpu::Backend>;
  Layer layer({.hidden = 64, .ffn = 256, .experts = 8, .top_k = 2}, /*seed=*/42);

  using Matrix = Layer::Matrix;
  const Matrix x = Matrix::Random(512, 64);  // 512 tokens, row-major [T, H]
  const Matrix target = Matrix::Random(512, 64) * 0.1f;

  for (int step = 0; step < 20; ++step) {
    const Matrix y = layer.forward(x);
    const Matrix dy = (y - target) / float(y.rows());  // d/dy of 0.5 * mean-over-tokens squared error
    layer.zero_grad();
    layer.backward(dy);  // fills parameter gradients, returns dL/dx (unused here)
    auto params = layer.parameters();
    moe::sgd_step(params, 0.5);
    if (step % 5 == 0) std::printf("step %2d  loss %.5f\n", step, 0.5 * (y - target).squaredNorm() / y.rows());
  }

  const moe::RoutingStats& stats = layer.stats();
  std::printf("router parameters %td, normalized entropy %.3f, max expert fraction %.3f\n",
              stats.router_parameters, stats.normalized_entropy(), stats.max_fraction());
  for (std::size_t e = 0; e < stats.assignments.size(); ++e)
    std::printf("expert %zu: %.3f\n", e, stats.expert_fractions()[e]);
}
