// Must NOT compile: this gate has no backward(), so MoELayer's static_assert names the concept.
#include <moe/moe.hpp>

template <class B>
struct NoBackward {
  using Scalar = typename B::Scalar;
  struct Options {};
  static constexpr std::string_view name = "no-backward";
  NoBackward(B&, const moe::LayerConfig&, std::uint64_t, Options) {}
  moe::ConstMatrixView<Scalar> forward(B&, moe::ConstMatrixView<Scalar> x) { return x; }
  bool wants_logit_gradient() const { return false; }
  std::vector<moe::ParamRef<Scalar>> parameters() { return {}; }
  moe::Index router_parameters() const { return 0; }
};

int main() {
  moe::MoELayer<NoBackward, moe::GeluMLP, moe::cpu::Backend> layer({.hidden = 8, .ffn = 8, .experts = 2, .top_k = 1}, 0);
}
