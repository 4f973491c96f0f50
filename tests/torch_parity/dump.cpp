// tests/torch_parity/dump.cpp: runs one forward and one backward of small fp32 MoE layers and
// writes everything a PyTorch re-implementation needs to check them (tests/torch_parity/parity.py).
//
// Usage: moe_torch_parity_dump OUTPUT_DIR
//
// OUTPUT_DIR/manifest.txt, one record per line, space-separated:
//   case   NAME gate=G expert=E weights=W capacity=C load_balance=A z_loss=B hidden=H ffn=F experts=N top_k=K tokens=T
//   tensor NAME TENSOR FILE NDIM D0 D1 ...      FILE: raw little-endian float32, row-major
//   param  NAME PARAM trainable=0|1 grad=0|1    (its value is tensor PARAM, its gradient PARAM.grad)
//   scalar NAME KEY VALUE                       (aux_loss, load_balance, z_loss, dropped_slots, ...)
#include <moe/moe.hpp>

#include "manifest_writer.hpp"

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace {

static_assert(std::endian::native == std::endian::little, "the dump format is little-endian float32");

namespace fs = std::filesystem;
using moe::Index;

// Stream ids for this program's own draws (inputs, output gradients, re-initialised parameters),
// far from the library's streams.
constexpr std::uint64_t kStreamX = 1001, kStreamDy = 1002, kStreamParamBase = 2000;

using parity::Writer;

std::string_view weights_name(moe::RoutingWeights w) {
  return w == moe::RoutingWeights::softmax_over_top_k ? "softmax_over_top_k" : "softmax_then_top_k";
}

template <template <class> class Gate, template <class> class Expert>
void run_case(Writer& out, const std::string& kase, moe::LayerConfig config, Index tokens, std::uint64_t seed,
              float dy_scale = 1.0f) {
  using Layer = moe::MoELayer<Gate, Expert, moe::cpu::Backend>;
  using Matrix = typename Layer::Matrix;
  Layer layer(config, seed);
  const Index H = config.hidden;

  // Re-initialise every trainable parameter at a scale where each part of the layer matters
  // (the library's GPT-2 init has zero biases and std 0.02 weights): weights N(0, 1/fan_in),
  // biases N(0, 0.1^2). Frozen buffers (FixedRandom's projection) keep the library's values.
  std::uint64_t stream = kStreamParamBase;
  for (auto& p : layer.parameters()) {
    ++stream;
    if (!p.trainable) continue;
    const bool bias = p.shape.size() == 2 && p.name.ends_with(".bias");
    const double std_dev = bias ? 0.1 : 1.0 / std::sqrt(double(p.shape.back()));
    for (std::size_t i = 0; i < p.value.size(); ++i)
      p.value[i] = float(std_dev * moe::random::normal(seed, stream, i));
  }

  Matrix x(tokens, H), dy(tokens, H);
  for (Index t = 0; t < tokens; ++t)
    for (Index c = 0; c < H; ++c) {
      x(t, c) = float(moe::random::normal(seed, kStreamX, std::uint64_t(t * H + c)));
      dy(t, c) = dy_scale * float(moe::random::normal(seed, kStreamDy, std::uint64_t(t * H + c)));
    }

  const Matrix y = layer.forward(x);
  const Matrix dx = layer.backward(dy);

  {
    std::string header = "case " + kase;
    header += " gate=" + std::string(Layer::GateType::name);
    header += " expert=" + std::string(Layer::ExpertsType::name);
    header += " weights=" + std::string(weights_name(config.weights));
    char numbers[512];
    std::snprintf(numbers, sizeof numbers,
                  " capacity=%.17g load_balance=%.17g z_loss=%.17g hidden=%td ffn=%td experts=%td top_k=%td tokens=%td",
                  config.capacity_factor, config.aux.load_balance, config.aux.z_loss, config.hidden, config.ffn,
                  config.experts, config.top_k, tokens);
    out.line(header + numbers);
  }
  out.matrix(kase, "x", moe::ConstMatrixView<float>(x));
  out.matrix(kase, "dy", moe::ConstMatrixView<float>(dy));
  out.matrix(kase, "y", moe::ConstMatrixView<float>(y));
  out.matrix(kase, "dx", moe::ConstMatrixView<float>(dx));
  out.matrix(kase, "logits", layer.last_logits());
  for (auto& p : layer.parameters()) {
    out.line("param " + kase + " " + p.name + " trainable=" + (p.trainable ? "1" : "0") +
             " grad=" + (p.grad.empty() ? "0" : "1"));
    out.tensor(kase, p.name, p.shape, p.value.data(), p.value.size());
    if (!p.grad.empty()) out.tensor(kase, p.name + ".grad", p.shape, p.grad.data(), p.grad.size());
  }
  out.scalar(kase, "aux_loss", layer.aux_loss());
  out.scalar(kase, "load_balance", layer.aux_losses().load_balance);
  out.scalar(kase, "z_loss", layer.aux_losses().z_loss);
  out.scalar(kase, "dropped_slots", layer.last_plan().dropped_slots);
  out.scalar(kase, "capacity", layer.last_plan().capacity);
  out.scalar(kase, "router_parameters", layer.router_parameter_count());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUTPUT_DIR\n", argv[0]);
    return 2;
  }
  try {
    const fs::path dir = argv[1];
    fs::create_directories(dir);
    Writer out(dir);

    using moe::RoutingWeights;
    const moe::LayerConfig base{.hidden = 32, .ffn = 64, .experts = 8, .top_k = 2};

    // Every gate with the GPT-2 expert.
    run_case<moe::SelfRoute, moe::GeluMLP>(out, "self_gelu", base, 64, 11);
    run_case<moe::Linear, moe::GeluMLP>(out, "linear_gelu", base, 72, 12);
    run_case<moe::FixedRandom, moe::GeluMLP>(out, "fixed_gelu", base, 80, 13);
    run_case<moe::Random, moe::GeluMLP>(out, "random_gelu", base, 56, 14);
    // The gated expert.
    run_case<moe::SelfRoute, moe::SwiGLU>(out, "self_swiglu", base, 64, 21);
    run_case<moe::Linear, moe::SwiGLU>(out, "linear_swiglu", base, 96, 22);

    // Switch-style weights: softmax over all N, no renormalisation.
    moe::LayerConfig then_top_k = base;
    then_top_k.weights = RoutingWeights::softmax_then_top_k;
    run_case<moe::Linear, moe::GeluMLP>(out, "linear_gelu_softmax_then_top_k", then_top_k, 64, 31);

    // Auxiliary losses on.
    moe::LayerConfig aux = base;
    aux.aux = {.load_balance = 0.01, .z_loss = 0.001};
    run_case<moe::Linear, moe::GeluMLP>(out, "linear_gelu_aux", aux, 88, 41);
    // ... and alone (dy = 0): the only gradient is the auxiliary losses', into x and the router,
    // where above it is a small share of the total.
    run_case<moe::Linear, moe::GeluMLP>(out, "linear_gelu_aux_only", aux, 88, 42, /*dy_scale=*/0.0f);

    // Capacity 1.0: ceil(T k / N) rows per expert, overflow dropped.
    moe::LayerConfig capacity = base;
    capacity.capacity_factor = 1.0;
    run_case<moe::Linear, moe::GeluMLP>(out, "linear_gelu_capacity", capacity, 77, 51);

    // Everything at once on the parameter-free gate: aux losses into x, drops, unnormalised weights.
    moe::LayerConfig combined = base;
    combined.weights = RoutingWeights::softmax_then_top_k;
    combined.capacity_factor = 1.0;
    combined.aux = {.load_balance = 0.01, .z_loss = 0.001};
    run_case<moe::SelfRoute, moe::SwiGLU>(out, "self_swiglu_all", combined, 100, 61);

    out.finish();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_torch_parity_dump: %s\n", e.what());
    return 1;
  }
  return 0;
}
